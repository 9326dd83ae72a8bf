"""Prometheus metrics every agentwatch worker exposes.

:class:`PipelineMetrics` owns the metric families on a registry passed in (tests use a fresh
``CollectorRegistry``) and is fed once per processed batch, never per span: each ``observe_*``
method aggregates its batch in a plain dict first and then touches every labelled child once.

Label cardinality is bounded, because label values come from untrusted telemetry (service,
model, project, tool and prompt names, prompt versions and detector keys are whatever apps send):

- counters and histograms admit at most ``max_label_sets`` distinct label sets per family; a
  later label set keeps its fixed-vocabulary labels (``direction``, ``status``, ``severity``)
  and has every free label folded into ``"other"``, so totals stay exact while series stay
  bounded; ``agentwatch_metric_label_sets_folded_total{metric}`` counts what was folded;
- gauges (drift scores, VRAM, consumer lag) keep the ``max_label_sets`` most recently updated
  label sets and remove the series they evict, because a gauge for a process that exited or a
  key nobody monitors anymore is a lie, not a total. VRAM gauges also expire after
  ``gauge_stale_after_s`` seconds of event time without a reading;
- every label value is truncated to ``max_label_value_length`` characters and an empty one
  reads ``"unknown"``.

Examples
--------
>>> from prometheus_client import CollectorRegistry
>>> from agentwatch.events import LlmCall
>>> registry = CollectorRegistry()
>>> metrics = PipelineMetrics(registry)
>>> metrics.observe_llm_calls([LlmCall(ts=1.0, trace_id="t", span_id="s", service="shop",
...                                    model="gpt-4o", input_tokens=12, output_tokens=3)])
>>> registry.get_sample_value("agentwatch_llm_tokens_total",
...     {"service": "shop", "model": "gpt-4o", "project": "unknown", "direction": "input"})
12.0
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from agentwatch.events import Finding, GpuSample, LlmCall, ToolCall

if TYPE_CHECKING:
    from agentwatch.detectors.drift import DriftCheck
    from agentwatch.detectors.vram import VramLeakEvidence, VramLeakResolvedEvidence

OTHER = "other"
UNKNOWN = "unknown"

# Batch processing takes from well under a millisecond (a small llm_calls batch) to seconds
# (an OTLP batch of thousands of spans with embedding work behind it).
PROCESSING_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                      1.0, 2.5, 5.0, 10.0, 30.0)
# Steps (model + tool calls) per finished agent trace; loops show up in the top buckets.
TRACE_STEP_BUCKETS = (1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144)
# Model call latency: a cached short answer takes ~100 ms, a long reasoning call minutes; the
# SLO detector's default p95 threshold (20 s) is a bucket edge.
LLM_LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)

TOKEN_DIRECTIONS = ("input", "output", "cache_read", "reasoning")
_CALL_STATUSES = frozenset({"ok", "error"})
_SEVERITIES = frozenset({"info", "warning", "critical"})


class _CounterFamily:
    """Children of one or more label-sharing counters/histograms, capped at ``max_label_sets``.

    ``fixed`` marks label positions whose values come from a small closed vocabulary; they
    survive folding so that, e.g., error and ok calls are still told apart in ``"other"``.
    """

    __slots__ = ("_metrics", "_fixed", "_max", "_children", "_folded", "_name")

    def __init__(self, metrics: Sequence[Any], *, fixed: Sequence[bool], max_label_sets: int,
                 folded: Counter) -> None:
        self._metrics = tuple(metrics)
        self._fixed = tuple(fixed)
        self._max = max_label_sets
        self._children: dict[tuple[str, ...], tuple[Any, ...]] = {}
        self._folded = folded
        self._name = metrics[0]._name
        # A zero series from the start: "nothing folded" must read 0, not "no data".
        folded.labels(self._name)

    def children(self, labels: tuple[str, ...]) -> tuple[Any, ...]:
        found = self._children.get(labels)
        if found is not None:
            return found
        if len(self._children) >= self._max:
            labels = tuple(v if keep else OTHER for v, keep in zip(labels, self._fixed))
            self._folded.labels(self._name).inc()
            found = self._children.get(labels)
            if found is not None:
                return found
        # Folded label sets may go over the cap, but only by the product of the fixed
        # vocabularies (a handful), so the family stays bounded.
        found = tuple(m.labels(*labels) for m in self._metrics)
        self._children[labels] = found
        return found

    def __len__(self) -> int:
        return len(self._children)


class _GaugeFamily:
    """Children of label-sharing gauges: the ``max_label_sets`` most recently set survive.

    Evicted or expired label sets are removed from the gauges, so their series disappear from
    the exposition instead of freezing at a stale value.
    """

    __slots__ = ("_gauges", "_max", "_entries")

    def __init__(self, gauges: Sequence[Gauge], *, max_label_sets: int) -> None:
        self._gauges = tuple(gauges)
        self._max = max_label_sets
        # label set -> (event ts of the last update, children)
        self._entries: OrderedDict[tuple[str, ...], tuple[float, tuple[Any, ...]]] = OrderedDict()

    def children(self, labels: tuple[str, ...], ts: float = 0.0) -> tuple[Any, ...]:
        entry = self._entries.get(labels)
        if entry is not None:
            self._entries.move_to_end(labels)
            children = entry[1]
        else:
            while len(self._entries) >= self._max:
                oldest, _ = self._entries.popitem(last=False)
                self._remove_series(oldest)
            children = tuple(g.labels(*labels) for g in self._gauges)
        self._entries[labels] = (ts, children)
        return children

    def remove(self, labels: tuple[str, ...]) -> None:
        if self._entries.pop(labels, None) is not None:
            self._remove_series(labels)

    def expire(self, before_ts: float) -> None:
        stale = [labels for labels, (ts, _) in self._entries.items() if ts < before_ts]
        for labels in stale:
            self.remove(labels)

    def _remove_series(self, labels: tuple[str, ...]) -> None:
        for gauge in self._gauges:
            try:
                gauge.remove(*labels)
            except KeyError:  # never set on this gauge of the family
                pass

    def __len__(self) -> int:
        return len(self._entries)


class PipelineMetrics:
    """The metric families of one agentwatch worker, fed once per batch.

    Parameters
    ----------
    registry : CollectorRegistry
        Where the families are registered; one ``PipelineMetrics`` per registry.
    max_label_sets : int
        Cap on distinct label sets per family (see the module docstring for what happens
        beyond it).
    gauge_stale_after_s : float
        VRAM gauges not updated for this many seconds of event time are removed.
    max_label_value_length : int
        Label values are cut to this many characters.
    """

    def __init__(self, registry: CollectorRegistry, *, max_label_sets: int = 1000,
                 gauge_stale_after_s: float = 300.0, max_label_value_length: int = 120) -> None:
        if max_label_sets < 1:
            raise ValueError(f"max_label_sets must be >= 1, got {max_label_sets}")
        if gauge_stale_after_s <= 0:
            raise ValueError(f"gauge_stale_after_s must be > 0, got {gauge_stale_after_s}")
        if max_label_value_length < 8:
            raise ValueError(f"max_label_value_length must be >= 8, got {max_label_value_length}")
        self.registry = registry
        self.max_label_sets = max_label_sets
        self.gauge_stale_after_s = gauge_stale_after_s
        self.max_label_value_length = max_label_value_length
        self._newest_gpu_ts = float("-inf")
        self._last_gpu_sweep_ts = float("-inf")

        def counter(name: str, doc: str, labels: Sequence[str]) -> Counter:
            return Counter(name, doc, labels, registry=registry)

        def gauge(name: str, doc: str, labels: Sequence[str]) -> Gauge:
            return Gauge(name, doc, labels, registry=registry)

        self._folded = counter("agentwatch_metric_label_sets_folded_total",
                               "Observations whose label set was folded into 'other' by the "
                               "per-family cardinality cap.", ["metric"])

        def counters(*metrics: Any, fixed: Sequence[bool]) -> _CounterFamily:
            return _CounterFamily(metrics, fixed=fixed, max_label_sets=max_label_sets,
                                  folded=self._folded)

        def gauges(*metrics: Gauge) -> _GaugeFamily:
            return _GaugeFamily(metrics, max_label_sets=max_label_sets)

        # Batches, per stage (the topic a worker consumes).
        self._batch = counters(
            counter("agentwatch_batches_total", "Batches processed.", ["topic"]),
            counter("agentwatch_spans_total",
                    "Items processed: spans for otlp_spans, events for the other topics.",
                    ["topic"]),
            fixed=(False,))
        self._processing = counters(
            Histogram("agentwatch_processing_seconds", "Wall time to process one batch.",
                      ["stage"], buckets=PROCESSING_BUCKETS, registry=registry),
            fixed=(False,))

        llm_labels = ["service", "model", "project"]
        self._llm = counters(
            counter("agentwatch_llm_calls_total", "Model invocations.", llm_labels),
            counter("agentwatch_llm_cost_usd_total",
                    "Cost of model invocations in US dollars (0 for unpriced models).",
                    llm_labels),
            counter("agentwatch_llm_errors_total", "Model invocations that failed.", llm_labels),
            counter("agentwatch_llm_unpriced_calls_total",
                    "Model invocations whose model is missing from the pricing table.",
                    llm_labels),
            fixed=(False, False, False))
        self._llm_tokens = counters(
            counter("agentwatch_llm_tokens_total", "Tokens by direction (input, output, "
                    "cache_read, reasoning).", [*llm_labels, "direction"]),
            fixed=(False, False, False, True))
        # Managed prompts only (LlmCall.prompt_name set), so a prompt version's cost per call,
        # latency and error ratio can be compared with the version before it.
        prompt_labels = ["service", "prompt", "version"]
        self._prompts = counters(
            counter("agentwatch_prompt_calls_total", "Model invocations of managed prompts "
                    "(gen_ai.prompt.name), by prompt name and version.", prompt_labels),
            counter("agentwatch_prompt_cost_usd_total", "Cost of model invocations of managed "
                    "prompts in US dollars (0 for unpriced models).", prompt_labels),
            counter("agentwatch_prompt_errors_total", "Model invocations of managed prompts "
                    "that failed.", prompt_labels),
            Histogram("agentwatch_prompt_latency_seconds", "Latency of model invocations of "
                      "managed prompts.", prompt_labels, buckets=LLM_LATENCY_BUCKETS,
                      registry=registry),
            fixed=(False, False, False))
        self._tools = counters(
            counter("agentwatch_tool_calls_total", "Tool executions by status.",
                    ["service", "tool", "status"]),
            fixed=(False, False, True))
        self._trace_steps = counters(
            Histogram("agentwatch_trace_steps", "Steps (model and tool calls) per finished "
                      "agent trace.", ["service"], buckets=TRACE_STEP_BUCKETS, registry=registry),
            fixed=(False,))

        self._findings = counters(
            counter("agentwatch_findings_total", "Findings raised, by detector and severity.",
                    ["detector", "severity"]),
            fixed=(False, True))
        self._findings_resolved = counters(
            counter("agentwatch_findings_resolved_total", "Findings resolved (condition cleared).",
                    ["detector"]),
            fixed=(False,))
        # Set by every drift check, raised or calm, one series per deciding statistic, so a
        # calm key shows how close it is to alarming; skew and drift are separate series.
        drift_labels = ["key", "check", "statistic"]
        self._drift = gauges(
            gauge("agentwatch_drift_score", "Latest score of each deciding drift statistic per "
                  "monitored key and check (skew: against the reference, drift: against the "
                  "previous windows).", drift_labels),
            gauge("agentwatch_drift_threshold", "Threshold the latest drift score is compared "
                  "with (the check raises when a score exceeds its threshold).", drift_labels))
        self._drift_checks = counters(
            counter("agentwatch_drift_checks_total", "Drift checks run per monitored key and "
                    "check (skew, drift), raised or calm.", ["key", "check"]),
            fixed=(False, True))

        vram_labels = ["host", "gpu", "pid", "process"]
        self._vram_used = gauges(gauge(
            "agentwatch_vram_used_bytes", "GPU memory used; pid 0 is the whole device.",
            vram_labels))
        self._vram_total = gauges(gauge(
            "agentwatch_vram_total_bytes", "GPU memory in total per device.", ["host", "gpu"]))
        self._vram_trend = gauges(
            gauge("agentwatch_vram_slope_bytes_per_second", "VRAM growth rate estimated by "
                  "the VRAM leak detector.", vram_labels),
            gauge("agentwatch_vram_seconds_to_threshold", "Projected seconds until VRAM "
                  "reaches the detector's threshold (time to OOM).", vram_labels))

        self._dead_letter = counters(
            counter("agentwatch_dead_letter_total", "Records sent to the dead-letter topic.",
                    ["topic", "reason"]),
            fixed=(False, False))
        # Table, field and reason come from agentwatch.bounds' closed vocabularies, not from
        # the telemetry, so they survive folding.
        self._values_rejected = counters(
            counter("agentwatch_values_rejected_total",
                    "Implausible values (out of bounds, NaN, infinite, not a number) nulled in "
                    "their rows and dead-lettered, by table, field and reason.",
                    ["table", "field", "reason"]),
            fixed=(True, True, True))
        # Entity types and fields are closed vocabularies (the recognisers, the policy's custom
        # types, the text columns), so they survive folding; services do not.
        self._pii = counters(
            counter("agentwatch_pii_detections_total",
                    "Personal data and secrets found in span and log texts (and handled per the PII "
                    "policy before storage), by entity type, service and field.",
                    ["entity_type", "service", "field"]),
            fixed=(True, False, True))
        # A plain counter: no labels, so nothing to cap.
        self._normalizer_restarts = counter("agentwatch_normalizer_restarts_total",
                                            "Normaliser processes started again after the previous "
                                            "one died.", [])
        self._lag = gauges(gauge("agentwatch_consumer_lag",
                                 "Records behind the partition's end offset.",
                                 ["topic", "partition"]))
        self._deliveries = counters(
            counter("agentwatch_notifier_deliveries_total",
                    "Alert deliveries that succeeded, by destination.", ["destination"]),
            fixed=(False,))
        self._delivery_failures = counters(
            counter("agentwatch_notifier_failures_total",
                    "Alert deliveries that failed, by destination.", ["destination"]),
            fixed=(False,))

    # -- label hygiene -------------------------------------------------------------------

    def _label(self, value: object) -> str:
        text = value if isinstance(value, str) else str(value)
        if not text:
            return UNKNOWN
        return text[: self.max_label_value_length]

    @staticmethod
    def _status(value: str) -> str:
        return value if value in _CALL_STATUSES else OTHER

    # -- the contract ----------------------------------------------------------------------

    def observe_batch(self, *, topic: str, spans: int, seconds: float) -> None:
        """Count one processed batch of ``spans`` items on ``topic`` that took ``seconds``."""
        batches, items = self._batch.children((self._label(topic),))
        batches.inc()
        if spans > 0:
            items.inc(spans)
        self._processing.children((self._label(topic),))[0].observe(max(seconds, 0.0))

    def observe_pii_detections(self, detections: Sequence[Any]) -> None:
        """Count PII detections (``PiiDetection`` events) by entity type, service and field."""
        for d in detections:
            self._pii.children((self._label(d.entity_type), self._label(d.service), self._label(d.field)))[0].inc(d.count)

    def observe_llm_calls(self, calls: Sequence[LlmCall]) -> None:
        """Count calls, tokens by direction, cost and errors per service/model/project; and
        calls, cost, errors and latency per service/prompt/version for managed prompts."""
        # [calls, errors, unpriced, cost, input, output, cache_read, reasoning]
        totals: dict[tuple[str, str, str], list[float]] = {}
        prompted: list[LlmCall] = []
        for call in calls:
            if call.prompt_name:
                prompted.append(call)
            key = (call.service, call.model, call.project)
            acc = totals.get(key)
            if acc is None:
                acc = totals[key] = [0, 0, 0, 0.0, 0, 0, 0, 0]
            acc[0] += 1
            if call.status == "error":
                acc[1] += 1
            if not call.priced:
                acc[2] += 1
            acc[3] += call.cost_usd
            acc[4] += call.input_tokens
            acc[5] += call.output_tokens
            acc[6] += call.cache_read_tokens
            acc[7] += call.reasoning_tokens
        label = self._label
        for (service, model, project), acc in totals.items():
            labels = (label(service), label(model), label(project))
            calls_c, cost_c, errors_c, unpriced_c = self._llm.children(labels)
            calls_c.inc(acc[0])
            if acc[1]:
                errors_c.inc(acc[1])
            if acc[2]:
                unpriced_c.inc(acc[2])
            if acc[3] > 0:
                cost_c.inc(acc[3])
            for direction, amount in zip(TOKEN_DIRECTIONS, acc[4:]):
                if amount > 0:
                    self._llm_tokens.children((*labels, direction))[0].inc(amount)
        if prompted:
            self._observe_prompts(prompted)

    def _observe_prompts(self, calls: Sequence[LlmCall]) -> None:
        # (service, prompt, version) -> [calls, errors, cost, latencies in seconds]
        totals: dict[tuple[str, str, str], list[Any]] = {}
        for call in calls:
            key = (call.service, call.prompt_name, call.prompt_version)
            acc = totals.get(key)
            if acc is None:
                acc = totals[key] = [0, 0, 0.0, []]
            acc[0] += 1
            if call.status == "error":
                acc[1] += 1
            acc[2] += call.cost_usd
            latency = call.latency_ms
            # A latency nulled as implausible (invalid_fields says so) is no observation.
            if latency is not None and not (call.invalid_fields and "latency_ms:" in call.invalid_fields):
                acc[3].append(latency / 1000.0)
        label = self._label
        for (service, prompt, version), (n, errors, cost, latencies) in totals.items():
            calls_c, cost_c, errors_c, latency_h = self._prompts.children(
                (label(service), label(prompt), label(version)))
            calls_c.inc(n)
            if errors:
                errors_c.inc(errors)
            if cost > 0:
                cost_c.inc(cost)
            for seconds in latencies:
                latency_h.observe(max(seconds, 0.0))

    def observe_tool_calls(self, calls: Sequence[ToolCall]) -> None:
        """Count tool executions per service/tool/status."""
        totals: dict[tuple[str, str, str], int] = {}
        for call in calls:
            key = (call.service, call.tool_name, call.status)
            totals[key] = totals.get(key, 0) + 1
        for (service, tool, status), n in totals.items():
            labels = (self._label(service), self._label(tool), self._status(status))
            self._tools.children(labels)[0].inc(n)

    def observe_trace_steps(self, *, service: str, steps: Iterable[int]) -> None:
        """Record the step counts of finished agent traces of ``service``.

        Not part of the first contract: the worker calls it when it closes a trace (idle TTL or
        LRU eviction of per-trace state) with the number of model and tool calls it saw.
        """
        histogram = self._trace_steps.children((self._label(service),))[0]
        for n in steps:
            histogram.observe(n)

    def observe_findings(self, findings: Sequence[Finding]) -> None:
        """Count findings; keep the VRAM trend gauges (drift gauges follow the checks:
        :meth:`observe_drift_checks`)."""
        raised: dict[tuple[str, str], int] = {}
        resolved: dict[str, int] = {}
        evidence_of, gauges_of = _evidence_gauges() if findings else (None, {})
        for finding in findings:
            severity = str(finding.severity)
            if finding.resolved:
                resolved[finding.detector] = resolved.get(finding.detector, 0) + 1
            else:
                key = (finding.detector, severity if severity in _SEVERITIES else OTHER)
                raised[key] = raised.get(key, 0) + 1
            evidence = evidence_of(finding)
            observe = gauges_of.get(type(evidence))
            if observe is not None:
                observe(self, finding, evidence)
        for (detector, severity), n in raised.items():
            self._findings.children((self._label(detector), severity))[0].inc(n)
        for detector, n in resolved.items():
            self._findings_resolved.children((self._label(detector),))[0].inc(n)

    def observe_drift_checks(self, checks: Sequence[DriftCheck]) -> None:
        """Count drift checks and set the latest score and threshold of each deciding
        statistic (:attr:`agentwatch.detectors.drift.DriftDetector.last_checks`).

        Called from the one thread that runs the drift detectors; nothing else touches these
        families, so they need no lock.
        """
        for check in checks:
            key, kind = self._label(check.key), self._label(check.kind)
            self._drift_checks.children((key, kind))[0].inc()
            scores = check.evidence.scores
            for statistic in check.evidence.deciding:
                verdict = scores.get(statistic)
                if verdict is None:  # vocabulary statistics of a reference without texts
                    continue
                score, threshold = self._drift.children((key, kind, self._label(statistic)),
                                                        check.ts)
                score.set(_gauge_value(verdict.get("score")))
                threshold.set(_gauge_value(verdict.get("threshold")))

    def _vram_labels(self, evidence: VramLeakEvidence | VramLeakResolvedEvidence
                     ) -> tuple[str, str, str, str]:
        # The labels of the series observe_gpu_samples sets for the same device or process.
        process = evidence.process_name or ("device" if evidence.pid == 0 else "")
        return (self._label(evidence.host), str(evidence.gpu), str(evidence.pid),
                self._label(process))

    def _observe_vram_leak(self, finding: Finding, evidence: VramLeakEvidence) -> None:
        labels = self._vram_labels(evidence)
        self._vram_used.children(labels, finding.ts)[0].set(evidence.floor_bytes)
        slope, eta = self._vram_trend.children(labels, finding.ts)
        slope.set(evidence.leak_bytes_per_s)
        eta.set(evidence.eta_s)

    def _observe_vram_resolved(self, finding: Finding,
                               evidence: VramLeakResolvedEvidence) -> None:
        # The leak cleared: a frozen slope/time-to-OOM would keep paging people's eyes.
        self._vram_trend.remove(self._vram_labels(evidence))

    def observe_gpu_samples(self, samples: Sequence[GpuSample]) -> None:
        """Set VRAM used per host/gpu/process (and device totals); expire silent processes."""
        newest = self._newest_gpu_ts
        label = self._label
        for sample in samples:
            process = sample.process_name or ("device" if sample.pid == 0 else "")
            labels = (label(sample.host), str(sample.gpu), str(sample.pid), label(process))
            self._vram_used.children(labels, sample.ts)[0].set(sample.memory_used_bytes)
            if sample.pid == 0 and sample.memory_total_bytes > 0:
                self._vram_total.children((labels[0], labels[1]), sample.ts)[0].set(
                    sample.memory_total_bytes)
            if sample.ts > newest:
                newest = sample.ts
        self._newest_gpu_ts = newest
        # Sweep at most a few times per staleness window: the sweep walks every label set.
        if newest - self._last_gpu_sweep_ts >= self.gauge_stale_after_s / 4:
            self._last_gpu_sweep_ts = newest
            cutoff = newest - self.gauge_stale_after_s
            for family in (self._vram_used, self._vram_total, self._vram_trend):
                family.expire(cutoff)

    def observe_dead_letter(self, *, topic: str, reason: str, n: int = 1) -> None:
        """Count ``n`` records of ``topic`` dead-lettered for ``reason`` (a short code)."""
        self._dead_letter.children((self._label(topic), self._label(reason)))[0].inc(n)

    def observe_normalizer_restart(self) -> None:
        self._normalizer_restarts.inc()

    def observe_rejected_values(self, rejections: Iterable[Any]) -> None:
        """Count rejected values (:class:`agentwatch.bounds.ValueRejection`: ``table``,
        ``field``, ``reason``), once per batch."""
        totals: dict[tuple[str, str, str], int] = {}
        for rejection in rejections:
            key = (rejection.table, rejection.field, rejection.reason)
            totals[key] = totals.get(key, 0) + 1
        for labels, n in totals.items():
            self._values_rejected.children(tuple(self._label(v) for v in labels))[0].inc(n)

    def set_consumer_lag(self, topic: str, partition: int, lag: int) -> None:
        """Set the lag of one assigned partition."""
        self._lag.children((self._label(topic), str(partition)))[0].set(max(lag, 0))

    def clear_consumer_lag(self, topic: str, partition: int) -> None:
        """Drop the lag series of a partition this worker no longer owns (after a rebalance)."""
        self._lag.remove((self._label(topic), str(partition)))

    def observe_delivery(self, *, destination: str, ok: bool) -> None:
        """Count one notifier delivery attempt to ``destination`` (success or failure)."""
        family = self._deliveries if ok else self._delivery_failures
        family.children((self._label(destination),))[0].inc()


@functools.cache
def _evidence_gauges() -> tuple[Callable[[Finding], Any], dict[type, Callable[..., None]]]:
    """``evidence_of`` and, per evidence type, the method keeping its gauges.

    Imported on the first findings observed: the detectors bring numpy and scipy (about two
    seconds of start-up), which processes that only serve ``/metrics`` (notifier, supervisor)
    never need.
    """
    from agentwatch.detectors.findings import evidence_of
    from agentwatch.detectors.vram import VramLeakEvidence, VramLeakResolvedEvidence

    return evidence_of, {VramLeakEvidence: PipelineMetrics._observe_vram_leak,
                         VramLeakResolvedEvidence: PipelineMetrics._observe_vram_resolved}


def _gauge_value(value: Any) -> float:
    # Evidence writes non-finite numbers as null; a gauge reads them back as NaN.
    return float(value) if value is not None else float("nan")


class WorkerStateCollector:
    """Drift sampling, embedding and detector-checkpoint figures, read at scrape time.

    The counters live where the work happens (the sampler on the event loop, the embedder in its
    thread, the checkpoint on save), so the hot path pays nothing for them. Every family is
    exported even when its source is absent (drift or checkpoints turned off): zeros, not gaps.

    Parameters
    ----------
    sampler : DriftSampler or None
        Its ``counters`` (:class:`~agentwatch.streams.drift_sampler.SamplerCounters`).
    embedder : Embedder or None
        Its ``sentences_embedded`` and ``seconds_throttled``.
    checkpoint : PartitionCheckpointStore or None
        Its ``saves``, ``failures``, ``last_save_bytes``, ``last_blocking_s``.
    dataflow_counts : Mapping or None
        The dataflow's ``counts``: duplicates dropped, and span ids its dedup memory forgot early.
    """

    def __init__(self, sampler: Any = None, embedder: Any = None, checkpoint: Any = None,
                 dataflow_counts: Mapping[str, int] | None = None) -> None:
        self.sampler = sampler
        self.embedder = embedder
        self.checkpoint = checkpoint
        self.dataflow_counts = dataflow_counts

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        counts = self.sampler.counters if self.sampler is not None else None

        def count(name: str) -> float:
            return float(getattr(counts, name, 0) if counts is not None else 0)

        flow = self.dataflow_counts or {}
        duplicates = CounterMetricFamily("agentwatch_duplicates_dropped",
                                         "Spans and usage records dropped as already applied (re-sent "
                                         "after a crash, an exporter retry).", labels=["kind"])
        duplicates.add_metric(["span"], float(flow.get("duplicate_spans", 0)))
        duplicates.add_metric(["usage"], float(flow.get("duplicate_usage", 0)))
        yield duplicates
        yield CounterMetricFamily("agentwatch_dedup_evicted_early",
                                  "Span ids forgotten by the duplicate-span memory while still within its "
                                  "window (the cap was reached): re-sends of those would count twice; raise "
                                  "the cap if this grows.", value=float(flow.get("dedup_evicted_early", 0)))
        yield CounterMetricFamily("agentwatch_offset_gaps",
                                  "Records the worker's Kafka consumer skipped (offsets that jumped within one "
                                  "assignment): their rows may be missing. Anything above 0 is a fault.",
                                  value=float(flow.get("offset_gaps", 0)))
        yield CounterMetricFamily("agentwatch_drift_prompts_offered",
                                  "Prompts offered to the drift sampler.", value=count("offered"))
        def by_reason(name: str, doc: str, reasons: Mapping[str, str]) -> Any:
            family = CounterMetricFamily(name, doc, labels=["reason"])
            for reason, counter in reasons.items():
                family.add_metric([reason], count(counter))
            return family

        yield by_reason("agentwatch_drift_prompts_skipped",
                        "Prompts not sampled: empty, or already in the window's sample (agents "
                        "repeat them per step).", {"empty": "empty_prompts", "duplicate": "duplicates"})
        yield CounterMetricFamily("agentwatch_drift_late_prompts",
                                  "Prompts older than their key's open window (folded into it).",
                                  value=count("late"))
        yield CounterMetricFamily("agentwatch_drift_windows_closed",
                                  "Sampling windows closed and handed to embedding.",
                                  value=count("windows_closed"))
        yield by_reason("agentwatch_drift_windows_dropped",
                        "Windows never checked: too few prompts, or embedding fell behind (raise "
                        "the embedding cap).", {"too_small": "small_windows_dropped",
                                                "embedding_behind": "pending_dropped"})
        yield CounterMetricFamily("agentwatch_drift_keys_evicted",
                                  "Keys whose open window was closed early to bound memory.",
                                  value=count("keys_evicted"))
        for kind, name, doc, source, attribute in _READ_AT_SCRAPE:
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(name, doc, value=float(getattr(getattr(self, source), attribute, 0)))


# (kind, family, help, collector attribute holding the source, attribute read from it)
_READ_AT_SCRAPE = (
    ("counter", "agentwatch_embeddings", "Prompts embedded for drift.",
     "embedder", "sentences_embedded"),
    ("counter", "agentwatch_embedding_throttled_seconds",
     "Seconds the embedder waited on its rate cap.", "embedder", "seconds_throttled"),
    ("counter", "agentwatch_detector_checkpoint_saves", "Detector state checkpoints written.",
     "checkpoint", "saves"),
    ("counter", "agentwatch_detector_checkpoint_failures",
     "Detector checkpoint saves or restores that failed.", "checkpoint", "failures"),
    ("gauge", "agentwatch_detector_checkpoint_bytes", "Size of the last detector checkpoint.",
     "checkpoint", "last_save_bytes"),
    ("gauge", "agentwatch_detector_checkpoint_blocking_seconds",
     "Event-loop time the last partition snapshot took (encoding and writing run in a thread).",
     "checkpoint", "last_blocking_s"),
)


def exported_sample_names() -> frozenset[str]:
    """Every sample name a worker's ``/metrics`` can carry (``_total``, ``_bucket``, ...)."""
    registry = CollectorRegistry()
    PipelineMetrics(registry)
    registry.register(WorkerStateCollector())
    names: set[str] = set()
    for family in registry.collect():
        if family.type == "counter":
            names.update((f"{family.name}_total", f"{family.name}_created"))
        elif family.type == "histogram":
            names.update(f"{family.name}{s}" for s in ("_bucket", "_sum", "_count", "_created"))
        else:
            names.add(family.name)
    return frozenset(names)


def serve_metrics(registry: CollectorRegistry, port: int, addr: str = "127.0.0.1") -> Any:
    """Serve ``registry`` at ``http://addr:port/metrics`` from a daemon thread.

    Returns the HTTP server; ``server.shutdown()`` stops it. Binds loopback by default; the
    container image passes ``0.0.0.0`` so Prometheus can scrape it.
    """
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server
