"""Partition checkpoints: a partition state restored from its file continues exactly like one
that never stopped; a bad file is set aside and the partition starts empty; a save is atomic.

States are filled the way the stages fill them (each event to the partition its trace id, or the
field its detector family partitions by, maps to), saved as the worker saves them
(:meth:`Dataflow.snapshot_states`, then :meth:`PartitionCheckpointStore.encode` and ``save``), and
restored by a fresh :class:`Dataflow` asking for the partition (``trace_state(p)``/``keyed_state(p)``).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import orjson
import pytest

from agentwatch.detectors.drift import EmbeddedWindow
from agentwatch.detectors.registry import DETECTORS, build_detectors
from agentwatch.events import ToolCall
from agentwatch.streams.dataflow import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, Dataflow, KeyedPartition,
                                         PartitionState, TracePartition)
from agentwatch.streams.partition_checkpoint import PartitionCheckpointStore
from agentwatch.streams.pipeline import partition_for
from tests.support.contract_streams import CONTRACT_STREAMS

N_PARTITIONS = 8
PARTITIONS = {"llm_calls": N_PARTITIONS, "tool_calls": N_PARTITIONS, "agent_steps": N_PARTITIONS,
              "usage": N_PARTITIONS, "gpu_samples": 1}
APP_ID = "agentwatch-test"
EPOCH = "epoch-1"


@functools.lru_cache(maxsize=None)
def _params(seed: int = 1) -> str:
    # Each detector's contract parameters: small warm-ups and caps, so the contract streams make
    # every detector build state and report. (Building the streams is slow: once per seed.)
    return json.dumps({name: dict(make(seed).params) for name, make in CONTRACT_STREAMS.items()})


def _config(seed: int = 1) -> dict[str, dict[str, Any]]:
    return json.loads(_params(seed))


def _dataflow(tmp_path: Path, build: Callable[[], Sequence[Any]] | None = None, *,
              log_epoch: str = EPOCH) -> Dataflow:
    build = build or (lambda: build_detectors(_config()))
    return Dataflow(partitions=PARTITIONS, build_detectors=build,
                    checkpoints=PartitionCheckpointStore(tmp_path, APP_ID), log_epoch=log_epoch)


def _feed(dataflow: Dataflow, events: Sequence[Any]) -> list[list[Any]]:
    """Findings per event, each event handed to the state of the partition it maps to: trace
    detectors by trace id, each keyed family by its field (drift windows by their key's value)."""
    topology = dataflow.topology
    found: list[list[Any]] = []
    for event in events:
        findings: list[Any] = []
        if topology.trace and hasattr(event, "trace_id"):
            state = dataflow.trace_state(partition_for(event.trace_id, N_PARTITIONS))
            findings += state.runner.process([event])
        for family in topology.families:
            if isinstance(event, EmbeddedWindow):
                value = event.key.partition("=")[2] if family == topology.drift_field else None
            else:  # as the trace stage forwards usage: only to families that read the event
                value = getattr(event, family, None) if type(event) in topology.accepts[family] else None
            if value is not None:
                state = dataflow.keyed_state(partition_for(str(value), N_PARTITIONS))
                findings += state.runners[family].process([event])
        found.append(findings)
    return found


def _save(dataflow: Dataflow, states: Sequence[PartitionState] | None = None) -> list[tuple[str, int]]:
    """What the worker does at a checkpoint: snapshot between two records, then encode and save."""
    store = dataflow.checkpoints
    saved = []
    for state, doc in dataflow.snapshot_states(dataflow.owned_states() if states is None else states):
        store.save(state.stage, state.partition, store.encode(doc))
        saved.append((state.stage, state.partition))
    return saved


def _restore(dataflow: Dataflow) -> list[PartitionState]:
    """Every stored partition's state in ``dataflow`` (which reads it from the store)."""
    return [dataflow.trace_state(p) if stage == "trace" else dataflow.keyed_state(p)
            for stage, p in dataflow.checkpoints.stored()]


def _normalised(value: Any) -> Any:
    # For comparing states only (tuples become lists, numpy arrays lists).
    return json.loads(orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY))


