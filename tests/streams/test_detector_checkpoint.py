"""Detector checkpoints: a restored runner continues exactly like one that never stopped."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import pytest

from agentwatch.detectors.registry import DETECTORS, build_detectors
from agentwatch.detectors.runner import DetectorRunner
from agentwatch.events import ToolCall
from agentwatch.streams.checkpoint import FORMAT, FORMAT_VERSION, DetectorCheckpoint, checkpoint_path

WALL = 1_700_000_000.123


def _config(seed: int = 1) -> dict[str, dict[str, Any]]:
    # Each detector's contract parameters: small warm-ups and caps, so the contract streams
    # below make every detector build state and report.
    return {name: dict(cls.contract_stream(seed).params) for name, cls in DETECTORS.items()}


def _merged_stream(seed: int = 1) -> list[Any]:
    """Every registered detector's contract warm-up and events, merged in timestamp order."""
    events: list[Any] = []
    for cls in DETECTORS.values():
        stream = cls.contract_stream(seed)
        events += list(stream.warmup) + list(stream.events)
    events.sort(key=lambda e: e.ts)  # stable: equal timestamps keep their stream order
    return events


def _runner(seed: int = 1) -> DetectorRunner:
    return DetectorRunner(build_detectors(_config(seed)))


def _checkpoint(path: Path, runner: DetectorRunner, **kwargs: Any) -> DetectorCheckpoint:
    kwargs.setdefault("wall_clock", lambda: WALL)
    return DetectorCheckpoint(path, runner, **kwargs)


def _normalised(snap: dict[str, Any]) -> dict[str, Any]:
    # For comparing states only (tuples become lists); -inf is allowed here, see the xfail below.
    return json.loads(json.dumps(snap))


@pytest.fixture(scope="module")
def merged() -> list[Any]:
    return _merged_stream(1)


@pytest.fixture(scope="module")
def reference_findings(merged) -> list[list[Any]]:
    """Findings per event of a runner that never stops."""
    runner = _runner()
    return [runner.process([event]) for event in merged]


@pytest.mark.parametrize("fraction", (0.25, 0.5, 0.75))
def test_restored_runner_continues_like_an_uninterrupted_one(tmp_path, merged, reference_findings,
                                                             fraction):
    split = int(len(merged) * fraction)
    expected = [f for found in reference_findings[split:] for f in found]
    assert expected, "the events after the split must cause findings to compare"

    first = _runner()
    first.process(merged[:split])
    path = tmp_path / "state" / "detectors.json"
    assert _checkpoint(path, first).maybe_save(force=True)

    restored = _runner()
    assert _checkpoint(path, restored).restore()
    assert restored.process(merged[split:]) == expected
    # Without the checkpoint the same events find something else: the state is what mattered.
    assert _runner().process(merged[split:]) != expected


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_each_detectors_real_state_round_trips_through_the_file(tmp_path, name):
    cls = DETECTORS[name]
    stream = cls.contract_stream(7)
    runner = DetectorRunner([cls(**stream.params)])
    runner.process(list(stream.warmup) + list(stream.events))
    before = runner.snapshot()
    assert runner.state_sizes()[name] > 0
    path = tmp_path / "d.json"
    assert _checkpoint(path, runner).maybe_save(force=True)
    restored = DetectorRunner([cls(**stream.params)])
    assert _checkpoint(path, restored).restore()
    assert _normalised(restored.snapshot()) == _normalised(before)


def test_a_fresh_runner_with_budgets_configured_round_trips(tmp_path):
    path = tmp_path / "d.json"
    fresh = _runner()  # the contract config sets a budget for project "shop"
    assert _checkpoint(path, fresh).maybe_save(force=True)
    assert _checkpoint(path, _runner()).restore()


def _repeat(trace_id: str, i: int) -> ToolCall:
    return ToolCall(ts=1_000.0 + i, trace_id=trace_id, span_id=f"s{i}", tool_name="search",
                    arguments='{"q": "refund", "n": 3}')


