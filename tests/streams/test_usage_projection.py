"""Usage records carry only the LlmCall fields their family's detectors declare they read
(``llm_call_reads``): those detectors must find exactly what they find on whole calls.

Two checks per keyed detector that reads calls, over every call of every contract stream:
what ``update`` reads is among what it declares (a recording view catches a field read but not
declared, which would arrive as its default), and its findings on calls sent through the usage
encoding and decoding (:func:`usage_payloads`, :func:`decode_usage`) equal its findings on the
whole calls.
"""

from __future__ import annotations

import dataclasses

import pytest

from agentwatch.detectors.registry import DETECTORS
from agentwatch.events import LlmCall
from agentwatch.streams.dataflow import LlmCallView, Topology, decode_usage, usage_payloads
from tests.support.contract_streams import CONTRACT_STREAMS

KEYED = sorted(name for name, cls in DETECTORS.items()
               if LlmCall in cls.accepts and getattr(cls, "partition_by", "") != "trace_id")
FIELDS = frozenset(f.name for f in dataclasses.fields(LlmCall))
IDENTITY = ("ts", "trace_id", "span_id")


def _all_events(name: str, seed: int) -> list:
    """The detector's own contract stream, then every call of the other contract streams."""
    own = CONTRACT_STREAMS[name](seed)
    events = [*own.warmup, *own.events, *own.flood]
    for other in sorted(CONTRACT_STREAMS):
        if other != name:
            stream = CONTRACT_STREAMS[other](seed)
            events += [e for e in (*stream.warmup, *stream.events) if isinstance(e, LlmCall)]
    return events


class _Recording:
    """An LlmCall that notes which of its fields are read."""

    def __init__(self, call: LlmCall, read: set[str]) -> None:
        self._call, self._read = call, read

    def __getattr__(self, name: str):
        if name in FIELDS:
            self._read.add(name)
        return getattr(self._call, name)


def test_the_keyed_detectors_that_read_calls_all_declare_what_they_read():
    assert KEYED, "no keyed detector reads calls?"
    missing = [name for name in KEYED if getattr(DETECTORS[name](**CONTRACT_STREAMS[name](1).params),
                                                 "llm_call_reads", None) is None]
    assert not missing, f"declare llm_call_reads on {missing} (or its usage records carry whole calls)"


@pytest.mark.parametrize("name", KEYED)
@pytest.mark.parametrize("seed", (1, 7))
def test_a_detector_reads_only_the_fields_it_declares(name: str, seed: int) -> None:
    cls, params = DETECTORS[name], CONTRACT_STREAMS[name](seed).params
    det = cls(**params)
    read: set[str] = set()
    for event in _all_events(name, seed):
        if isinstance(event, LlmCall):
            det.update(_Recording(event, read))  # type: ignore[arg-type]
        elif isinstance(event, cls.accepts):
            det.update(event)
    assert read, f"{name} read no field of any call: the stream does not exercise it"
    assert read <= det.llm_call_reads, f"{name} reads {sorted(read - det.llm_call_reads)} without declaring them"


@pytest.mark.parametrize("name", KEYED)
@pytest.mark.parametrize("seed", (1, 7))
def test_findings_on_projected_calls_equal_those_on_whole_calls(name: str, seed: int) -> None:
    cls, params = DETECTORS[name], CONTRACT_STREAMS[name](seed).params
    whole, projected = cls(**params), cls(**params)
    fields = tuple(f for f in (f.name for f in dataclasses.fields(LlmCall))
                   if f in {*whole.llm_call_reads, *IDENTITY})
    found_whole, found_projected, calls = [], [], 0
    for event in _all_events(name, seed):
        if isinstance(event, LlmCall):
            calls += 1
            (payload,) = usage_payloads([event], fields, 1 << 20)
            (view,) = decode_usage("llm_calls", payload)
            assert isinstance(view, LlmCallView)
            found_projected += projected.update(view)
        elif isinstance(event, cls.accepts):
            found_projected += projected.update(event)
        else:
            continue
        found_whole += whole.update(event)
    assert calls
    assert found_projected == found_whole
    assert whole.snapshot() == projected.snapshot()


def test_a_family_carries_the_union_of_its_detectors_reads_and_its_own_field():
    detectors = [DETECTORS[name](**CONTRACT_STREAMS[name](1).params) for name in KEYED]
    topology = Topology.of(detectors)
    for family, fields in topology.llm_call_fields.items():
        assert fields is not None
        wanted = {*IDENTITY, family, *(f for d in detectors if d.partition_by == family for f in d.llm_call_reads)}
        assert set(fields) >= wanted
    assert "response" not in {f for fs in topology.llm_call_fields.values() for f in fs or ()}


def test_a_detector_that_declares_nothing_gets_whole_calls():
    class Undeclared:
        name = "undeclared"
        partition_by = "project"
        accepts = (LlmCall,)

    detectors = [DETECTORS["budget"](), Undeclared()]
    assert Topology.of(detectors).llm_call_fields["project"] is None


@pytest.mark.parametrize("limit", (50, 400, 4_000, 1 << 20))
def test_usage_payloads_keep_every_call_in_order_under_the_record_limit(limit: int) -> None:
    prompts = ["", "hi", "x" * 300, "안녕 " * 500, "y" * 3_000]
    calls = [LlmCall(ts=float(i), trace_id=f"t{i}", span_id=f"s{i}", project="p", prompt=prompts[i % 5],
                     cost_usd=0.01 * i, time_to_first_token_ms=None if i % 2 else 12.5) for i in range(40)]
    fields = ("ts", "trace_id", "span_id", "project", "prompt", "cost_usd", "time_to_first_token_ms")
    payloads = usage_payloads(calls, fields, limit)
    decoded = [call for payload in payloads for call in decode_usage("llm_calls", payload)]
    assert [(c.trace_id, c.prompt, c.cost_usd, c.time_to_first_token_ms) for c in decoded] == \
        [(c.trace_id, c.prompt, c.cost_usd, c.time_to_first_token_ms) for c in calls]
    for payload in payloads:
        # Over the limit only when one call alone is.
        assert len(payload) <= limit or len(decode_usage("llm_calls", payload)) == 1
    assert len(payloads) == 1 or limit < sum(map(len, payloads))
