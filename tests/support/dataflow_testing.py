"""An in-memory runtime for :mod:`agentwatch.streams.dataflow`, for unit tests.

Bytewax's ``testing`` module is the model: the test writes records into a :class:`TestingBroker`
(the testing source), runs a :class:`TestingCluster` of N workers until nothing is left to read,
and reads the :class:`TestingSink` (rows by table), the findings and the ``dead_letter`` log. A
:class:`Clock` the test moves is the only time there is: nothing here reads the wall clock.

What the cluster does is what the Faust adapter does, without Kafka:

- every worker holds one :class:`~agentwatch.streams.dataflow.Dataflow` with its own map stage
  (a :class:`~agentwatch.streams.pipeline.SpanPipeline`) and a
  :class:`~agentwatch.streams.partition_checkpoint.PartitionCheckpointStore` on one shared data
  directory, as every production worker has;
- partitions are assigned like Faust's co-partitioned assignor: partition ``p`` of every input
  topic goes to worker ``p % n`` (so partition ``p`` of ``llm_calls``, ``tool_calls`` and
  ``agent_steps`` meet in one worker);
- a record is processed with :meth:`Dataflow.on_record`; its sends are produced, its rows
  written to the sink, its findings collected, and only then its offset committed (or, with a
  ``commit_lag``, committed that many records later: "written but not committed");
- before a partition's first live record, :meth:`Dataflow.replay_needed` is honoured by
  feeding the broker's records ``[start, end)`` to :meth:`Dataflow.replay`;
- :meth:`TestingCluster.checkpoint` commits everything processed and then saves every owned
  state (production's order); :meth:`TestingCluster.rebalance` hands partitions over cleanly;
  :meth:`TestingCluster.crash` drops a worker with neither commit nor checkpoint.

Test inputs are OTLP requests built with :func:`otlp_traces` / :func:`otlp_logs` from
:class:`SpanSpec` / :class:`LogSpec` (opentelemetry-proto messages, as a collector writes them).
"""

from __future__ import annotations

import collections
import itertools
import random
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import orjson
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from agentwatch.broker import DEFAULT_TOPICS
from agentwatch.events import Finding
from agentwatch.streams.dataflow import TRACE_TOPICS, USAGE_TOPIC, Dataflow, Record, StepOutput
from agentwatch.streams.partition_checkpoint import PartitionCheckpointStore

USAGE_PARTITIONS = 8
# Topics a worker consumes (the others are outputs: alerts, dead letters).
INPUT_TOPICS = ("otlp_spans", "otlp_logs", *TRACE_TOPICS, "llm_messages", "gpu_samples", USAGE_TOPIC)


def default_topics() -> dict[str, int]:
    """Production's topics and partition counts, with ``usage`` (8) when the broker lacks it."""
    topics = dict(DEFAULT_TOPICS)
    topics.setdefault(USAGE_TOPIC, USAGE_PARTITIONS)
    topics.setdefault("dead_letter", 1)
    topics.setdefault("alerts", 2)
    return topics


# -- time ------------------------------------------------------------------------------------------