def test_a_loop_in_progress_survives_the_restart(tmp_path):
    path = tmp_path / "d.json"
    before = DetectorRunner(build_detectors())
    assert before.process([_repeat("t1", 0), _repeat("t1", 1)]) == []
    _checkpoint(path, before).maybe_save(force=True)

    after = DetectorRunner(build_detectors())
    assert _checkpoint(path, after).restore()
    found = after.process([_repeat("t1", 2)])
    assert [(f.detector, f.kind, f.key, f.value) for f in found] == [
        ("agent_loop", "repeated_tool_call", "t1", 3.0)]
    assert DetectorRunner(build_detectors()).process([_repeat("t1", 2)]) == []


def test_file_has_a_header_naming_format_worker_time_and_detectors(tmp_path):
    runner = _runner()
    path = tmp_path / "d.json"
    checkpoint = _checkpoint(path, runner, worker_id="agentwatch-w3")
    checkpoint.maybe_save(force=True)
    doc = orjson.loads(path.read_bytes())
    assert doc["format"] == FORMAT and doc["version"] == FORMAT_VERSION
    assert doc["worker_id"] == "agentwatch-w3" and doc["saved_at"] == WALL
    assert doc["detectors"] == list(DETECTORS) == list(doc["state"])
    assert checkpoint.last_save_bytes == len(path.read_bytes())
    assert checkpoint.saves == 1 and checkpoint.last_save_s >= checkpoint.last_encode_s > 0


def test_worker_path_is_per_app_and_worker_under_data_dir(tmp_path):
    assert checkpoint_path(tmp_path, "shop", 2) == tmp_path / "state" / "detectors-shop-w2.json"


def test_missing_file_restores_nothing_and_moves_nothing(tmp_path):
    runner = _runner()
    assert _checkpoint(tmp_path / "d.json", runner).restore() is False
    assert list(tmp_path.iterdir()) == []


def _fresh_state() -> dict[str, Any]:
    return _normalised(_runner().snapshot())


def _runner_with_state(merged) -> DetectorRunner:
    runner = _runner()
    runner.process(merged)
    assert _normalised(runner.snapshot()) != _fresh_state()
    return runner


@pytest.mark.parametrize("content", (b"\x00\xffnot json at all", b'{"format": "agentwatch.detec',
                                     b"[1, 2, 3]", b'{"format": "something-else", "state": {}}'))
def test_corrupt_file_is_moved_aside_and_detectors_start_empty(tmp_path, merged, content):
    path = tmp_path / "d.json"
    path.write_bytes(content)
    runner = _runner()
    checkpoint = _checkpoint(path, runner)
    assert checkpoint.restore() is False
    assert not path.exists()
    aside = tmp_path / f"d.json.corrupt-{int(WALL * 1000)}"
    assert aside.read_bytes() == content
    assert _normalised(runner.snapshot()) == _fresh_state()
    assert checkpoint.failures == 1


def test_newer_format_version_is_moved_aside(tmp_path, merged):
    path = tmp_path / "d.json"
    _checkpoint(path, _runner_with_state(merged)).maybe_save(force=True)
    doc = orjson.loads(path.read_bytes())
    doc["version"] = FORMAT_VERSION + 1
    path.write_bytes(orjson.dumps(doc))
    runner = _runner()
    assert _checkpoint(path, runner).restore() is False
    assert (tmp_path / f"d.json.corrupt-{int(WALL * 1000)}").exists()
    assert _normalised(runner.snapshot()) == _fresh_state()


def test_a_detector_restore_failing_half_way_leaves_every_detector_empty(tmp_path, merged):
    path = tmp_path / "d.json"
    _checkpoint(path, _runner_with_state(merged)).maybe_save(force=True)
    doc = orjson.loads(path.read_bytes())
    names = list(doc["state"])
    # Detectors before agent_loop restore fine, then agent_loop raises on a malformed trace row.
    assert names.index("agent_loop") > 0
    doc["state"]["agent_loop"]["traces"] = [["t", [1.0]]]
    path.write_bytes(orjson.dumps(doc))
    runner = _runner()
    assert _checkpoint(path, runner).restore() is False
    assert _normalised(runner.snapshot()) == _fresh_state()
    assert not path.exists() and len(list(tmp_path.glob("d.json.corrupt-*"))) == 1


