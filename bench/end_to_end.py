"""End to end: otlp_spans records through the whole pipeline, 1 and 2 workers side by side.

The clock starts when the first timed record is produced to ``otlp_spans`` and stops when the
whole pipeline is done with them: every record on every worker input topic
(:data:`agentwatch.stack.WORKER_INPUT_TOPICS`: ``otlp_spans``, the trace-keyed event topics,
``usage``, ...) is committed by the worker group, AND the expected event rows are in the Parquet
snapshots. Commits alone would do: a worker commits a record only after its rows are written
and (Faust flushes its producer before a commit) after the records it sent downstream are on
the broker, so a drained group means the map stage, the trace stage, the usage hop, the keyed
stage and the Parquet writes are all done. The row count is checked anyway, once the commits
say drained (that query is not timed).

Each run starts a fresh embedded stack (Tansu, rotel, ``workers`` Faust workers with their
normaliser processes), passes warm-up records through it (group join, first fetches, code paths)
and waits until its processes are idle (the embedding-model preload) before the clock starts.
CPU seconds (user + system) of every process of the stack and of this process are sampled just
before the clock starts and right after it stops, and reported per span.

:func:`bench_end_to_end_rounds` runs the transport floor (:mod:`bench.transport_floor`), 1 worker
and 2 workers in interleaved rounds on the same records and reports medians and ranges: this
machine's speed drifts between seconds, and the figures only compare when measured side by side.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from agentwatch.broker import free_port

EVENT_TABLES = ("llm_calls", "tool_calls", "agent_steps")
# Stages by the topics they consume (the usage hop is the keyed stage's input).
STAGE_TOPICS = {"map": ("otlp_spans",), "trace": EVENT_TABLES, "keyed": ("usage",)}


class CommitProbe:
    """A cheap, repeated look at the group's commits against the topics' end offsets, with clients
    kept open between looks (``unconsumed_records`` opens two per call: the exact, final check).

    Tansu reports a partition's end offset as its last batch's base offset + 1, so a commit at or
    past that is "maybe done"; :func:`agentwatch.broker.unconsumed_records` settles it.
    """

    def __init__(self, bootstrap_servers: str, group_id: str, topics: Sequence[str]) -> None:
        from kafka import KafkaConsumer, TopicPartition
        from kafka.admin import KafkaAdminClient

        self.group_id = group_id
        self.admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id="agentwatch-bench-probe")
        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers, client_id="agentwatch-bench-probe",
                                      enable_auto_commit=False)
        self.partitions = [TopicPartition(t, p) for t in topics
                           for p in sorted(self.consumer.partitions_for_topic(t) or ())]
        self.begins = self.consumer.beginning_offsets(self.partitions)

    def look(self) -> tuple[dict[str, int], dict[str, int]]:
        """(records not yet committed per topic (a lower bound), end offsets summed per topic)."""
        ends = self.consumer.end_offsets(self.partitions)
        offsets = self.admin.list_group_offsets({self.group_id: self.partitions}).get(self.group_id, {})
        behind: dict[str, int] = {}
        end_sums: dict[str, int] = {}
        for tp in self.partitions:
            end_sums[tp.topic] = end_sums.get(tp.topic, 0) + ends[tp]
            meta = offsets.get(tp)
            committed = meta.offset if meta is not None and meta.offset >= 0 else self.begins[tp]
            # At least this many are left (the real end is at or past the reported one).
            behind[tp.topic] = behind.get(tp.topic, 0) + max(0, ends[tp] - committed)
        return behind, end_sums

    def close(self) -> None:
        self.consumer.close()
        self.admin.close()


def stack_processes(stack: Any) -> dict[str, Any]:
    """Role -> psutil.Process: the broker, every child of the stack, each worker's own children
    (its normaliser and embedder processes, the resource tracker of its process pools), and this
    process."""
    import psutil

    procs: dict[str, Any] = {"bench": psutil.Process()}
    if stack.broker is not None and stack.broker.proc is not None:
        procs["broker"] = psutil.Process(stack.broker.proc.pid)
    for child in stack.children:
        try:
            parent = psutil.Process(child.proc.pid)
            procs[child.name] = parent
            for sub in parent.children(recursive=True):
                cmdline = " ".join(sub.cmdline())
                # Both process-pool children are spawned alike: the embedder is the one at nice 19.
                role = "resource-tracker" if "resource_tracker" in cmdline else \
                    ("embedder" if sub.nice() > 0 else "normaliser") if "spawn_main" in cmdline else f"child-{sub.pid}"
                name = f"{child.name}-{role}"
                procs[name if name not in procs else f"{name}-{sub.pid}"] = sub
        except psutil.NoSuchProcess:
            continue
    return procs


def cpu_seconds(procs: dict[str, Any]) -> dict[str, float]:
    """User + system CPU seconds per role; ``<role>-exited-children``: children it waited for
    (a worker's forked checkpoint savers)."""
    import psutil

    out: dict[str, float] = {}
    for name, proc in procs.items():
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        out[name] = times.user + times.system
        if name.startswith("worker") and name.count("-") == 1:
            out[f"{name}-exited-children"] = times.children_user + times.children_system
    return out


def worker_thread_seconds(procs: dict[str, Any]) -> dict[str, float]:
    """CPU seconds of each worker process's threads, in three groups: ``<worker>-main`` (the
    event loop: Faust, the stages, the detectors), ``<worker>-drift`` (threads at the lowest
    priority: the drift detectors' updates, on CPU the stream leaves idle) and
    ``<worker>-other-threads`` (the producer's thread, the Parquet writes, ...)."""
    out: dict[str, float] = {}
    for name, proc in procs.items():
        if not (name.startswith("worker-") and name.count("-") == 1):
            continue
        try:
            threads = proc.threads()
        except Exception:  # psutil.NoSuchProcess, AccessDenied: the run reports without it
            continue
        for thread in threads:
            group = "main" if thread.id == proc.pid else "drift" if _nice(proc.pid, thread.id) > 0 \
                else "other-threads"
            key = f"{name}-{group}"
            out[key] = out.get(key, 0.0) + thread.user_time + thread.system_time
    return out


def _nice(pid: int, tid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[16])
    except (OSError, IndexError, ValueError):  # not Linux, or the thread just ended
        return 0


def _rows(data_dir: Path) -> int:
    return sum(_rows_by_table(data_dir).values())


def _rows_by_table(data_dir: Path, *, stored_copies: bool = False) -> dict[str, int]:
    """Rows per table as analysts see them (one per span), or every copy stored (``_raw``): a
    record processed twice stores its rows twice, which must not hide a row that is missing."""
    from agentwatch.streams.snapshots import query_snapshots

    suffix = "_raw" if stored_copies else ""
    sql = "SELECT " + ", ".join(f"(SELECT count(*) FROM {t}{suffix}) AS {t}" for t in EVENT_TABLES)
    return {t: int(n) for t, n in query_snapshots(data_dir, sql).to_pylist()[0].items()}


def _dead_letters(bootstrap: str) -> dict[str, int]:
    """Dead letters on the broker by source topic and reason: where rows that never landed went."""
    from collections import Counter

    from agentwatch.doctor import read_dead_letters
    from agentwatch.streams.dataflow import DLQ_REASON_HEADER

    letters = read_dead_letters(bootstrap, since_ts=0.0, until_ts=time.time() + 60).letters
    return dict(Counter(f"{letter.headers.get('agentwatch.dlq.topic', '?')}: "
                        f"{letter.headers.get(DLQ_REASON_HEADER, '?')[:200]}" for letter in letters))


def _wait_drained(bootstrap: str, group: str, topics: Sequence[str], timeout_s: float) -> None:
    from agentwatch.broker import unconsumed_records

    deadline = time.monotonic() + timeout_s
    while (left := unconsumed_records(bootstrap, group, topics)):
        if time.monotonic() > deadline:
            raise RuntimeError(f"warm-up not consumed in {timeout_s:g}s: {left}")
        time.sleep(0.25)


def _wait_idle(procs: dict[str, Any], *, max_cpu_per_s: float = 0.2, timeout_s: float = 60.0) -> float:
    """Wait until every worker (with its children) uses under ``max_cpu_per_s`` CPU-seconds per
    second over two one-second looks: its embedding-model preload (~0.5 CPU for 15 s) is over.
    An idle worker uses ~0.07 (its timers), the broker ~0.06."""
    workers = {k: v for k, v in procs.items() if k.startswith("worker-")}
    started = time.monotonic()
    quiet = 0
    before = cpu_seconds(workers)
    while quiet < 2 and time.monotonic() - started < timeout_s:
        time.sleep(1.0)
        now = cpu_seconds(workers)
        used: dict[str, float] = {}
        for name, seconds in now.items():
            worker = "-".join(name.split("-")[:2])
            used[worker] = used.get(worker, 0.0) + seconds - before.get(name, 0.0)
        before = now
        quiet = quiet + 1 if max(used.values(), default=0.0) < max_cpu_per_s else 0
    return time.monotonic() - started


def run_end_to_end(records: list[bytes], warmup: list[bytes], *, workers: int, expected_rows: int,
                   spans_per_record: int = 1000, timeout_s: float = 300.0,
                   on_clock_start: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """One run: a fresh stack with ``workers`` workers; ``records`` timed through the whole pipeline.

    ``expected_rows``: event rows (llm_calls + tool_calls + agent_steps) the timed records make.
    ``on_clock_start``: called with the role -> process map right after the clock starts (a
    profiler attaches there).
    """
    from kafka import KafkaProducer

    from agentwatch.broker import unconsumed_records
    from agentwatch.demo import scrape_counter
    from agentwatch.settings import Settings
    from agentwatch.stack import WORKER_INPUT_TOPICS, Stack

    data_dir = Path(tempfile.mkdtemp(prefix="agentwatch-bench-e2e-"))
    settings = Settings(broker_port=free_port(), otlp_grpc_port=free_port(), otlp_http_port=free_port(),
                        metrics_port=free_port(workers + 2), data_dir=data_dir, workers=workers,
                        gpu_exporter="off")
    group, topics = settings.app_id, WORKER_INPUT_TOPICS
    with Stack(settings, say=lambda _m: None) as stack:
        bootstrap = stack.bootstrap_servers
        producer = KafkaProducer(bootstrap_servers=bootstrap, max_request_size=settings.max_message_bytes,
                                 linger_ms=5, batch_size=1 << 20, acks=1)
        # Steady state: one-time costs (group join, first fetches and code paths, the normaliser
        # process's start, the embedding-model preload) are paid before the clock starts.
        for payload in warmup:
            producer.send("otlp_spans", payload)
        producer.flush()
        _wait_drained(bootstrap, group, topics, timeout_s=120)
        procs = stack_processes(stack)  # after the warm-up: the normaliser processes are up
        idle_wait_s = _wait_idle(procs)
        rows_before = _rows(data_dir)
        probe = CommitProbe(bootstrap, group, topics)
        looks = 0
        stage_done: dict[str, float] = {}
        last_end_sums: dict[str, int] = {}
        last_growth: dict[str, float] = {}
        cpu_before = cpu_seconds(procs)
        threads_before = worker_thread_seconds(procs)
        started = time.perf_counter()
        if on_clock_start is not None:
            on_clock_start(procs)
        for payload in records:
            producer.send("otlp_spans", payload)
        producer.flush()
        produced_at = time.perf_counter() - started
        deadline = time.monotonic() + timeout_s
        rows_written = None
        finished = None
        while time.monotonic() < deadline:
            behind, end_sums = probe.look()
            looks += 1
            now = time.perf_counter() - started
            for topic, end in end_sums.items():
                if end != last_end_sums.get(topic):
                    last_end_sums[topic] = end
                    last_growth[topic] = now
            for stage, stage_topics in STAGE_TOPICS.items():
                if stage not in stage_done and not any(behind.get(t, 0) for t in stage_topics):
                    stage_done[stage] = round(now, 3)
                elif stage in stage_done and any(behind.get(t, 0) for t in stage_topics):
                    del stage_done[stage]  # more came in after all
            if not any(behind.values()) and not unconsumed_records(bootstrap, group, topics):
                candidate = time.perf_counter()
                rows_written = _rows(data_dir) - rows_before
                if rows_written >= expected_rows:
                    finished = candidate
                    break
            # Each look costs this process and the broker ~5 ms of CPU: a few per second (the
            # group commits once a second anyway).
            time.sleep(0.25)
        cpu_after = cpu_seconds(procs)
        threads_after = worker_thread_seconds(procs)
        # Records a worker's Kafka client skipped (read from the log and processed all the same):
        # anything above 0 is a client fault worth a look, even in a run that stored every row.
        offset_gaps = int(scrape_counter(stack.worker_metrics_ports(), "agentwatch_offset_gaps_total"))
        probe.close()
        producer.close()
        if finished is None:
            raise RuntimeError(f"end to end ({workers} worker(s)): not done in {timeout_s:g}s: "
                               f"{unconsumed_records(bootstrap, group, topics)} uncommitted, "
                               f"{rows_written} of {expected_rows} rows; rows per table "
                               f"{_rows_by_table(data_dir)} ({_rows_by_table(data_dir, stored_copies=True)} "
                               f"stored); dead letters {_dead_letters(bootstrap)}; "
                               f"worker logs and snapshots kept in {data_dir}")
    # Every copy stored, against one per span in rows_written: a record processed twice (a
    # worker stalled or killed before its commit) stores its rows again.
    rows_stored = sum(_rows_by_table(data_dir, stored_copies=True).values()) - rows_before
    # Kept (and named) when the run fails or a worker's Kafka client skipped records: their logs
    # say which records and where.
    kept_dir = str(data_dir) if offset_gaps else None
    if kept_dir is None:
        shutil.rmtree(data_dir, ignore_errors=True)
    seconds = finished - started
    spans = len(records) * spans_per_record
    cpu = {name: cpu_after[name] - cpu_before[name] for name in cpu_after if name in cpu_before}
    cpu = {name: s for name, s in cpu.items() if not (name.endswith("-exited-children") and s == 0)}
    cpu_us = {name: round(s / spans * 1e6, 2) for name, s in cpu.items()}
    cpu_us["total"] = round(sum(cpu.values()) / spans * 1e6, 2)
    # Threads that started during the run (a new embedding thread) count from zero.
    thread_us = {name: round((seconds - threads_before.get(name, 0.0)) / spans * 1e6, 2)
                 for name, seconds in sorted(threads_after.items())}
    return {"workers": workers, "spans": spans, "seconds": round(seconds, 3),
            "spans_per_s": round(spans / seconds), "produce_seconds": round(produced_at, 3),
            # When each stage's input was all committed (seen by the probe, every ~0.3 s), and
            # when each topic last grew: the gap to "seconds" is commit/flush latency, not work.
            "stage_committed_s": stage_done,
            "topic_last_grew_s": {t: round(s, 3) for t, s in last_growth.items() if t in ("usage", *EVENT_TABLES)},
            "rows_expected": expected_rows, "rows_written": rows_written, "rows_stored": rows_stored,
            "idle_wait_s": round(idle_wait_s, 1),
            "probe_looks": looks, "offset_gaps": offset_gaps, "kept_data_dir": kept_dir,
            "cpu_us_per_span": cpu_us, "worker_threads_cpu_us_per_span": thread_us}


def _spread(values: Sequence[float]) -> dict[str, Any]:
    return {"median": round(statistics.median(values)), "range": [round(min(values)), round(max(values))]}


def bench_end_to_end_rounds(records: list[bytes], warmup: list[bytes], expected_rows: int, *, rounds: int,
                            spans_per_record: int = 1000, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Transport floor, 1 worker, 2 workers, in ``rounds`` interleaved rounds on the same records."""
    from bench.transport_floor import bench_transport_floor

    runs: dict[str, list[dict[str, Any]]] = {"transport_floor": [], "workers_1": [], "workers_2": []}
    for r in range(rounds):
        floor = bench_transport_floor(records, spans_per_record=spans_per_record, warmup=warmup)
        runs["transport_floor"].append(floor)
        say(f"  round {r + 1}/{rounds}: transport floor {floor['spans_per_s']:,} spans/s")
        for workers in (1, 2):
            run = run_end_to_end(records, warmup, workers=workers, expected_rows=expected_rows,
                                 spans_per_record=spans_per_record)
            runs[f"workers_{workers}"].append(run)
            say(f"  round {r + 1}/{rounds}: {workers} worker(s) {run['spans_per_s']:,} spans/s "
                f"({run['seconds']:.2f}s; stages committed at {run['stage_committed_s']}; "
                f"CPU {run['cpu_us_per_span']['total']} us/span)")
    rates = {name: [run["spans_per_s"] for run in rs] for name, rs in runs.items()}
    floors = rates["transport_floor"]
    ratios = {name: [round(e / f, 3) for e, f in zip(rates[name], floors)] for name in ("workers_1", "workers_2")}
    two_vs_one = [round(b / a, 3) for a, b in zip(rates["workers_1"], rates["workers_2"])]

    def cpu_medians(name: str) -> dict[str, float]:
        roles = sorted({k for run in runs[name] for k in run["cpu_us_per_span"]} - {"total"})
        per_run = [{**run["cpu_us_per_span"], "total": round(sum(v for k, v in run["cpu_us_per_span"].items()
                                                               if k != "total"), 2)} for run in runs[name]]
        return {k: round(statistics.median(c.get(k, 0.0) for c in per_run), 2) for k in [*roles, "total"]}

    def thread_medians(name: str) -> dict[str, float]:
        keys = sorted({k for run in runs[name] for k in run.get("worker_threads_cpu_us_per_span", {})})
        return {k: round(statistics.median(run.get("worker_threads_cpu_us_per_span", {}).get(k, 0.0)
                                           for run in runs[name]), 2) for k in keys}

    return {
        "what": "otlp_spans records produced to the embedded broker until every worker input topic is "
                "committed by the worker group and the event rows are in Parquet (whole pipeline: map, "
                "trace stage, usage, keyed stage, snapshots); transport floor: the same records through "
                "the broker and a forwarding worker",
        "records": len(records), "spans": len(records) * spans_per_record, "rounds": rounds,
        "order": "per round: transport floor, 1 worker, 2 workers",
        **{name: {"spans_per_s": _spread(rates[name]), "runs": runs[name]} for name in ("workers_1", "workers_2")},
        "transport_floor": {"spans_per_s": _spread(floors), "runs": runs["transport_floor"]},
        "ratio_to_transport_floor": {name: {"median": round(statistics.median(v), 3), "range": [min(v), max(v)],
                                            "per_round": v} for name, v in ratios.items()},
        "ratio_goal": 0.35,
        "two_workers_vs_one": {"median": round(statistics.median(two_vs_one), 3), "per_round": two_vs_one},
        "cpu_us_per_span": {name: cpu_medians(name) for name in ("workers_1", "workers_2", "transport_floor")},
        "worker_threads_cpu_us_per_span": {name: thread_medians(name) for name in ("workers_1", "workers_2")},
    }
