"""The streaming core: one record in, typed outputs out. No Kafka, no Faust, no clock.

Topology (each arrow a topic; every stage's state is keyed like its input)::

    otlp_spans ─► map ─► llm_calls / tool_calls / agent_steps      (partitioned by trace id)
    otlp_logs  ─► map ─► llm_messages, tool_declarations           (partitioned by trace id)
    llm_calls, tool_calls, agent_steps, tool_declarations ─► trace stage: nested-call dedup,
                                          trace rows, trace detectors (loops, tools) ─► usage
    gpu_samples ─► rows ─► usage
    usage ─► keyed stage: the aggregate detectors (cost, budget, retry storm, SLO, VRAM, drift)

The map stage holds no state that spans records: it decodes a request and maps each span. The
trace stage sees every span of a trace, because the event topics are partitioned by trace id
and co-partitioned (partition ``p`` of all three goes to one worker). It forwards each event to
``usage``, once per field an aggregate detector declares (``partition_by``) and partitioned by
it: all of a project's calls meet in one partition's budget detector whatever the worker count.
A call carries only the fields that field's detectors read (``llm_call_reads``). A usage
record's key names its table and field (``llm_calls:project``), so the keyed stage hands it to
the detectors of that field only.

State lives per input partition (:class:`TracePartition`, :class:`KeyedPartition`) and is
checkpointed with the offsets it reflects (:class:`PartitionCheckpoint`). When a partition
arrives (start, rebalance, crash of its previous owner), its state is restored and the records
between the checkpoint and the group's committed offset are replayed into the state alone
(:meth:`Dataflow.replay`): they were stored and their findings sent before the commit, so state
is neither lost nor applied twice.

Runtimes are thin adapters: :mod:`agentwatch.streams.app` (Faust) in production; a test feeds
records from a list. Both call :meth:`Dataflow.on_record` and act on the :class:`StepOutput`:
send its records, write its rows, and commit the input record once its rows are written.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import operator
import threading
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import msgspec
import orjson

from agentwatch.events import (AgentStep, Evaluation, Finding, GpuSample, LlmCall, PiiDetection, ToolCall,
                               ToolDeclaration)
from agentwatch.streams.pipeline import (VALUE_REJECTED_REASON, RecordOutcome, decode_event_rows,
                                         decode_events_checked, dumps_lenient, partition_for,
                                         value_rejection_dead_letters)
from agentwatch.streams.otlp import UndecodableRecord

log = logging.getLogger(__name__)

DECLARATIONS_TOPIC = "tool_declarations"  # tools declared on log records (ToolDeclaration)
TRACE_TOPICS = ("llm_calls", "tool_calls", "agent_steps", DECLARATIONS_TOPIC)
USAGE_TOPIC = "usage"
DLQ_REASON_HEADER = "agentwatch.dlq.reason"
CHECKPOINT_FORMAT = "agentwatch.partition-state"
CHECKPOINT_VERSION = 1
_EVENT_CLASS = {"llm_calls": LlmCall, "tool_calls": ToolCall, "agent_steps": AgentStep, "gpu_samples": GpuSample,
                "pii_detections": PiiDetection, "evaluations": Evaluation}
_DECLARATIONS_DECODER = msgspec.json.Decoder(list[ToolDeclaration])


def _struct_view(cls: type) -> type:
    """A frozen msgspec Struct with ``cls``'s fields, types and defaults, under its name."""
    hints = typing.get_type_hints(cls)
    spec = [(f.name, hints[f.name]) if f.default is dataclasses.MISSING else (f.name, hints[f.name], f.default)
            for f in dataclasses.fields(cls)]
    return msgspec.defstruct(cls.__name__, spec, frozen=True, kw_only=True, module=__name__)


# How the keyed stage sees a call: a usage record carries only the fields its family's
# detectors read (Topology.llm_call_fields), and decoding that into the LlmCall dataclass would
# cost ~0.2 us per absent field (msgspec fills dataclass defaults one by one); a Struct with
# the same fields and defaults decodes it ~6x faster. Detectors read it like an LlmCall (same
# names) and the runners route it to the LlmCall detectors.
LlmCallView = _struct_view(LlmCall)
# Usage records are decoded straight into typed events: their values were checked and nulled
# where the trace stage (or the GPU records' decode) read them.
_USAGE_DECODERS: dict[str, Any] = {"llm_calls": msgspec.json.Decoder(list[LlmCallView])}


@dataclass(frozen=True, slots=True)
class Record:
    """One input record, where it came from."""

    topic: str
    partition: int
    offset: int
    value: bytes | None
    key: bytes | None = None


@dataclass(frozen=True, slots=True)
class Send:
    """A record to produce. ``partition`` None: the producer picks it from ``key``."""

    topic: str
    partition: int | None
    value: bytes
    key: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class Rows:
    """Rows for one snapshot table: a JSON array and how many rows it holds."""

    table: str
    payload: bytes
    count: int


@dataclass
class StepOutput:
    """What one record (or timer tick) produced.

    The input record may be committed once every ``sends`` record is acknowledged by the broker
    and every ``rows`` payload is written: until then a crash makes the broker deliver it again.
    """

    sends: list[Send] = field(default_factory=list)
    rows: list[Rows] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    dead_letters: int = 0

    def extend(self, other: StepOutput) -> None:
        self.sends += other.sends
        self.rows += other.rows
        self.findings += other.findings
        self.dead_letters += other.dead_letters