def test_saves_come_every_interval_of_the_injected_clock(tmp_path):
    now = [100.0]
    path = tmp_path / "d.json"
    checkpoint = _checkpoint(path, _runner(), every_s=30.0, clock=lambda: now[0])
    saved = []
    for t in (100.0, 129.9, 130.0, 145.0, 159.9, 160.0, 161.0):
        now[0] = t
        saved.append(checkpoint.maybe_save())
    assert saved == [False, False, True, False, False, True, False]
    assert checkpoint.maybe_save(force=True) and checkpoint.saves == 3
    now[0] = 190.9  # force restarted the interval at 161.0
    assert not checkpoint.maybe_save()
    now[0] = 191.0
    assert checkpoint.maybe_save()


def test_snapshot_raising_keeps_the_previous_file_and_retries_after_an_interval(tmp_path, merged):
    now = [0.0]
    path = tmp_path / "d.json"
    runner = _runner_with_state(merged)
    checkpoint = _checkpoint(path, runner, every_s=10.0, clock=lambda: now[0])
    assert checkpoint.maybe_save(force=True)
    good = path.read_bytes()

    def broken() -> dict[str, Any]:
        raise RuntimeError("snapshot failed")

    runner.detectors["slo"].snapshot = broken
    now[0] = 10.0
    assert checkpoint.maybe_save() is False  # logged, not raised
    assert path.read_bytes() == good and checkpoint.failures == 1
    now[0] = 15.0
    assert checkpoint.maybe_save() is False and checkpoint.failures == 1  # not retried at once
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.json"]
    restored = _runner()
    assert _checkpoint(path, restored).restore()
    assert _normalised(restored.snapshot()) == _normalised(orjson.loads(good)["state"])


def test_write_failing_mid_file_keeps_the_previous_file_and_no_temp(tmp_path, merged, monkeypatch):
    path = tmp_path / "d.json"
    runner = _runner()
    checkpoint = _checkpoint(path, runner)
    checkpoint.maybe_save(force=True)
    good = path.read_bytes()
    runner.process(merged)

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    assert checkpoint.maybe_save(force=True) is False
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.json"]


def test_restore_removes_temp_files_left_by_a_killed_save(tmp_path):
    path = tmp_path / "d.json"
    stale = tmp_path / ".d.json.abc123.tmp"
    stale.write_bytes(b"half a checkp")
    other = tmp_path / ".other.json.abc.tmp"  # another worker's file is left alone
    other.write_bytes(b"x")
    assert _checkpoint(path, _runner()).restore() is False
    assert not stale.exists() and other.exists()


def _record_where_snapshots_run(runner: DetectorRunner, names, log: Path) -> None:
    """Make ``names``' snapshot() append "name pid thread" to ``log`` (a forked child's writes
    to memory are invisible here; its writes to a file are not)."""
    for name in names:
        original = runner.detectors[name].snapshot

        def recording(name=name, original=original) -> dict[str, Any]:
            with open(log, "a") as out:
                out.write(f"{name} {os.getpid()} {threading.current_thread().name}\n")
            return original()

        runner.detectors[name].snapshot = recording


def _where(log: Path) -> list[tuple[str, int, str]]:
    rows = [line.split(" ", 2) for line in log.read_text().splitlines()]
    log.unlink()
    return [(name, int(pid), thread) for name, pid, thread in rows]


