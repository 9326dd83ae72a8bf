"""The Faust worker: thin agents over :mod:`agentwatch.streams.pipeline`.

Topology (every record is a batch; nothing here runs per span):

    otlp_spans ─► normalize ─► llm_calls / tool_calls / agent_steps (partitioned by trace id)
    otlp_logs  ─► normalize ─► llm_messages
    event topics ─► snapshot sink (Parquet) + detectors ─► findings, alerts
    findings, alerts ─► snapshot sink

Built by :func:`create_app` from explicit settings: there is no module-level app.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

import faust

from agentwatch.broker import DEFAULT_TOPICS
from agentwatch.events import Finding
from agentwatch.settings import Settings
from agentwatch.streams.normalize import Normalizer
from agentwatch.streams.pipeline import (VALUE_REJECTED_REASON, RecordOutcome, SpanPipeline, decode_event_rows,
                                         decode_events_checked, encode_by_partition, merge_event_records,
                                         value_rejection_dead_letters)
from agentwatch.streams.otlp import UndecodableRecord
from agentwatch.streams.pricing import PricingTable
from agentwatch.streams.snapshots import SnapshotSink

log = logging.getLogger(__name__)

EVENT_TOPICS = ("llm_calls", "tool_calls", "agent_steps", "llm_messages", "gpu_samples")
# Topics whose events the detectors see (llm_messages only feed the snapshot join).
DETECTED_TOPICS = frozenset({"llm_calls", "tool_calls", "agent_steps", "gpu_samples"})
DLQ_REASON_HEADER = "agentwatch.dlq.reason"


class DriftStage:
    """Prompt sampling per key and window, embedding off the event loop, the drift detector."""

    def __init__(self, settings: Settings, detector: Any) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from agentwatch.reference import ReferenceStore
        from agentwatch.streams.drift_sampler import DriftSampler
        from agentwatch.streams.embeddings import Embedder

        self.detector = detector
        self.sampler = DriftSampler(key_fields=tuple(settings.drift_key_fields), window_s=settings.drift_window_s,
                                    sample_size=settings.drift_sample_size)
        # The model loads on the first due window, in the executor, so workers start fast.
        self.embedder = Embedder(settings.embedding_model, max_sentences_per_s=settings.embed_max_sentences_per_s)
        self.store = ReferenceStore(settings.data_dir)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        self.references_loaded_at = float("-inf")

    def preload(self) -> None:
        """Load torch and the model now, in a thread of its own: a few CPU-seconds, paid once at
        start-up instead of inside the first traffic burst that closes a window. Not in the
        embedding thread: the drift detector is snapshotted there, and a checkpoint (a clean stop
        right after a start) would wait for the whole load. The embedder's load lock makes a first
        window that comes early wait for this load instead of starting a second one."""
        import threading

        threading.Thread(target=lambda: self.embedder.dimension, name="embed-preload", daemon=True).start()

    def refresh_references(self, now: float, every_s: float = 30.0) -> None:
        """Pick up reference sets added or re-bound while running (``agentwatch reference add``)."""
        from agentwatch.reference import load_bound_references

        if now - self.references_loaded_at >= every_s:
            self.references_loaded_at = now
            try:
                load_bound_references(self.store, self.detector)
            except (OSError, ValueError) as exc:
                log.warning("reference sets not loaded: %s", exc)

    def check(self, now: float) -> list[Finding]:
        """Embed the windows that closed and run the detector on them (in the executor thread)."""
        from agentwatch.streams.drift_sampler import embed_windows

        windows = self.sampler.due_windows(now)
        if not windows:
            return []
        self.refresh_references(now)
        findings: list[Finding] = []
        for window in embed_windows(windows, self.embedder):
            findings.extend(self.detector.update(window))
        return findings


class TraceStepCounter:
    """Model and tool calls per trace, reported when the trace's root span arrives.

    A root span ends after its children, so its arrival closes the trace; traces whose root never
    comes are forgotten oldest-first beyond ``max_traces``.
    """

    def __init__(self, max_traces: int = 100_000) -> None:
        self.max_traces = max_traces
        self._steps: collections.OrderedDict[str, int] = collections.OrderedDict()

    def count(self, events: Sequence[Any]) -> None:
        steps = self._steps
        for event in events:
            steps[event.trace_id] = steps.get(event.trace_id, 0) + 1
        while len(steps) > self.max_traces:
            steps.popitem(last=False)

    def finished(self, agent_steps: Sequence[Any]) -> dict[str, list[int]]:
        """Step counts of the traces whose root span is among ``agent_steps``, by service."""
        done: dict[str, list[int]] = {}
        for step in agent_steps:
            if not step.parent_span_id:
                n = self._steps.pop(step.trace_id, 0)
                if n:
                    done.setdefault(step.service or "unknown", []).append(n)
        return done


class WorkerState:
    """Everything one worker process holds: the pipeline objects, sink, detectors, metrics."""

    def __init__(self, settings: Settings, *, worker_index: int, detect: Callable[[Sequence[Any]], list[Finding]] | None,
                 metrics: Any | None, alert_record: Callable[[Finding], bytes] | None,
                 drift: DriftStage | None = None) -> None:
        self.drift = drift
        self.settings = settings
        self.partitions = dict(DEFAULT_TOPICS)
        pricing = PricingTable.load(settings.pricing_path)
        self.pipeline = SpanPipeline(Normalizer(pricing, max_text_chars=settings.max_text_chars,
                                                value_bounds=settings.value_bounds), self.partitions)
        self.sink = SnapshotSink(settings.data_dir, writer_id=f"{settings.app_id}-w{worker_index}",
                                 flush_rows=settings.snapshot_flush_rows,
                                 flush_seconds=settings.snapshot_flush_seconds)
        self.detect = detect
        self.metrics = metrics
        self.alert_record = alert_record
        self.counts = {"spans": 0, "records": 0, "dead_letter": 0, "findings": 0}
        self.pool: NormalizerProcess | None = None  # the normaliser process, when used
        self.trace_steps = TraceStepCounter()


def _cap_consumer_fetch_wait(max_wait_ms: int) -> None:
    """Faust hard-codes aiokafka's ``fetch_max_wait_ms=1500`` (no setting exists).

    Tansu answers a fetch only when that wait expires, not when data arrives, so every Kafka hop
    cost up to 1.5 s and span -> alert latency was ~1.3 s p50. Capping the wait bounds each hop;
    an idle consumer then polls a few times a second, which costs nothing measurable.
    """
    import aiokafka

    original = aiokafka.AIOKafkaConsumer.__init__
    if getattr(original, "_agentwatch_cap", None) is not None:
        return

    def init(self, *args: Any, **kwargs: Any) -> None:
        kwargs["fetch_max_wait_ms"] = min(int(kwargs.get("fetch_max_wait_ms", 500)), max_wait_ms)
        original(self, *args, **kwargs)

    init._agentwatch_cap = max_wait_ms  # type: ignore[attr-defined]
    aiokafka.AIOKafkaConsumer.__init__ = init


class WorkerApp(faust.App):
    """A Faust app that writes buffered rows while Faust waits for acknowledgements.

    Before a worker gives its partitions up (a stop, a rebalance), Faust waits, with no timeout,
    until every event it handed out is acknowledged. Event records are acknowledged only once
    their rows are in Parquet, and the timers that flush them are already stopped by then, so
    the wait runs with a flush loop beside it: without it, it would never end.
    """

    flush_buffered: Callable[[], Awaitable[None]] | None = None

    async def _consumer_wait_empty(self, consumer: Any, logger: Any) -> None:
        if self.flush_buffered is None:
            await super()._consumer_wait_empty(consumer, logger)
            return
        flushing = asyncio.ensure_future(self._flush_until_cancelled(self.flush_buffered))
        try:
            await super()._consumer_wait_empty(consumer, logger)
        finally:
            flushing.cancel()

    @staticmethod
    async def _flush_until_cancelled(flush: Callable[[], Awaitable[None]], every_s: float = 0.1) -> None:
        while True:
            try:
                await flush()
            except Exception:
                log.exception("flush while releasing partitions failed; retrying")
            await asyncio.sleep(every_s)


def faust_app(settings: Settings, app_id: str | None = None) -> WorkerApp:
    """A Faust app with the worker's client settings (batches of tens of MB, fast group joins)."""
    _cap_consumer_fetch_wait(settings.consumer_fetch_max_wait_ms)
    fetch = settings.max_message_bytes * 2
    return WorkerApp(
        app_id or settings.app_id,
        broker=[f"kafka://{server}" for server in settings.bootstrap_servers.split(",")],
        store="memory://",
        autodiscover=False,
        web_enabled=False,  # metrics are served by prometheus_client on --metrics-port
        topic_allow_declare=False,  # the supervisor creates topics with their partition counts
        topic_disable_leader=True,
        broker_rebalance_timeout=settings.rebalance_timeout_s,
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=settings.heartbeat_interval_s,
        broker_commit_interval=settings.commit_interval_s,
        broker_max_poll_interval=max(30.0, settings.session_timeout_s * 5),
        consumer_max_fetch_size=fetch,
        consumer_auto_offset_reset="earliest",
        producer_max_request_size=settings.max_message_bytes,
        producer_linger_ms=5,
        # Output records are tens of KB (a batch of events each); aiokafka's 16 KB default batch
        # would make every send wait for the previous one to drain.
        producer_max_batch_size=settings.max_message_bytes,
        stream_buffer_maxsize=64,
    )


