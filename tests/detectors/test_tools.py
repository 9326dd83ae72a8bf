"""HallucinatedToolDetector: undeclared tools and arguments failing the declared schema."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest

from agentwatch.detectors.tools import (HallucinatedToolDetector, compile_fast_check,
                                        parse_tool_definitions)
from agentwatch.events import LlmCall, ToolCall
from tests.support.synthetic import TOOL_SCHEMAS, tool_definitions_json

DEFS = tool_definitions_json(("search", "lookup_order"))


def llm(ts: float, *, trace: str = "t1", defs: str = DEFS,
        requested: list[tuple[str, str]] = ()) -> LlmCall:
    req = json.dumps([{"name": n, "arguments": a, "id": f"c{i}"}
                      for i, (n, a) in enumerate(requested)]) if requested else ""
    return LlmCall(ts=ts, trace_id=trace, span_id=f"l{ts}", tool_definitions=defs,
                   requested_tool_calls=req)


def tool(ts: float, name: str, args: str, trace: str = "t1") -> ToolCall:
    return ToolCall(ts=ts, trace_id=trace, span_id=f"t{ts}", tool_name=name, arguments=args)


def run(det, events):
    return [(i, f) for i, e in enumerate(events) for f in det.update(e)]


def tick(ts: float = 1_000.0) -> LlmCall:
    """Later traffic of another trace: event time past the grace period of the calls held."""
    return LlmCall(ts=ts, trace_id="later", span_id="x")


def test_undeclared_tool_requested_without_any_tool_span() -> None:
    events = [llm(0, requested=[("search", '{"query": "refund"}')]),
              tool(1, "search", '{"query": "refund"}'),
              llm(2, requested=[("issue_refund", '{"amount": 50}')]), tick()]
    found = run(HallucinatedToolDetector(), events)
    # Held for its trace's declarations until the grace period passes (at the tick).
    assert [(i, f.kind, f.evidence["tool"], f.evidence["source"]) for i, f in found] == [
        (3, "undeclared_tool", "issue_refund", "requested")]
    assert found[0][1].key == "t1"
    assert found[0][1].evidence["declared_tools"] == ["lookup_order", "search"]


def test_undeclared_tool_executed_and_reported_once_per_trace() -> None:
    events = [llm(0), tool(1, "shell", '{"cmd": "ls"}'), llm(2, requested=[("shell", "{}")]),
              tool(3, "shell", '{"cmd": "rm"}'), tool(4, "browser", "{}"), tick()]
    found = run(HallucinatedToolDetector(), events)
    assert [(i, f.evidence["tool"], f.evidence["source"]) for i, f in found] == [
        (5, "shell", "executed"), (5, "browser", "executed")]
    # Judged at once with no grace period.
    found = run(HallucinatedToolDetector(declaration_grace_s=0), events)
    assert [(i, f.evidence["tool"]) for i, f in found] == [(1, "shell"), (4, "browser")]


def test_definitions_come_from_the_same_trace_only() -> None:
    events = [llm(0, trace="a"),
              llm(1, trace="b", defs="", requested=[("search", '{"query": "x"}')]),
              tool(2, "lookup_order", '{"order_id": "1"}', trace="b"),
              tool(3, "lookup_order", '{"order_id": "1"}', trace="a"), tick()]
    # Trace b declared nothing and nothing is configured: no registry, no judgement.
    assert run(HallucinatedToolDetector(), events) == []
    found = run(HallucinatedToolDetector(known_tools=["calculator"]), events)
    assert [(i, f.key, f.evidence["tool"]) for i, f in found] == [
        (4, "b", "search"), (4, "b", "lookup_order")]


def test_arguments_failing_the_declared_schema() -> None:
    events = [llm(0, requested=[("search", '{"query": "ok", "top_k": 5}')]),
              tool(1, "search", '{"query": "ok", "top_k": 5}'),
              llm(2, requested=[("search", '{"top_k": 5}')]),  # query is required
              tool(3, "lookup_order", '{"order_id": 17}'),  # must be a string
              tool(4, "lookup_order", '{"order_id": "1", '),  # truncated JSON
              tool(5, "search", "")]  # arguments not captured: not judged
    found = run(HallucinatedToolDetector(), events)
    assert [(i, f.kind, f.evidence["tool"]) for i, f in found] == [
        (2, "invalid_tool_arguments", "search"), (3, "invalid_tool_arguments", "lookup_order")]
    assert "'query' is a required property" in found[0][1].evidence["error"]
    assert found[1][1].evidence["error"].startswith("order_id: 17 is not of type 'string'")
    # The malformed JSON was for lookup_order too: one finding per (kind, tool) per trace.
    found = run(HallucinatedToolDetector(), [llm(0), tool(1, "lookup_order", '{"order_id": ')])
    assert found[0][1].evidence["error"] == "arguments are not valid JSON"


def test_configured_registry_and_schemas() -> None:
    det = HallucinatedToolDetector(
        known_tools=["search"],
        tool_schemas={"transfer": {"type": "object", "required": ["amount"],
                                   "properties": {"amount": {"type": "number", "maximum": 100}}}})
    events = [tool(0, "search", '{"anything": 1}'), tool(1, "transfer", '{"amount": 50}'),
              tool(2, "transfer", '{"amount": 5000}'), tool(3, "wire", "{}"), tick()]
    found = run(det, events)
    assert [(i, f.kind) for i, f in found] == [(2, "invalid_tool_arguments"),
                                               (4, "undeclared_tool")]
    assert "5000 is greater than the maximum of 100" in found[0][1].evidence["error"]
    with pytest.raises(ValueError):
        HallucinatedToolDetector(tool_schemas={"x": {"type": "no-such-type"}})
    with pytest.raises(ValueError):
        HallucinatedToolDetector(known_tools="search")


def test_definition_formats_and_invalid_schema() -> None:
    text = json.dumps([
        {"type": "function", "function": {"name": "a", "parameters": {"type": "object"}}},
        {"name": "b", "input_schema": {"type": "object", "required": ["x"]}},
        {"name": "c", "inputSchema": json.dumps({"type": "object"})},
        {"name": "d"}, {"name": ""}, "junk"])
    parsed = parse_tool_definitions(text)
    assert [(n, bool(k)) for n, k, _ in parsed] == [("a", True), ("b", True), ("c", True),
                                                    ("d", False)]
    assert parse_tool_definitions("not json") == []
    bogus = json.dumps([{"name": "z", "parameters": {"type": "bogus"}}])
    found = run(HallucinatedToolDetector(), [llm(0, defs=bogus), tool(1, "z", '{"q": 1}')])
    assert found == []  # declared; its schema cannot judge anything


SCHEMAS = list(TOOL_SCHEMAS.values()) + [
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"},
                                               "maxItems": 3},
                                      "n": {"type": ["integer", "null"], "exclusiveMinimum": 0},
                                      "code": {"type": "string", "pattern": "^[A-Z]{3}$"}},
     "additionalProperties": {"type": "boolean"}},
]


def random_value(rng: random.Random, depth: int = 0):
    pick = rng.randrange(9 if depth < 2 else 7)
    return [lambda: rng.choice(["", "x", "ABC", "https://docs.example.com/a", "c", "f"]),
            lambda: rng.randint(-3, 30), lambda: rng.choice([0.5, 1.0, 25.0, -2.5]),
            lambda: rng.choice([True, False]), lambda: None,
            lambda: rng.choice(["Oslo", "ord-1"]), lambda: rng.randint(1, 20),
            lambda: [random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))],
            lambda: {rng.choice(["query", "top_k", "city", "unit", "tags", "n", "code", "extra",
                                 "order_id", "url", "expression"]): random_value(rng, depth + 1)
                     for _ in range(rng.randint(0, 4))}][pick]()


def test_fast_check_never_accepts_what_jsonschema_rejects() -> None:
    rng = random.Random(1234)
    agreed = accepted = 0
    for schema in SCHEMAS:
        fast = compile_fast_check(schema)
        assert fast is not None
        validator = jsonschema.Draft202012Validator(schema)
        for _ in range(3000):
            instance = random_value(rng)
            if rng.random() < 0.5:
                instance = {k: random_value(rng, 1) for k in
                            rng.sample(sorted(schema.get("properties", {})) + ["zz"],
                                       rng.randint(0, min(3, len(schema.get("properties", {})) + 1)))}
            truth = validator.is_valid(instance)
            got = fast(instance)
            assert not got or truth, (schema, instance)  # sound for acceptance
            agreed += got == truth
            accepted += got
    # ... and useful: it settles nearly every call itself (jsonschema only for the rest)
    assert accepted > 500 and agreed / (len(SCHEMAS) * 3000) > 0.97


def test_fast_check_declines_schemas_outside_its_subset() -> None:
    assert compile_fast_check({"anyOf": [{"type": "string"}]}) is None
    assert compile_fast_check({"type": "object", "properties": {"a": {"$ref": "#/x"}}}) is None
    assert compile_fast_check({"minimum": 0, "exclusiveMinimum": True}) is None


# -- arrival order -------------------------------------------------------------------------------

def _verdict(found):
    return sorted((f.key, f.kind, f.evidence["tool"]) for _, f in found)


@pytest.mark.parametrize("events", [
    # the declaring call after the tool spans (log record or parent span exported later)
    [tool(1, "lookup_order", '{"order_id": 17}'), tool(2, "shell", "{}"), llm(3)],
    [llm(3), tool(1, "lookup_order", '{"order_id": 17}'), tool(2, "shell", "{}")],
    [tool(2, "shell", "{}"), llm(3), tool(1, "lookup_order", '{"order_id": 17}')],
])
def test_verdict_does_not_depend_on_arrival_order(events) -> None:
    found = run(HallucinatedToolDetector(), [*events, tick()])
    assert _verdict(found) == [("t1", "invalid_tool_arguments", "lookup_order"), ("t1", "undeclared_tool", "shell")]


def test_a_declaration_within_the_grace_period_clears_a_held_call() -> None:
    other = json.dumps([{"name": "shell", "parameters": {"type": "object"}}])
    events = [llm(0), tool(1, "shell", "{}"), llm(5, defs=other), tick()]
    assert run(HallucinatedToolDetector(), events) == []
    # Past the grace period the call was judged on what had been declared by then.
    late = [llm(0), tool(1, "shell", "{}"), llm(40, defs=other), tick()]
    found = run(HallucinatedToolDetector(declaration_grace_s=30), late)
    assert [(i, f.kind, f.evidence["tool"], f.ts) for i, f in found] == [(2, "undeclared_tool", "shell", 40.0)]


def test_held_calls_are_judged_when_their_trace_is_evicted() -> None:
    det = HallucinatedToolDetector(max_traces=2)
    events = [llm(0, trace="a"), tool(1, "shell", "{}", trace="a"), llm(2, trace="b"), llm(3, trace="c")]
    assert [(i, f.key, f.evidence["tool"]) for i, f in run(det, events)] == [(3, "a", "shell")]


def test_pending_calls_are_bounded_and_checkpointed() -> None:
    det = HallucinatedToolDetector(max_traces=10)
    events = [llm(0)] + [tool(1 + i / 100, f"made_up_{i}", "{}") for i in range(40)]
    found = run(det, events)
    cap = HallucinatedToolDetector._MAX_PENDING_PER_TRACE
    assert len(det.snapshot()["traces"][0][4]) == cap
    assert len(found) == HallucinatedToolDetector._MAX_FIRED_PER_TRACE  # the rest judged at once, capped
    restored = HallucinatedToolDetector(max_traces=10)
    restored.restore(json.loads(json.dumps(det.snapshot())))
    assert restored.snapshot() == det.snapshot()
    assert [f.kind for f in restored.update(tick())] == [f.kind for f in det.update(tick())] == []  # fired cap reached


def test_arguments_the_normaliser_could_not_read_are_not_judged() -> None:
    unknown = ToolCall(ts=1, trace_id="t1", span_id="u", tool_name="lookup_order", arguments="A-1042",
                       arguments_format="unknown")
    positional = ToolCall(ts=2, trace_id="t1", span_id="v", tool_name="search",
                          arguments='{"args": ["refund"], "kwargs": {}}', arguments_format="unknown")
    assert run(HallucinatedToolDetector(), [llm(0), unknown, positional, tick()]) == []
    # the same texts as JSON-as-sent are judged
    judged = [llm(0), tool(1, "lookup_order", "A-1042"), tick()]
    assert [f.kind for _, f in run(HallucinatedToolDetector(), judged)] == ["invalid_tool_arguments"]
    # and an undeclared tool is still undeclared, whatever its arguments
    odd = ToolCall(ts=1, trace_id="t1", span_id="w", tool_name="shell", arguments="ls", arguments_format="unknown")
    assert [f.kind for _, f in run(HallucinatedToolDetector(), [llm(0), odd, tick()])] == ["undeclared_tool"]


def test_rejects_a_grace_period_beyond_the_trace_ttl() -> None:
    with pytest.raises(ValueError):
        HallucinatedToolDetector(declaration_grace_s=900.0, trace_ttl_s=900.0)
    with pytest.raises(ValueError):
        HallucinatedToolDetector(declaration_grace_s=-1)


def test_the_root_span_settles_held_calls_at_once():
    # The root ends last: when it arrives the trace's declarations are in, so a held call is
    # judged then, not a grace period later (and not only once later traffic comes).
    from agentwatch.events import AgentStep

    det = HallucinatedToolDetector()
    defs = '[{"name": "search", "parameters": {"type": "object"}}]'
    events = [ToolCall(ts=1.0, trace_id="t", span_id="c", parent_span_id="r", tool_name="delete_all", arguments="{}"),
              LlmCall(ts=2.0, trace_id="t", span_id="l", parent_span_id="r", tool_definitions=defs),
              AgentStep(ts=3.0, trace_id="t", span_id="r")]
    found = [(i, f.kind, f.evidence["tool"]) for i, e in enumerate(events) for f in det.update(e)]
    assert found == [(2, "undeclared_tool", "delete_all")]
    declared_late = [ToolCall(ts=1.0, trace_id="u", span_id="c", parent_span_id="r", tool_name="search",
                              arguments="{}"),
                     LlmCall(ts=2.0, trace_id="u", span_id="l", parent_span_id="r", tool_definitions=defs),
                     AgentStep(ts=3.0, trace_id="u", span_id="r")]
    assert [f for e in declared_late for f in det.update(e)] == []
