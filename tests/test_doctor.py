"""`agentwatch doctor`: what it finds in snapshots and dead letters, and how it says so."""

from __future__ import annotations

import dataclasses
import json
import re
import socket
import time
from types import SimpleNamespace

import orjson
import pytest
from click.testing import CliRunner
from kafka.errors import KafkaTimeoutError, UnsupportedVersionError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from agentwatch.cli import main
from agentwatch.doctor import (KINDS, NOTE, DeadLetterCheck, DeadLetterRead, DeadLetterRecord, Problem,
                               ServiceCounts, build_report, check_dead_letters, dead_letter_problems,
                               read_dead_letters, render_text, report_to_json, snapshot_problems)
from agentwatch.events import AgentStep, LlmCall, ToolCall
from agentwatch.streams.snapshots import SnapshotSink, connect

T0 = 1_700_000_000.0
SINCE, UNTIL = T0 - 900, T0 + 100


def _call(i: int, service: str = "shop", **kw) -> dict:
    base = LlmCall(ts=T0 + i, trace_id=f"t{i}", span_id=f"s{i}", service=service, project="web", model="gpt-4o",
                   operation="chat", input_tokens=10, output_tokens=5, cost_usd=0.001, priced=True)
    return {**dataclasses.asdict(base), **kw}


def _write(root, now: float = T0) -> None:
    """shop: one call with each problem among 10; billing: clean; tools-only: no model calls."""
    shift = now - T0
    shop = [
        _call(1), _call(10),
        _call(2, model=""),  # no model (and no price, which is not counted again)
        _call(3, input_tokens=0, output_tokens=0),  # no tokens
        _call(4, input_tokens=0, output_tokens=0, status="error", error="429"),  # failed: no usage expected
        _call(5, model="my-llm", priced=False, cost_usd=0.0),
        _call(6, operation=""),
        _call(7, input_tokens=None, cost_usd=None,
              invalid_fields="input_tokens:above_max,cost_usd:from_invalid_tokens"),
        _call(8, input_tokens=None, output_tokens=None, cost_usd=None,
              invalid_fields="input_tokens:above_max,output_tokens:not_a_number"),
        _call(9, project=""),
        _call(-2000, model=""),  # before the window
    ]
    billing = [_call(20 + i, service="billing") for i in range(3)]
    nameless = [_call(30, service="")]
    for row in shop + billing + nameless:
        row["ts"] += shift
    sink = SnapshotSink(root, writer_id="test")
    sink.add_rows("llm_calls", shop + billing + nameless)
    sink.add_events([ToolCall(ts=now + 40, trace_id="t40", span_id="s40", service="tools-only", tool_name="x"),
                     ToolCall(ts=now + 41, trace_id="t41", span_id="s41", service="billing", tool_name="y")])
    sink.add_events([AgentStep(ts=now + 42 + i, trace_id="t42", span_id=f"s4{2 + i}", service="tools-only")
                     for i in range(2)])
    sink.flush(force=True)


EXPECTED = [
    Problem("", "no_service", 1, 1.0, "t30", "s30", "set service.name on the resource (OTEL_SERVICE_NAME)"),
    Problem("shop", "no_model", 1, 0.1, "t2", "s2", "set gen_ai.request.model (and gen_ai.response.model)"),
    Problem("shop", "no_tokens", 1, 0.1, "t3", "s3", "set gen_ai.usage.input_tokens and gen_ai.usage.output_tokens"),
    Problem("shop", "unpriced_model", 1, 0.1, "t5", "s5",
            "add the model to AGENTWATCH_PRICING_PATH (USD per 1M tokens)", "my-llm (1)"),
    Problem("shop", "no_operation", 1, 0.1, "t6", "s6", "set gen_ai.operation.name (chat, embeddings, ...)"),
    Problem("shop", "invalid_values", 2, 0.2, "t8", "s8",
            "send counts as integers in their unit (tokens, not thousands); or widen AGENTWATCH_VALUE_BOUNDS",
            "input_tokens:above_max (2), cost_usd:from_invalid_tokens (1), output_tokens:not_a_number (1)"),
    Problem("shop", "no_project", 1, 0.1, "t9", "s9", "set agentwatch.project on the resource"),
    Problem("tools-only", "no_model_calls", 3, None, "t42", "s43",
            "if this service calls models, set gen_ai.operation.name and gen_ai.request.model on those spans",
            "2 agent steps, 1 tool calls", severity=NOTE),
]