def raw_topic(app: faust.App, *names: str) -> faust.TopicT:
    """Topics carry bytes as they are: records are decoded by the pipeline, not by Faust."""
    return app.topic(*names, key_type=bytes, value_type=bytes, key_serializer="raw",
                     value_serializer="raw", allow_empty=True)


def create_app(settings: Settings, *, worker_index: int = 0, ready_file: Path | None = None,
               detect: Callable[[Sequence[Any]], list[Finding]] | None = None,
               metrics: Any | None = None,
               alert_record: Callable[[Finding], bytes] | None = None,
               drift: DriftStage | None = None,
               drain_requested: threading.Event | None = None) -> tuple[faust.App, WorkerState]:
    if not settings.bootstrap_servers:
        raise ValueError("create_app needs settings.bootstrap_servers")
    state = WorkerState(settings, worker_index=worker_index, detect=detect, metrics=metrics,
                        alert_record=alert_record, drift=drift)
    app = faust_app(settings)

    def topic(*names: str) -> faust.TopicT:
        return raw_topic(app, *names)

    out_topics = {name: topic(name) for name in DEFAULT_TOPICS}

    async def send_all(outputs: list[tuple[str, int, bytes]]) -> None:
        for name, partition, payload in outputs:
            await out_topics[name].send(value=payload, partition=partition)

    async def dead_letter(event: Any, reason: str) -> None:
        message = event.message
        state.counts["dead_letter"] += 1
        if state.metrics is not None:
            state.metrics.observe_dead_letter(topic=message.topic, reason=reason.split(":")[0])
        log.warning("dead-lettered %s[%s]@%s: %s", message.topic, message.partition, message.offset, reason)
        await out_topics["dead_letter"].send(key=message.key, value=message.value or b"",
                                             headers=dead_letter_headers(message, reason))

    async def dead_letter_if_empty(event: Any, stream: Any = None) -> bool:
        """Dead-letter a record with nothing to decode; ``stream``: acknowledge it there too."""
        reason = empty_record_reason(event.value)
        if reason is None:
            return False
        await dead_letter(event, reason)
        if stream is not None:
            await stream.ack(event)
        return True

    async def dead_letter_values(event: Any, rejections: Sequence[Any]) -> None:
        """Count the implausible values nulled in this record's rows and dead-letter the originals."""
        if not rejections:
            return
        message = event.message
        if state.metrics is not None:
            state.metrics.observe_rejected_values(rejections)
        for letter in value_rejection_dead_letters(rejections, source_topic=message.topic,
                                                   max_bytes=int(settings.max_message_bytes * 0.9)):
            state.counts["dead_letter"] += 1
            if state.metrics is not None:
                state.metrics.observe_dead_letter(topic=message.topic, reason=VALUE_REJECTED_REASON)
            await out_topics["dead_letter"].send(key=letter.key, value=letter.value,
                                                 headers=dead_letter_headers(message, letter.reason))

    normalize = _normalizer_offload(settings, state)

    @app.agent(topic("otlp_spans"), name="agentwatch.normalize_spans")
    async def normalize_spans(stream: faust.StreamT) -> None:
        # Records are handed to the normaliser process in small groups, in order; while it
        # decodes, this loop sends the previous group's events and runs the detect stage.
        async for events in stream.take_events(16, within=0.005):
            started = time.perf_counter()
            pending = [None if empty_record_reason(event.value) else asyncio.ensure_future(normalize(event.value))
                       for event in events]
            group_outputs: list[tuple[str, int, bytes]] = []
            for event, future in zip(events, pending):
                if future is None:  # nothing to decode
                    await dead_letter_if_empty(event)
                    continue
                try:
                    outcome = await future
                except NormalizerDied as exc:
                    await dead_letter(event, f"normaliser died: {exc}")
                    continue
                except Exception as exc:  # never let one record kill the worker
                    log.exception("normaliser failed on a record")
                    await dead_letter(event, f"normaliser error: {type(exc).__name__}: {exc}")
                    continue
                group_outputs += outcome.outputs
                state.counts["spans"] += outcome.spans
                state.counts["records"] += 1
                if outcome.dead_letter_reason:
                    await dead_letter(event, outcome.dead_letter_reason)
                await dead_letter_values(event, outcome.rejections)
                if state.metrics is not None:
                    state.metrics.observe_batch(topic="otlp_spans", spans=outcome.spans,
                                                seconds=time.perf_counter() - started)
            # One record per (topic, partition) for the whole group, not per input record:
            # every record costs the producer, the broker and each consumer the same overhead
            # whatever its size.
            await send_all(merge_event_records(group_outputs, int(settings.max_message_bytes * 0.9)))

    @app.agent(topic("otlp_logs"), name="agentwatch.normalize_logs")
    async def normalize_logs(stream: faust.StreamT) -> None:
        async for event in stream.events():
            if await dead_letter_if_empty(event):
                continue
            try:
                outcome = state.pipeline.on_logs(event.value)
            except Exception as exc:
                await dead_letter(event, f"normaliser error: {type(exc).__name__}: {exc}")
                continue
            await send_all(outcome.outputs)
            if outcome.dead_letter_reason:
                await dead_letter(event, outcome.dead_letter_reason)

    # Event-topic records are acknowledged (and so committed) only once their rows are in a
    # Parquet file: a worker killed between flushes gets them again instead of losing them.
    @app.agent(topic(*EVENT_TOPICS), name="agentwatch.detect_and_snapshot")
    async def detect_and_snapshot(stream: faust.StreamT) -> None:
        stream = stream.noack()
        async for event in stream.events():
            table = event.message.topic
            if await dead_letter_if_empty(event, stream):
                continue
            try:
                # Typed events only where something reads them (detectors, metrics); the
                # snapshot sink takes the record's bytes as they are and needs only the count.
                payload = event.value
                if table in DETECTED_TOPICS:
                    decoded = decode_events_checked(table, payload, settings.value_bounds)
                    events, payload = decoded.events, decoded.payload
                    rows = len(events)
                    await dead_letter_values(event, decoded.rejections)
                else:
                    events, rows = [], len(decode_event_rows(payload))
            except UndecodableRecord as exc:
                await dead_letter(event, f"undecodable {table} record: {exc}")
                await stream.ack(event)
                continue
            if rows:
                state.sink.add_payload(table, payload, rows, token=(stream, event))
            else:
                await stream.ack(event)
            if state.metrics is not None:
                if table == "llm_calls":
                    state.metrics.observe_llm_calls(events)
                    state.trace_steps.count(events)
                elif table == "tool_calls":
                    state.metrics.observe_tool_calls(events)
                    state.trace_steps.count(events)
                elif table == "agent_steps":
                    for service, steps in state.trace_steps.finished(events).items():
                        state.metrics.observe_trace_steps(service=service, steps=steps)
                elif table == "gpu_samples":
                    state.metrics.observe_gpu_samples(events)
            if state.drift is not None and table == "llm_calls":
                state.drift.sampler.offer(events)
            if state.detect is None or table not in DETECTED_TOPICS:
                continue
            try:
                findings = state.detect(events)
            except Exception as exc:
                log.exception("detector failed")
                await dead_letter(event, f"detector error: {type(exc).__name__}: {exc}")
                continue
            await emit_findings(findings)

    async def emit_findings(findings: list[Finding]) -> None:
        if not findings:
            return
        state.counts["findings"] += len(findings)
        await send_all(encode_by_partition("findings", findings, state.partitions["findings"],
                                           key=_dedup_key))
        if state.alert_record is not None:
            for finding in findings:
                await out_topics["alerts"].send(key=finding.dedup_key.encode(), value=state.alert_record(finding))
        if state.metrics is not None:
            state.metrics.observe_findings(findings)

    @app.timer(5.0)
    async def report_consumer_lag() -> None:
        if state.metrics is None:
            return
        consumer = app.consumer
        # Faust keeps the last committed offset per partition only in this private map; no
        # public accessor exists. Without it (another Faust version) lag is simply not reported.
        committed = getattr(consumer, "_committed_offset", None)
        if committed is None:
            return
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            if high is None:
                continue
            done = committed.get(tp)
            state.metrics.set_consumer_lag(tp.topic, tp.partition, max(0, high - (done + 1 if done is not None else 0)))

    @app.timer(1.0)
    async def check_drift() -> None:
        if state.drift is None:
            return
        try:
            findings = await asyncio.get_running_loop().run_in_executor(
                state.drift.executor, state.drift.check, time.time())
        except Exception:  # a bad model path or window must not stop the worker
            log.exception("drift check failed")
            return
        await emit_findings(findings)

    @app.agent(topic("findings", "alerts"), name="agentwatch.snapshot_outputs")
    async def snapshot_outputs(stream: faust.StreamT) -> None:
        stream = stream.noack()
        async for event in stream.events():
            if await dead_letter_if_empty(event, stream):
                continue
            try:
                rows = decode_event_rows(event.value)
            except UndecodableRecord as exc:
                await dead_letter(event, f"undecodable {event.message.topic} record: {exc}")
                await stream.ack(event)
                continue
            if rows:
                state.sink.add_payload(event.message.topic, event.value, len(rows), token=(stream, event))
            else:
                await stream.ack(event)

    async def ack_written(due: dict) -> None:
        for buffer in due.values():
            for stream, event in buffer.tokens:
                await stream.ack(event)

    async def flush(force: bool = False) -> None:
        due = state.sink.take_due(force=force)
        if not due:
            return
        # Parquet encoding runs in a thread so the consumer loop keeps heartbeating.
        try:
            await asyncio.get_running_loop().run_in_executor(None, state.sink.write, due)
        except Exception:  # disk full, permissions, a bug: keep the rows and their offsets; retry later
            log.exception("snapshot write failed; will retry")
            state.sink.requeue(due)
            return
        await ack_written(due)

    app.flush_buffered = lambda: flush(force=True)
    # The supervisor sends SIGUSR1 before a stop, while it waits for the consumers to commit
    # everything on the in-memory broker: from then on rows are written at every tick, so their
    # records commit within a second instead of after the flush interval. run_worker catches the
    # signal from the process's first instant; the loop's handler, set once the app runs, takes
    # over from the one Faust's worker installs for SIGUSR1.
    draining = drain_requested if drain_requested is not None else threading.Event()

    @app.task
    async def drain_on_sigusr1() -> None:
        import signal

        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, draining.set)

    @app.timer(0.5)
    async def flush_snapshots() -> None:
        await flush(force=draining.is_set())

    @app.on_before_shutdown.connect
    async def flush_on_shutdown(app: faust.App, **kwargs: Any) -> None:
        due = state.sink.take_due(force=True)
        state.sink.write(due)
        await ack_written(due)
        if state.pool is not None:
            state.pool.shutdown()

    if state.drift is not None:
        @app.task
        async def preload_embedding_model() -> None:
            # After the group join, so the model load does not slow the worker's start.
            while not app.consumer.assignment():
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)
            state.drift.preload()

    if ready_file is not None:
        @app.task
        async def announce_ready() -> None:
            # Ready means joined: the group has handed this worker its partitions.
            while not app.consumer.assignment():
                await asyncio.sleep(0.1)
            ready_file.write_text(str(time.time()))

    return app, state


