"""Scale-out: the same recorded stream gives the same rows, cost and findings with 1, 2 or 3
workers, and with one of two workers killed mid-stream.

The stream (tests/support/scaleout_stream.py) holds what breaks when state is keyed by one thing
and the stream split by another: nested model calls whose LLM-looking parent arrives in a later
export, a project's budget spent over many traces, clients retrying one prompt in new traces,
agent loops. Its expectations are worked out from its construction and the pricing file, not
from agentwatch's code.
"""

from __future__ import annotations

import os
import signal
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

from agentwatch.broker import free_port
from agentwatch.stack import Stack
from bench.faults import post_http
from tests.support.scaleout_stream import RecordedStream, recorded_stream

from stack_helpers import stack_settings

pytestmark = pytest.mark.slow

SPAN_TABLES = ("llm_calls", "tool_calls", "agent_steps")


@pytest.fixture(scope="module")
def stream() -> RecordedStream:
    return recorded_stream(time.time())


def supervise_until(stack: Stack, predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Poll ``predicate`` while supervising the stack (a killed worker is restarted meanwhile)."""
    deadline = time.monotonic() + timeout_s
    while True:
        stack.poll()
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout_s:g}s (last value {value!r})")
        time.sleep(0.2)


def _query(data_dir: Path, sql: str) -> list[tuple]:
    from agentwatch.streams.snapshots import connect

    con = connect(data_dir)
    try:
        return con.sql(sql).fetchall()
    except Exception:  # a table with no file yet
        return []
    finally:
        con.close()


def stored_span_ids(data_dir: Path) -> int:
    """Distinct span ids in the span tables (each span of the stream lands in exactly one)."""
    union = " UNION ALL ".join(f"SELECT span_id FROM {t}" for t in SPAN_TABLES)
    rows = _query(data_dir, f"SELECT count(DISTINCT span_id) FROM ({union})")
    return rows[0][0] if rows else 0


def send(stack: Stack, stream: RecordedStream, start: int, stop: int, timeout_s: float = 90.0) -> None:
    """Send exports[start:stop], each acknowledged; at a barrier, wait until every span sent so
    far is stored (what a few seconds' export delay gives a pipeline that keeps up)."""
    port = stack.settings.otlp_http_port
    for i in range(start, stop):
        if i in stream.barriers:
            sent = sum(len(ids) for ids in stream.export_span_ids[:i])
            supervise_until(stack, lambda: stored_span_ids(stack.settings.data_dir) >= sent, timeout_s,
                            f"spans of exports[:{i}] stored")
        status = post_http(port, stream.exports[i])
        assert status == 200, f"export {i} answered {status}"


@dataclass
class Outcome:
    rows: dict[str, int]  # in the analyst views: one row per span
    stored: dict[str, int]  # in the _raw views: every copy a redelivered record wrote again
    cost_usd: float
    # (detector, kind, key) -> event times of its non-resolved findings (one per row)
    firing: dict[tuple[str, str, str], list[float]] = field(default_factory=dict)
    identities: frozenset[tuple[str, str, str]] = frozenset()

    def summary(self) -> str:
        counts = ", ".join(f"{t} {self.rows[t]} rows ({self.stored[t]} stored)" for t in SPAN_TABLES)
        return f"{counts}; cost ${self.cost_usd:.6f}; {sum(map(len, self.firing.values()))} firing findings"


def read_outcome(data_dir: Path) -> Outcome:
    rows, stored = {}, {}
    for table in SPAN_TABLES:
        found = _query(data_dir, f"SELECT (SELECT count(*) FROM {table}), (SELECT count(*) FROM {table}_raw)")
        rows[table], stored[table] = found[0] if found else (0, 0)
    cost = _query(data_dir, "SELECT coalesce(sum(cost_usd), 0) FROM llm_calls")
    firing: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    identities = set()
    for detector, kind, key, ts, resolved in _query(data_dir, "SELECT detector, kind, key, ts, resolved FROM findings"):
        identities.add((detector, kind, key))
        if not resolved:
            firing[(detector, kind, key)].append(ts)
    return Outcome(rows, stored, float(cost[0][0]) if cost else 0.0, dict(firing), frozenset(identities))


def settle(stack: Stack, stream: RecordedStream, timeout_s: float = 90.0) -> Outcome:
    """Wait until every span is stored, then until the findings stop changing: at once when
    they match the expected set and have been still for 2 s, else after 6 s of stillness."""
    data_dir = stack.settings.data_dir
    supervise_until(stack, lambda: stored_span_ids(data_dir) >= stream.spans, timeout_s, "every span stored")
    deadline = time.monotonic() + 45.0
    last, changed_at = None, time.monotonic()
    while True:
        stack.poll()
        outcome = read_outcome(data_dir)
        seen = (outcome.identities, sum(map(len, outcome.firing.values())))
        now = time.monotonic()
        if seen != last:
            last, changed_at = seen, now
        still = now - changed_at
        if (outcome.identities == stream.findings and still >= 2.0) or still >= 6.0 or now > deadline:
            return outcome
        time.sleep(0.25)


def problems(outcome: Outcome, stream: RecordedStream, *, exact_replays_allowed: bool) -> list[str]:
    """What differs from the stream's expectations (empty when nothing does), as analysts see it."""
    out = []
    expected_rows = {"llm_calls": stream.llm_calls, "tool_calls": stream.tool_calls, "agent_steps": stream.agent_steps}
    for table in SPAN_TABLES:
        if outcome.rows[table] != expected_rows[table]:
            out.append(f"{table}: {outcome.rows[table]} rows, expected {expected_rows[table]}")
    if abs(outcome.cost_usd - stream.total_cost_usd) > 1e-6:
        out.append(f"sum(cost_usd) {outcome.cost_usd:.6f}, expected {stream.total_cost_usd:.6f}")
    missing = sorted(stream.findings - outcome.identities)
    extra = sorted(outcome.identities - stream.findings)
    if missing:
        out.append(f"{len(missing)} findings missing: {missing}")
    if extra:
        out.append(f"{len(extra)} unexpected findings: {extra}")
    for identity, times in sorted(outcome.firing.items()):
        # A record processed twice after a crash repeats a finding with the same event time, which
        # the notifier absorbs by identity (dedup key, status, finding time); another time is a
        # second firing of the same condition.
        fired = len(set(times)) if exact_replays_allowed else len(times)
        if fired > 1:
            out.append(f"{identity} fired {fired} times (event times {sorted(times)})")
    return out


def run_stack(tmp_path: Path, stream: RecordedStream, workers: int) -> Stack:
    settings = stack_settings(tmp_path / "data", workers=workers, gpu_exporter="off", detectors=stream.detectors)
    # Workers, notifier and supervisor number their /metrics ports from metrics_port.
    settings = settings.model_copy(update={"metrics_port": free_port(workers + 2)})
    return Stack(settings, say=lambda _m: None).start(timeout_s=60.0)


@pytest.mark.parametrize("workers", [1, 2, 3], ids=lambda n: f"workers={n}")
def test_the_recorded_stream_gives_the_same_rows_cost_and_findings_for_any_worker_count(tmp_path, stream, workers):
    started = time.monotonic()
    stack = run_stack(tmp_path, stream, workers)
    try:
        send(stack, stream, 0, len(stream.exports))
        outcome = settle(stack, stream)
        assert all(c.proc.poll() is None for c in stack.children)
    finally:
        stack.stop()
    print(f"workers={workers}: {outcome.summary()} ({time.monotonic() - started:.1f}s)")
    found = problems(outcome, stream, exact_replays_allowed=False)
    assert outcome.stored == outcome.rows, "no worker died, so no record was processed twice"
    assert not found, f"workers={workers}:\n  " + "\n  ".join(found)


def test_sigkill_of_one_of_two_workers_mid_stream_loses_and_doubles_no_finding(tmp_path, stream):
    """Half the stream, SIGKILL of worker-1 (as the OOM killer does), the rest while the
    supervisor restarts it. Replayed records may store rows again (same span id) and findings
    (same event time); analysts must see every span once and the exact cost, and every expected
    finding must fire, none twice."""
    stack = run_stack(tmp_path, stream, 2)
    half = stream.barriers[len(stream.barriers) // 2]
    victim = next(c for c in stack.children if c.name == "worker-1")
    try:
        send(stack, stream, 0, half)
        pid = victim.proc.pid
        os.kill(pid, signal.SIGKILL)
        send(stack, stream, half, len(stream.exports))
        supervise_until(stack, lambda: victim.restarts == 1 and victim.restart_at is None and victim.proc.pid != pid,
                        60, "worker-1 restarted")
        outcome = settle(stack, stream)
        assert all(c.proc.poll() is None for c in stack.children)
    finally:
        stack.stop()
    print(f"workers=2, worker-1 killed after export {half}: {outcome.summary()}")
    found = problems(outcome, stream, exact_replays_allowed=True)
    assert not found, "workers=2, worker-1 SIGKILLed mid-stream:\n  " + "\n  ".join(found)