def _states(dataflow: Dataflow) -> dict[tuple[str, int], Any]:
    return {(s.stage, s.partition): _normalised(s.state_snapshot()) for s in dataflow.owned_states()}


def _flat(found: Sequence[Sequence[Any]]) -> list[Any]:
    return [f for findings in found for f in findings]


# -- detector state round trips ------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_each_detectors_real_state_round_trips_through_its_partition_files(tmp_path, name):
    stream = CONTRACT_STREAMS[name](7)
    cls = DETECTORS[name]
    build = lambda: [cls(**stream.params)]  # noqa: E731
    events = list(stream.warmup) + list(stream.events)
    reference = _feed(_dataflow(tmp_path / "ref", build), events)
    causes = [i for i, found in enumerate(reference) if found]
    assert causes, f"{name}'s contract stream must cause findings"
    # Split where the state matters: after the first finding when more follow, else right
    # before the only one (history, a loop in progress, a leak's trend are in the state).
    split = causes[0] + 1 if len(causes) > 1 else causes[0]

    first = _dataflow(tmp_path, build)
    _feed(first, events[:split])
    stage = "trace" if first.topology.trace else "keyed"
    assert (name in first.topology.trace) == (stage == "trace")  # where it lives: Topology.of
    held = first.owned_states()
    assert held and {s.stage for s in held} == {stage}
    assert sum(s.runner.state_sizes()[name] if stage == "trace" else
               sum(r.state_sizes().get(name, 0) for r in s.runners.values()) for s in held) > 0
    before = _states(first)
    assert sorted(_save(first)) == sorted(before)

    restored = _dataflow(tmp_path, build)
    assert {(s.stage, s.partition) for s in _restore(restored)} == set(before)
    assert _states(restored) == before
    rest = _feed(restored, events[split:])
    assert _flat(rest) == _flat(reference[split:]) != []
    # And the states end where an uninterrupted run's end.
    uninterrupted = _dataflow(tmp_path / "whole", build)
    _feed(uninterrupted, events)
    assert _states(restored) == _states(uninterrupted)


@pytest.fixture(scope="module")
def merged() -> list[Any]:
    """Every registered detector's contract warm-up and events, merged in timestamp order."""
    events: list[Any] = []
    for make in CONTRACT_STREAMS.values():
        stream = make(1)
        events += list(stream.warmup) + list(stream.events)
    events.sort(key=lambda e: e.ts)  # stable: equal timestamps keep their stream order
    return events


@pytest.fixture(scope="module")
def reference_findings(merged, tmp_path_factory) -> list[list[Any]]:
    """Findings per event of partitions that never stop."""
    return _feed(_dataflow(tmp_path_factory.mktemp("reference")), merged)


@pytest.mark.parametrize("fraction", (0.25, 0.5, 0.75))
def test_restored_partitions_continue_like_uninterrupted_ones(tmp_path, merged, reference_findings, fraction):
    split = int(len(merged) * fraction)
    expected = _flat(reference_findings[split:])
    assert expected, "the events after the split must cause findings to compare"

    first = _dataflow(tmp_path)
    _feed(first, merged[:split])
    saved = _save(first)
    assert {stage for stage, _ in saved} == {"trace", "keyed"} and len(saved) > 2

    restored = _dataflow(tmp_path)
    assert len(_restore(restored)) == len(saved)
    assert _flat(_feed(restored, merged[split:])) == expected
    # Without the files the same events find something else: the state is what mattered.
    assert _flat(_feed(_dataflow(tmp_path / "empty"), merged[split:])) != expected


def test_fresh_partitions_with_budgets_configured_round_trip(tmp_path):
    first = _dataflow(tmp_path)  # the contract config sets a budget for project "shop"
    fresh = [first.trace_state(3), first.keyed_state(partition_for("shop", N_PARTITIONS))]
    before = _states(first)
    _save(first, fresh)
    restored = _dataflow(tmp_path)
    assert len(_restore(restored)) == 2 and _states(restored) == before