def test_snapshot_problems_counts_shares_examples_and_hints(tmp_path):
    _write(tmp_path)
    con = connect(tmp_path)
    assert snapshot_problems(con, since_ts=SINCE, until_ts=UNTIL) == EXPECTED
    only_billing = snapshot_problems(con, since_ts=SINCE, until_ts=UNTIL, service="billing")
    assert only_billing == []


def test_nothing_in_the_window_is_a_problem(tmp_path):
    _write(tmp_path)
    con = connect(tmp_path)
    assert snapshot_problems(con, since_ts=SINCE, until_ts=UNTIL, service="nobody") == [
        Problem("nobody", "nothing_received", 0, None, "", "", KINDS["nothing_received"][1])]
    empty = connect(tmp_path / "empty")
    report = build_report(empty, since_ts=SINCE, until_ts=UNTIL)
    assert [p.kind for p in report.problems] == ["nothing_received"] and report.exit_code == 1


def test_report_text_groups_by_service(tmp_path):
    _write(tmp_path)
    check = DeadLetterCheck(False, note="no broker here")
    report = build_report(connect(tmp_path), since_ts=SINCE, until_ts=UNTIL, dead_letters=(check, []))
    assert report.services == (ServiceCounts("", 1, 0, 0), ServiceCounts("billing", 3, 1, 0),
                               ServiceCounts("shop", 10, 0, 0), ServiceCounts("tools-only", 0, 1, 2))
    text = render_text(report)
    lines = text.splitlines()
    assert "billing: 3 model calls, 1 tool calls, 0 agent steps: OK" in lines
    assert "shop: 10 model calls, 0 tool calls, 0 agent steps" in lines
    assert "(no service.name): 1 model calls, 0 tool calls, 0 agent steps" in lines
    row = next(line for line in lines if line.strip().startswith("model calls with no model"))
    assert re.split(r"\s{2,}", row.strip()) == ["model calls with no model", "1", "10.0%", "t2", "s2",
                                                "set gen_ai.request.model (and gen_ai.response.model)"]
    assert any(line.strip() == "my-llm (1)" for line in lines)
    assert "Dead letters: not checked: no broker here" in lines
    assert "Result: 7 problems found (exit code 1)" in lines
    assert any("map to nothing is listed" in line for line in lines)  # the footnote on non-GenAI spans
    assert report.exit_code == 1


def test_report_json(tmp_path):
    _write(tmp_path)
    report = build_report(connect(tmp_path), since_ts=SINCE, until_ts=UNTIL,
                          dead_letters=(DeadLetterCheck(True, "k:9092", 0), []))
    doc = json.loads(orjson.dumps(report_to_json(report)))
    assert doc["ok"] is False
    assert doc["dead_letters"] == {"checked": True, "bootstrap_servers": "k:9092", "records": 0, "note": ""}
    assert doc["problems"][1] == {
        "service": "shop", "kind": "no_model", "severity": "problem", "what": "model calls with no model",
        "count": 1, "share": 0.1, "example_trace_id": "t2", "example_span_id": "s2",
        "hint": "set gen_ai.request.model (and gen_ai.response.model)", "detail": ""}
    assert len(doc["problems"]) == len(EXPECTED)


# -- dead letters ---------------------------------------------------------------------------------

def _kv(key: str, value: str) -> KeyValue:
    return KeyValue(key=key, value=AnyValue(string_value=value))


def _otlp(service: str, span_ids: list[bytes]) -> bytes:
    spans = [Span(trace_id=bytes([7]) * 16, span_id=sid, name="x") for sid in span_ids]
    request = ExportTraceServiceRequest(resource_spans=[ResourceSpans(
        resource=Resource(attributes=[_kv("service.name", service)]), scope_spans=[ScopeSpans(spans=spans)])])
    return request.SerializeToString()


