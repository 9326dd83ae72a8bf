"""`agentwatch mapping check FILE --capture ...`: how each captured span would map."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from google.protobuf import json_format
from otel_fixtures import otlp_bytes, recorded_spans

from agentwatch.cli import main
from agentwatch.streams.otlp import decode_traces

EXAMPLE = Path(__file__).resolve().parents[1] / "streams" / "mapping.example.yaml"
SECOND = 1_000_000_000


@pytest.fixture(autouse=True)
def default_environment(monkeypatch):
    for name in ("AGENTWATCH_PII_MODE", "AGENTWATCH_PII", "AGENTWATCH_PII_HASH_KEY", "AGENTWATCH_PRICING_PATH",
                 "AGENTWATCH_MAPPING_PATH"):
        monkeypatch.delenv(name, raising=False)


def _capture() -> bytes:
    """An ai_inference span, a tool span without its arguments, a native GenAI span, an HTTP span."""
    with recorded_spans("shop") as (tracer, exporter):
        for name, attrs in (
                ("ai_inference", {"prompt.length": 11, "prompt.text": "hello world", "user.id": "u-42",
                                  "inference.duration": 1.5, "tokens.consumed": 1000}),
                ("tool.get_order", {"tool.name": "get_order", "tool.duration_ms": 250}),
                ("chat gpt-4o", {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o"}),
                ("GET /orders", {"http.method": "GET"})):
            tracer.start_span(name, attributes=attrs, start_time=100 * SECOND).end(end_time=102 * SECOND)
        return otlp_bytes(exporter)


def _otlp_json(payload: bytes) -> str:
    """OTLP/JSON as the OTLP file exporter writes it: camelCase keys, ids as hex."""
    doc = json_format.MessageToDict(decode_traces(payload))
    for resource_spans in doc["resourceSpans"]:
        for scope_spans in resource_spans["scopeSpans"]:
            for span in scope_spans["spans"]:
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in span:
                        span[key] = base64.b64decode(span[key]).hex()
    return json.dumps(doc)


def _check(*args):
    return CliRunner().invoke(main, ["mapping", "check", *map(str, args)], catch_exceptions=False)


def _blocks(output: str) -> dict[str, str]:
    """The report of each span, by span name."""
    out: dict[str, str] = {}
    current = None
    for line in output.splitlines():
        if line.startswith("span '"):
            current = line.split("'")[1]
            out[current] = ""
        elif current is not None and line.startswith("  "):
            out[current] += line + "\n"
    return out


@pytest.mark.parametrize("form", ["protobuf", "json", "jsonl"])
def test_check_prints_how_each_span_maps(tmp_path, form):
    payload = _capture()
    capture = tmp_path / ("spans.otlp.bin" if form == "protobuf" else "spans.json")
    if form == "protobuf":
        capture.write_bytes(payload)
    elif form == "json":
        capture.write_text(_otlp_json(payload))
    else:  # the file exporter appends one request per line
        capture.write_text(_otlp_json(payload) + "\n" + _otlp_json(payload) + "\n")
    result = _check(EXAMPLE, "--capture", capture)
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"{EXAMPLE}: 2 rule(s), valid\n")
    blocks = _blocks(result.output)
    inference = blocks["ai_inference"]
    assert "rule 1 'ai_inference' (line 21) -> llm_call" in inference
    for shown in ("model = 'gpt-4o-mini'", "provider = 'openai'", "input_tokens = 1000", "latency_ms = 1500.0",
                  "user = 'u-42'", "prompt = 'hello world'", "cost_usd = 0.00015"):
        assert f"    {shown}\n" in inference
    assert "response: not set (response.text or completion absent" in inference
    tool = blocks["tool.get_order"]
    assert "rule 2 'tools' (line 40) -> tool_call" in tool and "tool_name = 'get_order'" in tool
    assert "latency_ms = 250.0" in tool and "tool_arguments: not set (tool.args absent" in tool
    assert "no rule matches; read by the built-in conventions -> llm_call" in blocks["chat gpt-4o"]
    assert blocks["GET /orders"] == (
        "  not mapped: no rule matches and no GenAI attributes (rule 1 'ai_inference' (line 21): span name "
        "'GET /orders' does not match glob 'ai_inference'; rule 2 'tools' (line 40): span name 'GET /orders' "
        "does not match glob 'tool.*')\n")
    copies = 2 if form == "jsonl" else 1
    assert result.output.endswith(f"{4 * copies} span(s): {2 * copies} mapped by a rule, {copies} read by the "
                                  f"built-in conventions, {copies} not mapped\n")


def test_an_invalid_mapping_is_refused_with_its_line(tmp_path):
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text("rules:\n  - match: {span_name: a}\n    kind: llm_call\n    fields:\n      tokns_in: t\n")
    capture = tmp_path / "spans.otlp.bin"
    capture.write_bytes(_capture())
    result = _check(mapping, "--capture", capture)
    assert result.exit_code == 1
    assert f"{mapping} line 5: unknown field 'tokns_in' (known: model, provider" in result.output


def test_an_unreadable_capture_is_refused(tmp_path):
    capture = tmp_path / "spans.json"
    capture.write_text('{"resourceLogs": []}')
    result = _check(EXAMPLE, "--capture", capture)
    assert result.exit_code == 1 and "not an OTLP/JSON export request" in result.output