def _repeat(trace_id: str, i: int) -> ToolCall:
    return ToolCall(ts=1_000.0 + i, trace_id=trace_id, span_id=f"s{i}", tool_name="search",
                    arguments='{"q": "refund", "n": 3}')


def test_a_loop_in_progress_survives_the_restart(tmp_path):
    before = _dataflow(tmp_path, build_detectors)
    assert _flat(_feed(before, [_repeat("t1", 0), _repeat("t1", 1)])) == []
    assert _save(before) == [("trace", partition_for("t1", N_PARTITIONS))]

    after = _dataflow(tmp_path, build_detectors)
    found = _flat(_feed(after, [_repeat("t1", 2)]))
    assert [(f.detector, f.kind, f.key, f.value) for f in found] == [("agent_loop", "repeated_tool_call", "t1", 3.0)]
    assert _flat(_feed(_dataflow(tmp_path / "empty", build_detectors), [_repeat("t1", 2)])) == []


# -- the file --------------------------------------------------------------------------------------


def test_file_names_format_version_stage_partition_offsets_and_log_epoch(tmp_path, merged):
    dataflow = _dataflow(tmp_path)
    _feed(dataflow, merged[:200])
    trace = dataflow.trace_state(5)
    keyed = dataflow.keyed_state(2)
    trace.offsets = {"llm_calls": 1042, "tool_calls": 988, "agent_steps": 311}
    keyed.offsets = {"usage": 77}
    _save(dataflow, [trace, keyed])
    store = dataflow.checkpoints
    assert store.directory == tmp_path / "state" / APP_ID
    assert store.path("trace", 5) == tmp_path / "state" / APP_ID / "trace-5.json"
    assert store.stored() == [("keyed", 2), ("trace", 5)]
    for state, offsets in ((trace, trace.offsets), (keyed, keyed.offsets)):
        raw = store.path(state.stage, state.partition).read_bytes()
        doc = orjson.loads(raw)
        assert {k: doc[k] for k in ("format", "version", "stage", "partition", "offsets", "log_epoch")} == {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "stage": state.stage,
            "partition": state.partition, "offsets": offsets, "log_epoch": EPOCH}
        assert set(doc["state"]) == set(_normalised(state.state_snapshot()))
    assert store.saves == 2 and store.last_save_bytes == len(raw) and store.last_save_s > 0
    # A fresh worker resumes at those offsets: the state reflects the records below them.
    restored = _dataflow(tmp_path)
    assert restored.trace_state(5).restored_offsets == trace.offsets
    assert restored.keyed_state(2).restored_offsets == {"usage": 77}


def test_missing_file_restores_nothing_and_moves_nothing(tmp_path):
    dataflow = _dataflow(tmp_path)
    state = dataflow.trace_state(1)
    assert state.offsets == {} and state.restored_offsets == {}
    assert _normalised(state.state_snapshot()) == _empty_state("trace", 1)
    assert dataflow.checkpoints.load("keyed", 4) is None and dataflow.checkpoints.failures == 0
    assert not (tmp_path / "state").exists()


def _empty_state(stage: str, partition: int) -> Any:
    fresh = _dataflow(Path("/nonexistent-agentwatch-test"))
    fresh.checkpoints = None
    state = fresh.trace_state(partition) if stage == "trace" else fresh.keyed_state(partition)
    return _normalised(state.state_snapshot())


def _good_doc(tmp_path: Path, merged, stage: str, partition: int) -> dict[str, Any]:
    source = _dataflow(tmp_path / "source")
    _feed(source, merged)
    state = source.trace_state(partition) if stage == "trace" else source.keyed_state(partition)
    state.offsets = {"usage": 10} if stage == "keyed" else {"tool_calls": 10}
    ((_, doc),) = source.snapshot_states([state])
    assert _normalised(doc["state"]) != _empty_state(stage, partition)
    return doc