def _letter(value: bytes | None, reason: str, topic: str, offset: int = 0, ts_ms: int = int(T0 * 1000)):
    return DeadLetterRecord(value, {"agentwatch.dlq.reason": reason, "agentwatch.dlq.topic": topic,
                                    "agentwatch.dlq.partition": "0", "agentwatch.dlq.offset": str(offset)},
                            ts_ms, 0, offset)


A, B, C = bytes([1]) * 8, bytes([2]) * 8, bytes([3]) * 8
TRACE = (bytes([7]) * 16).hex()
UNMAPPABLE = f"7 of 9 spans unmappable: span {B.hex()}: ValueError: bad; span {C.hex()}: ValueError: bad"
LETTERS = [
    # Two of three spans named; seven failed in all: the five unnamed go with the first named.
    _letter(_otlp("chat-api", [A, B, C]), UNMAPPABLE, "otlp_spans", 1),
    _letter(_otlp("chat-api", [A, B]), "normaliser error: RuntimeError: boom", "otlp_spans", 2),
    _letter(b"garbage", "undecodable otlp_spans record: not OTLP protobuf (x)", "otlp_spans", 3),
    _letter(orjson.dumps([{"service": "shop", "trace_id": "t9", "span_id": "s9", "input_tokens": "12"}]),
            "undecodable llm_calls record: Expected `int`, got `str` - at `$[0].input_tokens`", "llm_calls", 4),
    _letter(orjson.dumps({"kind": "value_rejections", "source_topic": "otlp_spans", "rejections": [
        {"table": "llm_calls", "field": "input_tokens", "reason": "above_max", "trace_id": "t7", "span_id": "s7"},
        {"table": "llm_calls", "field": "ts", "reason": "above_max", "trace_id": "t8", "span_id": "s8",
         "row": orjson.dumps({"service": "shop", "trace_id": "t8", "span_id": "s8"}).decode()}]}),
        "implausible values: 2 from otlp_spans (1x llm_calls.input_tokens above_max, 1x llm_calls.ts above_max)",
        "otlp_spans", 5),
    _letter(None, "tombstone (record with a null value)", "otlp_spans", 6),
]


def test_dead_letter_problems_by_service_and_reason():
    problems = dead_letter_problems(LETTERS)
    empty = "a producer wrote an empty record to an agentwatch topic"
    not_otlp = "the collector wrote a record that is not OTLP: check its Kafka exporter encoding (otlp_proto)"
    unmappable = "the normaliser failed on these spans: report the reason and the span to the agentwatch team"
    generic = "see the agentwatch.dlq.reason header on topic dead_letter"
    dropped = "a row was dropped for an implausible timestamp: check the span's start and end times"
    schema = ("a producer other than agentwatch wrote an event record that does not fit its schema "
              "(the reason names the field)")
    assert [(p.service, p.count, p.example_trace_id, p.example_span_id, p.hint, p.detail) for p in problems] == [
        ("", 1, "", "", empty, "tombstone (record with a null value)"),
        ("", 1, "", "", not_otlp, "undecodable otlp_spans record: not OTLP protobuf (x)"),
        ("chat-api", 7, TRACE, B.hex(), unmappable, UNMAPPABLE),
        ("chat-api", 2, TRACE, A.hex(), generic, "normaliser error: RuntimeError: boom"),
        ("shop", 1, "t8", "s8", dropped, "implausible values: 2 from otlp_spans (1x llm_calls.input_tokens "
                                         "above_max, 1x llm_calls.ts above_max)"),
        ("shop", 1, "t9", "s9", schema,
         "undecodable llm_calls record: Expected `int`, got `str` - at `$[0].input_tokens`"),
    ]
    assert all(p.kind == "dead_lettered" and p.share is None and p.severity == "problem" for p in problems)


