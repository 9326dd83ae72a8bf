"""Typed evidence: every detector's findings carry the mapping of its evidence dataclass, and
that mapping survives the wire (orjson out, the worker's msgspec decoder in) as the same typed
object; finding keys have one writer and one reader."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields

import orjson
import pytest

from agentwatch.detectors.findings import EVIDENCE_TYPES, evidence_of
from agentwatch.detectors.keys import key_string, parse_key
from agentwatch.detectors.registry import DETECTORS
from agentwatch.detectors.vram import VramLeakDetector, VramLeakResolvedEvidence
from agentwatch.events import Finding, GpuSample, Severity
from agentwatch.streams.pipeline import decode_events
from tests.support.contract_streams import CONTRACT_STREAMS

GIB = 1 << 30


def _findings(name: str, seed: int = 1) -> list[Finding]:
    stream = CONTRACT_STREAMS[name](seed)
    detector = DETECTORS[name](**stream.params)
    return [f for e in [*stream.warmup, *stream.events] if isinstance(e, detector.accepts)
            for f in detector.update(e)]


def _over_the_wire(finding: Finding) -> Finding:
    # What the detector agent sends (orjson of the dataclass) and the worker reads back.
    (decoded,) = decode_events("findings", orjson.dumps([finding]))
    return decoded


def test_every_registered_detector_has_an_evidence_type() -> None:
    assert sorted(EVIDENCE_TYPES) == sorted(DETECTORS)


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_evidence_round_trips_as_the_same_typed_object(name: str) -> None:
    findings = _findings(name)
    assert findings
    for finding in findings:
        typed = evidence_of(finding)
        assert type(typed) is EVIDENCE_TYPES[name][finding.resolved], finding
        # The mapping on the finding is exactly the typed object's: no key added or lost.
        assert typed.to_mapping() == dict(finding.evidence)
        decoded = _over_the_wire(finding)
        assert isinstance(decoded.evidence, Mapping)
        assert decoded == finding
        assert evidence_of(decoded) == typed


def test_vram_resolution_round_trips_as_its_own_type() -> None:
    # A leaking process that restarts: its open finding resolves with a reason.
    detector = VramLeakDetector(min_points=6)
    t0, total = 1_700_000_040.0, 8 * GIB

    def row(k: int, used: float, pid: int = 42) -> GpuSample:
        return GpuSample(ts=t0 + 5 * k, host="n1", gpu=0, pid=pid, process_name="vllm",
                         memory_used_bytes=int(used), memory_total_bytes=total)

    samples = [row(k, 2 * GIB + 3 * (1 << 20) * 5 * k) for k in range(400)]
    samples += [row(400 + k, GIB / 4) for k in range(20)]  # fell to near zero: a restart
    found = [f for s in samples for f in detector.update(s)]
    resolved = [f for f in found if f.resolved]
    assert any(not f.resolved for f in found) and resolved
    for finding in resolved:
        typed = evidence_of(finding)
        assert isinstance(typed, VramLeakResolvedEvidence)
        assert (typed.host, typed.gpu, typed.pid, typed.process_name) == ("n1", 0, 42, "vllm")
        assert evidence_of(_over_the_wire(finding)) == typed


def test_optional_fields_are_left_out_and_required_nulls_written() -> None:
    leak = next(f for f in _findings("vram_leak") if not f.resolved)
    # mib_per_inference is required: written as null when no calls were seen.
    assert "mib_per_inference" in leak.evidence
    cost = [f for f in _findings("cost_anomaly")]
    assert {"trigger" in f.evidence for f in cost} == {True, False}  # absent on resolutions
    for f in cost:
        assert set(f.evidence) - {"project", "user"} == {
            fl.name for fl in fields(EVIDENCE_TYPES["cost_anomaly"][0])
            if fl.name not in ("project", "model", "service", "user", "agent", "provider",
                               "host", "prompt_name", "prompt_version")} - (
                {"trigger"} if f.resolved else set())
        assert {k: f.evidence[k] for k in ("project", "user") if k in f.evidence} == parse_key(f.key)


def test_unreadable_evidence_reads_as_none() -> None:
    def finding(detector: str, evidence: dict, resolved: bool = False) -> Finding:
        return Finding(detector=detector, key="k", kind="x", severity=Severity.WARNING, ts=1.0,
                       value=1.0, threshold=0.0, evidence=evidence, resolved=resolved)

    assert evidence_of(finding("not_a_detector", {"a": 1})) is None
    assert evidence_of(finding("drift", {"method": "mmd"})) is None  # required fields missing
    assert evidence_of(finding("vram_leak", {"reason": "restart"}, resolved=True)) is None
    slo = next(f for f in _findings("slo") if not f.resolved)
    newer = finding("slo", {**slo.evidence, "added_by_a_newer_version": 1})
    assert evidence_of(newer) == evidence_of(slo)  # unknown keys are ignored


@pytest.mark.parametrize("key, fields", [
    ("project=shop/model=gpt-4o", {"project": "shop", "model": "gpt-4o"}),
    ("host=a/gpu=0/pid=12", {"host": "a", "gpu": "0", "pid": "12"}),
    (" service = shop /model=", {"service": "shop", "model": ""}),
    ("4bf92f3577b34da6a3ce929d0e0e4736", {}),
    ("=x/a=b=c/plain", {"a": "b=c"}),
])
def test_parse_key(key: str, fields: dict[str, str]) -> None:
    assert parse_key(key) == fields


def test_key_string_and_parse_key_are_inverse() -> None:
    names, values = ("project", "service", "user", "session"), ("shop", "agent", "u7", "s7")
    key = key_string(names, values)
    assert key == "project=shop/service=agent/user=u7/session=s7"
    assert parse_key(key) == dict(zip(names, values))