CORRUPT = {
    "not json": lambda doc: b"\x00\xffnot json at all",
    "truncated": lambda doc: orjson.dumps(doc)[:40],
    "a json list": lambda doc: b"[1, 2, 3]",
    "another format": lambda doc: orjson.dumps({**doc, "format": "agentwatch.detector-checkpoint"}),
    "a newer version": lambda doc: orjson.dumps({**doc, "version": CHECKPOINT_VERSION + 1}),
    "another partition": lambda doc: orjson.dumps({**doc, "partition": doc["partition"] + 1}),
    "another stage": lambda doc: orjson.dumps({**doc, "stage": "keyed" if doc["stage"] == "trace" else "trace"}),
    "no state": lambda doc: orjson.dumps({k: v for k, v in doc.items() if k != "state"}),
}


@pytest.mark.parametrize("stage", ("trace", "keyed"))
@pytest.mark.parametrize("what", sorted(CORRUPT))
def test_a_corrupt_file_is_moved_aside_and_the_partition_starts_empty(tmp_path, merged, caplog, stage, what):
    partition = partition_for("shop", N_PARTITIONS) if stage == "keyed" else 6
    content = CORRUPT[what](_good_doc(tmp_path, merged, stage, partition))
    dataflow = _dataflow(tmp_path)
    path = dataflow.checkpoints.path(stage, partition)
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    caplog.set_level(logging.WARNING)
    started_ms = int(time.time() * 1000)
    state = dataflow.trace_state(partition) if stage == "trace" else dataflow.keyed_state(partition)
    done_ms = int(time.time() * 1000)

    assert not path.exists()
    (aside,) = path.parent.glob(f"{path.name}.corrupt-*")
    assert re.fullmatch(rf"{stage}-{partition}\.json\.corrupt-\d+", aside.name)
    assert started_ms <= int(aside.name.rsplit("-", 1)[1]) <= done_ms
    assert aside.read_bytes() == content
    assert _normalised(state.state_snapshot()) == _empty_state(stage, partition)
    assert state.offsets == {} and state.restored_offsets == {}
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert f"{stage}-{partition}.json" in warned or f"{stage}/{partition}" in warned
    assert dataflow.checkpoints.stored() == []


def test_a_restore_failing_half_way_leaves_the_partition_empty(tmp_path):
    first = _dataflow(tmp_path, build_detectors)
    _feed(first, [_repeat("t1", 0), _repeat("t1", 1)])
    state = first.trace_state(partition_for("t1", N_PARTITIONS))
    ((_, doc),) = first.snapshot_states([state])
    runner_state = doc["state"]["detectors"]
    # agent_loop restores first, then hallucinated_tool raises on a malformed trace row.
    assert list(runner_state).index("agent_loop") < list(runner_state).index("hallucinated_tool")
    runner_state["hallucinated_tool"]["traces"] = [["t", 1.0]]
    first.checkpoints.save(state.stage, state.partition, first.checkpoints.encode(doc))

    restored = _dataflow(tmp_path, build_detectors).trace_state(state.partition)
    assert restored.offsets == {}  # set aside: the records since offset 0 are replayed into it
    assert _normalised(restored.state_snapshot()) == _empty_state("trace", state.partition)


# -- atomic saves ------------------------------------------------------------------------------------


class _HalfWrite:
    """A file object whose write puts half the bytes down, then fails (disk full mid-file)."""

    def __init__(self, f: Any) -> None:
        self.f = f

    def __enter__(self) -> _HalfWrite:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.f.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)

    def write(self, data: bytes) -> int:
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        raise OSError(28, "No space left on device")


def _fail_fsync(monkeypatch) -> None:
    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)


def _fail_write(monkeypatch) -> None:
    fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda *a, **kw: _HalfWrite(fdopen(*a, **kw)))


@pytest.mark.parametrize("fail", (_fail_fsync, _fail_write), ids=("fsync", "write"))
def test_a_save_failing_mid_file_keeps_the_previous_file_and_no_temp(tmp_path, merged, monkeypatch, fail):
    dataflow = _dataflow(tmp_path)
    state = dataflow.trace_state(partition_for(merged[-1].trace_id, N_PARTITIONS))
    _save(dataflow, [state])
    store = dataflow.checkpoints
    path = store.path(state.stage, state.partition)
    good = path.read_bytes()
    _feed(dataflow, merged)
    (_, doc), = dataflow.snapshot_states([state])
    data = store.encode(doc)
    assert data != good

    fail(monkeypatch)
    with pytest.raises(OSError):
        store.save(state.stage, state.partition, data)
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert [p.name for p in store.directory.iterdir()] == [path.name]
    assert store.failures == 1 and store.saves == 1
    store.save(state.stage, state.partition, data)  # and the next save goes through
    assert path.read_bytes() == data