def test_value_rejections_whose_rows_were_kept_are_not_dead_letter_problems():
    kept_only = _letter(orjson.dumps({"kind": "value_rejections", "source_topic": "otlp_spans", "rejections": [
        {"table": "llm_calls", "field": "input_tokens", "reason": "above_max", "trace_id": "t", "span_id": "s"}]}),
        "implausible values: 1 from otlp_spans (1x llm_calls.input_tokens above_max)", "otlp_spans")
    assert dead_letter_problems([kept_only]) == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_broker_given_and_none_running_says_dead_letters_were_not_checked():
    port = _free_port()
    check, problems = check_dead_letters(None, broker_port=port, since_ts=SINCE, until_ts=UNTIL)
    assert problems == [] and not check.checked
    assert check.note == (f"no --bootstrap-servers / AGENTWATCH_BOOTSTRAP_SERVERS given and no embedded broker "
                          f"listening on 127.0.0.1:{port} (is `agentwatch up` running?)")


@pytest.fixture
def listening():
    """An address something listens on (not Kafka: the tests hand check_dead_letters a fake reader)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield f"127.0.0.1:{server.getsockname()[1]}"


def test_a_bootstrap_address_nothing_listens_on_is_named():
    address = f"127.0.0.1:{_free_port()}"
    check, problems = check_dead_letters(address, broker_port=1, since_ts=SINCE, until_ts=UNTIL)
    assert not check.checked and problems == []
    assert check.note == (f"nothing is listening at {address} (--bootstrap-servers / "
                          f"AGENTWATCH_BOOTSTRAP_SERVERS)")


def test_a_broker_that_does_not_answer_is_named(listening):
    def read(bootstrap, **_):
        raise KafkaTimeoutError(f"Unable to bootstrap from {bootstrap}")

    check, problems = check_dead_letters(listening, broker_port=1, since_ts=SINCE, until_ts=UNTIL, read=read)
    assert not check.checked and problems == []
    assert check.note == (f"Kafka at {listening} did not answer: KafkaTimeoutError: KafkaTimeoutError: "
                          f"Unable to bootstrap from {listening}")


def test_checked_dead_letters_become_problems(listening):
    def read(bootstrap, **_):
        return DeadLetterRead(LETTERS[:1], truncated=True)

    check, problems = check_dead_letters(listening, broker_port=1, since_ts=SINCE, until_ts=UNTIL, read=read)
    assert check == DeadLetterCheck(True, listening, 1, "stopped after 1 dead letters; later ones were not read")
    assert [(p.service, p.count) for p in problems] == [("chat-api", 7)]
    no_topic = check_dead_letters(listening, broker_port=1, since_ts=SINCE, until_ts=UNTIL,
                                  read=lambda *_, **__: DeadLetterRead([], topic_exists=False))
    assert no_topic == (DeadLetterCheck(True, listening, note=f"no dead_letter topic on {listening} (nothing was "
                                                              "ever dead-lettered)"), [])


def test_the_embedded_broker_port_is_used_when_something_listens_there(listening):
    port = int(listening.rsplit(":", 1)[1])
    seen = []

    def read(bootstrap, **_):
        seen.append(bootstrap)
        return DeadLetterRead([])

    check, _ = check_dead_letters(None, broker_port=port, since_ts=SINCE, until_ts=UNTIL, read=read)
    assert seen == [listening] and check == DeadLetterCheck(True, listening, 0)


class FakeConsumer:
    """Just what read_dead_letters uses of kafka-python's KafkaConsumer, over one partition."""

    def __init__(self, records, *, timestamps: bool = True, **config) -> None:
        self.records = records
        self.timestamps = timestamps
        self.position = None
        self.closed = False

    def partitions_for_topic(self, topic):
        return {0} if topic == "dead_letter" else None

    def assign(self, partitions):
        self.assigned = partitions

    def offsets_for_times(self, query):
        if not self.timestamps:
            raise UnsupportedVersionError("no ListOffsets v1")
        (tp, ms), = query.items()
        first = next((r.offset for r in self.records if r.timestamp >= ms), None)
        return {tp: None if first is None else SimpleNamespace(offset=first)}

    def seek(self, tp, offset):
        self.position = offset

    def seek_to_beginning(self, *tps):
        self.position = 0

    def seek_to_end(self, tp):
        self.position = len(self.records)

    def poll(self, timeout_ms):
        batch = self.records[self.position:self.position + 2]
        self.position += len(batch)
        return {"tp": batch} if batch else {}

    def close(self):
        self.closed = True