@dataclass(frozen=True, slots=True)
class Topology:
    """Which detectors run where, from the field each one declares (``partition_by``).

    ``trace`` detectors key by trace id and run in the trace stage; every other field becomes a
    family of the keyed stage, fed by usage records partitioned by that field.
    """

    trace: tuple[str, ...]
    families: Mapping[str, tuple[str, ...]]  # field -> detector names
    accepts: Mapping[str, frozenset[type]]  # field -> event classes its detectors read
    drift_field: str | None  # the family whose partitions sample prompts for drift
    # field -> the LlmCall fields its usage records carry (None: whole calls): what its
    # detectors declare they read (``llm_call_reads``), its own field, and the call's identity.
    llm_call_fields: Mapping[str, tuple[str, ...] | None] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, detectors: Sequence[Any], drift_key_fields: Sequence[str] = ("service",)) -> Topology:
        trace: list[str] = []
        families: dict[str, list[str]] = {}
        accepts: dict[str, set[type]] = {}
        reads: dict[str, set[str] | None] = {}
        drift_field = None
        for det in detectors:
            name = type(det).name
            if name == "drift":
                # Drift windows are keyed by the sampler's key fields: partition by the first.
                field_name = drift_field = str(drift_key_fields[0])
                accepted: tuple[type, ...] = (LlmCall,)
                det_reads: Any = {"ts", "prompt", *drift_key_fields}  # what the sampler reads
            else:
                field_name = getattr(det, "partition_by", None)
                accepted = type(det).accepts
                det_reads = getattr(det, "llm_call_reads", None)
            if not field_name:
                raise ValueError(f"detector {name!r} declares no partition_by field")
            if field_name == "trace_id":
                trace.append(name)
                continue
            families.setdefault(field_name, []).append(name)
            accepts.setdefault(field_name, set()).update(accepted)
            if LlmCall in accepted:
                known = reads.setdefault(field_name, set())
                reads[field_name] = None if known is None or det_reads is None else known | set(det_reads)
        identity = [f.name for f in dataclasses.fields(LlmCall) if f.default is dataclasses.MISSING]
        llm_call_fields = {
            family: None if fields is None else
            tuple(f.name for f in dataclasses.fields(LlmCall) if f.name in {*fields, family, *identity})
            for family, fields in reads.items()}
        return cls(tuple(trace), {k: tuple(v) for k, v in families.items()},
                   {k: frozenset(v) for k, v in accepts.items()}, drift_field, llm_call_fields)