def test_temp_files_left_by_a_killed_save_are_removed_when_the_partition_loads(tmp_path):
    store = PartitionCheckpointStore(tmp_path, APP_ID)
    store.directory.mkdir(parents=True)
    stale = store.directory / ".trace-3.json.abc123.tmp"
    stale.write_bytes(b"half a checkp")
    other = store.directory / ".trace-31.json.abc123.tmp"  # another partition's: left alone
    other.write_bytes(b"x")
    dataflow = _dataflow(tmp_path)
    dataflow.trace_state(3)
    assert not stale.exists() and other.exists()
    assert store.stored() == []


def test_state_holding_a_numpy_drift_window_round_trips(tmp_path):
    stream = CONTRACT_STREAMS["drift"](3)
    build = lambda: [DETECTORS["drift"](**stream.params)]  # noqa: E731
    first = _dataflow(tmp_path, build)
    _feed(first, list(stream.warmup))
    (state,) = first.owned_states()
    assert isinstance(state, KeyedPartition) and not isinstance(state, TracePartition)
    _save(first)
    restored = _dataflow(tmp_path, build)
    _restore(restored)
    assert _states(restored) == _states(first)
    assert _flat(_feed(restored, list(stream.events))) == _flat(_feed(first, list(stream.events)))


# -- the real stack: a restart keeps a loop in progress ---------------------------------------------


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


def _trace_file(data_dir: Path, trace_hex: str) -> Path:
    from agentwatch.broker import DEFAULT_TOPICS

    store = PartitionCheckpointStore(data_dir, "agentwatch")
    return store.path("trace", partition_for(trace_hex, dict(DEFAULT_TOPICS)["tool_calls"]))


def _holds_the_trace(path: Path, trace_hex: str) -> bool:
    try:
        state = orjson.loads(path.read_bytes())["state"]
    except (OSError, orjson.JSONDecodeError, KeyError):
        return False
    return any(row[0] == trace_hex for row in state["detectors"]["agent_loop"]["traces"])


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
        # In Parquet means the trace stage has seen them (rows are written after detection).
        _wait(lambda: len(_rows(first.settings, "SELECT * FROM tool_calls")) >= 2)
    finally:
        first.stop()  # SIGTERM: the worker saves its partitions on the way out
    assert _holds_the_trace(_trace_file(data_dir, f"{trace_id:032x}"), f"{trace_id:032x}")
    assert _rows(first.settings, LOOP_FINDINGS) == []  # two repeats are not a loop yet

    _third_repeat_fires_the_loop(data_dir, trace_id)


@pytest.mark.slow
def test_worker_killed_keeps_the_state_of_its_last_timer_save(tmp_path):
    """A SIGKILL skips the shutdown save: the state comes from a timer save."""
    from agentwatch.stack import Stack

    data_dir = tmp_path / "data"
    trace_id = 0x0FEDCBA9876543210FEDCBA987654321
    trace_hex = f"{trace_id:032x}"
    saved = _trace_file(data_dir, trace_hex)

    settings = _stack_settings(data_dir).model_copy(update={"detector_checkpoint_s": 1.0})
    first = Stack(settings, say=lambda _m: None).start()
    try:
        _send_repeated_tool_calls(first.settings, trace_id, 0, 2)
        _wait(lambda: len(_rows(first.settings, "SELECT * FROM tool_calls")) >= 2)
        _wait(lambda: _holds_the_trace(saved, trace_hex), timeout_s=30)
        worker = next(c for c in first.children if c.name == "worker-0")
        os.kill(worker.proc.pid, 9)
        worker.proc.wait()
        first.children.remove(worker)
    finally:
        first.stop()
    assert _holds_the_trace(saved, trace_hex)

    _third_repeat_fires_the_loop(data_dir, trace_id)