def _kafka_record(offset: int, ts_ms: int, reason: str):
    return SimpleNamespace(offset=offset, timestamp=ts_ms, partition=0, value=b"x",
                           headers=[("agentwatch.dlq.reason", reason.encode()),
                                    ("agentwatch.dlq.topic", b"otlp_spans")])


@pytest.mark.parametrize("timestamps", [True, False])
def test_read_dead_letters_keeps_the_window(timestamps):
    since_ms = int(SINCE * 1000)
    records = [_kafka_record(i, since_ms + (i - 2) * 1000, f"r{i}") for i in range(6)]
    records.append(_kafka_record(6, int(UNTIL * 1000), "after the window"))
    made = []

    def factory(**config):
        made.append(FakeConsumer(records, timestamps=timestamps, **config))
        return made[-1]

    read = read_dead_letters("k:9092", since_ts=SINCE, until_ts=UNTIL, consumer_factory=factory)
    assert [(r.offset, r.headers["agentwatch.dlq.reason"]) for r in read.letters] == [
        (2, "r2"), (3, "r3"), (4, "r4"), (5, "r5")]
    assert read.topic_exists and not read.truncated and made[0].closed
    capped = read_dead_letters("k:9092", since_ts=SINCE, until_ts=UNTIL, consumer_factory=factory, max_records=3)
    assert len(capped.letters) == 3 and capped.truncated


# -- the command ----------------------------------------------------------------------------------

def test_command_exit_codes_and_formats(tmp_path, monkeypatch):
    monkeypatch.delenv("AGENTWATCH_BOOTSTRAP_SERVERS", raising=False)
    port = str(_free_port())
    now = time.time() - 200  # rows end up between now - 2200 s and now - 100 s
    _write(tmp_path / "bad", now=now)
    runner = CliRunner()
    bad = runner.invoke(main, ["doctor", "--data-dir", str(tmp_path / "bad"), "--broker-port", port])
    assert bad.exit_code == 1, bad.output
    assert "shop: 10 model calls, 0 tool calls, 0 agent steps" in bad.output
    assert (f"Dead letters: not checked: no --bootstrap-servers / AGENTWATCH_BOOTSTRAP_SERVERS given and no "
            f"embedded broker listening on 127.0.0.1:{port}") in bad.output
    as_json = runner.invoke(main, ["doctor", "--data-dir", str(tmp_path / "bad"), "--format", "json",
                                   "--skip-dead-letters"])
    assert as_json.exit_code == 1
    doc = json.loads(as_json.output)
    assert [(p["service"], p["kind"], p["count"]) for p in doc["problems"]] == [
        (p.service, p.kind, p.count) for p in EXPECTED]
    assert doc["dead_letters"]["note"] == "--skip-dead-letters"
    clean = runner.invoke(main, ["doctor", "--data-dir", str(tmp_path / "bad"), "--service", "billing",
                                 "--skip-dead-letters"])
    assert clean.exit_code == 0, clean.output
    assert "Result: no problems found" in clean.output
    # The window: 1m holds none of these rows.
    short = runner.invoke(main, ["doctor", "--data-dir", str(tmp_path / "bad"), "--since", "1m",
                                 "--skip-dead-letters", "--format", "json"])
    assert short.exit_code == 1
    assert [p["kind"] for p in json.loads(short.output)["problems"]] == ["nothing_received"]
    wrong = runner.invoke(main, ["doctor", "--data-dir", str(tmp_path / "bad"), "--since", "soon"])
    assert wrong.exit_code == 2 and "is not a duration" in wrong.output


def test_command_with_a_broker_that_is_not_there(tmp_path, monkeypatch):
    _write(tmp_path, now=time.time() - 200)
    address = f"127.0.0.1:{_free_port()}"
    out = CliRunner().invoke(main, ["doctor", "--data-dir", str(tmp_path), "--bootstrap-servers", address,
                                    "--service", "billing"])
    assert out.exit_code == 0, out.output
    assert f"Dead letters: not checked: nothing is listening at {address}" in out.output


