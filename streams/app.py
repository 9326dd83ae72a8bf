"""The Faust runtime of :mod:`agentwatch.streams.dataflow`: topics in, the core's outputs out.

Three agents feed records to the core and act on what it returns (send records, buffer rows,
acknowledge): the map stage (``otlp_spans`` through the normaliser process, ``otlp_logs``) and
one agent for everything that owns state or rows (the trace-keyed event topics, ``usage``,
``llm_messages``, ``gpu_samples``). A record is acknowledged (and so committed) once its records
are sent and its rows are in Parquet. Partition state is checkpointed by
:class:`PartitionCheckpointer`; drift windows are embedded in a thread by :class:`DriftStage`.

Built by :func:`create_app` from explicit settings: there is no module-level app.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable

import faust
from faust.types import TP

from agentwatch.settings import Settings
from agentwatch.streams.dataflow import (TRACE_TOPICS, USAGE_TOPIC, Dataflow, Record, Rows, Send, StepOutput,
                                         empty_record_reason)
from agentwatch.streams.drift_stage import DriftStage
from agentwatch.streams.kafka_compat import (assignment_start_offsets, cap_consumer_fetch_wait, committed_offsets,
                                             fetch_range)
from agentwatch.streams.normalizer_process import NormalizerDied, NormalizerProcess
from agentwatch.streams.partition_checkpoint import PartitionCheckpointer, Unacked
from agentwatch.streams.pipeline import merge_event_records
from agentwatch.streams.snapshots import SnapshotSink

log = logging.getLogger(__name__)

ROW_TOPICS = (*TRACE_TOPICS, USAGE_TOPIC, "llm_messages", "gpu_samples")
# Groups of otlp_spans records handed to the normaliser and not yet finished (sent, acked): one
# being finished, the next being normalised, one more queued behind it.
MAP_GROUPS_IN_FLIGHT = 3


class WorkerApp(faust.App):
    """A Faust app that writes buffered rows while Faust waits for acknowledgements.

    Before a worker gives its partitions up (a stop, a rebalance), Faust waits, with no timeout,
    until every event it handed out is acknowledged. Records are acknowledged only once their
    rows are in Parquet, and the timers that flush them are already stopped by then, so the wait
    runs with a flush loop beside it: without it, it would never end.
    """

    flush_buffered: Callable[[], Awaitable[None]] | None = None

    async def _consumer_wait_empty(self, consumer: Any, logger: Any) -> None:
        if self.flush_buffered is None:
            await super()._consumer_wait_empty(consumer, logger)
            return
        flushing = asyncio.ensure_future(_flush_until_cancelled(self.flush_buffered))
        try:
            await super()._consumer_wait_empty(consumer, logger)
        finally:
            flushing.cancel()


async def _flush_until_cancelled(flush: Callable[[], Awaitable[None]], every_s: float = 0.1) -> None:
    while True:
        try:
            await flush()
        except Exception:
            log.exception("flush while releasing partitions failed; retrying")
        await asyncio.sleep(every_s)


def faust_app(settings: Settings, app_id: str | None = None) -> WorkerApp:
    """A Faust app with the worker's client settings (batches of tens of MB, fast group joins)."""
    cap_consumer_fetch_wait(settings.consumer_fetch_max_wait_ms)
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
    """Topics carry bytes as they are: records are decoded by the core, not by Faust."""
    return app.topic(*names, key_type=bytes, value_type=bytes, key_serializer="raw",
                     value_serializer="raw", allow_empty=True)