class Clock:
    """Time that moves only when the test says so (unix seconds)."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError(f"a clock does not go back ({seconds} s)")
        self._now += seconds
        return self._now


# -- the testing source: a broker ------------------------------------------------------------------

Position = tuple[str, int, int]  # (topic, partition, offset)


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """One record in a partition's log; ``origin`` is the input record whose processing sent it
    (None for what the test produced)."""

    topic: str
    partition: int
    offset: int
    value: bytes | None
    key: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = ()
    origin: Position | None = None

    @property
    def position(self) -> Position:
        return (self.topic, self.partition, self.offset)

    def header(self, name: str) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)

    def as_record(self) -> Record:
        return Record(self.topic, self.partition, self.offset, self.value, self.key)


class TestingBroker:
    """Append-only partition logs and one consumer group's committed offsets.

    ``produce`` with no partition picks one like Kafka's default partitioner does: the key's
    hash (crc32, as :func:`~agentwatch.streams.pipeline.partition_for`), round-robin when there
    is no key.
    """

    __test__ = False  # not a pytest class

    def __init__(self, topics: Mapping[str, int] | None = None) -> None:
        self.topics = dict(default_topics() if topics is None else topics)
        self._logs: dict[tuple[str, int], list[StoredRecord]] = {
            (t, p): [] for t, n in self.topics.items() for p in range(n)}
        self._committed: dict[tuple[str, int], int] = {}
        self._round_robin: dict[str, Iterable[int]] = {}

    def produce(self, topic: str, partition: int | None, value: bytes | None, key: bytes | None = None,
                headers: Sequence[tuple[str, bytes]] = (), *, origin: Position | None = None) -> StoredRecord:
        if topic not in self.topics:
            raise KeyError(f"unknown topic {topic!r}")
        count = self.topics[topic]
        if partition is None:
            if key is None:
                cycle = self._round_robin.setdefault(topic, itertools.cycle(range(count)))
                partition = next(cycle)  # type: ignore[call-overload]
            else:
                partition = zlib.crc32(key) % count
        if not 0 <= partition < count:
            raise ValueError(f"{topic} has {count} partitions, not {partition + 1}")
        log = self._logs[(topic, partition)]
        stored = StoredRecord(topic, partition, len(log), value, key, tuple(headers), origin)
        log.append(stored)
        return stored

    def end_offset(self, topic: str, partition: int) -> int:
        return len(self._logs[(topic, partition)])

    def read(self, topic: str, partition: int, offset: int) -> StoredRecord:
        return self._logs[(topic, partition)][offset]

    def log(self, topic: str, partition: int) -> list[StoredRecord]:
        return list(self._logs[(topic, partition)])

    def records(self, topic: str) -> list[StoredRecord]:
        """Every record of ``topic``, partition by partition."""
        return [r for p in range(self.topics[topic]) for r in self._logs[(topic, p)]]

    def committed(self, topic: str, partition: int) -> int:
        return self._committed.get((topic, partition), 0)

    def commit(self, topic: str, partition: int, offset: int) -> None:
        """Commit ``offset`` (the next to read); a commit never moves the group back."""
        if offset > self.end_offset(topic, partition):
            raise ValueError(f"commit of {topic}[{partition}]@{offset} past its end")
        key = (topic, partition)
        self._committed[key] = max(self._committed.get(key, 0), offset)


# -- the testing sink ------------------------------------------------------------------------------


class TestingSink:
    """Rows by table, decoded from the JSON payloads the core hands out, with the record each
    row came from."""

    __test__ = False

    def __init__(self) -> None:
        self.tables: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
        self.origins: dict[str, list[Position]] = collections.defaultdict(list)

    def write(self, table: str, payload: bytes, count: int, origin: Position) -> None:
        rows = orjson.loads(payload)
        rows = rows if isinstance(rows, list) else [rows]
        if len(rows) != count:
            raise AssertionError(f"{table} rows from {origin}: payload holds {len(rows)}, count says {count}")
        self.tables[table].extend(rows)
        self.origins[table].extend([origin] * len(rows))

    def rows(self, table: str) -> list[dict[str, Any]]:
        return list(self.tables.get(table, ()))

    def counts(self) -> dict[str, int]:
        return {table: len(rows) for table, rows in self.tables.items() if rows}


# -- workers and the cluster -----------------------------------------------------------------------


@dataclass
class Applied:
    """What processing one record did (kept for lineage: which rows a record caused)."""

    worker: int
    position: Position
    rows: dict[str, int]
    sends: list[Position]
    findings: list[Finding]
    dead_letters: int


@dataclass
class TestingWorker:
    """One worker: its core, the partitions it holds, where it reads each and what it has
    processed but not committed."""

    __test__ = False

    index: int
    dataflow: Dataflow
    assigned: list[tuple[str, int]] = field(default_factory=list)
    positions: dict[tuple[str, int], int] = field(default_factory=dict)

    @property
    def checkpoints(self) -> PartitionCheckpointStore:
        return self.dataflow.checkpoints


BuildDataflow = Callable[[Mapping[str, int], PartitionCheckpointStore], Dataflow]


def dataflow_factory(build_detectors: Callable[[], Sequence[Any]], **kwargs: Any) -> BuildDataflow:
    """A ``build_dataflow`` like production's (:func:`agentwatch.streams.worker.build_dataflow`):
    the map stage in process with the bundled pricing table, ``build_detectors`` for every
    partition state, ``kwargs`` passed on to :class:`Dataflow`."""
    from agentwatch.streams.normalize import Normalizer
    from agentwatch.streams.pipeline import SpanPipeline
    from agentwatch.streams.pricing import PricingTable

    pricing = PricingTable.load(None)

    def build(partitions: Mapping[str, int], checkpoints: PartitionCheckpointStore) -> Dataflow:
        mapper = SpanPipeline(Normalizer(pricing), partitions)
        return Dataflow(partitions=partitions, build_detectors=build_detectors, mapper=mapper,
                        checkpoints=checkpoints, **kwargs)

    return build


class TestingCluster:
    """N workers of one consumer group over a :class:`TestingBroker`.

    Parameters
    ----------
    n_workers : int
    data_dir : path
        Shared by every worker: partition checkpoints live in ``<data_dir>/state/<app_id>/``.
    build_dataflow : callable
        ``(partitions, checkpoint_store) -> Dataflow``, called once per worker (see
        :func:`dataflow_factory`).
    broker : TestingBroker, optional
        An existing broker (a restarted cluster reads where the last one committed).
    clock : Clock, optional
    commit_lag : int or mapping, optional
        Records per partition (or per topic: ``{"usage": 2}``) processed but not yet committed:
        the window a :meth:`crash` re-delivers. Checkpoints and hand-overs commit everything.
    order_seed : int, optional
        Picks the next partition to read at random (seeded) instead of round-robin.
    """

    __test__ = False

    def __init__(self, n_workers: int, data_dir: str | Path, build_dataflow: BuildDataflow, *,
                 broker: TestingBroker | None = None, clock: Clock | None = None,
                 commit_lag: int | Mapping[str, int] = 0, app_id: str = "agentwatch-test",
                 order_seed: int | None = None) -> None:
        if n_workers < 1:
            raise ValueError("a cluster needs a worker")
        self.broker = broker or TestingBroker()
        self.clock = clock or Clock()
        self.data_dir = Path(data_dir)
        self.app_id = app_id
        self.build_dataflow = build_dataflow
        self.commit_lag = commit_lag
        self.sink = TestingSink()
        self.findings: list[Finding] = []
        self.applied: list[Applied] = []
        self.replayed: list[Position] = []
        self._rng = random.Random(order_seed) if order_seed is not None else None
        self._next_index = 0
        self.workers: list[TestingWorker] = []
        self._assign([self._new_worker() for _ in range(n_workers)])

    # -- membership ------------------------------------------------------------------------------

    @property
    def partitions(self) -> dict[str, int]:
        return dict(self.broker.topics)

    def _new_worker(self) -> TestingWorker:
        store = PartitionCheckpointStore(self.data_dir, self.app_id)
        worker = TestingWorker(self._next_index, self.build_dataflow(self.partitions, store))
        self._next_index += 1
        return worker

    def _owner(self, workers: Sequence[TestingWorker], partition: int) -> TestingWorker:
        # Co-partitioned: partition p of every input topic to one worker, round-robin by p.
        return workers[partition % len(workers)]

    def _assign(self, workers: list[TestingWorker]) -> None:
        """Give every input partition to one of ``workers``; those moving away from a live worker
        are handed over cleanly (commit, checkpoint, release)."""
        wanted: dict[int, list[tuple[str, int]]] = {w.index: [] for w in workers}
        for topic in INPUT_TOPICS:
            for partition in range(self.broker.topics.get(topic, 0)):
                wanted[self._owner(workers, partition).index].append((topic, partition))
        for worker in self.workers:
            keep = set(wanted.get(worker.index, ()))
            revoked = [tp for tp in worker.assigned if tp not in keep]
            if revoked:
                self._hand_over(worker, revoked)
        for worker in workers:
            held = set(worker.assigned)
            for tp in wanted[worker.index]:
                if tp not in held:
                    worker.positions[tp] = self.broker.committed(*tp)
            worker.assigned = wanted[worker.index]
        self.workers = workers

    def _hand_over(self, worker: TestingWorker, revoked: list[tuple[str, int]]) -> None:
        self._commit(worker, revoked)
        df = worker.dataflow
        gone_trace = {p for t, p in revoked if t in TRACE_TOPICS}
        gone_keyed = {p for t, p in revoked if t == USAGE_TOPIC}
        states = [s for p, s in df.trace_states.items() if p in gone_trace]
        states += [s for p, s in df.keyed_states.items() if p in gone_keyed]
        self._save(worker, states)
        df.release(revoked)
        for tp in revoked:
            worker.positions.pop(tp, None)
        worker.assigned = [tp for tp in worker.assigned if tp not in set(revoked)]

    def rebalance(self, n_workers: int) -> None:
        """A clean rebalance to ``n_workers``: workers keep their index, new ones are added,
        surplus ones leave after handing their partitions over."""
        if n_workers < 1:
            raise ValueError("a cluster needs a worker")
        kept = self.workers[:n_workers]
        added = [self._new_worker() for _ in range(n_workers - len(kept))]
        self._assign(kept + added)

    def crash(self, worker_index: int) -> list[Position]:
        """Worker ``worker_index`` (its position in :attr:`workers`) vanishes: what it processed
        since its last commit is neither committed nor checkpointed (the rows and records it
        already wrote stay written). Its partitions go to the survivors. Returns the positions
        the survivors will read again."""
        if len(self.workers) < 2:
            raise ValueError("a crash needs a survivor")
        dead = self.workers[worker_index]
        redelivered = [(t, p, o) for (t, p), end in sorted(dead.positions.items())
                       for o in range(self.broker.committed(t, p), end)]
        survivors = [w for w in self.workers if w is not dead]
        self.workers = survivors  # the dead worker hands nothing over
        self._assign(survivors)
        return redelivered

    def stop(self) -> None:
        """A clean stop of every worker (commit, checkpoint, release)."""
        for worker in self.workers:
            self._hand_over(worker, list(worker.assigned))
        self.workers = []

    # -- processing -----------------------------------------------------------------------------

    def run_until_idle(self, max_records: int | None = None) -> int:
        """Process every record available to every worker (including those the processing
        produces), one record per partition in turn; returns how many were processed."""
        done = 0
        while max_records is None or done < max_records:
            ready = [(w, tp) for w in self.workers for tp in w.assigned
                     if w.positions[tp] < self.broker.end_offset(*tp)]
            if not ready:
                break
            if self._rng is not None:
                self._rng.shuffle(ready)
            for worker, tp in ready:
                if max_records is not None and done >= max_records:
                    break
                self._process_next(worker, tp)
                done += 1
        return done

    def _process_next(self, worker: TestingWorker, tp: tuple[str, int]) -> None:
        df = worker.dataflow
        stored = self.broker.read(tp[0], tp[1], worker.positions[tp])
        record = stored.as_record()
        if record.topic in TRACE_TOPICS or record.topic == USAGE_TOPIC:
            replay = df.replay_needed(record)
            if replay is not None:
                for offset in range(replay.start, replay.end):
                    df.replay(self.broker.read(replay.topic, replay.partition, offset).as_record())
                    self.replayed.append((replay.topic, replay.partition, offset))
        out = df.on_record(record)
        self._apply(worker, stored.position, out)
        worker.positions[tp] = record.offset + 1
        lag = self.commit_lag if isinstance(self.commit_lag, int) else self.commit_lag.get(record.topic, 0)
        if record.offset + 1 - lag > 0:
            self.broker.commit(tp[0], tp[1], record.offset + 1 - lag)

    def _apply(self, worker: TestingWorker, origin: Position, out: StepOutput) -> None:
        sends = [self.broker.produce(s.topic, s.partition, s.value, s.key, s.headers, origin=origin).position
                 for s in out.sends]
        rows: dict[str, int] = collections.Counter()
        for batch in out.rows:
            self.sink.write(batch.table, batch.payload, batch.count, origin)
            rows[batch.table] += batch.count
        self.findings += out.findings
        self.applied.append(Applied(worker.index, origin, dict(rows), sends, list(out.findings), out.dead_letters))

    def due_drift_windows(self) -> list[tuple[int, Any, list[Any]]]:
        """(worker index, keyed partition state, windows) closed at the clock's time."""
        return [(w.index, state, windows) for w in self.workers
                for state, windows in w.dataflow.due_drift_windows(self.clock.now())]

    # -- commits and checkpoints ------------------------------------------------------------------

    def _commit(self, worker: TestingWorker, tps: Iterable[tuple[str, int]] | None = None) -> None:
        for tp in (worker.assigned if tps is None else tps):
            self.broker.commit(tp[0], tp[1], worker.positions[tp])

    def _save(self, worker: TestingWorker, states: Sequence[Any]) -> None:
        df = worker.dataflow
        for state, doc in df.snapshot_states(states):
            for topic, offset in doc["offsets"].items():
                committed = self.broker.committed(topic, state.partition)
                if offset > committed:  # the consistency rule the core's replay relies on
                    raise AssertionError(f"{state.stage}/{state.partition} checkpoint names {topic}@{offset}, "
                                         f"past the committed {committed}")
            df.checkpoints.save(state.stage, state.partition, df.checkpoints.encode(doc))

    def checkpoint(self) -> None:
        """Commit everything processed, then save every owned state (production's order)."""
        for worker in self.workers:
            self._commit(worker)
        for worker in self.workers:
            self._save(worker, worker.dataflow.owned_states())

    # -- what came out ----------------------------------------------------------------------------

    def dead_letters(self) -> list[StoredRecord]:
        return self.broker.records("dead_letter")

    def lineage_rows(self, positions: Iterable[Position]) -> dict[str, int]:
        """Rows by table that processing each of ``positions`` caused so far, directly or through
        the records it sent (each record's first processing), summed over ``positions``: what
        processing them all once more writes again when processing is deterministic."""
        first: dict[Position, Applied] = {}
        for applied in self.applied:
            first.setdefault(applied.position, applied)
        rows: dict[str, int] = collections.Counter()
        for root in positions:
            todo = [root]
            while todo:
                applied = first.get(todo.pop())
                if applied is None:
                    continue
                for table, n in applied.rows.items():
                    rows[table] += n
                todo += applied.sends
        return dict(rows)

    def states(self) -> list[Any]:
        """Every partition state the live workers hold."""
        return [s for w in self.workers for s in w.dataflow.owned_states()]