class TraceParents:
    """(trace id, span id) of the parents of recent LLM spans: an LLM-looking span that arrives
    after one of its LLM children is an ancestor wrapper, counted in the child. Bounded, oldest
    forgotten first."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._keys: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, trace_id: str, span_id: str) -> None:
        if not span_id or len(trace_id) + len(span_id) > 256:  # a root, or not an OTLP id
            return
        keys = self._keys
        keys[(trace_id, span_id)] = None
        if len(keys) > self.max_entries:
            keys.popitem(last=False)

    def snapshot(self) -> list[list[str]]:
        return [list(k) for k in self._keys]

    def restore(self, snap: Iterable[Sequence[str]]) -> None:
        self._keys = collections.OrderedDict(((str(t), str(s)), None) for t, s in snap)
        while len(self._keys) > self.max_entries:
            self._keys.popitem(last=False)


class RecentSpans:
    """(trace id, span id) of the spans a trace partition applied lately: a span that comes
    again is a duplicate.

    The invariant: a span sent again is recognised when it ends within ``window_s`` seconds
    (event time) of the newest span the partition has applied, unless the partition applied
    more than ``max_entries`` spans in that window. Re-sends come within that: a crashed
    worker's records are re-read after a session timeout and a commit interval, an exporter
    retries within its backoff (seconds to a minute). Past the cap the oldest spans are
    forgotten early and counted in ``evicted_early``, so a rate the cap cannot cover is seen,
    not silently deduplicated less.
    """

    def __init__(self, max_entries: int = 40_000, window_s: float = 60.0) -> None:
        if max_entries < 1 or window_s <= 0:
            raise ValueError("max_entries must be >= 1 and window_s > 0")
        self.max_entries = max_entries
        self.window_s = window_s
        self.newest = float("-inf")
        self.evicted_early = 0
        self._keys: collections.OrderedDict[str, float] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, trace_id: str, span_id: str, ts: float) -> bool:
        """Remember the span; False when it was already there."""
        key = trace_id + span_id
        keys = self._keys
        if key in keys:
            return False
        keys[key] = ts
        if ts > self.newest:
            self.newest = ts
            horizon = ts - self.window_s
            # Insertion order is about event order: the front holds the oldest. A span that came
            # late stays until it reaches the front; the cap bounds what that keeps.
            while keys:
                first = next(iter(keys.values()))
                if first >= horizon:
                    break
                keys.popitem(last=False)
        if len(keys) > self.max_entries:
            _, first = keys.popitem(last=False)
            if first >= self.newest - self.window_s:
                self.evicted_early += 1
        return True

    def snapshot(self) -> dict[str, Any]:
        return {"spans": [[k, ts] for k, ts in self._keys.items()], "evicted_early": self.evicted_early}

    def restore(self, snap: Any) -> None:
        if isinstance(snap, Mapping):
            items, self.evicted_early = snap.get("spans", ()), int(snap.get("evicted_early", 0))
        else:  # before the window: ids only, kept as the oldest
            items = [(k, float("-inf")) for k in snap]
        self._keys = collections.OrderedDict((str(k), float(ts)) for k, ts in items)
        self.newest = max(self._keys.values(), default=float("-inf"))
        while len(self._keys) > self.max_entries:
            self._keys.popitem(last=False)


class TraceSteps:
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

    def snapshot(self) -> list[list[Any]]:
        return [[k, v] for k, v in self._steps.items()]

    def restore(self, snap: Iterable[Sequence[Any]]) -> None:
        self._steps = collections.OrderedDict((str(k), int(v)) for k, v in snap)
        while len(self._steps) > self.max_traces:
            self._steps.popitem(last=False)


class PartitionState:
    """What one input partition owns, with the offsets (next to read, per topic) it reflects."""

    stage: str = ""

    def __init__(self, partition: int) -> None:
        self.partition = partition
        self.offsets: dict[str, int] = {}
        # Offsets the restored state already reflects, per topic (None: nothing restored).
        self.restored_offsets: dict[str, int] = {}
        self.started: set[str] = set()  # topics whose first live record since restore was seen

    def state_snapshot(self) -> dict[str, Any]:
        raise NotImplementedError

    def state_restore(self, snap: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def checkpoint(self) -> dict[str, Any]:
        return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "stage": self.stage,
                "partition": self.partition, "offsets": dict(self.offsets), "state": self.state_snapshot()}

    def restore_checkpoint(self, doc: Mapping[str, Any]) -> None:
        if doc.get("format") != CHECKPOINT_FORMAT or doc.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"not a version {CHECKPOINT_VERSION} partition checkpoint")
        if doc.get("stage") != self.stage or int(doc.get("partition", -1)) != self.partition:
            raise ValueError(f"checkpoint of {doc.get('stage')}/{doc.get('partition')}, "
                             f"not {self.stage}/{self.partition}")
        self.state_restore(doc["state"])
        self.offsets = {str(t): int(o) for t, o in doc.get("offsets", {}).items()}
        self.restored_offsets = dict(self.offsets)


class TracePartition(PartitionState):
    """Partition ``p`` of the trace-keyed topics: trace detectors, parent spans, step counts."""

    stage = "trace"

    def __init__(self, partition: int, runner: Any, *, max_traces: int = 100_000, max_spans: int = 40_000,
                 dedup_window_s: float = 60.0) -> None:
        super().__init__(partition)
        self.runner = runner
        self.parents = TraceParents(max_traces)
        self.steps = TraceSteps(max_traces)
        self.seen = RecentSpans(max_spans, dedup_window_s)

    def state_snapshot(self) -> dict[str, Any]:
        return {"detectors": self.runner.snapshot(), "parents": self.parents.snapshot(),
                "steps": self.steps.snapshot(), "seen": self.seen.snapshot()}

    def state_restore(self, snap: Mapping[str, Any]) -> None:
        self.runner.restore(snap.get("detectors", {}))
        self.parents.restore(snap.get("parents", ()))
        self.steps.restore(snap.get("steps", ()))
        self.seen.restore(snap.get("seen", ()))


class KeyedPartition(PartitionState):
    """Partition ``p`` of ``usage``: the aggregate detectors of each family, the drift sampler."""

    stage = "keyed"

    def __init__(self, partition: int, runners: Mapping[str, Any], sampler: Any = None) -> None:
        super().__init__(partition)
        self.runners = dict(runners)  # family field -> DetectorRunner
        self.sampler = sampler
        # "<family>@<source topic>:<partition>" -> (offset, chunk) of the last usage record applied
        self.applied: dict[str, tuple[int, int]] = {}

    def state_snapshot(self) -> dict[str, Any]:
        snap: dict[str, Any] = {"families": {f: r.snapshot() for f, r in self.runners.items()},
                                "applied": dict(self.applied)}
        if self.sampler is not None:
            snap["sampler"] = self.sampler.snapshot()
        return snap

    def state_restore(self, snap: Mapping[str, Any]) -> None:
        for family, runner_snap in snap.get("families", {}).items():
            if family in self.runners:
                self.runners[family].restore(runner_snap)
        if self.sampler is not None and snap.get("sampler"):
            self.sampler.restore(snap["sampler"])
        self.applied = {str(k): (int(v[0]), int(v[1])) for k, v in snap.get("applied", {}).items()}


@dataclass(frozen=True, slots=True)
class Replay:
    """Records to replay into a partition's state before its first live record: offsets
    ``[start, end)`` of ``topic``/``partition``, stored and committed since its checkpoint."""

    topic: str
    partition: int
    start: int
    end: int


class Dataflow:
    """The whole topology for the partitions one worker holds.

    Parameters
    ----------
    partitions : Mapping[str, int]
        Partition count per topic.
    build_detectors : callable
        Fresh detector instances (every registered one): called once per partition state.
    mapper : object, optional
        ``on_traces(payload) -> RecordOutcome`` and ``on_logs(payload)``: the map stage, when it
        runs in this process (the Faust adapter runs it in a child process instead and hands the
        outcome to :meth:`on_mapped`).
    checkpoints : PartitionCheckpointStore, optional
        Where partition states are restored from (None: every partition starts empty).
    drift_sampler : callable, optional
        A fresh :class:`~agentwatch.streams.drift_sampler.DriftSampler` for a keyed partition.
    alert_record : callable, optional
        Finding -> the notifier's record value (``alerts`` topic); None sends no alerts.
    trace_memory : int
        Traces whose nested calls and step counts are remembered, for the whole group; each trace
        partition keeps twice its even share.
    dedup_spans, dedup_window_s : int, float
        A span sent again within ``dedup_window_s`` of event time is dropped as a duplicate (see
        :class:`RecentSpans`); each trace partition remembers at most ``dedup_spans`` span ids
        for it: 40,000 cover 60 s at ~660 spans/s per partition (~5,300/s over 8). Beyond that
        the oldest go early, counted in ``counts["dedup_evicted_early"]``.
    metrics : PipelineMetrics, optional
    redactor : Redactor, optional
        Masks personal data and secrets in dead letters, which keep the record as it came (the
        same length, so a protobuf still decodes): nothing stored holds a detected value.
    """

    def __init__(self, *, partitions: Mapping[str, int], build_detectors: Callable[[], Sequence[Any]],
                 drift_key_fields: Sequence[str] = ("service",), mapper: Any = None,
                 checkpoints: Any = None, drift_sampler: Callable[[], Any] | None = None,
                 alert_record: Callable[[Finding], bytes] | None = None, metrics: Any = None,
                 value_bounds: Any = None, max_message_bytes: int = 1_000_000, log_epoch: str = "",
                 trace_memory: int = 100_000, dedup_spans: int = 40_000, dedup_window_s: float = 60.0,
                 redactor: Any = None) -> None:
        from agentwatch.detectors.runner import DetectorRunner

        self.partitions = dict(partitions)
        self.log_epoch = log_epoch
        trace_partitions = max(1, self.partitions.get("llm_calls", 1))
        self.traces_per_partition = max(1, -(-2 * trace_memory // trace_partitions))
        self.dedup_spans = dedup_spans
        self.dedup_window_s = dedup_window_s
        self._build_detectors = build_detectors
        self._runner = DetectorRunner
        self.topology = Topology.of(build_detectors(), drift_key_fields)
        self.mapper = mapper
        self.checkpoints = checkpoints
        self.drift_sampler = drift_sampler if self.topology.drift_field else None
        self.alert_record = alert_record
        self.metrics = metrics
        self.redactor = redactor if redactor is not None and redactor.policy.enabled else None
        self.value_bounds = value_bounds
        self.max_record_bytes = int(max_message_bytes * 0.9)
        self.trace_states: dict[int, TracePartition] = {}
        self.keyed_states: dict[int, KeyedPartition] = {}
        # Drift detectors are updated in the embedding thread; snapshots take the same lock.
        self.drift_lock = threading.Lock()
        self.counts = collections.Counter()

    # -- states --------------------------------------------------------------------------------

    def _detectors(self, names: Iterable[str]) -> Any:
        wanted = set(names)
        return self._runner([d for d in self._build_detectors() if type(d).name in wanted])

    def trace_state(self, partition: int) -> TracePartition:
        state = self.trace_states.get(partition)
        if state is None:
            state = TracePartition(partition, self._detectors(self.topology.trace),
                                   max_traces=self.traces_per_partition, max_spans=self.dedup_spans,
                                   dedup_window_s=self.dedup_window_s)
            self._restore(state)
            self.trace_states[partition] = state
        return state

    def keyed_state(self, partition: int) -> KeyedPartition:
        state = self.keyed_states.get(partition)
        if state is None:
            runners = {f: self._detectors(names) for f, names in self.topology.families.items()}
            for runner in runners.values():
                runner.route_as(LlmCallView, LlmCall)
            sampler = self.drift_sampler() if self.drift_sampler is not None else None
            state = KeyedPartition(partition, runners, sampler)
            self._restore(state)
            self.keyed_states[partition] = state
        return state

    def _restore(self, state: PartitionState) -> None:
        if self.checkpoints is None:
            return
        doc = self.checkpoints.load(state.stage, state.partition)
        if doc is None:
            return
        fresh = state.state_snapshot()
        try:
            state.restore_checkpoint(doc)
            if doc.get("log_epoch", "") != self.log_epoch:
                # Saved against logs that are gone (a broker that kept topics in memory): the
                # state stands, its offsets name records that do not exist any more.
                log.warning("partition %s/%s: checkpoint of log epoch %r, now %r: state kept, offsets dropped",
                            state.stage, state.partition, doc.get("log_epoch", ""), self.log_epoch)
                state.offsets, state.restored_offsets = {}, {}
                if isinstance(state, KeyedPartition):
                    state.applied = {}  # source offsets of the old logs: the new ones restart at 0
        except Exception as exc:  # a checkpoint from another version: start empty, keep the file aside
            log.warning("partition %s/%s: checkpoint not restored (%s); starting empty",
                        state.stage, state.partition, exc)
            self.checkpoints.set_aside(state.stage, state.partition)
            # A restore that failed half-way (a later detector refusing its part) leaves nothing
            # behind: the partition is rebuilt from its log, and must not count records twice.
            state.state_restore(fresh)
            state.offsets, state.restored_offsets = {}, {}

    def owned_states(self) -> list[PartitionState]:
        return [*self.trace_states.values(), *self.keyed_states.values()]

    def state_for(self, topic: str, partition: int) -> PartitionState | None:
        if topic in TRACE_TOPICS:
            return self.trace_state(partition)
        if topic == USAGE_TOPIC:
            return self.keyed_state(partition)
        return None

    def release(self, topic_partitions: Iterable[tuple[str, int]]) -> list[PartitionState]:
        """Forget the states of partitions this worker no longer holds; returns them (the caller
        checkpoints them first, after their records were committed)."""
        gone: list[PartitionState] = []
        for topic, partition in topic_partitions:
            states = self.trace_states if topic in TRACE_TOPICS else self.keyed_states if topic == USAGE_TOPIC else None
            if states is not None and partition in states:
                gone.append(states.pop(partition))
        return gone

    # -- replay ----------------------------------------------------------------------------------

    def replay_needed(self, record: Record, log_end: int | None = None, committed: int | None = None
                      ) -> Replay | None:
        """The records to replay before ``record``, the first live one of its partition since the
        state was restored: those after the checkpoint and before the committed offset (the
        group resumes there). A partition without a checkpoint replays from offset 0 when
        checkpoints are kept: what an earlier owner committed without saving is in no file.

        ``committed``: where the group resumes, if known; otherwise ``record``'s offset stands in
        for it. Records from there to ``record`` were committed by nobody (the consumer skipped
        them): they are live, not history, and are not replayed.

        ``log_end``: the partition's end offset, if known. A checkpoint past it was saved
        against another incarnation of the log (the embedded broker starts empty on every
        ``up``): its offsets are dropped, its state is kept, nothing is replayed or skipped.
        """
        state = self.state_for(record.topic, record.partition)
        if state is None or record.topic in state.started:
            return None
        state.started.add(record.topic)
        start = state.restored_offsets.get(record.topic)
        if start is not None and log_end is not None and start > log_end:
            log.warning("%s[%s]: checkpoint at offset %d is past the log's end (%d): the log was "
                        "recreated; state kept, offsets dropped", record.topic, record.partition, start, log_end)
            state.restored_offsets.pop(record.topic, None)
            state.offsets.pop(record.topic, None)
            return None
        end = record.offset if committed is None else min(record.offset, committed)
        if start is None:
            start = 0 if self.checkpoints is not None else end
        if start >= end:
            return None
        return Replay(record.topic, record.partition, start, end)

    def replay(self, record: Record) -> None:
        """Apply a record to its partition's state only: its rows, records and findings went out
        before it was committed. A record that was dead-lettered is passed over again."""
        try:
            if empty_record_reason(record.value) is None:
                self._stateful(record, emit=False)
        except Exception as exc:  # it was dead-lettered when it came live: nothing to apply
            log.debug("replay passes over %s[%s]@%s: %s", record.topic, record.partition, record.offset, exc)
        self._advance(record)

    def _advance(self, record: Record) -> None:
        state = self.state_for(record.topic, record.partition)
        if state is not None:
            state.offsets[record.topic] = max(state.offsets.get(record.topic, 0), record.offset + 1)

    # -- records -------------------------------------------------------------------------------

    def on_record(self, record: Record) -> StepOutput:
        """Everything ``record`` produces. Never raises for bad input: that is a dead letter."""
        out = StepOutput()
        reason = empty_record_reason(record.value)
        if reason is not None:
            self._dead_letter(out, record, reason)
            self._advance(record)
            return out
        topic = record.topic
        if topic in ("otlp_spans", "otlp_logs"):
            mapper = self.mapper.on_traces if topic == "otlp_spans" else self.mapper.on_logs
            try:
                outcome = mapper(record.value)
            except Exception as exc:
                self._dead_letter(out, record, f"normaliser error: {type(exc).__name__}: {exc}")
                return out
            return self.on_mapped(record, outcome)
        if topic in TRACE_TOPICS or topic == USAGE_TOPIC:
            try:
                return self._stateful(record, emit=True)
            except UndecodableRecord as exc:
                self._dead_letter(out, record, f"undecodable {topic} record: {exc}")
                return out
            except Exception as exc:  # whatever a hostile record trips on, it never stops its partition
                log.exception("%s[%s]@%s failed", topic, record.partition, record.offset)
                out = StepOutput()  # what it produced before failing is dropped with it
                self._dead_letter(out, record, f"{topic} record failed: {type(exc).__name__}: {exc}")
                return out
            finally:
                self._advance(record)
        if topic == "gpu_samples":
            try:
                return self._gpu_samples(record)
            except Exception as exc:
                log.exception("%s[%s]@%s failed", topic, record.partition, record.offset)
                self._dead_letter(out, record, f"{topic} record failed: {type(exc).__name__}: {exc}")
                return out
        if topic == "llm_messages":
            try:
                rows = decode_event_rows(record.value)
            except Exception as exc:
                self._dead_letter(out, record, f"undecodable {topic} record: {exc}")
                return out
            if rows:
                out.rows.append(Rows(topic, record.value, len(rows)))
            return out
        self._dead_letter(out, record, f"no stage reads topic {topic!r}")
        return out

    def on_mapped(self, record: Record, outcome: RecordOutcome) -> StepOutput:
        """The map stage's outputs for ``record`` (normalised here or in a child process)."""
        out = StepOutput()
        for topic, partition, payload in outcome.outputs:
            out.sends.append(Send(topic, partition, payload))
        self.counts["spans"] += outcome.spans
        self.counts["records"] += 1
        if outcome.pii_rows:
            # Counted where the text was redacted: rows with the record, per-service detectors
            # through the usage topic like every other keyed event.
            rows = outcome.pii_rows
            out.rows.append(Rows("pii_detections", dumps_lenient(rows), len(rows)))
            detections = [PiiDetection(**row) for row in rows]
            if self.metrics is not None:
                self.metrics.observe_pii_detections(detections)
            self._forward_usage(out, record, "pii_detections", detections)
        if outcome.coverage_rows:
            # Only for `agentwatch doctor`: which services send spans that map to nothing.
            out.rows.append(Rows("span_coverage", dumps_lenient(outcome.coverage_rows), len(outcome.coverage_rows)))
        if outcome.evaluation_rows:
            # Like the detections: rows with the record, per-service detectors through the usage topic.
            rows = outcome.evaluation_rows
            out.rows.append(Rows("evaluations", dumps_lenient(rows), len(rows)))
            self._forward_usage(out, record, "evaluations", [Evaluation(**row) for row in rows])
        if outcome.dead_letter_reason:
            self._dead_letter(out, record, outcome.dead_letter_reason)
        self._reject_values(out, record, outcome.rejections)
        return out

    def _stateful(self, record: Record, *, emit: bool) -> StepOutput:
        state = self.state_for(record.topic, record.partition)
        assert state is not None
        out = StepOutput()
        reflected = state.restored_offsets.get(record.topic)
        # A record the restored state already reflects (saved before its commit went through):
        # its rows go out again, the detectors do not see it twice.
        update = reflected is None or record.offset >= reflected
        if record.topic == USAGE_TOPIC:
            self._usage(state, record, out, emit=emit, update=update)  # type: ignore[arg-type]
        else:
            self._trace_record(state, record, out, emit=emit, update=update)  # type: ignore[arg-type]
        return out

    def _trace_record(self, state: TracePartition, record: Record, out: StepOutput, *, emit: bool,
                      update: bool) -> None:
        table = record.topic
        if table == DECLARATIONS_TOPIC:
            self._declarations(state, record, out, emit=emit, update=update)
            return
        decoded = decode_events_checked(table, record.value, self.value_bounds)
        received, payload = decoded.events, decoded.payload
        if emit:
            self._reject_values(out, record, decoded.rejections)
        keep = range(len(received))
        if update:
            # A span already applied (its request re-sent after a crash, an exporter's retry, or
            # twice in one record) is dropped: its row is stored and the detectors counted it.
            seen = state.seen
            evicted = seen.evicted_early
            keep = [i for i in keep if seen.add(received[i].trace_id, received[i].span_id, received[i].ts)]
            if seen.evicted_early > evicted:
                self.counts["dedup_evicted_early"] += seen.evicted_early - evicted
            if len(keep) < len(received):
                self.counts["duplicate_spans"] += len(received) - len(keep)
        demote: list[int] = []
        if table == "llm_calls":
            # An LLM-looking span whose model-call child came earlier wraps that call: it is an
            # agent step, and the call is counted once, in the child.
            parents, wrappers = state.parents, []
            for i in keep:
                call = received[i]
                (demote if (call.trace_id, call.span_id) in parents else wrappers).append(i)
                if update:
                    parents.add(call.trace_id, call.parent_span_id)
            keep = wrappers
        events = [received[i] for i in keep]
        demoted = [received[i] for i in demote]
        if emit:
            if demote or len(keep) < len(received):
                rows = _load_rows(payload)  # aligned with the decoded events, one row each
                kept = [rows[i] for i in keep]
                if kept:
                    out.rows.append(Rows(table, dumps_lenient(kept), len(kept)))
                steps = [_agent_step_row(rows[i]) for i in demote]
                if steps:
                    out.rows.append(Rows("agent_steps", dumps_lenient(steps), len(steps)))
                    self.counts["nested_demoted"] += len(steps)
            elif events:
                out.rows.append(Rows(table, payload, len(events)))
            if self.metrics is not None:
                if table == "llm_calls":
                    self.metrics.observe_llm_calls(events)
                elif table == "tool_calls":
                    self.metrics.observe_tool_calls(events)
        if not update:
            return
        as_steps = [_as_agent_step(c) for c in demoted]
        if table == "agent_steps":
            finished = state.steps.finished(events)
        else:
            state.steps.count(events)
            finished = state.steps.finished(as_steps) if as_steps else {}
        if emit and self.metrics is not None:
            for service, steps in finished.items():
                self.metrics.observe_trace_steps(service=service, steps=steps)
        if emit and events:
            # Before the trace detectors: a failing one must not cost the project its usage.
            self._forward_usage(out, record, table, events)
        if state.runner.detectors:
            self._detect(state.runner, [*events, *as_steps] if as_steps else events, out, record, emit=emit)

    def _detect(self, runner: Any, events: Sequence[Any], out: StepOutput, record: Record, *, emit: bool) -> None:
        """Run ``events`` through ``runner``; a detector that fails dead-letters the record (its
        state updates so far stand), and never stops the partition."""
        try:
            findings = runner.process(events)
        except Exception as exc:
            log.exception("detector failed on %s[%s]@%s", record.topic, record.partition, record.offset)
            if emit:
                self._dead_letter(out, record, f"detector error: {type(exc).__name__}: {exc}")
            return
        if emit:
            self._emit_findings(out, findings)

    def _declarations(self, state: TracePartition, record: Record, out: StepOutput, *, emit: bool,
                      update: bool) -> None:
        """Tools declared on log records: state only (their rows are llm_messages'), for the trace
        detectors that judge calls against declarations."""
        try:
            declarations = _DECLARATIONS_DECODER.decode(record.value)
        except msgspec.DecodeError as exc:  # ValidationError included
            raise UndecodableRecord(f"rows do not match ToolDeclaration: {exc}") from exc
        if update and declarations and state.runner.detectors:
            self._detect(state.runner, declarations, out, record, emit=emit)

    def _usage(self, state: KeyedPartition, record: Record, out: StepOutput, *, emit: bool, update: bool) -> None:
        key = (record.key or b"").decode("utf-8", "replace")
        head, _, source = key.partition("@")
        table, _, family = head.partition(":")
        runner = state.runners.get(family)
        if table not in _EVENT_CLASS or runner is None:
            if emit:
                self._dead_letter(out, record, f"usage record for unknown table/family {key!r}")
            return
        if not update:
            return
        # Usage records name the record they came from; a source re-read after a crash sends them
        # again, and the family's detectors must not count them twice.
        position = _source_position(source)
        if position is not None:
            source_log, at = position
            applied = f"{family}@{source_log}"
            if at <= state.applied.get(applied, (-1, -1)):
                self.counts["duplicate_usage"] += 1
                return
            state.applied[applied] = at
        events = decode_usage(table, record.value)
        if family == self.topology.drift_field and state.sampler is not None and table == "llm_calls":
            state.sampler.offer(events)
        self._detect(runner, events, out, record, emit=emit)

    def _gpu_samples(self, record: Record) -> StepOutput:
        out = StepOutput()
        try:
            decoded = decode_events_checked("gpu_samples", record.value, self.value_bounds)
        except UndecodableRecord as exc:
            self._dead_letter(out, record, f"undecodable gpu_samples record: {exc}")
            return out
        self._reject_values(out, record, decoded.rejections)
        if decoded.events:
            out.rows.append(Rows("gpu_samples", decoded.payload, len(decoded.events)))
            if self.metrics is not None:
                self.metrics.observe_gpu_samples(decoded.events)
            self._forward_usage(out, record, "gpu_samples", decoded.events)
        return out

    def _forward_usage(self, out: StepOutput, record: Record, table: str, events: Sequence[Any]) -> None:
        """One usage record per family that reads these events and partition they go to, keyed
        ``<table>:<family>@<source topic>:<partition>:<offset>:<chunk>`` (the keyed stage's dedup).
        """
        cls = _EVENT_CLASS[table]
        families = [f for f, accepted in self.topology.accepts.items() if cls in accepted and hasattr(events[0], f)]
        if not families:
            return
        partitions = self.partitions.get(USAGE_TOPIC, 1)
        source = f"{record.topic}:{record.partition}:{record.offset}"
        for family in families:
            # A call carries only what the family's detectors read: the response and tool texts
            # never leave the trace stage, the prompt only where a detector reads it.
            fields = self.topology.llm_call_fields.get(family) if cls is LlmCall else None
            groups: dict[int, list[Any]] = {}
            where: dict[Any, int] = {}  # a family has few distinct values: hash each once
            for event in events:
                value = getattr(event, family)
                partition = where.get(value)
                if partition is None:
                    partition = where[value] = partition_for(str(value), partitions)
                groups.setdefault(partition, []).append(event)
            for partition, group in groups.items():
                for chunk, payload in enumerate(usage_payloads(group, fields, self.max_record_bytes)):
                    out.sends.append(Send(USAGE_TOPIC, partition, payload,
                                          key=f"{table}:{family}@{source}:{chunk}".encode()))

    # -- findings, dead letters -----------------------------------------------------------------

    def _emit_findings(self, out: StepOutput, findings: Sequence[Finding]) -> None:
        if not findings:
            return
        self.emit_findings(out, findings)

    def emit_findings(self, out: StepOutput, findings: Sequence[Finding]) -> None:
        """Findings are written once, as rows of ``findings``, and sent once to the notifier."""
        out.findings += findings
        out.rows.append(Rows("findings", dumps_lenient(list(findings)), len(findings)))
        if self.alert_record is not None:
            for finding in findings:
                out.sends.append(Send("alerts", None, self.alert_record(finding), key=finding.dedup_key.encode()))
        self.counts["findings"] += len(findings)
        if self.metrics is not None:
            self.metrics.observe_findings(findings)

    def dead_letter(self, record: Record, reason: str) -> StepOutput:
        """The dead letter of a record the runtime could not hand to a stage (its normaliser died)."""
        out = StepOutput()
        self._dead_letter(out, record, reason)
        return out

    def _dead_letter(self, out: StepOutput, record: Record, reason: str) -> None:
        value = record.value or b""
        if self.redactor is not None and value:
            value, masked = self.redactor.mask_bytes(value)
            if masked and self.metrics is not None:
                self.metrics.observe_pii_detections(
                    [PiiDetection(ts=0.0, trace_id="", span_id="", entity_type=entity, field="dead_letter")
                     for entity in masked])
        headers = dead_letter_headers(record, reason)
        if len(value) > self.max_record_bytes:
            # The headers would push a record near the broker's limit over it: keep its start and say so.
            headers += (("agentwatch.dlq.truncated_from_bytes", str(len(value)).encode()),)
            value = value[:self.max_record_bytes]
        out.sends.append(Send("dead_letter", None, value, key=record.key, headers=headers))
        out.dead_letters += 1
        self.counts["dead_letter"] += 1
        if self.metrics is not None:
            self.metrics.observe_dead_letter(topic=record.topic, reason=reason.split(":")[0])
        log.warning("dead-lettered %s[%s]@%s: %s", record.topic, record.partition, record.offset, reason)

    def _reject_values(self, out: StepOutput, record: Record, rejections: Sequence[Any]) -> None:
        """Count the implausible values nulled in this record's rows and dead-letter the originals."""
        if not rejections:
            return
        if self.metrics is not None:
            self.metrics.observe_rejected_values(rejections)
        for letter in value_rejection_dead_letters(rejections, source_topic=record.topic,
                                                   max_bytes=self.max_record_bytes):
            out.sends.append(Send("dead_letter", None, letter.value, key=letter.key,
                                  headers=dead_letter_headers(record, letter.reason)))
            out.dead_letters += 1
            self.counts["dead_letter"] += 1
            if self.metrics is not None:
                self.metrics.observe_dead_letter(topic=record.topic, reason=VALUE_REJECTED_REASON)

    # -- drift -------------------------------------------------------------------------------------

    def due_drift_windows(self, now: float) -> list[tuple[KeyedPartition, list[Any]]]:
        """Closed drift windows per keyed partition (taken from their samplers)."""
        due = []
        for state in self.keyed_states.values():
            if state.sampler is not None:
                windows = state.sampler.due_windows(now)
                if windows:
                    due.append((state, windows))
        return due

    def owns_drift_key(self, state: KeyedPartition) -> Callable[[str], bool]:
        """Whether a drift key (``service=shop/agent=a``) is one of ``state``'s partition: its
        detector loads only those keys' reference sets. A key without the partition field (bound
        to no particular value) belongs everywhere."""
        field_name = self.topology.drift_field or ""
        partitions = self.partitions.get(USAGE_TOPIC, 1)

        def owns(key: str) -> bool:
            for segment in key.split("/"):
                name, sep, value = segment.partition("=")
                if sep and name == field_name:
                    return partition_for(value, partitions) == state.partition
            return True

        return owns

    def drift_detector(self, state: KeyedPartition) -> Any:
        runner = state.runners.get(self.topology.drift_field or "")
        return runner.detectors.get("drift") if runner is not None else None

    def snapshot_states(self, states: Iterable[PartitionState]) -> list[tuple[PartitionState, dict[str, Any]]]:
        """Checkpoint documents of ``states``, each consistent with its offsets (call between
        two records; drift detectors are snapshotted under the lock their thread updates under)."""
        with self.drift_lock:
            return [(state, {**state.checkpoint(), "log_epoch": self.log_epoch}) for state in states]


