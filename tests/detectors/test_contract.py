"""One contract over every registered detector (river's ``check_estimator`` idea).

Each registered detector has its sample streams in ``tests/support/contract_streams.py``
(``CONTRACT_STREAMS[name](seed)``) and reports its state size through ``state_size()``. A
registered detector without them FAILS here, on purpose: nobody forgets the contract.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from agentwatch.detectors.base import Detector
from agentwatch.detectors.registry import DETECTORS
from agentwatch.events import Finding
from tests.support.contract_streams import CONTRACT_STREAMS, ContractStream

SEEDS = (1, 7)
NAMES = sorted(DETECTORS)


def _stream(cls: type, seed: int) -> ContractStream:
    provider = CONTRACT_STREAMS.get(cls.name)
    assert provider is not None, (
        f"{cls.__name__} is registered as {cls.name!r} but has no contract stream: add a function "
        "returning ContractStream to tests/support/contract_streams.py and list it in "
        "CONTRACT_STREAMS; every registered detector needs one")
    stream = provider(seed)
    assert isinstance(stream, ContractStream), f"CONTRACT_STREAMS[{cls.name!r}] must return ContractStream"
    return stream


def test_every_contract_stream_belongs_to_a_registered_detector() -> None:
    # A renamed or removed detector must not leave its stream behind, untested.
    assert sorted(CONTRACT_STREAMS) == NAMES


def _feed(det: Any, events) -> list[Finding]:
    out: list[Finding] = []
    accepts = type(det).accepts
    for event in events:
        if not isinstance(event, accepts):
            continue  # the runner routes only accepted types; so does the contract
        found = det.update(event)
        assert isinstance(found, (list, tuple)), f"update returned {type(found).__name__}"
        out.extend(found)
    return out


def _json_round_trip(snap: dict[str, Any]) -> dict[str, Any]:
    # allow_nan=False: NaN/Infinity are not JSON, a checkpoint store would reject them.
    return json.loads(json.dumps(snap, allow_nan=False))


@pytest.mark.parametrize("name", NAMES)
def test_registered_under_its_name_and_shaped_like_a_detector(name: str) -> None:
    cls = DETECTORS[name]
    assert cls.name == name
    assert cls.accepts and all(isinstance(t, type) for t in cls.accepts)
    stream = _stream(cls, SEEDS[0])
    det = cls(**stream.params)
    assert isinstance(det, Detector)
    assert callable(getattr(det, "state_size", None)), f"{cls.__name__} needs state_size()"
    for arg, value in stream.params.items():  # constructor arguments are stored under their names
        stored = getattr(det, arg)
        assert json.loads(json.dumps(stored, default=list)) == json.loads(
            json.dumps(value, default=list)), arg


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", SEEDS)
def test_no_findings_in_warmup_and_findings_after(name: str, seed: int) -> None:
    cls = DETECTORS[name]
    stream = _stream(cls, seed)
    det = cls(**stream.params)
    assert stream.warmup and stream.events
    assert _feed(det, stream.warmup) == []
    after = _feed(det, stream.events)
    assert any(not f.resolved for f in after), "the contract events must cause a finding"
    for f in after:
        assert isinstance(f, Finding) and f.detector == name
        json.dumps(dict(f.evidence), allow_nan=False)  # evidence is JSON-able


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", SEEDS)
def test_snapshot_restore_round_trip(name: str, seed: int) -> None:
    cls = DETECTORS[name]
    stream = _stream(cls, seed)
    events = list(stream.warmup) + list(stream.events)
    reference = cls(**stream.params)
    per_event = [_feed(reference, [e]) for e in events]
    n = len(events)
    splits = sorted({len(stream.warmup), len(stream.warmup) + len(stream.events) // 2, n - 1})
    for split in splits:
        first = cls(**stream.params)
        _feed(first, events[:split])
        snap = _json_round_trip(first.snapshot())
        restored = cls(**stream.params)
        restored.restore(snap)
        expected = [f for found in per_event[split:] for f in found]
        assert _feed(restored, events[split:]) == expected, f"diverged after restore at {split}"
        # restoring twice / snapshotting a restored detector gives the same state
        assert _json_round_trip(restored.snapshot()) == _json_round_trip(
            reference.snapshot()), f"state differs after restore at {split}"


@pytest.mark.parametrize("name", NAMES)
def test_a_fresh_detector_snapshot_is_strict_json_and_restores(name: str) -> None:
    # A worker checkpoints detectors that may not have seen any event yet (a configured budget
    # with no spend): their initial state must survive the same JSON round trip.
    cls = DETECTORS[name]
    params = _stream(cls, SEEDS[0]).params
    fresh = cls(**params)
    restored = cls(**params)
    restored.restore(_json_round_trip(fresh.snapshot()))
    assert _json_round_trip(restored.snapshot()) == _json_round_trip(fresh.snapshot())


@pytest.mark.parametrize("name", NAMES)
def test_deterministic(name: str) -> None:
    cls = DETECTORS[name]
    runs = []
    for _ in range(2):
        stream = _stream(cls, SEEDS[1])
        det = cls(**stream.params)
        runs.append(_feed(det, list(stream.warmup) + list(stream.events)))
    assert runs[0] == runs[1]
    assert runs[0], "the contract stream must produce findings to compare"


@pytest.mark.parametrize("name", NAMES)
def test_bounded_state(name: str) -> None:
    cls = DETECTORS[name]
    stream = _stream(cls, SEEDS[0])
    det = cls(**stream.params)
    cap = stream.state_cap
    flood = list(stream.flood)
    assert len(flood) >= 4 * cap, "the flood must bring far more keys than the cap"
    half_size = None
    for i, event in enumerate(flood, 1):
        _feed(det, [event])
        if i % 50 == 0 or i == len(flood):
            assert det.state_size() <= cap, f"state {det.state_size()} > cap {cap} at {i}"
        if i == len(flood) // 2:
            half_size = len(json.dumps(det.snapshot()))
    end_size = len(json.dumps(det.snapshot()))
    # Past the cap the checkpoint stops growing (key strings get a little longer, no more).
    assert end_size <= 1.5 * half_size, (half_size, end_size)