def test_async_save_snapshots_executor_detectors_on_their_thread(tmp_path, merged):
    runner = _runner_with_state(merged)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed-test")
    where = tmp_path / "where.log"
    _record_where_snapshots_run(runner, ("drift", "agent_loop"), where)
    path = tmp_path / "d.json"
    checkpoint = _checkpoint(path, runner, snapshot_executors={"drift": executor})
    me, main = os.getpid(), threading.main_thread().name

    async def save_twice() -> list[bool]:
        # A shutdown save while a timer save is in flight: both write, one after the other.
        return list(await asyncio.gather(checkpoint.maybe_save_async(force=True),
                                         checkpoint.maybe_save_async(force=True, background=False)))

    assert asyncio.run(save_twice()) == [True, True]
    drift_first, loop_forked, drift_second, loop_here = _where(where)
    assert drift_first[1] == drift_second[1] == me and drift_first[2].startswith("embed-test")
    assert loop_forked[0] == "agent_loop" and loop_forked[1] != me
    assert loop_here == ("agent_loop", me, main)
    assert checkpoint.saves == 2 and checkpoint.forked_saves == 1
    executor.shutdown()
    assert asyncio.run(checkpoint.maybe_save_async(force=True, background=False))  # shut down: here
    assert _where(where)[0] == ("drift", me, main)
    restored = _runner()
    assert _checkpoint(path, restored).restore()
    assert _normalised(restored.snapshot()) == _normalised(runner.snapshot())


class _SlowSnapshot:
    """Wraps a detector so its snapshot takes ``delay_s`` (a big state, in miniature)."""

    def __init__(self, detector: Any, delay_s: float) -> None:
        self.detector, self.delay_s = detector, delay_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self.detector, name)

    def snapshot(self) -> dict[str, Any]:
        time.sleep(self.delay_s)
        return self.detector.snapshot()


def test_background_save_leaves_the_loop_free_and_saves_the_state_at_the_fork(tmp_path, merged):
    half = len(merged) // 2
    runner = _runner()
    runner.process(merged[:half])
    at_fork = _normalised(runner.snapshot())
    runner.detectors["agent_loop"] = _SlowSnapshot(runner.detectors["agent_loop"], 1.0)
    path = tmp_path / "d.json"
    checkpoint = _checkpoint(path, runner)

    async def save_while_working() -> tuple[bool, int]:
        save = asyncio.create_task(checkpoint.maybe_save_async(force=True))
        await asyncio.sleep(0)  # the save forks and starts waiting for its child
        runner.process(merged[half:])  # after the fork: not in the file
        ticks = 0
        while not save.done():  # an in-process save would hold the loop for the whole second
            ticks += 1
            await asyncio.sleep(0.01)
        return await save, ticks

    saved, ticks = asyncio.run(save_while_working())
    assert saved and checkpoint.forked_saves == 1
    assert ticks > 10, "the event loop was blocked during the save"
    assert checkpoint.last_blocking_s < checkpoint.last_encode_s
    assert checkpoint.last_save_bytes == path.stat().st_size
    assert checkpoint.last_child_private_bytes > 0
    restored = _runner()
    assert _checkpoint(path, restored).restore()
    assert _normalised(restored.snapshot()) == at_fork != _normalised(runner.snapshot())


def test_background_save_failing_in_the_child_keeps_the_previous_file_and_says_why(tmp_path, merged,
                                                                                   caplog):
    path = tmp_path / "d.json"
    runner = _runner_with_state(merged)
    checkpoint = _checkpoint(path, runner)
    assert asyncio.run(checkpoint.maybe_save_async(force=True))
    good = path.read_bytes()

    def broken() -> dict[str, Any]:
        raise RuntimeError("snapshot failed in the child")

    runner.detectors["slo"].snapshot = broken
    assert asyncio.run(checkpoint.maybe_save_async(force=True)) is False
    assert checkpoint.failures == 1 and checkpoint.saves == 1
    assert "RuntimeError: snapshot failed in the child" in caplog.text
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.json"]


