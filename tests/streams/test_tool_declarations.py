"""Tools declared only on a log record (the operation-details event, as OpenLIT sends them) reach
the trace stage: the trace's calls are judged against them, whichever arrives first."""

from __future__ import annotations

import json

from agentwatch.broker import DEFAULT_TOPICS
from agentwatch.detectors.tools import HallucinatedToolDetector
from agentwatch.streams.dataflow import Dataflow, Record
from agentwatch.streams.normalize import Normalizer
from agentwatch.streams.pipeline import SpanPipeline
from agentwatch.streams.pricing import PricingTable
from tests.streams.streams_otlp_helpers import logs_payload
from tests.support.dataflow_testing import SpanSpec, otlp_traces

TRACE, ROOT, CHAT = 0x0AF7651916CD43DD8448EB211C80319C, 0x00F067AA0BA902B7, 0xB7AD6B7169203331
DEFINITIONS = json.dumps([{"name": "search", "parameters": {"type": "object"}}])


def dataflow() -> Dataflow:
    mapper = SpanPipeline(Normalizer(PricingTable.load()), DEFAULT_TOPICS)
    return Dataflow(partitions=DEFAULT_TOPICS, build_detectors=lambda: [HallucinatedToolDetector()], mapper=mapper)


def logs_record() -> Record:
    payload = logs_payload([{"trace_id": TRACE, "span_id": CHAT,
                             "event_name": "gen_ai.client.inference.operation.details",
                             "attributes": {"gen_ai.tool.definitions": DEFINITIONS},
                             "timestamp": 1_700_000_001_000_000_000}])
    return Record("otlp_logs", 0, 0, payload)


def spans_record(root: bool = True) -> Record:
    trace, root_id = TRACE.to_bytes(16, "big"), ROOT.to_bytes(8, "big")

    def tool(span: int, name: str, at: float) -> SpanSpec:
        return SpanSpec(trace, span.to_bytes(8, "big"), f"execute_tool {name}", at, at + 0.1, {
            "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": name, "gen_ai.tool.call.arguments": "{}"},
            parent_id=root_id)

    spans = [tool(0x11, "search", 1_700_000_002.0), tool(0x12, "delete_all", 1_700_000_003.0)]
    if root:
        spans.append(SpanSpec(trace, root_id, "invoke_agent a", 1_700_000_000.0, 1_700_000_004.0,
                              {"gen_ai.operation.name": "invoke_agent"}))
    return Record("otlp_spans", 0, 0, otlp_traces(spans))


def run(flow: Dataflow, record: Record, offsets: dict) -> list:
    """The record through the map stage, then what it sent through the trace stage; the findings."""
    findings = list(flow.on_record(record).findings)
    mapped = flow.on_record(record)
    for send in mapped.sends:
        if send.topic in ("tool_calls", "agent_steps", "llm_calls", "tool_declarations"):
            at = offsets.setdefault((send.topic, send.partition), 0)
            offsets[(send.topic, send.partition)] += 1
            findings += flow.on_record(Record(send.topic, send.partition, at, send.value)).findings
    return findings


def test_the_map_stage_sends_log_declarations_to_the_trace_partition_of_their_trace():
    out = dataflow().on_record(logs_record())
    sends = [s for s in out.sends if s.topic == "tool_declarations"]
    assert len(sends) == 1
    spans_out = dataflow().on_record(spans_record())
    assert {s.partition for s in spans_out.sends if s.topic == "tool_calls"} == {sends[0].partition}
    assert json.loads(sends[0].value)[0]["tool_definitions"] == '[{"name":"search","parameters":{"type":"object"}}]'


def test_declared_on_a_log_record_first_then_the_calls():
    flow, offsets = dataflow(), {}
    assert run(flow, logs_record(), offsets) == []
    found = run(flow, spans_record(), offsets)
    assert [(f.kind, f.evidence["tool"]) for f in found] == [("undeclared_tool", "delete_all")]


def test_the_calls_first_then_the_log_record_declares():
    # The root span came with the calls, but the trace had declared nothing on its spans: the
    # calls wait for the log record instead of being judged against nothing.
    flow, offsets = dataflow(), {}
    assert run(flow, spans_record(), offsets) == []
    assert run(flow, logs_record(), offsets) == []  # "search" is settled as declared
    # Later traffic in the partition (the detector's clock is event time) ends the grace period.
    later = SpanSpec(TRACE.to_bytes(16, "big"), (0x99).to_bytes(8, "big"), "execute_tool search",
                     1_700_000_100.0, 1_700_000_100.1, {"gen_ai.operation.name": "execute_tool",
                                                        "gen_ai.tool.name": "search"})
    found = run(flow, Record("otlp_spans", 0, 1, otlp_traces([later])), offsets)
    assert [(f.kind, f.evidence["tool"]) for f in found] == [("undeclared_tool", "delete_all")]
