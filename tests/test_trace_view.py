"""``agentwatch trace``: the tree built from span rows, its renderings, and the command as a
terminal runs it against snapshots of a real loop."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from agentwatch.detectors.loops import LoopDetector
from agentwatch.detectors.tools import HallucinatedToolDetector
from agentwatch.events import AgentStep, Finding, LlmCall, Severity, ToolCall
from agentwatch.streams.snapshots import SnapshotSink, connect
from agentwatch.trace_view import build_trace, evidence_summary, load_trace, render_text, tree_to_json

T0 = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC
AGENTWATCH = Path(sys.executable).parent / "agentwatch"


def step(span_id, start, end, parent="", name="agent", trace="t1", **kw):
    return AgentStep(ts=T0 + end, trace_id=trace, span_id=span_id, parent_span_id=parent, name=name,
                     operation="invoke_agent", start_ts=T0 + start, latency_ms=(end - start) * 1000, **kw)


def llm(span_id, end, parent, latency_ms=400.0, trace="t1", **kw):
    return LlmCall(ts=T0 + end, trace_id=trace, span_id=span_id, parent_span_id=parent, model="gpt-4o",
                   input_tokens=120, output_tokens=30, cost_usd=0.0006, priced=True, latency_ms=latency_ms, **kw)


def tool(span_id, end, parent, args='{"q": "refund"}', trace="t1", **kw):
    return ToolCall(ts=T0 + end, trace_id=trace, span_id=span_id, parent_span_id=parent, tool_name="search",
                    arguments=args, result="no results", latency_ms=200.0, **kw)


def shape(nodes):
    return [(n.span.span_id, shape(n.children)) for n in nodes]


def test_spans_hang_under_their_parents_in_start_time_order():
    # Given out of order, with a model call that ended after the tool call but started before it.
    spans = [tool("c1", 2.0, "a"), llm("l1", 2.5, "a", latency_ms=1500), step("a", 0, 3),
             step("sub", 0.2, 0.9, parent="a", name="planner"), llm("l0", 0.8, "sub")]
    tree = build_trace("t1", spans)
    assert shape(tree.roots) == [("a", [("sub", [("l0", [])]), ("l1", []), ("c1", [])])]
    assert (tree.start_ts, tree.end_ts, tree.span_count) == (T0, T0 + 3, 5)


def test_orphans_are_roots_duplicates_are_kept_once_and_a_parent_cycle_loses_nothing():
    spans = [llm("l0", 1, "not-flushed-yet"), llm("l0", 1, "not-flushed-yet"), tool("c0", 0.5, ""),
             tool("x", 2, "y"), tool("y", 3, "x")]
    tree = build_trace("t1", spans)
    assert shape(tree.roots) == [("c0", []), ("l0", []), ("x", [("y", [])])]


def test_findings_are_kept_once_in_time_order():
    late = Finding(detector="agent_loop", key="t1", kind="repeated_tool_call", severity=Severity.INFO,
                   ts=T0 + 900, value=0, threshold=0, evidence={"reason": "trace idle"}, resolved=True)
    early = Finding(detector="agent_loop", key="t1", kind="repeated_tool_call", severity=Severity.WARNING,
                    ts=T0 + 2, value=3, threshold=3, evidence={"tool": "search"})
    tree = build_trace("t1", [step("a", 0, 3)], [late, early, early])
    assert tree.findings == (early, late)
    assert render_text(tree).splitlines()[1:3] == [
        "  finding agent_loop/repeated_tool_call warning at 2027-01-15 08:00:02.000Z  value=3 threshold=3: "
        "tool=search",
        "  finding agent_loop/repeated_tool_call info resolved at 2027-01-15 08:15:00.000Z: reason=trace idle"]


def test_evidence_summary_of_a_hallucinated_tool_finding():
    det = HallucinatedToolDetector()
    defs = json.dumps([{"name": "search", "parameters": {"type": "object"}}])
    events = [LlmCall(ts=T0, trace_id="t1", span_id="l0", tool_definitions=defs),
              ToolCall(ts=T0 + 1, trace_id="t1", span_id="c0", tool_name="shell", arguments='{"cmd": "ls"}'),
              # later traffic ends the grace period in which the trace could still declare "shell"
              LlmCall(ts=T0 + 1 + det.declaration_grace_s, trace_id="t2", span_id="l1")]
    (finding,) = [f for e in events for f in det.update(e)]
    assert evidence_summary(finding) == 'tool=shell, arguments={"cmd": "ls"}'


def test_errors_and_unpriced_calls_are_shown_on_their_lines():
    spans = [step("a", 0, 2),
             LlmCall(ts=T0 + 1, trace_id="t1", span_id="l0", parent_span_id="a", model="mystery",
                     latency_ms=250, status="error", error="rate limited\nretry later"),
             tool("c0", 1.5, "a", status="error", error="timeout")]
    assert render_text(build_trace("t1", spans)).splitlines()[1:] == [
        "  step agent (invoke_agent)  2000 ms  ok",
        "    llm mystery  in=0 out=0  $? (unpriced)  250 ms  error: rate limited\\nretry later",
        '    tool search  args={"q": "refund"}  result=no results  200 ms  error: timeout']


def test_json_is_the_same_tree_nested():
    tree = build_trace("t1", [step("a", 0, 3), tool("c0", 1, "a")])
    doc = tree_to_json(tree)
    assert (doc["trace_id"], doc["span_count"], doc["findings"]) == ("t1", 2, [])
    (root,) = doc["spans"]
    assert (root["type"], root["name"], root["start_ts"], root["end_ts"]) == ("agent_step", "agent", T0, T0 + 3)
    (child,) = root["children"]
    assert (child["type"], child["tool_name"], child["start_ts"], child["children"]) == (
        "tool_call", "search", T0 + 0.8, [])


# -- the command, against snapshots of a real loop ----------------------------------------------

def loop_trace():
    """An agent that asks the model, searches with the same arguments, three times over."""
    spans = [step("a", 0, 4, name="support-bot")]
    for i in range(3):
        spans += [llm(f"l{i}", i + 0.5, "a"), tool(f"c{i}", i + 0.9, "a")]
    spans.append(llm("l3", 3.8, "a"))
    return spans


def write_loop(data_dir: Path) -> list[Finding]:
    spans = loop_trace()
    other = [tool("z0", 1, "", trace="t2")]
    detector = LoopDetector()
    findings = [f for e in sorted(spans + other, key=lambda e: e.ts) for f in detector.update(e)]
    sink = SnapshotSink(data_dir, writer_id="test")
    for table in (AgentStep, LlmCall, ToolCall):
        sink.add_events([s for s in spans + other if isinstance(s, table)])
    sink.add_events(findings)
    sink.flush(force=True)
    return findings


EXPECTED = """\
trace t1  2027-01-15 08:00:00.000Z  4000 ms  8 spans
  finding agent_loop/repeated_tool_call warning at 2027-01-15 08:00:02.900Z  value=3 threshold=3: \