def test_background_save_killed_child_is_a_failure_not_a_hang(tmp_path, merged):
    path = tmp_path / "d.json"
    runner = _runner_with_state(merged)
    me = os.getpid()

    def killed() -> dict[str, Any]:
        if os.getpid() == me:  # never the test process itself
            raise AssertionError("snapshot ran in-process, not in a forked child")
        os.kill(os.getpid(), 9)  # as the OOM killer would
        return {}

    runner.detectors["slo"].snapshot = killed
    checkpoint = _checkpoint(path, runner)
    assert asyncio.run(checkpoint.maybe_save_async(force=True)) is False
    assert checkpoint.failures == 1 and not path.exists()


def test_background_save_falls_back_to_in_process_when_fork_fails(tmp_path, merged, monkeypatch,
                                                                  caplog):
    def no_memory() -> int:
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(os, "fork", no_memory)
    path = tmp_path / "d.json"
    runner = _runner_with_state(merged)
    checkpoint = _checkpoint(path, runner)
    assert asyncio.run(checkpoint.maybe_save_async(force=True))
    assert checkpoint.saves == 1 and checkpoint.forked_saves == 0
    assert "fork failed" in caplog.text
    restored = _runner()
    assert _checkpoint(path, restored).restore()
    assert _normalised(restored.snapshot()) == _normalised(runner.snapshot())


@pytest.mark.parametrize("env, forks", [({}, True), ({"AGENTWATCH_DETECTOR_CHECKPOINT_FORK": "false"}, False)])
def test_worker_checkpoint_forks_unless_turned_off(tmp_path, monkeypatch, env, forks):
    from agentwatch.settings import Settings
    from agentwatch.stack import settings_env
    from agentwatch.streams.worker import _restored_checkpoint

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings(data_dir=tmp_path)
    assert settings.detector_checkpoint_fork is forks
    # The supervisor hands settings to the worker process as AGENTWATCH_* variables: they read back.
    monkeypatch.setenv("AGENTWATCH_DETECTOR_CHECKPOINT_FORK",
                       settings_env(settings)["AGENTWATCH_DETECTOR_CHECKPOINT_FORK"])
    assert Settings(data_dir=tmp_path).detector_checkpoint_fork is forks
    checkpoint = _restored_checkpoint(settings, 0, _runner(), drift=None)
    assert checkpoint.fork_saves is forks


def test_interval_must_be_positive(tmp_path):
    with pytest.raises(ValueError):
        DetectorCheckpoint(tmp_path / "d.json", _runner(), every_s=0)


# -- the real stack: a worker restart keeps a loop in progress ------------------------------------


def _stack_settings(data_dir: Path):
    from agentwatch.broker import free_port
    from agentwatch.settings import Settings

    return Settings(broker_port=free_port(), otlp_grpc_port=free_port(), otlp_http_port=free_port(),
                    metrics_port=free_port(4), data_dir=data_dir, snapshot_flush_seconds=0.5,
                    gpu_exporter="off")