async def _send_until_accepted(topic: Any, s: Send, first_backoff_s: float = 0.1, max_backoff_s: float = 5.0) -> None:
    """Send one record, retrying until the producer takes it.

    The record that made it is already applied to its partition's state: running it again
    would apply it twice, and acknowledging it without its outputs would lose them. So a send
    that fails (a broker away, a topic's metadata not there yet) is retried, loudly, and the
    input record stays unacknowledged (uncommitted) until it goes out.
    """
    backoff = first_backoff_s
    attempts = 0
    while True:
        try:
            await topic.send(key=s.key, value=s.value, partition=s.partition, headers=list(s.headers) or None)
            if attempts:
                log.warning("send to %s[%s] went through after %d failed attempts", s.topic, s.partition, attempts)
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if getattr(exc, "retriable", True) is False:  # e.g. a record over the broker's limit
                log.error("send to %s[%s] cannot succeed (%s: %s); its input record stays uncommitted",
                          s.topic, s.partition, type(exc).__name__, exc)
                raise
            attempts += 1
            log.warning("send to %s[%s] failed (%s: %s); retrying in %.1fs (attempt %d)",
                        s.topic, s.partition, type(exc).__name__, exc, backoff, attempts)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, max_backoff_s)


def _record(event: Any) -> Record:
    message = event.message
    return Record(message.topic, message.partition, message.offset, event.value, message.key)


class OffsetContinuity:
    """The offsets a worker is handed must follow on, partition by partition.

    Our topics are neither compacted nor written in transactions, so within one assignment a
    record handed over after offset ``n`` is ``n + 1`` (or an earlier one again, after a seek
    back). A jump means the consumer skipped records: their rows would be missing while their
    offsets commit. :meth:`check` names the skipped range so it is logged and counted, never
    silent. A partition given up is forgotten: its next owner may have moved it on meanwhile.
    """

    def __init__(self) -> None:
        self._next: dict[tuple[str, int], int] = {}

    def start_at(self, topic: str, partition: int, offset: int) -> None:
        """Where the consumer starts a partition it was just assigned (its committed offset): the
        first record handed over is checked against it like any other."""
        self._next.setdefault((topic, partition), offset)

    def check(self, topic: str, partition: int, offset: int) -> tuple[int, int] | None:
        """``(first, end)`` of the offsets skipped before ``offset``, or None."""
        key = (topic, partition)
        expected = self._next.get(key)
        self._next[key] = offset + 1 if expected is None else max(expected, offset + 1)
        if expected is not None and offset > expected:
            return expected, offset
        return None

    def next_offset(self, topic: str, partition: int) -> int | None:
        """The offset after the furthest one handed over (None: none yet in this assignment)."""
        return self._next.get((topic, partition))

    def forget(self, topic_partitions: Iterable[tuple[str, int]]) -> None:
        for key in topic_partitions:
            self._next.pop(key, None)


class _Pending:
    """An input record waiting for its rows: acknowledged when the last of them is written."""

    __slots__ = ("ack", "remaining")

    def __init__(self, ack: Callable[[], Awaitable[None]], remaining: int) -> None:
        self.ack = ack
        self.remaining = remaining


