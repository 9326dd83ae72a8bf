"""Partition checkpoint size and save/restore time at the per-trace caps (``agentwatch bench``
section ``detector_checkpoint``).

A worker holding every partition checkpoints 8 trace partitions and 8 keyed partitions
(:class:`~agentwatch.streams.app.PartitionCheckpointer`): ``Dataflow.snapshot_states`` on the
event loop, between two records; then, per partition, ``PartitionCheckpointStore.encode`` and
``save`` in a thread. This fills the states as the stages do and times those steps apart.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

PARTITIONS = 8


def _traces_to_fill(partitions: int, cap: int) -> int:
    """The fewest traces (``_trace_chunk``'s ids, in order) that put ``cap`` in every partition."""
    from agentwatch.streams.pipeline import partition_for

    counts = [0] * partitions
    n = 0
    while min(counts) < cap:
        counts[partition_for(f"{n:032x}", partitions)] += 1
        n += 1
    return n


def bench_checkpoint(n_traces: int | None = None, *, max_traces: int = 50_000, partitions: int = PARTITIONS,
                     projects: int = 32, repeat: int = 3, directory: Path | None = None) -> dict[str, Any]:
    """Size and save/restore time of a worker's partition checkpoints, per-trace maps at their caps.

    Builds a :class:`Dataflow` as the worker does (every registered detector, default config,
    caps split over ``partitions`` by ``build_detectors``: loop and tool detectors hold
    ``ceil(2 * max_traces / partitions)`` traces per partition, a keyed drift sampler each) and
    feeds ``_trace_chunk`` traces (3 events each; project ``project-<trace % projects>`` so the
    keyed partitions fill too): each event goes to the trace partition its trace id maps to (span
    dedup, step counts, trace detectors, as the trace stage applies it) and to the keyed partition
    its family's field maps to (``partition_for``). At least ``n_traces`` are fed, and as many as
    fill every trace partition to its cap.

    Then ``repeat`` times: ``snapshot_states`` of all 16 states at once (the periodic save; what
    blocks the event loop) and of each state alone (a hand-over), then encode + save per
    partition (the worker's thread). Last, a fresh Dataflow restores every partition from its file.
    """
    from agentwatch.detectors.registry import build_detectors
    from agentwatch.events import LlmCall
    from agentwatch.streams.dataflow import Dataflow
    from agentwatch.streams.drift_sampler import DriftSampler
    from agentwatch.streams.partition_checkpoint import PartitionCheckpointStore
    from agentwatch.streams.pipeline import partition_for
    from bench.detector_state import WORKER_GC_THRESHOLD, _trace_chunk
    from tests.support.synthetic import tool_definitions_json

    config = {"agent_loop": {"max_traces": max_traces}, "hallucinated_tool": {"max_traces": max_traces}}
    per_partition_cap = math.ceil(2 * max_traces / partitions)
    n_traces = max(n_traces or 0, _traces_to_fill(partitions, per_partition_cap))
    topics = {"llm_calls": partitions, "tool_calls": partitions, "agent_steps": partitions, "usage": partitions}

    def dataflow(store: PartitionCheckpointStore) -> Dataflow:
        return Dataflow(partitions=topics, build_detectors=lambda: build_detectors(config, partitions=partitions),
                        checkpoints=store, drift_sampler=lambda: DriftSampler(window_s=300.0, sample_size=200),
                        log_epoch="bench")

    previous = gc.get_threshold()
    gc.set_threshold(*WORKER_GC_THRESHOLD)
    owned = directory is None
    where = Path(tempfile.mkdtemp(prefix="agentwatch-ckpt-")) if owned else Path(directory)
    try:
        store = PartitionCheckpointStore(where, "bench")
        flow = dataflow(store)
        topology = flow.topology
        defs = tool_definitions_json(("search", "lookup_order", "fetch_url"))
        fill_started = time.perf_counter()
        for first in range(0, n_traces, 10_000):
            chunk = _trace_chunk(first, min(10_000, n_traces - first), 2_000.0, defs)
            chunk = [dataclasses.replace(e, project=f"project-{int(e.trace_id, 16) % projects}") for e in chunk]
            trace_batches: dict[int, list[Any]] = {}
            keyed_batches: dict[tuple[int, str], list[Any]] = {}
            for event in chunk:
                trace_batches.setdefault(partition_for(event.trace_id, partitions), []).append(event)
                for family, accepted in topology.accepts.items():
                    if type(event) in accepted:
                        p = partition_for(str(getattr(event, family)), partitions)
                        keyed_batches.setdefault((p, family), []).append(event)
            for p, events in trace_batches.items():
                state = flow.trace_state(p)
                events = [e for e in events if state.seen.add(e.trace_id, e.span_id)]
                state.steps.count(events)
                state.runner.process(events)
            for (p, family), events in keyed_batches.items():
                state = flow.keyed_state(p)
                if family == topology.drift_field and state.sampler is not None:
                    state.sampler.offer([e for e in events if isinstance(e, LlmCall)])
                state.runners[family].process(events)
        fill_s = time.perf_counter() - fill_started
        states = sorted(flow.owned_states(), key=lambda s: (s.stage != "trace", s.partition))
        for state in states:  # offsets as a worker's would be: the next record of each topic
            state.offsets = {t: 1_000 + state.partition for t in
                             (("llm_calls", "tool_calls") if state.stage == "trace" else ("usage",))}

        all_snapshot_ms: list[float] = []
        all_encode_save_ms: list[float] = []
        snapshot_ms: dict[str, list[float]] = {}
        encode_ms: dict[str, list[float]] = {}
        save_ms: dict[str, list[float]] = {}
        sizes: dict[str, int] = {}
        for _ in range(repeat):
            started = time.perf_counter()
            docs = flow.snapshot_states(states)
            all_snapshot_ms.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            for state, doc in docs:
                name = f"{state.stage}-{state.partition}"
                t0 = time.perf_counter()
                data = store.encode(doc)
                t1 = time.perf_counter()
                store.save(state.stage, state.partition, data)
                t2 = time.perf_counter()
                encode_ms.setdefault(name, []).append((t1 - t0) * 1000)
                save_ms.setdefault(name, []).append((t2 - t1) * 1000)
                sizes[name] = len(data)
            all_encode_save_ms.append((time.perf_counter() - started) * 1000)
            del docs
            for state in states:  # one state alone, as a hand-over of that partition snapshots it
                started = time.perf_counter()
                flow.snapshot_states([state])
                snapshot_ms.setdefault(f"{state.stage}-{state.partition}", []).append(
                    (time.perf_counter() - started) * 1000)

        fresh = dataflow(store)
        restore_ms: dict[str, float] = {}
        restore_started = time.perf_counter()
        for stage, p in store.stored():
            started = time.perf_counter()
            restored = fresh.trace_state(p) if stage == "trace" else fresh.keyed_state(p)
            restore_ms[f"{stage}-{p}"] = (time.perf_counter() - started) * 1000
            if not restored.restored_offsets:
                raise RuntimeError(f"partition {stage}/{p} was not restored from its file")
        restore_total_ms = (time.perf_counter() - restore_started) * 1000
        if store.failures:
            raise RuntimeError(f"{store.failures} checkpoint saves or loads failed")

        def per_partition(state: Any) -> dict[str, Any]:
            name = f"{state.stage}-{state.partition}"
            if state.stage == "trace":
                held = state.runner.state_sizes()
            else:
                held = {n: v for r in state.runners.values() for n, v in r.state_sizes().items()}
            return {"bytes": sizes[name], "state_sizes": held,
                    "snapshot_ms": round(statistics.median(snapshot_ms[name]), 2),
                    "encode_ms": round(statistics.median(encode_ms[name]), 2),
                    "save_ms": round(statistics.median(save_ms[name]), 2),
                    "restore_ms": round(restore_ms[name], 2)}

        by_partition = {f"{s.stage}-{s.partition}": per_partition(s) for s in states}
        trace = [v for k, v in by_partition.items() if k.startswith("trace-")]
        keyed = [v for k, v in by_partition.items() if k.startswith("keyed-")]
        largest = max(by_partition, key=lambda k: by_partition[k]["bytes"])
        return {
            "n_traces": n_traces, "max_traces": max_traces, "partitions": partitions, "projects": projects,
            "per_partition_trace_cap": per_partition_cap,
            "trace_partitions_at_cap": sum(v["state_sizes"].get("agent_loop", 0) >= per_partition_cap for v in trace),
            "fill_s": round(fill_s, 1),
            "total_bytes": sum(sizes.values()),
            "trace_partition_bytes_median": int(statistics.median(v["bytes"] for v in trace)),
            "keyed_partition_bytes_median": int(statistics.median(v["bytes"] for v in keyed)) if keyed else 0,
            "largest_partition": largest, "largest_partition_bytes": by_partition[largest]["bytes"],
            # The event loop: one periodic save snapshots every owned state between two records.
            "snapshot_all_ms_median": round(statistics.median(all_snapshot_ms), 1),
            "snapshot_all_ms_max": round(max(all_snapshot_ms), 1),
            "snapshot_one_ms_max": round(max(v["snapshot_ms"] for v in by_partition.values()), 2),
            # The worker's thread: encode and write (temp file, fsync, rename) every partition.
            "encode_save_all_ms_median": round(statistics.median(all_encode_save_ms), 1),
            "encode_save_all_ms_max": round(max(all_encode_save_ms), 1),
            "encode_save_one_ms_max": round(max(v["encode_ms"] + v["save_ms"] for v in by_partition.values()), 2),
            "restore_all_ms": round(restore_total_ms, 1),
            "restore_one_ms_max": round(max(restore_ms.values()), 2),
            "rss_mb": round(_rss_bytes() / 2**20, 1),
            "by_partition": by_partition,
        }
    finally:
        gc.set_threshold(*previous)
        if owned:
            shutil.rmtree(where, ignore_errors=True)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