def dead_letter_headers(message: Any, reason: str) -> list[tuple[str, bytes]]:
    """The reason and the source record's position, on every dead letter."""
    return [(DLQ_REASON_HEADER, reason.encode()[:4000]),
            ("agentwatch.dlq.topic", message.topic.encode()),
            ("agentwatch.dlq.partition", str(message.partition).encode()),
            ("agentwatch.dlq.offset", str(message.offset).encode())]


def empty_record_reason(value: bytes | None) -> str | None:
    """Why a record holds nothing to decode, or None: a tombstone (null value) or zero bytes.
    Both go to dead_letter with this reason instead of vanishing as "no rows"."""
    if value is None:
        return "tombstone (record with a null value)"
    if not value:
        return "empty record (0 bytes)"
    return None


def _dedup_key(finding: Finding) -> str:
    return finding.dedup_key


# -- the normaliser process ---------------------------------------------------------------------

_CHILD_PIPELINE: SpanPipeline | None = None


def _child_init(pricing_path: str | None, max_text_chars: int, partitions: dict[str, int],
                value_bounds: Any = None) -> None:
    global _CHILD_PIPELINE
    from agentwatch.stack import _die_with_parent

    import signal

    # The stop signal reaches the worker's whole process group. The normaliser must outlive it
    # until the worker has drained its records (a dead child mid-stop would be restarted and the
    # record charged with its death); it goes when the worker goes, by the parent-death signal.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(signal.SIGKILL)  # a worker killed with SIGKILL takes its normaliser with it
    import gc

    # Each record allocates thousands of short-lived dicts; the default thresholds run a young
    # collection every 700 of them and promote the memos and parent memory into older ones.
    gc.freeze()
    gc.set_threshold(10_000, 20, 100)
    pricing = PricingTable.load(pricing_path)
    _CHILD_PIPELINE = SpanPipeline(Normalizer(pricing, max_text_chars=max_text_chars, value_bounds=value_bounds),
                                   partitions)