def create_app(settings: Settings, dataflow: Dataflow, *, worker_index: int = 0,
               ready_file: Path | None = None, drift: DriftStage | None = None,
               drain_requested: threading.Event | None = None) -> faust.App:
    if not settings.bootstrap_servers:
        raise ValueError("create_app needs settings.bootstrap_servers")
    app = faust_app(settings)
    metrics = dataflow.metrics
    sink = SnapshotSink(settings.data_dir, writer_id=f"{settings.app_id}-w{worker_index}",
                        flush_rows=settings.snapshot_flush_rows, flush_seconds=settings.snapshot_flush_seconds)
    out_topics = {name: raw_topic(app, name) for name in dataflow.partitions}
    unacked = Unacked()
    continuity = OffsetContinuity()
    # Per partition of the current assignment, until its first record: where the consumer starts it.
    assignment_starts: dict[tuple[str, int], asyncio.Future] = {}

    # Replay and gap reads fetch about two records' worth at a time: bounded memory whatever a
    # record's size.
    read_chunk_bytes = settings.max_message_bytes * 2

    async def read_range(topic: str, partition: int, start: int, end: int, purpose: str
                         ) -> AsyncIterator[list[Record]]:
        """Records ``[start, end)`` of one partition, read outside the group in chunks; a failing
        fetch is retried (the caller's live record waits for them). Records the log no longer
        holds are logged as missing."""
        backoff = 0.5
        loop = asyncio.get_running_loop()
        while start < end:
            try:
                chunk = await loop.run_in_executor(None, lambda at=start: fetch_range(
                    settings.bootstrap_servers, topic, partition, at, end, max_fetch_bytes=read_chunk_bytes))
            except Exception as exc:
                log.warning("%s of %s[%s] from %d failed (%s: %s); retrying in %.1fs", purpose, topic, partition,
                            start, type(exc).__name__, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            if not chunk:
                log.error("%s of %s[%s]: nothing readable in %d..%d; those records are missing", purpose, topic,
                          partition, start, end - 1)
                return
            if chunk[0][0] > start:
                log.error("%s of %s[%s]: records %d..%d are no longer in the log (retention) and are missing",
                          purpose, topic, partition, start, chunk[0][0] - 1)
            yield [Record(topic, partition, offset, value, key) for offset, key, value in chunk]
            start = chunk[-1][0] + 1

    async def assignment_start(record: Record) -> int | None:
        """For the first record of a partition in this assignment: the offset the consumer
        started it at (its committed offset), which the record's offset is checked against."""
        start = assignment_starts.pop((record.topic, record.partition), None)
        if start is None:
            return None
        try:
            offset = (await start).get((record.topic, record.partition))
        except Exception as exc:  # the check of this assignment's first record is lost, nothing else
            log.warning("start offsets of the assignment unreadable (%s: %s); the first record of %s[%s] "
                        "is not checked", type(exc).__name__, exc, record.topic, record.partition)
            return None
        if offset is not None:
            continuity.start_at(record.topic, record.partition, offset)
        return offset

    async def skipped_before(record: Record) -> AsyncIterator[list[Record]]:
        """The records the consumer skipped before ``record`` in this assignment (none, normally).

        A skipped record would have its offset committed with the ones after it and its rows
        never written, silently. So a gap is an error, counted (agentwatch_offset_gaps_total),
        and its records are read from the log and processed before ``record``."""
        await assignment_start(record)
        skipped = continuity.check(record.topic, record.partition, record.offset)
        if skipped is None:
            return
        first, end = skipped
        dataflow.counts["offset_gaps"] += end - first
        log.error("%s[%s]: the consumer skipped offsets %d..%d; reading them from the log to process them "
                  "(agentwatch_offset_gaps_total)", record.topic, record.partition, first, end - 1)
        async for chunk in read_range(record.topic, record.partition, first, end, "gap read"):
            yield chunk

    async def process_skipped(record: Record, track: Unacked | None = None) -> tuple[list[Rows], list[Record]]:
        """Process the records skipped before ``record`` (none, normally): their sends go out
        now; their rows, and the records themselves, go with ``record``'s acknowledgement."""
        rows: list[Rows] = []
        records: list[Record] = []
        async for chunk in skipped_before(record):
            for r in chunk:
                if track is not None:
                    track.add(r)
                out = dataflow.on_record(r)
                await send(out.sends)
                rows += out.rows
                records.append(r)
        return rows, records

    async def send(sends: list[Send]) -> None:
        for s in sends:
            await _send_until_accepted(out_topics[s.topic], s)

    async def apply(out: StepOutput, ack: Callable[[], Awaitable[None]] | None = None) -> None:
        """Send the outputs, buffer the rows; ``ack`` once both are done."""
        await send(out.sends)
        if not out.rows:
            if ack is not None:
                await ack()
            return
        pending = _Pending(ack, len(out.rows)) if ack is not None else None
        for rows in out.rows:
            sink.add_payload(rows.table, rows.payload, rows.count, token=pending)

    async def ack_written(due: dict) -> None:
        for buffer in due.values():
            for pending in buffer.tokens:
                if pending is None:
                    continue
                pending.remaining -= 1
                if pending.remaining == 0:
                    await pending.ack()

    async def flush(force: bool = False) -> None:
        due = sink.take_due(force=force)
        if not due:
            return
        # Parquet encoding runs in a thread so the consumer loop keeps heartbeating.
        try:
            await asyncio.get_running_loop().run_in_executor(None, sink.write, due)
        except Exception:  # disk full, permissions, a bug: keep the rows and their offsets; retry later
            log.exception("snapshot write failed; will retry")
            sink.requeue(due)
            return
        await ack_written(due)

    async def commit(topic_partitions: list[tuple[str, int]]) -> dict[tuple[str, int], int | None]:
        """Everything sent so far delivered, acknowledged offsets committed: the offsets the group
        has committed now (read back from the broker, not assumed)."""
        await app.producer.flush()
        await app.consumer.commit()
        return await asyncio.get_running_loop().run_in_executor(
            None, committed_offsets, settings.bootstrap_servers, settings.app_id, topic_partitions)

    checkpointer = PartitionCheckpointer(dataflow, unacked, flush, commit, settings.detector_checkpoint_s) \
        if dataflow.checkpoints is not None and settings.detector_checkpoint_s > 0 else None

    pool: NormalizerProcess | None = None
    if not settings.normalize_in_process:
        pool = NormalizerProcess(settings, dataflow.partitions,
                                 on_restart=lambda reason: metrics.observe_normalizer_restart() if metrics else None)

    async def normalize(payload: bytes) -> Any:
        if pool is None:
            return dataflow.mapper.on_traces(payload)
        return await pool(payload)

    async def finish_group(group: list[tuple[Any, Record, Any]], acknowledge: Callable[[Any], Any],
                           carried: list[Rows]) -> None:
        """A group's outcomes, in order: its events sent (merged per topic and partition), then
        each record acknowledged once its rows are written. A record read to fill a gap (event
        None) has no acknowledgement of its own: its rows are ``carried`` to the next record
        handed over, which is acknowledged only once they are written too."""
        started = time.perf_counter()
        outputs: list[tuple[str, int, bytes]] = []
        after_sends: list[tuple[StepOutput, Any]] = []
        spans = 0
        for event, record, future in group:
            if future is None:
                await apply(dataflow.on_record(record), acknowledge(event))  # the empty-record dead letter
                continue
            try:
                outcome = await future
            except NormalizerDied as exc:
                await apply(dataflow.dead_letter(record, f"normaliser died: {exc}"), acknowledge(event))
                continue
            except Exception as exc:  # never let one record kill the worker
                log.exception("normaliser failed on a record")
                await apply(dataflow.dead_letter(record, f"normaliser error: {type(exc).__name__}: {exc}"),
                            acknowledge(event))
                continue
            out = dataflow.on_mapped(record, outcome)
            spans += outcome.spans
            # Event records are merged per (topic, partition) for the whole group below:
            # every record costs producer, broker and consumers the same whatever its size.
            outputs += [(s.topic, s.partition, s.value) for s in out.sends if s.key is None and not s.headers]
            await send([s for s in out.sends if s.key is not None or s.headers])
            after_sends.append((StepOutput(rows=out.rows), event))
        await send([Send(t, p, v) for t, p, v in merge_event_records(outputs, int(settings.max_message_bytes * 0.9))])
        for rows, event in after_sends:
            if event is None:
                carried += rows.rows
                continue
            await apply(StepOutput(rows=carried + rows.rows), acknowledge(event))
            carried.clear()
        if metrics is not None:
            metrics.observe_batch(topic="otlp_spans", spans=spans, seconds=time.perf_counter() - started)

    @app.agent(raw_topic(app, "otlp_spans"), name="agentwatch.map_spans")
    async def map_spans(stream: faust.StreamT) -> None:
        # Records go to the normaliser process as they arrive, in groups; a second task finishes
        # the groups in order (sends their events, acknowledges them) while the normaliser
        # already works on the next: it waited idle for a third of a run when each group was
        # finished before the next was handed over. A record is acknowledged once its events
        # are with the producer and its rows (the PII detections found in it) are in Parquet.
        # At most MAP_GROUPS_IN_FLIGHT groups are handed over and unfinished: bounded memory
        # when the normaliser is the slower.
        stream = stream.noack()

        async def no_ack() -> None:
            return None

        def acknowledge(event: Any) -> Callable[[], Awaitable[None]]:
            return no_ack if event is None else lambda: stream.ack(event)

        groups: asyncio.Queue = asyncio.Queue(maxsize=MAP_GROUPS_IN_FLIGHT - 1)
        carried: list[Rows] = []

        async def finisher() -> None:
            while True:
                await finish_group(await groups.get(), acknowledge, carried)

        finishing = asyncio.ensure_future(finisher())

        async def hand_over(group: list[tuple[Any, Record, Any]]) -> None:
            queued = asyncio.ensure_future(groups.put(group))
            await asyncio.wait([queued, finishing], return_when=asyncio.FIRST_COMPLETED)
            if finishing.done():
                # A send that cannot succeed (the only way out of finish_group): the agent
                # fails with it, as it did when it finished groups itself.
                queued.cancel()
                finishing.result()

        def start(event: Any, record: Record) -> tuple[Any, Record, Any]:
            future = None if empty_record_reason(record.value) else asyncio.ensure_future(normalize(record.value))
            return event, record, future

        try:
            async for events in stream.take_events(16, within=0.005):
                group = []
                for event in events:
                    record = _record(event)
                    async for skipped in skipped_before(record):
                        if group:
                            await hand_over(group)
                        group = [start(None, r) for r in skipped]
                    group.append(start(event, record))
                await hand_over(group)
        finally:
            finishing.cancel()

    @app.agent(raw_topic(app, "otlp_logs"), name="agentwatch.map_logs")
    async def map_logs(stream: faust.StreamT) -> None:
        stream = stream.noack()
        async for event in stream.events():
            record = _record(event)
            skipped_rows, _ = await process_skipped(record)
            out = dataflow.on_record(record)
            out.rows[:0] = skipped_rows
            await apply(out, lambda event=event: stream.ack(event))

    async def replay_before(record: Record) -> None:
        """Replay what was committed since the partition's checkpoint into its state (the live
        record waits: applied before its history, the state would differ from an uninterrupted
        run's)."""
        committed = await assignment_start(record)
        replay = dataflow.replay_needed(record, app.consumer.highwater(TP(record.topic, record.partition)),
                                        committed)
        if replay is None:
            return
        started, replayed = time.perf_counter(), 0
        async for chunk in read_range(replay.topic, replay.partition, replay.start, replay.end, "replay"):
            for r in chunk:
                dataflow.replay(r)
            replayed += len(chunk)
        log.info("partition %s[%s]: replayed %d records (%d..%d) into its restored state in %.2fs",
                 replay.topic, replay.partition, replayed, replay.start, replay.end, time.perf_counter() - started)

    # Records are acknowledged (and so committed) only once their rows are in a Parquet file: a
    # worker killed between flushes gets them again instead of losing them.
    @app.agent(raw_topic(app, *ROW_TOPICS), name="agentwatch.keyed_stages")
    async def keyed_stages(stream: faust.StreamT) -> None:
        stream = stream.noack()
        async for event in stream.events():
            record = _record(event)
            await replay_before(record)
            skipped_rows, skipped_records = await process_skipped(record, track=unacked)
            unacked.add(record)

            async def ack(event: Any = event, records: list[Record] = [*skipped_records, record]) -> None:
                for r in records:
                    unacked.done(r)
                await stream.ack(event)

            out = dataflow.on_record(record)
            out.rows[:0] = skipped_rows
            await apply(out, ack)

    app.flush_buffered = lambda: flush(force=True)
    # The supervisor sends SIGUSR1 before a stop, while it waits for the consumers to commit
    # everything: from then on rows are written at every tick, so their records commit within a
    # second instead of after the flush interval. run_worker catches the signal from the
    # process's first instant; the loop's handler takes over once the app runs.
    draining = drain_requested if drain_requested is not None else threading.Event()

    @app.task
    async def drain_on_sigusr1() -> None:
        import signal

        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, draining.set)

    @app.timer(0.5)
    async def flush_snapshots() -> None:
        await flush(force=draining.is_set())

    @app.timer(5.0)
    async def report_consumer_lag() -> None:
        if metrics is None:
            return
        consumer = app.consumer
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            done = continuity.next_offset(tp.topic, tp.partition)
            if high is not None and done is not None:
                metrics.set_consumer_lag(tp.topic, tp.partition, max(0, high - done))

    if drift is not None:
        @app.timer(1.0)
        async def check_drift() -> None:
            now = time.time()
            due = dataflow.due_drift_windows(now)
            if not due:
                return
            try:
                findings = await asyncio.get_running_loop().run_in_executor(drift.executor, drift.check, due, now)
            except Exception:  # a bad model path or window must not stop the worker
                log.exception("drift check failed")
                return
            if findings:
                out = StepOutput()
                dataflow.emit_findings(out, findings)
                await apply(out)

        @app.task
        async def preload_embedding_model() -> None:
            # After the group join, so the model load does not slow the worker's start.
            while not app.consumer.assignment():
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)
            drift.preload()

    if checkpointer is not None:
        # Ticks shorter than the interval, so timer drift never skips a whole interval.
        @app.timer(min(checkpointer.every_s, 5.0), name="agentwatch.checkpoint_partitions")
        async def checkpoint_partitions() -> None:
            await checkpointer.maybe_save()

    @app.on_partitions_assigned.connect
    async def read_start_offsets(app: faust.App, assigned: Any, **kwargs: Any) -> None:
        # Read while the group finishes its rebalance; a partition's first record waits for it.
        tps = sorted((tp.topic, tp.partition) for tp in assigned)
        if tps:
            starts = asyncio.get_running_loop().run_in_executor(
                None, assignment_start_offsets, settings.bootstrap_servers, settings.app_id, tps)
            assignment_starts.update((tp, starts) for tp in tps)

    @app.on_partitions_revoked.connect
    async def hand_over(app: faust.App, revoked: Any, **kwargs: Any) -> None:
        # Faust has waited for every record handed out to be acknowledged: the states of the
        # revoked partitions reflect exactly what was stored. Save them, then forget them.
        tps = [(tp.topic, tp.partition) for tp in revoked]
        continuity.forget(tps)
        for tp in tps:
            assignment_starts.pop(tp, None)
        states = [s for s in dataflow.owned_states()
                  if any((topic in TRACE_TOPICS and s.stage == "trace" or topic == USAGE_TOPIC and s.stage == "keyed")
                         and partition == s.partition for topic, partition in tps)]
        if checkpointer is not None and states:
            # Short: the rebalance waits for this. A state not saved now is rebuilt by its next
            # owner from the previous file and the log.
            await checkpointer.save(states, wait_s=1.0)
        dataflow.release(tps)

    @app.on_before_shutdown.connect
    async def flush_on_shutdown(app: faust.App, **kwargs: Any) -> None:
        due = sink.take_due(force=True)
        try:
            sink.write(due)
            await ack_written(due)
        except Exception:  # the records stay uncommitted and come again; the rest of the stop goes on
            log.exception("final snapshot write failed")
        if checkpointer is not None:
            states = dataflow.owned_states()
            docs = dataflow.snapshot_states(states)
            try:  # Faust committed what was acknowledged before this hook; a file must not run ahead of it
                committed = committed_offsets(settings.bootstrap_servers, settings.app_id, sorted(
                    {(topic, state.partition) for state, doc in docs for topic in doc["offsets"]}))
            except Exception:
                log.exception("committed offsets unreadable at shutdown; no shutdown checkpoint")
                committed = {}
            for state, doc in docs:
                if unacked.clear_below(state, doc["offsets"]) and all(
                        (committed.get((topic, state.partition)) or 0) >= offset
                        for topic, offset in doc["offsets"].items()):
                    try:
                        checkpointer.store.save(state.stage, state.partition, checkpointer.store.encode(doc))
                    except Exception:
                        log.exception("partition %s/%s: shutdown checkpoint failed", state.stage, state.partition)
        if pool is not None:
            pool.shutdown()
        if drift is not None:
            drift.shutdown()

    if ready_file is not None:
        @app.task
        async def announce_ready() -> None:
            # Ready means joined: the group has handed this worker its partitions.
            while not app.consumer.assignment():
                await asyncio.sleep(0.1)
            ready_file.write_text(str(time.time()))

    return app


__all__ = ["create_app", "DriftStage", "OffsetContinuity", "PartitionCheckpointer", "WorkerApp", "faust_app",
           "raw_topic"]