def test_dead_letters_alone_fail_the_report_and_show_their_reason(tmp_path):
    _write(tmp_path)
    letters = dead_letter_problems(LETTERS[1:2])
    report = build_report(connect(tmp_path), since_ts=SINCE, until_ts=UNTIL, service="chat-api",
                          dead_letters=(DeadLetterCheck(True, "k:9092", 1), letters))
    # chat-api sent nothing that became a row, and two of its spans were dead-lettered.
    assert [(p.kind, p.count) for p in report.problems] == [("nothing_received", 0), ("dead_lettered", 2)]
    assert report.exit_code == 1
    lines = render_text(report).splitlines()
    assert "      normaliser error: RuntimeError: boom" in lines
    assert "Dead letters: 1 in the window on k:9092" in lines


@pytest.mark.slow
def test_dead_letters_read_from_the_embedded_broker():
    from kafka import KafkaProducer

    from agentwatch.broker import EmbeddedBroker, create_topics

    port = _free_port()
    broker = EmbeddedBroker(port).start()
    try:
        address = f"127.0.0.1:{port}"
        create_topics(address, {"dead_letter": 2})
        producer = KafkaProducer(bootstrap_servers=address)
        now = time.time()
        headers = [("agentwatch.dlq.reason", b"normaliser error: RuntimeError: boom"),
                   ("agentwatch.dlq.topic", b"otlp_spans")]
        producer.send("dead_letter", _otlp("old", [A]), partition=0, timestamp_ms=int((now - 3600) * 1000),
                      headers=headers)  # before the window
        for i in range(3):
            producer.send("dead_letter", _otlp("chat-api", [A, B]), partition=i % 2, headers=headers)
        producer.flush()
        producer.close()
        check, problems = check_dead_letters(None, broker_port=port, since_ts=now - 900, until_ts=time.time() + 1)
    finally:
        broker.stop()
    assert check == DeadLetterCheck(True, address, 3)
    assert [(p.service, p.count, p.example_span_id) for p in problems] == [("chat-api", 6, A.hex())]


def test_a_service_whose_spans_all_map_to_nothing_is_named_with_an_example(tmp_path):
    # The normaliser's span_coverage rows are the only trace such a service leaves: it has no
    # model call, tool call or agent step at all.
    from agentwatch.broker import DEFAULT_TOPICS
    from agentwatch.streams.normalize import Normalizer
    from agentwatch.streams.pipeline import SpanPipeline
    from agentwatch.streams.pricing import PricingTable
    from tests.support.dataflow_testing import SpanSpec, otlp_traces

    custom = [SpanSpec(bytes([1] * 16), bytes([i] * 8), "ai_inference", T0 + i, T0 + i + 1,
                       {"prompt.length": 42, "user.id": "u-1", "tokens.consumed": 900},
                       resource=(("service.name", "custom-ai"),)) for i in (1, 2)]
    web = [SpanSpec(bytes([2] * 16), bytes([9] * 8), "GET /orders", T0 + 3, T0 + 4, {"http.method": "GET"},
                    resource=(("service.name", "shop"),)),
           SpanSpec(bytes([2] * 16), bytes([8] * 8), "chat gpt-4o", T0 + 3, T0 + 3.5,
                    {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o"},
                    resource=(("service.name", "shop"),))]
    outcome = SpanPipeline(Normalizer(PricingTable.load()), DEFAULT_TOPICS).on_traces(otlp_traces(custom + web))
    sink = SnapshotSink(tmp_path, writer_id="test")
    sink.add_rows("span_coverage", outcome.coverage_rows)
    sink.add_events(outcome.batch.llm_calls)
    sink.flush(force=True)
    problems = snapshot_problems(connect(tmp_path), since_ts=SINCE, until_ts=UNTIL)
    assert [(p.service, p.kind, p.count, p.example_trace_id, p.example_span_id) for p in problems
            if p.kind == "unmapped_spans"] == [("custom-ai", "unmapped_spans", 2, "01" * 16, "01" * 8)]
    (found,) = [p for p in problems if p.kind == "unmapped_spans"]
    assert found.detail == "e.g. span 'ai_inference' with attributes prompt.length, tokens.consumed, user.id"
    assert "mapping" in found.hint