# -- OTLP requests ---------------------------------------------------------------------------------


def _attr(key: str, value: Any) -> KeyValue:
    if isinstance(value, bool):
        return KeyValue(key=key, value=AnyValue(bool_value=value))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    if isinstance(value, float):
        return KeyValue(key=key, value=AnyValue(double_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=str(value)))


@dataclass(frozen=True)
class SpanSpec:
    """One span as an SDK exports it. Ids are bytes (16 and 8); ``resource`` is the resource's
    attributes (``service.name``, ``agentwatch.project``)."""

    trace_id: bytes
    span_id: bytes
    name: str
    start_s: float
    end_s: float
    attributes: Mapping[str, Any] = field(default_factory=dict)
    parent_id: bytes = b""
    resource: tuple[tuple[str, str], ...] = (("service.name", "shop"),)


def otlp_traces(spans: Iterable[SpanSpec]) -> bytes:
    """One ``ExportTraceServiceRequest`` (serialized), spans grouped by resource."""
    request = ExportTraceServiceRequest()
    scopes: dict[tuple[tuple[str, str], ...], Any] = {}
    for span in spans:
        scope = scopes.get(span.resource)
        if scope is None:
            resource_spans = request.resource_spans.add()
            resource_spans.resource.attributes.extend(_attr(k, v) for k, v in span.resource)
            scope = scopes[span.resource] = resource_spans.scope_spans.add()
            scope.scope.name = "agentwatch-dataflow-tests"
        out = scope.spans.add()
        out.trace_id, out.span_id, out.name = span.trace_id, span.span_id, span.name
        if span.parent_id:
            out.parent_span_id = span.parent_id
        out.start_time_unix_nano = round(span.start_s * 1e9)
        out.end_time_unix_nano = round(span.end_s * 1e9)
        out.attributes.extend(_attr(k, v) for k, v in span.attributes.items())
    return request.SerializeToString()