def _child_on_traces(payload: bytes) -> RecordOutcome:
    return _without_batch(_CHILD_PIPELINE.on_traces(payload))


def _without_batch(outcome: RecordOutcome) -> RecordOutcome:
    """The outcome the agent uses; the typed batch stays behind (it would cost a pickle)."""
    return RecordOutcome(outputs=outcome.outputs, dead_letter_reason=outcome.dead_letter_reason,
                         spans=outcome.spans, rejections=outcome.rejections)


class NormalizerDied(RuntimeError):
    """The normaliser process died on a record even when it ran alone: the record is the suspect."""


class NormalizerProcess:
    """otlp_spans records normalised in a child process, surviving the child's death.

    Decoding and mapping are pure CPU work; in a second process they run on the other core
    while the worker does Kafka I/O, detectors and snapshots. One process only, so its memory of
    parent spans sees every record of this worker, in order.

    When the child dies (the OOM killer, a crash) the records it held were not acknowledged and
    are not at fault: a new child is started and they run again, one at a time, so a record that
    kills a child while running alone is known to be the cause. After ``max_deaths_alone`` such
    deaths it raises :class:`NormalizerDied` and the caller dead-letters that record. A child
    that cannot even start raises, and the worker fails for its supervisor to see.
    """

    def __init__(self, settings: Settings, partitions: dict[str, int], *, max_deaths_alone: int = 2,
                 on_restart: Callable[[str], None] | None = None,
                 work: Callable[[bytes], RecordOutcome] | None = None) -> None:
        self.initargs = (str(settings.pricing_path) if settings.pricing_path else None, settings.max_text_chars,
                         dict(partitions), settings.value_bounds)
        self.max_deaths_alone = max_deaths_alone
        self.on_restart = on_restart
        self.work = work or _child_on_traces  # a module-level function: the child imports it by name
        self.restarts = 0
        self._pool = self._start()
        self._alone = asyncio.Lock()

    def _start(self) -> Any:
        pool, started = self._spawn()
        started.result()
        return pool

    def _spawn(self) -> tuple[Any, Any]:
        """A new pool, its process started now (not on the first record), and the future of its
        warm-up. Call it from the thread that lives as long as the worker: the child's
        parent-death signal follows the thread that started it, not the process."""
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),  # no fork of a threaded process
                                   initializer=_child_init, initargs=self.initargs)
        return pool, pool.submit(int)

    def child_pid(self) -> int | None:
        processes = getattr(self._pool, "_processes", None) or {}
        return next(iter(processes), None)

    async def __call__(self, payload: bytes) -> RecordOutcome:
        from concurrent.futures.process import BrokenProcessPool

        pool = self._pool
        try:
            return await asyncio.wrap_future(pool.submit(self.work, payload))
        except BrokenProcessPool as exc:  # died while it held this record and others
            death = str(exc)
        deaths_alone = 0
        async with self._alone:
            while True:
                pool = await self._replace(pool, death)
                try:
                    future = pool.submit(self.work, payload)
                except BrokenProcessPool as exc:  # broken by another record before this one got in
                    death = str(exc)
                    continue
                try:
                    return await asyncio.wrap_future(future)
                except BrokenProcessPool as exc:
                    death = str(exc)
                    deaths_alone += 1
                    if deaths_alone >= self.max_deaths_alone:
                        # A working process for the next record before the lock is let go: the
                        # pool notices its death asynchronously, and a record handed to it now
                        # would be charged with a death it did not cause.
                        await self._replace(pool, death)
                        raise NormalizerDied(f"the normaliser process died {deaths_alone} times while it held "
                                             f"only this record ({death})") from None

    async def _replace(self, broken: Any, reason: str) -> Any:
        """The live pool: the one another record already started, or a new one."""
        if self._pool is broken:
            broken.shutdown(wait=False, cancel_futures=True)
            self._pool, started = self._spawn()
            await asyncio.wrap_future(started)  # the child initialises while the loop goes on
            self.restarts += 1
            log.warning("normaliser process died (%s); restarted it (restart %d)", reason, self.restarts)
            if self.on_restart is not None:
                self.on_restart(reason)
        return self._pool

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _normalizer_offload(settings: Settings, state: WorkerState) -> Callable[[bytes], Awaitable[Any]]:
    """Where otlp_spans records are normalised: a child process (default) or this one."""
    if settings.normalize_in_process:
        async def inline(payload: bytes) -> RecordOutcome:
            return state.pipeline.on_traces(payload)

        return inline

    def restarted(reason: str) -> None:
        if state.metrics is not None:
            state.metrics.observe_normalizer_restart()

    state.pool = NormalizerProcess(settings, state.partitions, on_restart=restarted)
    return state.pool


__all__ = ["create_app", "DriftStage", "WorkerState"]