def _send_repeated_tool_calls(settings, trace_id: int, first: int, count: int) -> None:
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    provider = TracerProvider(resource=Resource.create({"service.name": "restart-test"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(
        endpoint=f"127.0.0.1:{settings.otlp_grpc_port}", insecure=True)))
    # The same trace in both runs: the spans hang under a remote parent of a fixed trace id.
    parent = trace.set_span_in_context(NonRecordingSpan(SpanContext(
        trace_id=trace_id, span_id=0xABCDEF, is_remote=True, trace_flags=TraceFlags(1))))
    tracer = provider.get_tracer("t")
    for i in range(first, first + count):
        with tracer.start_as_current_span("execute_tool search", context=parent, attributes={
                "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "search",
                "gen_ai.tool.call.arguments": '{"q": "refund status", "n": 3}',
                "gen_ai.tool.call.id": f"call-{i}"}):
            pass
    provider.shutdown()


def _rows(settings, sql: str) -> list[dict]:
    from agentwatch.streams.snapshots import query_snapshots

    try:
        return query_snapshots(settings.data_dir, sql).to_pylist()
    except Exception:  # no Parquet file for the table yet
        return []


def _wait(predicate, timeout_s: float = 45.0):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not met within {timeout_s}s")
        time.sleep(0.25)
    return value


LOOP_FINDINGS = ("SELECT key, value FROM findings WHERE detector = 'agent_loop' "
                 "AND kind = 'repeated_tool_call' AND NOT resolved")


def _third_repeat_fires_the_loop(data_dir: Path, trace_id: int) -> None:
    """A new stack on ``data_dir`` gets the trace's third repeat: the loop fires only if the
    first two came back from the checkpoint (a fresh, empty broker carries nothing over)."""
    from agentwatch.stack import Stack

    stack = Stack(_stack_settings(data_dir), say=lambda _m: None).start()
    try:
        _send_repeated_tool_calls(stack.settings, trace_id, 2, 1)
        found = _wait(lambda: _rows(stack.settings, LOOP_FINDINGS))
    finally:
        stack.stop()
    assert [(r["key"], r["value"]) for r in found] == [(f"{trace_id:032x}", 3.0)]


@pytest.mark.slow
def test_worker_restart_keeps_a_loop_in_progress(tmp_path):
    from agentwatch.stack import Stack

    data_dir = tmp_path / "data"
    trace_id = 0x0123456789ABCDEF0123456789ABCDEF

    first = Stack(_stack_settings(data_dir), say=lambda _m: None).start()
    try:
        _send_repeated_tool_calls(first.settings, trace_id, 0, 2)
        # In Parquet means the detect stage has seen them (rows are written after detection).
        _wait(lambda: len(_rows(first.settings, "SELECT * FROM tool_calls")) >= 2)
    finally:
        first.stop()  # SIGTERM: the worker saves its checkpoint on the way out
    saved = checkpoint_path(data_dir, "agentwatch", 0)
    assert saved.exists()
    assert _rows(first.settings, LOOP_FINDINGS) == []  # two repeats are not a loop yet

    _third_repeat_fires_the_loop(data_dir, trace_id)


@pytest.mark.slow
def test_worker_killed_keeps_the_state_of_its_last_background_save(tmp_path):
    """A SIGKILL skips the shutdown save: the state comes from a timer save made by a forked child."""
    import urllib.request

    from agentwatch.stack import Stack

    data_dir = tmp_path / "data"
    trace_id = 0x0FEDCBA9876543210FEDCBA987654321
    trace_hex = f"{trace_id:032x}"
    saved = checkpoint_path(data_dir, "agentwatch", 0)

    def holds_the_trace() -> bool:
        try:
            state = orjson.loads(saved.read_bytes())["state"]
        except (OSError, orjson.JSONDecodeError, KeyError):
            return False
        return any(key == trace_hex for key, _ in state["agent_loop"]["traces"])

    settings = _stack_settings(data_dir).model_copy(update={"detector_checkpoint_s": 1.0})
    first = Stack(settings, say=lambda _m: None).start()
    try:
        _send_repeated_tool_calls(first.settings, trace_id, 0, 2)
        _wait(lambda: len(_rows(first.settings, "SELECT * FROM tool_calls")) >= 2)
        _wait(holds_the_trace, timeout_s=30)
        with urllib.request.urlopen(f"http://127.0.0.1:{first.worker_metrics_ports()[0]}/metrics",
                                    timeout=10) as response:
            metrics = response.read().decode()
        copied = [float(line.split()[-1]) for line in metrics.splitlines()
                  if line.startswith("agentwatch_detector_checkpoint_child_private_bytes ")]
        assert copied and copied[0] > 0, "the timer save did not run in a forked child"
        worker = next(c for c in first.children if c.name == "worker-0")
        os.kill(worker.proc.pid, 9)
        worker.proc.wait()
        first.children.remove(worker)
    finally:
        first.stop()
    assert holds_the_trace()

    _third_repeat_fires_the_loop(data_dir, trace_id)