@dataclass(frozen=True)
class LogSpec:
    """One GenAI message log record in a span's context."""

    trace_id: bytes
    span_id: bytes
    ts: float
    event_name: str = "gen_ai.user.message"
    body: str = ""
    service: str = "shop"


def otlp_logs(records: Iterable[LogSpec]) -> bytes:
    """One ``ExportLogsServiceRequest`` (serialized)."""
    request = ExportLogsServiceRequest()
    by_service: dict[str, Any] = {}
    for spec in records:
        scope = by_service.get(spec.service)
        if scope is None:
            resource_logs = request.resource_logs.add()
            resource_logs.resource.attributes.append(_attr("service.name", spec.service))
            scope = by_service[spec.service] = resource_logs.scope_logs.add()
        record = scope.log_records.add()
        record.time_unix_nano = round(spec.ts * 1e9)
        record.trace_id, record.span_id = spec.trace_id, spec.span_id
        record.attributes.append(_attr("event.name", spec.event_name))
        record.body.string_value = spec.body
    return request.SerializeToString()


class Ids:
    """Distinct, non-zero trace and span ids from a seed (or a generator the caller shares)."""

    def __init__(self, seed: int | random.Random) -> None:
        self._rng = seed if isinstance(seed, random.Random) else random.Random(seed)
        self._seen: set[bytes] = set()

    def new(self, n: int) -> bytes:
        while True:
            value = self._rng.randbytes(n)
            if value not in self._seen and any(value):
                self._seen.add(value)
                return value

    def trace(self) -> bytes:
        return self.new(16)

    def span(self) -> bytes:
        return self.new(8)
