"""The supervisor's restart policy on real child processes (no broker: children are short Python
programs, so each behaviour is checked in well under a second)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from agentwatch.settings import Settings
from agentwatch.stack import RestartPolicy, Stack, StackError

FAST = RestartPolicy(initial_backoff_s=0.05, max_backoff_s=0.2, max_deaths=3, window_s=30)


def stack_with(tmp_path: Path, policy: RestartPolicy = FAST) -> tuple[Stack, list[str]]:
    said: list[str] = []
    stack = Stack(Settings(data_dir=tmp_path / "data", metrics_port=0), run_dir=tmp_path / "run",
                  say=said.append, restart_policy=policy)
    stack.run_dir.mkdir()
    return stack, said


def poll_until(stack: Stack, predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met"
        stack.poll()
        time.sleep(0.02)


def metric(stack: Stack, line_start: str) -> float:
    for line in generate_latest(stack.metrics.registry).decode().splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{line_start} not exposed")


def test_backoff_doubles_from_the_initial_delay_up_to_the_cap():
    policy = RestartPolicy(initial_backoff_s=0.5, max_backoff_s=15.0)
    assert [policy.backoff_s(n) for n in range(1, 8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0]


def test_a_dead_child_is_restarted_counted_and_reported(tmp_path):
    stack, said = stack_with(tmp_path)
    marker = tmp_path / "starts"
    # Counts its starts in a file; dies on the first, stays up on the second.
    script = ("import pathlib, sys, time\n"
              f"p = pathlib.Path({str(marker)!r})\n"
              "starts = len(p.read_text().splitlines()) + 1 if p.exists() else 1\n"
              "p.write_text('x\\n' * starts)\n"
              "sys.exit(3) if starts == 1 else time.sleep(30)\n")
    child = stack._spawn("worker-0", [sys.executable, "-c", script])
    try:
        poll_until(stack, lambda: child.restarts == 1 and child.restart_at is None)
        poll_until(stack, lambda: marker.exists() and len(marker.read_text().splitlines()) == 2)
        assert child.proc.poll() is None  # the second run is alive
        assert any("worker-0 died (exit code 3); restarting in 0.1s (restart 1)" in m for m in said), said
        assert any(m.startswith("worker-0 restarted (pid") for m in said)
        assert metric(stack, 'agentwatch_supervisor_restarts_total{child="worker-0"}') == 1
        assert metric(stack, 'agentwatch_supervisor_child_up{child="worker-0"}') == 1
        assert all(c.proc.poll() is None for c in stack.children)
    finally:
        stack.stop(timeout_s=2)


def test_a_child_that_keeps_dying_makes_the_supervisor_give_up_with_its_log(tmp_path):
    stack, said = stack_with(tmp_path)
    stack._spawn("notifier", [sys.executable, "-c", "print('bad routes file'); raise SystemExit(2)"])
    try:
        with pytest.raises(StackError, match=r"notifier died 3 times within 30s \(last: exit code 2\); "
                                             r"giving up[\s\S]*bad routes file"):
            stack.supervise(lambda: False, every_s=0.02)
        assert stack.children[0].restarts == 2
    finally:
        stack.stop(timeout_s=2)


def test_deaths_outside_the_window_do_not_add_up(tmp_path):
    stack, _said = stack_with(tmp_path, RestartPolicy(initial_backoff_s=0.01, max_deaths=2, window_s=0.3))
    child = stack._spawn("gpu-exporter", [sys.executable, "-c", "import time; time.sleep(0.4)"])
    try:
        poll_until(stack, lambda: child.restarts >= 3, timeout_s=15)  # one death per 0.4 s never makes 2 per 0.3 s
    finally:
        stack.stop(timeout_s=2)


def test_collector_export_failures_are_reported_and_counted(tmp_path):
    from agentwatch.collectors.rotel import CollectorLogWatch

    stack, said = stack_with(tmp_path)
    log = tmp_path / "run" / "collector.log"
    line = ("2026-11-29T11:02:03.000Z ERROR rotel::exporters::kafka::exporter: Failed to send traces: "
            "Message production error: MessageSizeTooLarge (Broker: Message size too large)\n")
    log.write_text("2026-11-29T11:02:02.000Z  INFO rotel: started\n")
    stack._collector_log = CollectorLogWatch(log)
    stack.poll()
    assert metric(stack, "agentwatch_collector_export_failures_total") == 0
    with open(log, "a") as f:
        f.write(line * 2)
    stack.poll()
    assert metric(stack, "agentwatch_collector_export_failures_total") == 2
    assert any(m.startswith("collector: 2 export(s) to Kafka failed; first:") and "MessageSizeTooLarge" in m
               for m in said)
