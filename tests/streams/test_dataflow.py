"""The whole streaming core, from OTLP requests to rows and findings, in memory.

A :class:`~tests.support.dataflow_testing.TestingCluster` runs N workers of the core
(:mod:`agentwatch.streams.dataflow`) over a testing broker; the stream below is cut into rounds
and the cluster runs until idle after each, which is what an exporter's few-second schedule
delay gives a pipeline that keeps up.

The stream (every expectation worked out here from its construction and the bundled prices):

- nested model calls: 6 traces, each with 2 LLM child spans in round r and, in round r + 1,
  their LLM-looking parents (same model and tokens, no operation name) and the trace's root:
  12 ``llm_calls`` rows, 12 + 6 ``agent_steps`` rows;
- a project over its $1.00 daily budget only in aggregate: 16 traces of one gpt-4o call each,
  20 000 input + 2 000 output tokens = $0.05 + $0.02 = $0.07, 4 per round; running totals
  $0.49 -> $0.56 (50 %), $0.77 -> $0.84 (80 %), $0.98 -> $1.05 (100 %), final $1.12, never
  within rounding of a level, so each level fires once at the same call in any order;
- two users each sending one prompt 4 times, 0.5 s apart, in 4 new traces in 4 exports: one
  ``retry_storm`` per user (the detector's default: 3 calls within 10 s); 8 ``llm_calls``;
- two loop traces: ``search`` with the same arguments 3 times (2 tool spans in round 1, the
  third and the root in round 2): one ``agent_loop`` ``repeated_tool_call`` per trace;
  6 ``tool_calls``, 2 ``agent_steps``.

Everything else is quiet by construction: event times span 16 s (no cost baseline, no burn-rate
projection), no errors or slow calls, no tools declared, no GPU samples; drift is left out.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from agentwatch.detectors.registry import DETECTORS, build_detectors
from agentwatch.events import Finding, GpuSample, LlmCall, ToolCall, AgentStep
from agentwatch.streams.dataflow import DLQ_REASON_HEADER
from agentwatch.streams.otlp import UndecodableRecord
from agentwatch.streams.pipeline import partition_for
from agentwatch.streams.dataflow import Record, Replay
from agentwatch.streams.partition_checkpoint import PartitionCheckpointStore
from tests.support.dataflow_testing import (Clock, Ids, LogSpec, SpanSpec, TestingBroker, TestingCluster,
                                            dataflow_factory, otlp_logs, otlp_traces)

T0 = 1_750_000_000.0  # 15:06:40 UTC: the stream's 16 s stay within one UTC day
ROUNDS = 4
EXPORTS_PER_ROUND = 4
ROUND_S = 4.0

BUDGET_PROJECT = "budget-proj"
BUDGET_CALLS = 16
BUDGET_CALL_USD = 0.07  # gpt-4o: 20 000 x $2.50/M + 2 000 x $10/M
RETRY_PROJECT, RETRY_SERVICE = "chat-proj", "chat-app"
RETRY_USERS = 2
RETRY_REPEATS = 4
NESTED_TRACES = 6
CALLS_PER_NESTED_TRACE = 2
LOOP_TRACES = 2
LOOP_REPEATS = 3

DETECTOR_CONFIG = {"budget": {"budgets": {BUDGET_PROJECT: {"daily_usd": 1.0}}}}
NO_DRIFT = set(DETECTORS) - {"drift"}


def detectors() -> list[Any]:
    return build_detectors(DETECTOR_CONFIG, enabled=NO_DRIFT)


FACTORY = dataflow_factory(detectors)


@dataclass(frozen=True)
class Stream:
    rounds: tuple[tuple[bytes, ...], ...]  # OTLP requests per round
    llm_calls: int
    tool_calls: int
    agent_steps: int
    findings: frozenset[tuple[str, str, str]]
    nested_children: frozenset[str]  # span ids: model calls
    nested_parents: frozenset[str]  # span ids: the LLM-looking wrappers sent a round later


def chat(model: str, tokens_in: int, tokens_out: int, **extra: Any) -> dict[str, Any]:
    return {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": model,
            "gen_ai.response.model": model, "gen_ai.usage.input_tokens": tokens_in,
            "gen_ai.usage.output_tokens": tokens_out, **extra}


def build_stream(seed: int = 7) -> Stream:
    import random

    rng = random.Random(seed)
    ids = Ids(seed)
    plan: list[list[list[SpanSpec]]] = [[[] for _ in range(EXPORTS_PER_ROUND)] for _ in range(ROUNDS)]
    loose: list[list[SpanSpec]] = [[] for _ in range(ROUNDS)]  # spread over a round's exports
    llm_calls = tool_calls = agent_steps = 0
    findings: set[tuple[str, str, str]] = set()
    children: set[str] = set()
    parents: set[str] = set()

    nested = (("service.name", "nested-agent"), ("agentwatch.project", "nested-proj"))
    for t in range(NESTED_TRACES):
        r = t % (ROUNDS - 1)
        base = T0 + r * ROUND_S + 0.1 * t
        trace_id, root_id = ids.trace(), ids.span()
        for c in range(CALLS_PER_NESTED_TRACE):
            model = ("gpt-4o-mini", "gpt-4.1-mini")[(t + c) % 2]
            tokens_in, tokens_out = 500 + 37 * t + 11 * c, 40 + 3 * t + c
            start = base + 0.6 * c
            parent_id, child_id = ids.span(), ids.span()
            loose[r].append(SpanSpec(trace_id, child_id, f"chat {model}", start + 0.01, start + 0.5,
                                     chat(model, tokens_in, tokens_out), parent_id, nested))
            loose[r + 1].append(SpanSpec(trace_id, parent_id, "planner step", start, start + 0.55, {
                "gen_ai.request.model": model, "gen_ai.usage.input_tokens": tokens_in,
                "gen_ai.usage.output_tokens": tokens_out, "gen_ai.agent.name": "planner"}, root_id, nested))
            children.add(child_id.hex())
            parents.add(parent_id.hex())
            llm_calls += 1
            agent_steps += 1
        loose[r + 1].append(SpanSpec(trace_id, root_id, "invoke_agent planner", base - 0.1, base + 1.5,
                                     {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "planner"},
                                     b"", nested))
        agent_steps += 1

    budget = (("service.name", "budget-app"), ("agentwatch.project", BUDGET_PROJECT))
    for i in range(BUDGET_CALLS):
        r = i % ROUNDS
        end = T0 + r * ROUND_S + 0.5 + 0.2 * i
        loose[r].append(SpanSpec(ids.trace(), ids.span(), "chat gpt-4o", end - 0.7, end,
                                 chat("gpt-4o", 20_000, 2_000), b"", budget))
        llm_calls += 1
    for level in (50, 80, 100):
        findings.add(("budget", f"budget_daily_{level}pct", f"project={BUDGET_PROJECT}"))

    retry = (("service.name", RETRY_SERVICE), ("agentwatch.project", RETRY_PROJECT))
    for u in range(RETRY_USERS):
        r = 1 + u
        user, session = f"user-{u}", f"sess-{u}"
        prompt = f"Where is my order {7000 + u}? It was due yesterday."
        for k in range(RETRY_REPEATS):
            end = T0 + r * ROUND_S + 0.5 * k + 0.6
            plan[r][k].append(SpanSpec(ids.trace(), ids.span(), "chat gpt-4o-mini", end - 0.4, end, chat(
                "gpt-4o-mini", 900 + 7 * u, 60, **{"user.id": user, "session.id": session,
                                                   "gen_ai.prompt.0.role": "user",
                                                   "gen_ai.prompt.0.content": prompt}), b"", retry))
            llm_calls += 1
        key = f"project={RETRY_PROJECT}/service={RETRY_SERVICE}/user={user}/session={session}"
        findings.add(("retry_storm", "retry_storm", key))

    loop = (("service.name", "loop-agent"), ("agentwatch.project", "loop-proj"))
    for i in range(LOOP_TRACES):
        trace_id, root_id = ids.trace(), ids.span()
        base = T0 + 1 * ROUND_S + 0.2 * i
        arguments = json.dumps({"q": f"refund policy for order {500 + i}"})
        for k in range(LOOP_REPEATS):
            r = 1 if k < LOOP_REPEATS - 1 else 2
            start = base + 0.3 * k if r == 1 else T0 + 2 * ROUND_S + 0.2 * i
            loose[r].append(SpanSpec(trace_id, ids.span(), "execute_tool search", start, start + 0.2, {
                "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "search",
                "gen_ai.tool.call.arguments": arguments}, root_id, loop))
            tool_calls += 1
        loose[2].append(SpanSpec(trace_id, root_id, "invoke_agent looper", base - 0.1, T0 + 2 * ROUND_S + 1.5,
                                 {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "looper"},
                                 b"", loop))
        agent_steps += 1
        findings.add(("agent_loop", "repeated_tool_call", trace_id.hex()))

    rounds = []
    for r in range(ROUNDS):
        rng.shuffle(loose[r])
        for j, span in enumerate(loose[r]):
            plan[r][j % EXPORTS_PER_ROUND].append(span)
        exports = []
        for spans in plan[r]:
            rng.shuffle(spans)
            if spans:
                exports.append(otlp_traces(spans))
        rounds.append(tuple(exports))
    return Stream(tuple(rounds), llm_calls, tool_calls, agent_steps, frozenset(findings), frozenset(children),
                  frozenset(parents))


STREAM = build_stream()
ENTITY_TABLES = ("llm_calls", "tool_calls", "agent_steps")
USAGE_PARTITIONS = 8
TRACE_PARTITIONS = 8


def build_warmup(seed: int = 11) -> tuple[bytes, ...]:
    """Traffic that reaches every trace partition on all three event topics and every usage
    partition: one trace per trace partition (a root, a model call, a tool call), each in a
    project of its own whose usage lands on that usage partition. Quiet for every detector."""
    ids = Ids(seed)
    spans = []
    for k in range(TRACE_PARTITIONS):
        trace_id = next(t for t in iter(ids.trace, None) if partition_for(t.hex(), TRACE_PARTITIONS) == k)
        project = next(f"warm-{j}" for j in range(1000) if partition_for(f"warm-{j}", USAGE_PARTITIONS) == k)
        resource = (("service.name", "warm-app"), ("agentwatch.project", project))
        root_id = ids.span()
        start = T0 - 3.0 + 0.1 * k
        spans.append(SpanSpec(trace_id, ids.span(), "chat gpt-4o-mini", start + 0.1, start + 0.4,
                              chat("gpt-4o-mini", 100 + k, 10), root_id, resource))
        spans.append(SpanSpec(trace_id, ids.span(), "execute_tool lookup", start + 0.5, start + 0.6, {
            "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "lookup",
            "gen_ai.tool.call.arguments": json.dumps({"id": k})}, root_id, resource))
        spans.append(SpanSpec(trace_id, root_id, "invoke_agent warm", start, start + 0.7,
                              {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "warm"}, b"", resource))
    return (otlp_traces(spans),)


# Workaround for the core bug shown by test_replay_covers_records_no_checkpoint_reflects: the
# crash tests warm every partition up (and checkpoint after it), so every state file names
# every topic it reads.
WARMUP = build_warmup()
WARM = TRACE_PARTITIONS  # rows per entity table the warm-up adds


def test_stream_expectations_add_up() -> None:
    # Worked out by hand from the module docstring, independently of build_stream's counters.
    assert STREAM.llm_calls == 6 * 2 + 16 + 2 * 4 == 36
    assert STREAM.tool_calls == 2 * 3 == 6
    assert STREAM.agent_steps == 6 * 2 + 6 + 2 == 20
    totals = [round(BUDGET_CALL_USD * k, 10) for k in range(1, BUDGET_CALLS + 1)]
    crossings = [next(k for k, s in enumerate(totals, 1) if s >= level) for level in (0.5, 0.8, 1.0)]
    assert crossings == [8, 12, 15]
    assert all(abs(s - level) > 1e-6 for s in totals for level in (0.5, 0.8, 1.0))
    assert len(STREAM.findings) == 3 + RETRY_USERS + LOOP_TRACES


def run(tmp_path: Path, n_workers: int, *, before_round: Any = None, commit_lag: Any = 0,
        order_seed: int | None = None, warmup: bool = False) -> TestingCluster:
    """The stream, round by round (the warm-up first when asked: round 0, the stream's rounds
    then numbered from 1)."""
    cluster = TestingCluster(n_workers, tmp_path, FACTORY, commit_lag=commit_lag, order_seed=order_seed)
    rounds = ((WARMUP,) if warmup else ()) + STREAM.rounds
    for r, exports in enumerate(rounds):
        if before_round is not None:
            before_round(r, cluster)
        for payload in exports:
            cluster.broker.produce("otlp_spans", None, payload)
        cluster.run_until_idle()
    return cluster


def identities(findings: list[Finding]) -> collections.Counter[tuple[str, str, str]]:
    """Firings per (detector, kind, key): distinct open findings (a finding written twice by a
    re-delivered record is one firing)."""
    distinct = {(f.detector, f.kind, f.key, f.ts, f.value) for f in findings if not f.resolved}
    return collections.Counter(d[:3] for d in distinct)


def counts(cluster: TestingCluster) -> dict[str, int]:
    return {t: len(cluster.sink.rows(t)) for t in ENTITY_TABLES}


def expected_counts(warm: int = 0) -> dict[str, int]:
    return {"llm_calls": STREAM.llm_calls + warm, "tool_calls": STREAM.tool_calls + warm,
            "agent_steps": STREAM.agent_steps + warm}


def budget_spent(cluster: TestingCluster) -> float:
    spent = []
    for state in cluster.states():
        if state.stage == "keyed":
            for project, _period, _start, _end, usd, *_ in \
                    state.runners["project"].detectors["budget"].snapshot()["periods"]:
                if project == BUDGET_PROJECT and usd > 0:
                    spent.append(usd)
    assert len(spent) == 1, spent  # one partition holds the project
    return spent[0]


def retry_counts(cluster: TestingCluster) -> dict[str, int]:
    found = {}
    for state in cluster.states():
        if state.stage == "keyed":
            for client, _tokens, _digest, _first, _last, count, *_ in \
                    state.runners["project"].detectors["retry_storm"].snapshot()["repeats"]:
                found[client[2]] = count
    return found


def assert_expected(cluster: TestingCluster) -> None:
    assert counts(cluster) == {"llm_calls": STREAM.llm_calls, "tool_calls": STREAM.tool_calls,
                               "agent_steps": STREAM.agent_steps}
    fired = identities(cluster.findings)
    assert set(fired) == STREAM.findings
    assert all(n == 1 for n in fired.values()), fired
    assert not [f for f in cluster.findings if f.resolved]
    assert len(cluster.findings) == len(STREAM.findings)  # written once each
    assert len(cluster.sink.rows("findings")) == len(STREAM.findings)
    assert cluster.dead_letters() == []
    assert budget_spent(cluster) == pytest.approx(BUDGET_CALLS * BUDGET_CALL_USD, abs=1e-9)
    assert retry_counts(cluster) == {f"user-{u}": RETRY_REPEATS for u in range(RETRY_USERS)}
    by_kind = {f.kind: f for f in cluster.findings if f.detector == "budget"}
    for kind, calls in (("budget_daily_50pct", 8), ("budget_daily_80pct", 12), ("budget_daily_100pct", 15)):
        assert by_kind[kind].value == pytest.approx(calls * BUDGET_CALL_USD, abs=1e-9)


@pytest.mark.parametrize("n_workers", [1, 2, 3])
def test_same_rows_and_findings_with_any_worker_count(tmp_path: Path, n_workers: int) -> None:
    cluster = run(tmp_path, n_workers)
    assert_expected(cluster)
    # The nested parents that arrived after their child: demoted by the normaliser when one
    # worker mapped both requests, by the trace stage otherwise; one llm_calls row per call.
    llm_span_ids = [row["span_id"] for row in cluster.sink.rows("llm_calls")]
    step_span_ids = {row["span_id"] for row in cluster.sink.rows("agent_steps")}
    assert len(set(llm_span_ids)) == len(llm_span_ids)
    assert STREAM.nested_children <= set(llm_span_ids)
    assert STREAM.nested_parents <= step_span_ids and not STREAM.nested_parents & set(llm_span_ids)
    assert len(STREAM.nested_parents) == NESTED_TRACES * CALLS_PER_NESTED_TRACE


def test_nested_parents_are_demoted_by_the_trace_stage_across_workers(tmp_path: Path) -> None:
    # Three workers map the requests: a parent's request is mapped by another normaliser than
    # its child's at least once, so the trace stage is what demotes it.
    cluster = run(tmp_path, 3)
    assert sum(w.dataflow.counts["nested_demoted"] for w in cluster.workers) > 0
    assert_expected(cluster)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_any_interleaving_of_partitions(tmp_path: Path, seed: int) -> None:
    assert_expected(run(tmp_path, 2, order_seed=seed))


@pytest.mark.parametrize("plan", [(2, 3), (3, 1)])
def test_rebalance_mid_stream(tmp_path: Path, plan: tuple[int, int]) -> None:
    before, after = plan

    def rebalance(r: int, cluster: TestingCluster) -> None:
        if r == 2:
            cluster.rebalance(after)
            assert len(cluster.workers) == after

    cluster = run(tmp_path, before, before_round=rebalance)
    assert_expected(cluster)
    # The states that moved were restored from their files, not rebuilt.
    assert cluster.replayed == []  # a clean hand-over commits exactly what the files hold


def test_rebalance_after_checkpoint_restores_from_files(tmp_path: Path) -> None:
    def step(r: int, cluster: TestingCluster) -> None:
        if r == 1:
            cluster.checkpoint()
        if r == 2:
            cluster.rebalance(3)
        if r == 3:
            cluster.rebalance(1)

    cluster = run(tmp_path, 2, before_round=step)
    assert_expected(cluster)
    stored = cluster.workers[0].checkpoints.stored()
    assert {stage for stage, _ in stored} == {"trace", "keyed"}


def crash_run(tmp_path: Path, commit_lag: Any) -> tuple[TestingCluster, list[Any], dict[str, int]]:
    """Two workers; the warm-up, the stream's round 0, a checkpoint; round 1 with ``commit_lag``
    records per partition written but not committed; worker 1 crashes; rounds 2 and 3."""
    found: dict[str, Any] = {}

    def step(r: int, cluster: TestingCluster) -> None:
        if r == 2:
            cluster.checkpoint()
            found["committed"] = {tp: cluster.broker.committed(*tp) for tp in cluster.workers[1].assigned}
        if r == 3:
            dead = cluster.workers[1]
            found["ends"] = {tp: cluster.broker.end_offset(*tp) for tp in dead.assigned}
            found["redelivered"] = cluster.crash(1)
            found["duplicates"] = cluster.lineage_rows(found["redelivered"])
            assert len(cluster.workers) == 1

    cluster = run(tmp_path, 2, before_round=step, commit_lag=commit_lag, warmup=True)
    lag = (lambda t: commit_lag) if isinstance(commit_lag, int) else (lambda t: commit_lag.get(t, 0))
    # Exactly the lag's worth per partition of the dead worker (fewer where fewer came since the
    # checkpoint committed everything).
    expected_redelivered = sum(min(lag(t), found["ends"][(t, p)] - found["committed"][(t, p)])
                               for t, p in found["ends"])
    assert len(found["redelivered"]) == expected_redelivered > 0
    return cluster, found["redelivered"], found["duplicates"]


def assert_findings_once(cluster: TestingCluster) -> None:
    fired = identities(cluster.findings)
    assert set(fired) == STREAM.findings and all(n == 1 for n in fired.values()), fired
    assert budget_spent(cluster) == pytest.approx(BUDGET_CALLS * BUDGET_CALL_USD, abs=1e-9)
    assert retry_counts(cluster) == {f"user-{u}": RETRY_REPEATS for u in range(RETRY_USERS)}


def test_crash_of_a_keyed_worker_between_write_and_commit(tmp_path: Path) -> None:
    # Only usage records stay uncommitted: the keyed state is restored from its file, the
    # records between file and commit replayed into it alone, the uncommitted ones re-read.
    cluster, redelivered, duplicates = crash_run(tmp_path, {"usage": 2})
    assert {t for t, _, _ in redelivered} == {"usage"}
    # The dead worker's states are restored from their files and what it committed since is
    # replayed into them alone (the trace states' records too: committed, not in the files).
    assert {t for t, _, _ in cluster.replayed} <= {"usage", "llm_calls", "tool_calls", "agent_steps"}
    assert "usage" in {t for t, _, _ in cluster.replayed}
    assert counts(cluster) == expected_counts(WARM)
    # Re-read usage records write their findings again; the detectors do not fire again.
    assert len(cluster.sink.rows("findings")) == len(STREAM.findings) + duplicates.get("findings", 0)
    assert_findings_once(cluster)


def test_crash_between_write_and_commit(tmp_path: Path) -> None:
    # Every topic lags 2 records behind: a crash re-delivers up to 2 records per partition of
    # the dead worker. A re-delivered trace-topic record writes its rows again (at-least-once);
    # what a re-read otlp_spans record sends again is dropped by span id. Nothing is lost and no
    # condition fires twice.
    cluster, redelivered, duplicates = crash_run(tmp_path, 2)
    assert {t for t, _, _ in redelivered} >= {"otlp_spans", "llm_calls", "usage"}
    assert cluster.replayed
    base = expected_counts(WARM)
    got = counts(cluster)
    assert all(base[t] <= got[t] <= base[t] + duplicates.get(t, 0) for t in ENTITY_TABLES), (got, base, duplicates)
    assert sum(got[t] - base[t] for t in ENTITY_TABLES) < sum(duplicates.get(t, 0) for t in ENTITY_TABLES)
    span_ids = {t: {r["span_id"] for r in cluster.sink.rows(t)} for t in ENTITY_TABLES}
    assert {t: len(ids) for t, ids in span_ids.items()} == base  # nothing lost
    fired = identities(cluster.findings)
    assert set(fired) == STREAM.findings and all(n == 1 for n in fired.values()), fired


def test_crash_applies_detector_state_once(tmp_path: Path) -> None:
    cluster, _, _ = crash_run(tmp_path, 2)
    # Observed: budget spend $1.40 (4 calls counted twice), user-0's retries counted 7 times.
    assert retry_counts(cluster) == {f"user-{u}": RETRY_REPEATS for u in range(RETRY_USERS)}
    assert budget_spent(cluster) == pytest.approx(BUDGET_CALLS * BUDGET_CALL_USD, abs=1e-9)


def test_redelivered_request_does_not_count_its_calls_twice(tmp_path: Path) -> None:
    # One request: a trace calling search twice with the same arguments (a loop needs 3). The
    # worker mapping it crashes before committing it; the survivor maps it again.
    ids = Ids(3)
    trace_id, root_id = ids.trace(), ids.span()
    spans = [SpanSpec(trace_id, ids.span(), "execute_tool search", T0 + k, T0 + k + 0.2, {
        "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "search",
        "gen_ai.tool.call.arguments": '{"q": "refund"}'}, root_id) for k in range(2)]
    cluster = TestingCluster(2, tmp_path, FACTORY, commit_lag={"otlp_spans": 1})
    cluster.broker.produce("otlp_spans", 1, otlp_traces(spans))  # partition 1: worker 1's
    cluster.run_until_idle()
    assert cluster.findings == []
    assert cluster.crash(1) == [("otlp_spans", 1, 0)]
    cluster.run_until_idle()
    # The re-mapped request's spans were applied already: the trace stage drops them, rows and all.
    assert len(cluster.sink.rows("tool_calls")) == 2
    assert cluster.findings == []


@pytest.mark.parametrize("file_before", [False, True], ids=["no-file", "file-without-topic"])
def test_replay_covers_records_no_checkpoint_reflects(tmp_path: Path, file_before: bool) -> None:
    ids = Ids(5)
    trace, root, parent, child = ids.trace().hex(), ids.span().hex(), ids.span().hex(), ids.span().hex()
    call = {"trace_id": trace, "model": "gpt-4o-mini", "operation": "chat", "input_tokens": 10}
    child_row = orjson.dumps([{**call, "ts": T0, "span_id": child, "parent_span_id": parent}])
    parent_row = orjson.dumps([{**call, "ts": T0 + 1, "span_id": parent, "parent_span_id": root}])
    step_row = orjson.dumps([{"ts": T0, "trace_id": trace, "span_id": root, "operation": "invoke_agent"}])
    broker = TestingBroker()
    owner = FACTORY(broker.topics, PartitionCheckpointStore(tmp_path, "a"))
    if file_before:  # a checkpoint of partition 0 that has seen agent_steps only
        owner.on_record(Record("agent_steps", 0, 0, step_row))
        for state, doc in owner.snapshot_states(owner.owned_states()):
            owner.checkpoints.save(state.stage, state.partition, owner.checkpoints.encode(doc))
    owner.on_record(Record("llm_calls", 0, 0, child_row))  # processed and committed, then the owner dies
    heir = FACTORY(broker.topics, PartitionCheckpointStore(tmp_path, "a"))
    live = Record("llm_calls", 0, 1, parent_row)
    assert heir.replay_needed(live) == Replay("llm_calls", 0, 0, 1)


def test_replay_stops_at_the_committed_offset_when_the_first_live_record_comes_later(tmp_path: Path) -> None:
    """Committed up to 1, first record handed over at 3: 1 and 2 were skipped by the consumer, not
    processed by anyone, so they are live (processed in full before 3), not history to replay."""
    rows = [orjson.dumps([{"ts": T0 + k, "trace_id": "ab" * 16, "span_id": f"{k:016x}", "tool_name": "search"}])
            for k in range(4)]
    heir = FACTORY(TestingBroker().topics, PartitionCheckpointStore(tmp_path, "a"))
    live = Record("tool_calls", 0, 3, rows[3])
    assert heir.replay_needed(live, committed=1) == Replay("tool_calls", 0, 0, 1)
    for offset in (1, 2):
        assert heir.on_record(Record("tool_calls", 0, offset, rows[offset])).rows  # stored, not dropped as seen
    fresh = FACTORY(TestingBroker().topics, PartitionCheckpointStore(tmp_path / "none", "a"))
    assert fresh.replay_needed(Record("tool_calls", 0, 3, rows[3]), committed=0) is None


@pytest.mark.parametrize("bad", [None, b"", b"\xff not json"], ids=["tombstone", "empty", "undecodable"])
def test_replay_passes_over_dead_lettered_records(tmp_path: Path, bad: bytes | None) -> None:
    search = {"ts": T0, "trace_id": "ab" * 16, "tool_name": "search", "arguments": '{"q": 1}'}
    good = [orjson.dumps([{**search, "span_id": f"{k:016x}", "ts": T0 + k}]) for k in range(3)]
    broker = TestingBroker()
    owner = FACTORY(broker.topics, PartitionCheckpointStore(tmp_path, "a"))
    owner.on_record(Record("tool_calls", 0, 0, good[0]))
    for state, doc in owner.snapshot_states(owner.owned_states()):
        owner.checkpoints.save(state.stage, state.partition, owner.checkpoints.encode(doc))
    assert owner.on_record(Record("tool_calls", 0, 1, bad)).dead_letters == 1  # after the checkpoint
    owner.on_record(Record("tool_calls", 0, 2, good[1]))  # committed, then the owner dies
    heir = FACTORY(broker.topics, PartitionCheckpointStore(tmp_path, "a"))
    live = Record("tool_calls", 0, 3, good[2])
    replay = heir.replay_needed(live)
    assert replay == Replay("tool_calls", 0, 1, 3)
    for offset, value in ((1, bad), (2, good[1])):
        heir.replay(Record("tool_calls", 0, offset, value))
    assert [f.kind for f in heir.on_record(live).findings] == ["repeated_tool_call"]


# -- bad records -----------------------------------------------------------------------------------


def good_records() -> dict[str, tuple[bytes | None, list[bytes]]]:
    """(key, two good values) per input topic; each good value makes one row (usage: none)."""
    ids = Ids(9)
    out: dict[str, tuple[bytes | None, list[bytes]]] = {}
    out["otlp_spans"] = (None, [otlp_traces([SpanSpec(ids.trace(), ids.span(), "chat gpt-4o-mini", T0 + k, T0 + k + 0.3,
                                                      chat("gpt-4o-mini", 100, 10))]) for k in range(2)])
    out["otlp_logs"] = (None, [otlp_logs([LogSpec(ids.trace(), ids.span(), T0 + k, body=f"hello {k}")])
                               for k in range(2)])
    out["llm_calls"] = (None, [orjson.dumps([LlmCall(T0 + k, ids.trace().hex(), ids.span().hex(), model="m")])
                               for k in range(2)])
    out["tool_calls"] = (None, [orjson.dumps([ToolCall(T0 + k, ids.trace().hex(), ids.span().hex(),
                                                       tool_name=f"t{k}")]) for k in range(2)])
    out["agent_steps"] = (None, [orjson.dumps([AgentStep(T0 + k, ids.trace().hex(), ids.span().hex())])
                                 for k in range(2)])
    out["llm_messages"] = (None, [orjson.dumps([{"ts": T0 + k, "trace_id": ids.trace().hex(),
                                                 "span_id": ids.span().hex(), "content": "hi"}]) for k in range(2)])
    out["gpu_samples"] = (None, [orjson.dumps([GpuSample(T0 + k, "node-1", 0, memory_used_bytes=1 << 30,
                                                         memory_total_bytes=8 << 30)]) for k in range(2)])
    # Usage for a budgeted project: $0.30 each; both must reach the budget detector.
    out["usage"] = (b"llm_calls:project", [orjson.dumps([LlmCall(T0 + k, ids.trace().hex(), ids.span().hex(),
                                                                project=BUDGET_PROJECT, cost_usd=0.3)])
                                           for k in range(2)])
    return out


BAD_VALUES = ((None, "tombstone (record with a null value)"), (b"", "empty record (0 bytes)"),
              (b"\xff\xfe not a record", None))


def test_bad_records_on_every_topic_are_dead_letters(tmp_path: Path) -> None:
    cluster = TestingCluster(2, tmp_path, FACTORY)
    good = good_records()
    for topic, (key, (first, last)) in good.items():
        for value in (first, *(v for v, _ in BAD_VALUES), last):
            cluster.broker.produce(topic, 0, value, key)
    cluster.broker.produce("usage", 0, good["usage"][1][0], b"nonsense:field")
    cluster.run_until_idle()

    letters = cluster.dead_letters()
    by_source = collections.defaultdict(list)
    for letter in letters:
        source = letter.header("agentwatch.dlq.topic").decode()
        offset = int(letter.header("agentwatch.dlq.offset"))
        by_source[source].append((offset, letter.header(DLQ_REASON_HEADER).decode(), letter.value))
    assert set(by_source) == set(good)
    for topic, found in by_source.items():
        found.sort()
        expected_offsets = [1, 2, 3] + ([5] if topic == "usage" else [])
        assert [o for o, _, _ in found] == expected_offsets, (topic, found)
        for (offset, reason, value), (bad, expected_reason) in zip(found, BAD_VALUES):
            if expected_reason is not None:
                assert reason == expected_reason
            else:
                assert reason.startswith(f"undecodable {topic} record"), (topic, reason)
                assert value == bad  # the record kept whole for inspection
        if topic == "usage":
            assert found[-1][1] == "usage record for unknown table/family 'nonsense:field'"
    # The neighbours went through: one row per good value, and both usage records were counted.
    rows = cluster.sink.counts()
    assert {t: rows.get(t, 0) for t in ("llm_calls", "tool_calls", "agent_steps", "llm_messages", "gpu_samples")} == {
        "llm_calls": 2 + 2, "tool_calls": 2, "agent_steps": 2, "llm_messages": 2 + 2, "gpu_samples": 2}
    assert [(f.kind, round(f.value, 9)) for f in cluster.findings] == [("budget_daily_50pct", 0.6)]


# -- checkpoint files ------------------------------------------------------------------------------


def test_corrupt_checkpoints_are_set_aside_and_the_partition_is_rebuilt_from_its_log(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rounds = (WARMUP, *STREAM.rounds)
    first = TestingCluster(2, tmp_path, FACTORY)
    for exports in rounds[:2]:  # the warm-up and round 0: 4 budget calls, 2 nested traces' children
        for payload in exports:
            first.broker.produce("otlp_spans", None, payload)
        first.run_until_idle()
    first.stop()  # commit, then every state to its file
    store = PartitionCheckpointStore(tmp_path, "agentwatch-test")
    nested = {r["trace_id"] for r in first.sink.rows("llm_calls") if r["service"] == "nested-agent"}
    assert len(nested) == 2
    trace_p = partition_for(sorted(nested)[0], TRACE_PARTITIONS)
    keyed_p = partition_for(BUDGET_PROJECT, USAGE_PARTITIONS)
    files_before = set(store.stored())
    assert {("trace", trace_p), ("keyed", keyed_p)} <= files_before
    store.path("trace", trace_p).write_bytes(b'{"format": "agentwatch.partition-state", "vers')
    store.path("keyed", keyed_p).write_bytes(orjson.dumps({"format": "agentwatch.partition-state", "version": 99}))

    caplog.set_level(logging.WARNING)
    second = TestingCluster(2, tmp_path, FACTORY, broker=first.broker)
    for exports in rounds[2:]:
        for payload in exports:
            second.broker.produce("otlp_spans", None, payload)
        second.run_until_idle()

    aside = sorted(p.name.split(".corrupt-")[0] for p in store.directory.glob("*.corrupt-*"))
    assert aside == sorted([f"trace-{trace_p}.json", f"keyed-{keyed_p}.json"])
    assert not store.path("trace", trace_p).exists() and not store.path("keyed", keyed_p).exists()
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert f"trace-{trace_p}.json" in warned and f"keyed/{keyed_p}" in warned
    assert second.dead_letters() == []
    # Without a file, a partition's state is rebuilt by replaying its log from offset 0: the
    # budget partition counts round 0's calls again ($1.12, all three levels once), and the trace
    # partition remembers the children whose parents arrive now.
    assert second.replayed
    assert budget_spent(second) == pytest.approx(BUDGET_CALLS * BUDGET_CALL_USD, abs=1e-9)
    budget = sorted(f.kind for f in first.findings + second.findings if f.detector == "budget")
    assert budget == ["budget_daily_100pct", "budget_daily_50pct", "budget_daily_80pct"]
    rows = {t: len(first.sink.rows(t)) + len(second.sink.rows(t)) for t in ENTITY_TABLES}
    assert rows == {"llm_calls": STREAM.llm_calls + WARM, "tool_calls": STREAM.tool_calls + WARM,
                    "agent_steps": STREAM.agent_steps + WARM}
    # Every other partition the new workers hold was restored from its file.
    corrupted = {("trace", trace_p), ("keyed", keyed_p)}
    held = {(s.stage, s.partition): s for s in second.states()}
    assert corrupted <= set(held)
    for where, state in held.items():
        assert bool(state.restored_offsets) == (where in files_before - corrupted), where


# -- drift windows and the clock ---------------------------------------------------------------------


@pytest.mark.parametrize("n_workers", [1, 3])
def test_drift_windows_close_when_the_clock_passes_them(tmp_path: Path, n_workers: int) -> None:
    from agentwatch.streams.drift_sampler import DriftSampler

    factory = dataflow_factory(lambda: build_detectors(DETECTOR_CONFIG),
                               drift_sampler=lambda: DriftSampler(window_s=60.0, sample_size=8,
                                                                  min_window_size=5, grace_s=30.0))
    clock = Clock(T0)
    cluster = TestingCluster(n_workers, tmp_path, factory, clock=clock)
    ids = Ids(13)
    resource = (("service.name", "chat-app"), ("agentwatch.project", "p"))
    prompts = [f"question number {k} about invoices" for k in range(12)]
    for half in (prompts[:6], prompts[6:]):
        cluster.broker.produce("otlp_spans", None, otlp_traces([
            SpanSpec(ids.trace(), ids.span(), "chat gpt-4o-mini", T0 + k * 0.5, T0 + k * 0.5 + 0.3, chat(
                "gpt-4o-mini", 50 + k, 5, **{"gen_ai.prompt.0.role": "user", "gen_ai.prompt.0.content": p}),
                     b"", resource) for k, p in enumerate(half)]))
        cluster.run_until_idle()
        if n_workers > 1 and half is prompts[:6]:  # the open window is handed over mid-way
            cluster.rebalance(1)
    # Window [T0 // 60 * 60, + 60 s) closes once the clock is 30 s (grace) past its end.
    end = (T0 // 60) * 60 + 60
    clock.advance(end + 30 - T0 - 0.5)
    assert cluster.due_drift_windows() == []
    clock.advance(0.5)
    due = cluster.due_drift_windows()
    assert len(due) == 1
    _, state, windows = due[0]
    assert state.partition == partition_for("chat-app", USAGE_PARTITIONS)
    assert [(w.key, w.start_ts, w.end_ts, w.seen, len(w.texts)) for w in windows] == [
        ("service=chat-app", end - 60, end, 12, 8)]
    assert set(windows[0].texts) <= set(prompts)
    assert cluster.due_drift_windows() == []  # taken once


def test_a_checkpoint_of_another_log_epoch_keeps_its_state_and_drops_its_offsets(tmp_path: Path) -> None:
    # The embedded broker keeps topics in memory: a second `up` on the same data directory starts
    # every log at offset 0 again. The loop detector's count of earlier calls is kept; the new
    # log's records are neither skipped (as "already reflected") nor replayed from the old offsets.
    search = {"trace_id": "cd" * 16, "tool_name": "search", "arguments": '{"q": 1}'}
    calls = [orjson.dumps([{**search, "ts": T0 + k, "span_id": f"{k + 1:016x}"}]) for k in range(3)]
    first = dataflow_factory(detectors, log_epoch="run-1")(TestingBroker().topics, PartitionCheckpointStore(tmp_path, "a"))
    for offset in range(2):
        first.on_record(Record("tool_calls", 0, offset, calls[offset]))
    for state, doc in first.snapshot_states(first.owned_states()):
        first.checkpoints.save(state.stage, state.partition, first.checkpoints.encode(doc))
    second = dataflow_factory(detectors, log_epoch="run-2")(TestingBroker().topics, PartitionCheckpointStore(tmp_path, "a"))
    live = Record("tool_calls", 0, 0, calls[2])  # offset 0 of the new log
    assert second.replay_needed(live) is None
    assert [f.kind for f in second.on_record(live).findings] == ["repeated_tool_call"]
    same = dataflow_factory(detectors, log_epoch="run-1")(TestingBroker().topics, PartitionCheckpointStore(tmp_path, "a"))
    assert same.replay_needed(Record("tool_calls", 0, 5, calls[2])) == Replay("tool_calls", 0, 2, 5)


def test_each_drift_key_belongs_to_the_one_keyed_partition_its_prompts_go_to(tmp_path: Path) -> None:
    flow = FACTORY(TestingBroker().topics, PartitionCheckpointStore(tmp_path, "a"))
    flow.topology = dataclasses.replace(flow.topology, drift_field="service")
    states = [flow.keyed_state(p) for p in range(USAGE_PARTITIONS)]
    for service in ("shop", "search-api", "", "ünïcode"):
        owners = [s.partition for s in states if flow.owns_drift_key(s)(f"service={service}/agent=a")]
        assert owners == [partition_for(service, USAGE_PARTITIONS)]
    assert all(flow.owns_drift_key(s)("agent=a") for s in states)  # no partition field: everywhere


def test_hostile_rows_never_raise_and_a_span_twice_in_one_record_is_one_row(tmp_path: Path) -> None:
    flow = FACTORY(TestingBroker().topics, PartitionCheckpointStore(tmp_path, "a"))
    surrogate = b'[{"ts": 1.0, "trace_id": "t1", "span_id": "s1", "service": "\\ud800", "model": "m"}]'
    for topic in ("llm_calls", "gpu_samples", "usage"):
        flow.on_record(Record(topic, 0, 0, surrogate, key=b"llm_calls:project@llm_calls:0:0:0"))  # no raise
    twice = orjson.dumps([{"ts": 2.0, "trace_id": "t2", "span_id": "s9", "tool_name": "x"}] * 2)
    out = flow.on_record(Record("tool_calls", 0, 1, twice))
    assert [(r.table, r.count, len(orjson.loads(r.payload))) for r in out.rows] == [("tool_calls", 1, 1)]


def test_usage_records_stay_under_the_record_limit_and_each_chunk_is_applied_once(tmp_path: Path) -> None:
    flow = dataflow_factory(detectors, max_message_bytes=20_000)(TestingBroker().topics, PartitionCheckpointStore(tmp_path, "a"))
    calls = [{"ts": T0 + i, "trace_id": "ab" * 16, "span_id": f"{i:016x}", "project": BUDGET_PROJECT,
              "model": "m", "prompt": "p" * 900, "cost_usd": 0.01} for i in range(40)]  # ~45 KB of usage
    out = flow.on_record(Record("llm_calls", 0, 0, orjson.dumps(calls)))
    usage = [s for s in out.sends if s.topic == "usage" and s.key.startswith(b"llm_calls:project")]
    assert len(usage) > 1 and all(len(s.value) <= flow.max_record_bytes for s in usage)
    assert sum(len(orjson.loads(s.value)) for s in usage) == 40
    for offset, send in enumerate(usage * 2):  # every chunk delivered twice (a re-send after a crash)
        flow.on_record(Record("usage", send.partition, offset, send.value, send.key))
    assert budget_spent_in(flow) == pytest.approx(0.40)


def budget_spent_in(flow: Any) -> float:
    return sum(usd for state in flow.keyed_states.values()
               for project, _p, _s, _e, usd, *_ in state.runners["project"].detectors["budget"].snapshot()["periods"]
               if project == BUDGET_PROJECT and _p == "daily")


def test_a_new_log_epoch_forgets_which_source_offsets_the_keyed_stage_applied(tmp_path: Path) -> None:
    def usage(offset: int) -> Record:
        call = [{"ts": T0, "trace_id": f"t{offset}", "span_id": "s", "project": BUDGET_PROJECT, "cost_usd": 0.3}]
        return Record("usage", 0, offset, orjson.dumps(call), key=f"llm_calls:project@llm_calls:1:{offset}:0".encode())

    first = dataflow_factory(detectors, log_epoch="run-1")(TestingBroker().topics, PartitionCheckpointStore(tmp_path, "a"))
    first.on_record(usage(0))
    first.on_record(usage(1))
    for state, doc in first.snapshot_states(first.owned_states()):
        first.checkpoints.save(state.stage, state.partition, first.checkpoints.encode(doc))
    second = dataflow_factory(detectors, log_epoch="run-2")(TestingBroker().topics, PartitionCheckpointStore(tmp_path, "a"))
    second.on_record(usage(0))  # the new log's offset 0: new spend, not a re-send
    assert budget_spent_in(second) == pytest.approx(0.9)