@functools.lru_cache(maxsize=64)
def _projection(fields: tuple[str, ...]) -> tuple[Callable[[Any], tuple[Any, ...]], type]:
    """A getter of ``fields`` (at least two) and a Struct of them: an event's projection is
    built in C and encoded as a JSON object of those fields in one call per record."""
    return operator.attrgetter(*fields), msgspec.defstruct("Usage", [(f, Any) for f in fields])


_USAGE_ENCODER = msgspec.json.Encoder()


def usage_payloads(events: Sequence[Any], fields: tuple[str, ...] | None, limit: int) -> list[bytes]:
    """``events`` as JSON arrays of at most about ``limit`` bytes each (one when they fit; an
    event larger than the limit goes alone): each event whole, or as an object of ``fields``."""
    if fields is None:
        items = [orjson.dumps(e) for e in events]
        return _json_arrays(items, limit)
    pick, view = _projection(fields)
    views = [view(*pick(e)) for e in events]
    payload = _USAGE_ENCODER.encode(views)
    if len(payload) <= limit:
        return [payload]
    return _json_arrays([_USAGE_ENCODER.encode(v) for v in views], limit)


def decode_usage(table: str, payload: bytes) -> list[Any]:
    """A usage record's events: calls as :data:`LlmCallView`, the others as their class."""
    decoder = _USAGE_DECODERS.get(table)
    if decoder is None:
        decoder = _USAGE_DECODERS[table] = msgspec.json.Decoder(list[_EVENT_CLASS[table]])  # type: ignore[index]
    try:
        return decoder.decode(payload)
    except msgspec.DecodeError as exc:  # ValidationError included
        raise UndecodableRecord(f"usage rows do not match {_EVENT_CLASS[table].__name__}: {exc}") from exc


