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


def test_run_logs_live_under_the_data_dir_and_only_the_newest_runs_stay(tmp_path):
    from agentwatch.stack import KEEP_RUN_LOGS

    data = tmp_path / "data"
    stack = Stack(Settings(data_dir=data, metrics_port=0), say=lambda _m: None)
    assert stack.run_dir.parent == data / "logs" and stack.run_dir.name.startswith("run-")
    assert stack.run_dir.is_dir() and not str(stack.run_dir).startswith("/tmp/agentwatch-run-")
    (stack.run_dir / "worker-0.log").write_text("first run\n")
    later = [Stack(Settings(data_dir=data, metrics_port=0), say=lambda _m: None).run_dir
             for _ in range(KEEP_RUN_LOGS + 2)]
    assert len(set(later)) == len(later)  # one folder per run, even within one second
    kept = sorted(p for p in (data / "logs").iterdir())
    assert kept == sorted(later[-KEEP_RUN_LOGS:])  # the oldest went, the newest stay
    assert stack.run_dir not in kept
    # An explicit run_dir is used as given; nothing is made under the data dir for it.
    assert Stack(Settings(data_dir=tmp_path / "other"), run_dir=tmp_path / "run").run_dir == tmp_path / "run"
    assert not (tmp_path / "other").exists()


@pytest.mark.slow
def test_a_started_and_stopped_stack_leaves_no_tmp_run_folder_and_says_where_its_logs_are(tmp_path):
    import glob
    import os

    from agentwatch.broker import free_port

    def tmp_runs() -> set[str]:
        return set(glob.glob("/tmp/agentwatch-run-*"))

    settings = Settings(broker_port=free_port(), otlp_grpc_port=free_port(), otlp_http_port=free_port(),
                        metrics_port=free_port(4), data_dir=tmp_path / "data", gpu_exporter="off")
    started_at = time.time()
    before = tmp_runs()
    said: list[str] = []
    stack = Stack(settings, say=said.append)
    try:
        stack.start()
    finally:
        stack.stop()
    # Other tests may run at the same time: only folders new since this test began count.
    new = {p for p in tmp_runs() - before if os.stat(p).st_ctime >= started_at - 1}
    assert new == set(), f"left in /tmp: {sorted(new)}"
    assert stack.run_dir.parent == tmp_path / "data" / "logs"
    assert {"broker.log", "collector.log", "worker-0.log"} <= {p.name for p in stack.run_dir.iterdir()}
    assert f"logs      {stack.run_dir}" in said


def test_free_ports_come_from_below_the_ephemeral_range_and_are_free():
    import socket

    from agentwatch.broker import _ephemeral_range, free_port

    low, _high = _ephemeral_range()
    for count in (1, 5):
        port = free_port(count)
        if low > 10_000 + count:
            # An outgoing connection can never be handed it between this check and the bind.
            assert 10_000 <= port and port + count <= low
        for p in range(port, port + count):
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", p))