tool=search, arguments={"q":"refund"}
  step support-bot (invoke_agent)  4000 ms  ok
    llm gpt-4o  in=120 out=30  $0.000600  400 ms  ok
    tool search  args={"q": "refund"}  result=no results  200 ms  ok
    llm gpt-4o  in=120 out=30  $0.000600  400 ms  ok
    tool search  args={"q": "refund"}  result=no results  200 ms  ok
    llm gpt-4o  in=120 out=30  $0.000600  400 ms  ok
    tool search  args={"q": "refund"}  result=no results  200 ms  ok
    llm gpt-4o  in=120 out=30  $0.000600  400 ms  ok
"""


def test_load_trace_reads_the_snapshot_rows_back(tmp_path):
    findings = write_loop(tmp_path)
    assert [(f.detector, f.kind, f.key) for f in findings] == [("agent_loop", "repeated_tool_call", "t1")]
    con = connect(tmp_path)
    try:
        tree = load_trace(con, "t1")
        assert load_trace(con, "nope") is None
    finally:
        con.close()
    assert tree.findings == tuple(findings)
    assert render_text(tree) == EXPECTED


def agentwatch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(AGENTWATCH), *args], capture_output=True, text=True, timeout=120)


def test_trace_command_prints_the_loop_as_a_terminal_sees_it(tmp_path):
    write_loop(tmp_path)
    out = agentwatch("trace", "t1", "--data-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout == EXPECTED
    as_json = agentwatch("trace", "t1", "--format", "json", "--data-dir", str(tmp_path))
    assert as_json.returncode == 0, as_json.stderr
    doc = json.loads(as_json.stdout)
    assert [(f["detector"], f["kind"], f["evidence"]["tool"]) for f in doc["findings"]] == [
        ("agent_loop", "repeated_tool_call", "search")]
    children = doc["spans"][0]["children"]
    assert [c.get("tool_name") or c["model"] for c in children] == ["gpt-4o", "search"] * 3 + ["gpt-4o"]


def test_trace_command_on_an_unknown_trace_says_so_in_one_line_and_exits_1(tmp_path):
    write_loop(tmp_path)
    out = agentwatch("trace", "nope", "--data-dir", str(tmp_path))
    assert (out.returncode, out.stdout, out.stderr) == (1, "", "error: no trace 'nope' in the snapshots\n")