def _json_arrays(items: Sequence[bytes], limit: int) -> list[bytes]:
    """Encoded JSON values joined into arrays of at most about ``limit`` bytes each (one when
    they fit; an item larger than the limit goes alone)."""
    out, chunk, size = [], [], 2
    for item in items:
        if chunk and size + len(item) + 1 > limit:
            out.append(b"[" + b",".join(chunk) + b"]")
            chunk, size = [], 2
        chunk.append(item)
        size += len(item) + 1
    out.append(b"[" + b",".join(chunk) + b"]")
    return out


def _source_position(source: str) -> tuple[str, tuple[int, int]] | None:
    """``("llm_calls:3", (1042, 0))`` from a usage key's ``llm_calls:3:1042:0``; None if absent."""
    parts = source.rsplit(":", 2)
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    return parts[0], (int(parts[1]), int(parts[2]))


def _load_rows(payload: bytes) -> list[Any]:
    """The rows of an event record that already decoded (orjson, or Python's json for what only
    it reads: a lone surrogate, NaN)."""
    try:
        rows = orjson.loads(payload)
    except orjson.JSONDecodeError:
        import json

        rows = json.loads(payload)
    return rows if isinstance(rows, list) else [rows]


def _agent_step_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """The AgentStep row of an LLM-looking span found to wrap an earlier model call."""
    latency = row.get("latency_ms")  # None where it was nulled as implausible (invalid_fields says so)
    ts = row.get("ts") or 0.0
    return {"ts": ts, "trace_id": row.get("trace_id", ""), "span_id": row.get("span_id", ""),
            "parent_span_id": row.get("parent_span_id", ""), "service": row.get("service", ""),
            "project": row.get("project", ""), "user": row.get("user", ""), "session": row.get("session", ""),
            "agent": row.get("agent", ""), "host": row.get("host", ""), "operation": row.get("operation", ""),
            "name": " ".join(p for p in (row.get("operation", ""), row.get("request_model") or row.get("model", "")) if p),
            "start_ts": ts - (latency or 0.0) / 1000.0, "latency_ms": latency, "status": row.get("status", "ok"),
            "error": row.get("error", ""), "invalid_fields": row.get("invalid_fields", "")}


def _as_agent_step(call: LlmCall) -> AgentStep:
    row = _agent_step_row({f.name: getattr(call, f.name) for f in dataclasses.fields(call)})
    return AgentStep(**{**row, "latency_ms": row["latency_ms"] or 0.0})


def dead_letter_headers(record: Record, reason: str) -> tuple[tuple[str, bytes], ...]:
    """The reason and the source record's position, on every dead letter."""
    return ((DLQ_REASON_HEADER, reason.encode()[:4000]),
            ("agentwatch.dlq.topic", record.topic.encode()),
            ("agentwatch.dlq.partition", str(record.partition).encode()),
            ("agentwatch.dlq.offset", str(record.offset).encode()))


def empty_record_reason(value: bytes | None) -> str | None:
    """Why a record holds nothing to decode, or None: a tombstone (null value) or zero bytes.
    Both go to dead_letter with this reason instead of vanishing as "no rows"."""
    if value is None:
        return "tombstone (record with a null value)"
    if not value:
        return "empty record (0 bytes)"
    return None
