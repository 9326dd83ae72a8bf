"""Error-rate, latency and time-to-first-token SLOs per (service, model), and the share of calls
a provider blocked per (service, provider, model), over a sliding event-time window.

The window is a ring of sub-buckets (counts of calls, errors and slow calls), so per-event work is
O(1) and memory per key is fixed. Latency is judged without a histogram: the ``q`` quantile of
latency exceeds ``T`` exactly when more than ``1 - q`` of the calls took longer than ``T``; the
quantile itself (for the finding's value) is computed only when a finding is made, from the most
recent calls. Time to first token is judged the same way over the calls that report it (streamed
calls). A provider block is a call whose finish reason is a content-policy stop
(:data:`BLOCKED_FINISH_REASONS`): a vendor's policy filter refusing a share of an app's traffic
is an incident of its own, whatever the error rate says (most blocked calls succeed).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, ClassVar, Collection, Mapping, Sequence

from agentwatch.detectors.bounded import EventTimeLru, check_at_least, check_positive
from agentwatch.detectors.evidence import Evidence
from agentwatch.detectors.keys import key_string
from agentwatch.events import Finding, LlmCall, Severity

_OVERRIDABLE = frozenset({"error_rate_threshold", "latency_threshold_ms", "ttft_threshold_ms",
                          "blocked_threshold"})
# Finish reasons (lower case) meaning the provider's content policy stopped the call: OpenAI and
# Azure content_filter; Gemini SAFETY, PROHIBITED_CONTENT, BLOCKLIST, SPII, RECITATION,
# IMAGE_SAFETY; Anthropic refusal; Bedrock guardrail_intervened / content_filtered.
BLOCKED_FINISH_REASONS = frozenset({"content_filter", "content_filtered", "safety", "prohibited_content",
                                    "blocklist", "spii", "recitation", "image_safety", "refusal",
                                    "guardrail_intervened"})


@dataclass(frozen=True, slots=True, kw_only=True)
class SloEvidence(Evidence):
    """The window of one (service, model) when its error rate or latency SLO was judged.

    The latency fields (``quantile``, ``latency_sample_size``, ``observed_quantile_ms``) are set
    on ``latency`` findings only; ``reason`` when the key was forgotten (TTL, eviction) while
    firing.
    """

    service: str
    model: str
    window_s: float
    calls: int
    errors: int
    slow_calls: int
    error_rate: float
    slow_fraction: float
    calls_without_latency: int
    quantile: float | None = None
    latency_sample_size: int | None = None
    observed_quantile_ms: float | None = None
    reason: str | None = None
    # ttft findings: calls that reported a time to first token, and how many of them were slow.
    calls_with_ttft: int | None = None
    slow_ttft_calls: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockedEvidence(Evidence):
    """The window of one (service, provider, model) when its share of blocked calls was judged."""

    service: str
    provider: str
    model: str
    window_s: float
    calls: int
    blocked_calls: int
    blocked_share: float
    finish_reasons: tuple[str, ...]  # the block reasons seen last (up to 8, most recent last)
    reason: str | None = None


class _SloWindow:
    __slots__ = ("service", "model", "head", "ring_calls", "ring_errors", "ring_slow", "ring_untimed",
                 "ring_ttft", "ring_ttft_slow", "calls", "errors", "slow", "untimed", "ttft_calls", "ttft_slow",
                 "error_firing", "latency_firing", "ttft_firing", "last_ts", "recent", "recent_ttft",
                 "error_rate_threshold", "latency_threshold_ms", "ttft_threshold_ms")

    def __init__(self, service: str, model: str, n_buckets: int, recent_maxlen: int,
                 error_rate_threshold: float, latency_threshold_ms: float, ttft_threshold_ms: float) -> None:
        self.service = service
        self.model = model
        self.head = -1  # index of the newest sub-bucket (event time // bucket_s)
        self.ring_calls = [0] * n_buckets
        self.ring_errors = [0] * n_buckets
        self.ring_slow = [0] * n_buckets
        # Calls whose latency was implausible (nulled upstream): they count for the error rate,
        # not for the latency quantile, where their placeholder 0 would read as fast calls.
        self.ring_untimed = [0] * n_buckets
        # Calls that reported a time to first token, and those slower than its threshold.
        self.ring_ttft = [0] * n_buckets
        self.ring_ttft_slow = [0] * n_buckets
        self.calls = self.errors = self.slow = self.untimed = self.ttft_calls = self.ttft_slow = 0
        self.error_firing = False
        self.latency_firing = False
        self.ttft_firing = False
        self.last_ts = float("-inf")
        self.recent: deque[tuple[float, float]] = deque(maxlen=recent_maxlen)  # (ts, latency_ms)
        self.recent_ttft: deque[tuple[float, float]] = deque(maxlen=recent_maxlen)  # (ts, ttft_ms)
        self.error_rate_threshold = error_rate_threshold
        self.latency_threshold_ms = latency_threshold_ms
        self.ttft_threshold_ms = ttft_threshold_ms

    @property
    def key(self) -> str:
        return key_string(("service", "model"), (self.service, self.model))

    def rings(self) -> tuple[list[int], ...]:
        return (self.ring_calls, self.ring_errors, self.ring_slow, self.ring_untimed, self.ring_ttft,
                self.ring_ttft_slow)

    def sum_rings(self) -> None:
        (self.calls, self.errors, self.slow, self.untimed, self.ttft_calls, self.ttft_slow) = map(sum, self.rings())

    def advance(self, bucket: int) -> None:
        """Slide the window so ``bucket`` is the newest sub-bucket, dropping expired ones."""
        n = len(self.ring_calls)
        if bucket - self.head >= n:
            for ring in self.rings():
                ring[:] = [0] * n
        else:
            for b in range(self.head + 1, bucket + 1):
                slot = b % n
                for ring in self.rings():
                    ring[slot] = 0
        self.sum_rings()
        self.head = bucket


class _BlockWindow:
    """Calls and provider-blocked calls of one (service, provider, model), in sub-buckets."""

    __slots__ = ("service", "provider", "model", "head", "ring_calls", "ring_blocked", "calls", "blocked",
                 "firing", "last_ts", "reasons", "threshold")

    def __init__(self, service: str, provider: str, model: str, n_buckets: int, threshold: float) -> None:
        self.service, self.provider, self.model = service, provider, model
        self.head = -1
        self.ring_calls = [0] * n_buckets
        self.ring_blocked = [0] * n_buckets
        self.calls = self.blocked = 0
        self.firing = False
        self.last_ts = float("-inf")
        self.reasons: deque[str] = deque(maxlen=8)
        self.threshold = threshold

    @property
    def key(self) -> str:
        return key_string(("service", "provider", "model"), (self.service, self.provider, self.model))

    def advance(self, bucket: int) -> None:
        n = len(self.ring_calls)
        if bucket - self.head >= n:
            self.ring_calls[:] = [0] * n
            self.ring_blocked[:] = [0] * n
        else:
            for b in range(self.head + 1, bucket + 1):
                self.ring_calls[b % n] = self.ring_blocked[b % n] = 0
        self.calls, self.blocked = sum(self.ring_calls), sum(self.ring_blocked)
        self.head = bucket


def nearest_rank_quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile by nearest rank (an observed value, no interpolation)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def transition(firing: bool, value: float, threshold: float, resolve_ratio: float) -> bool | None:
    """A condition's change: True when it starts firing (``value > threshold``), False when a
    firing one resolves (``value <= resolve_ratio x threshold``), None when nothing changes. The
    gap between the two is the hysteresis that keeps a value near its threshold from flapping.

    >>> transition(False, 0.06, 0.05, 0.8), transition(True, 0.045, 0.05, 0.8), transition(True, 0.04, 0.05, 0.8)
    (True, None, False)
    """
    if firing:
        return False if value <= threshold * resolve_ratio else None
    return True if value > threshold else None


class SloDetector:
    """Error rate, latency and time-to-first-token quantiles per (service, model), and the share of
    provider-blocked calls per (service, provider, model), against on-call thresholds.

    A condition fires once when the window over ``window_s`` (with at least ``min_calls`` calls)
    crosses its threshold, and resolves once when it falls to ``resolve_ratio`` x threshold (the
    gap stops a rate hovering at the threshold from paging on every call).

    Parameters
    ----------
    window_s : float
        Sliding window length, event time.
    n_buckets : int
        Sub-buckets in the window; the window slides in steps of ``window_s / n_buckets``.
    min_calls : int
        Calls the window must hold before anything is judged (warm-up and low-traffic guard).
    error_rate_threshold : float
        Fraction of failed calls above which ``error_rate`` fires.
    latency_threshold_ms : float
        The ``latency_quantile`` latency above which ``latency`` fires.
    latency_quantile : float
        Which latency quantile the SLO is about (0.95 = p95).
    ttft_threshold_ms : float
        The ``ttft_quantile`` time to first token above which ``ttft`` fires. Judged over the calls
        that report one (streamed calls), once ``min_calls`` of them are in the window.
    ttft_quantile : float
        Which time-to-first-token quantile the SLO is about.
    blocked_threshold : float
        Share of a (service, provider, model)'s calls stopped by the provider's content policy
        (finish reason in ``blocked_finish_reasons``) above which ``provider_blocked`` fires.
    blocked_finish_reasons : Collection[str]
        Finish reasons (compared in lower case) that mean a provider block.
    resolve_ratio : float
        A firing condition resolves when its statistic is <= ``resolve_ratio`` x its threshold.
    overrides : Mapping[str, Mapping[str, float]]
        Per ``"service"`` or ``"service/model"`` (more specific wins) values of
        ``error_rate_threshold``, ``latency_threshold_ms``, ``ttft_threshold_ms`` and/or
        ``blocked_threshold``.
    max_keys : int
        Most (service, model) windows held, and most (service, provider, model) block windows.
    key_ttl_s : float
        A key without calls for this long (event time) is forgotten (resolving what it had firing).

    Examples
    --------
    >>> slo = SloDetector(min_calls=4, error_rate_threshold=0.5)
    >>> calls = [LlmCall(ts=float(i), trace_id="t", span_id=str(i), service="api", model="m",
    ...                  status="error" if i >= 2 else "ok") for i in range(6)]
    >>> [(f.kind, f.value) for c in calls for f in slo.update(c)]
    [('error_rate', 0.6)]
    """

    name: ClassVar[str] = "slo"
    partition_by: ClassVar[str] = "service"
    # Constructor arguments that bound the state: split over the partitions of its stage.
    state_caps: ClassVar[tuple[str, ...]] = ("max_keys",)
    accepts: ClassVar[tuple[type, ...]] = (LlmCall,)
    llm_call_reads: ClassVar[frozenset[str]] = frozenset({
        "ts", "service", "model", "provider", "status", "latency_ms", "time_to_first_token_ms", "finish_reason",
        "invalid_fields"})

    def __init__(self, *, window_s: float = 300.0, n_buckets: int = 10, min_calls: int = 100,
                 error_rate_threshold: float = 0.05, latency_threshold_ms: float = 20_000.0,
                 latency_quantile: float = 0.95, ttft_threshold_ms: float = 5_000.0,
                 ttft_quantile: float = 0.95, blocked_threshold: float = 0.02,
                 blocked_finish_reasons: Collection[str] = BLOCKED_FINISH_REASONS,
                 resolve_ratio: float = 0.8,
                 overrides: Mapping[str, Mapping[str, float]] | None = None,
                 max_keys: int = 5_000, key_ttl_s: float = 86_400.0,
                 recent_latencies: int = 256) -> None:
        check_positive("window_s", window_s)
        check_positive("latency_threshold_ms", latency_threshold_ms)
        check_positive("ttft_threshold_ms", ttft_threshold_ms)
        if not 0 < ttft_quantile < 1:
            raise ValueError(f"ttft_quantile must be in (0, 1), got {ttft_quantile}")
        if not 0 < blocked_threshold < 1:
            raise ValueError(f"blocked_threshold must be in (0, 1), got {blocked_threshold}")
        if isinstance(blocked_finish_reasons, str):
            raise ValueError("blocked_finish_reasons must be a collection of reasons, not one string")
        check_positive("key_ttl_s", key_ttl_s)
        check_at_least("n_buckets", n_buckets, 1)
        check_at_least("min_calls", min_calls, 1)
        if not 0 < error_rate_threshold < 1:
            raise ValueError(f"error_rate_threshold must be in (0, 1), got {error_rate_threshold}")
        if not 0 < latency_quantile < 1:
            raise ValueError(f"latency_quantile must be in (0, 1), got {latency_quantile}")
        if not 0 < resolve_ratio <= 1:
            raise ValueError(f"resolve_ratio must be in (0, 1], got {resolve_ratio}")
        check_at_least("max_keys", max_keys, 1)
        check_at_least("recent_latencies", recent_latencies, 1)
        overrides = {str(k): dict(v) for k, v in (overrides or {}).items()}
        for scope, values in overrides.items():
            unknown = set(values) - _OVERRIDABLE
            if unknown:
                raise ValueError(f"overrides[{scope!r}] has unknown settings {sorted(unknown)}; "
                                 f"allowed: {sorted(_OVERRIDABLE)}")
        self.window_s = float(window_s)
        self.n_buckets = n_buckets
        self.min_calls = min_calls
        self.error_rate_threshold = float(error_rate_threshold)
        self.latency_threshold_ms = float(latency_threshold_ms)
        self.latency_quantile = float(latency_quantile)
        self.ttft_threshold_ms = float(ttft_threshold_ms)
        self.ttft_quantile = float(ttft_quantile)
        self.blocked_threshold = float(blocked_threshold)
        self.blocked_finish_reasons = frozenset(str(r).lower() for r in blocked_finish_reasons)
        self.resolve_ratio = float(resolve_ratio)
        self.overrides = overrides
        self.max_keys = max_keys
        self.key_ttl_s = float(key_ttl_s)
        self.recent_latencies = recent_latencies
        self._bucket_s = self.window_s / n_buckets
        self._slow_fraction_limit = 1.0 - self.latency_quantile
        self._slow_ttft_limit = 1.0 - self.ttft_quantile
        self._scratch: list[Finding] = []
        self._windows: EventTimeLru[tuple[str, str], _SloWindow] = EventTimeLru(max_keys, key_ttl_s)
        self._blocks: EventTimeLru[tuple[str, str, str], _BlockWindow] = EventTimeLru(max_keys, key_ttl_s)

    def state_size(self) -> int:
        """Entries of the larger of the two maps (each is capped at ``max_keys``)."""
        return max(len(self._windows), len(self._blocks))

    def _thresholds(self, service: str, model: str) -> dict[str, float]:
        values = {"error_rate_threshold": self.error_rate_threshold,
                  "latency_threshold_ms": self.latency_threshold_ms,
                  "ttft_threshold_ms": self.ttft_threshold_ms, "blocked_threshold": self.blocked_threshold}
        values.update(self.overrides.get(service, {}))
        values.update(self.overrides.get(f"{service}/{model}", {}))
        return values

    def _new_window(self, service: str, model: str) -> _SloWindow:
        t = self._thresholds(service, model)
        return _SloWindow(service, model, self.n_buckets, self.recent_latencies, t["error_rate_threshold"],
                          t["latency_threshold_ms"], t["ttft_threshold_ms"])

    def _new_block_window(self, service: str, provider: str, model: str) -> _BlockWindow:
        return _BlockWindow(service, provider, model, self.n_buckets,
                            self._thresholds(service, model)["blocked_threshold"])

    def update(self, event: LlmCall) -> Sequence[Finding]:
        ts = event.ts
        findings = self._scratch  # reused: a fresh list per event is GC pressure
        findings.clear()
        windows = self._windows
        for _, gone in windows.expire(ts):
            findings.extend(self._resolve_all(gone, ts, "no calls within key_ttl_s"))
        for _, gone_block in self._blocks.expire(ts):
            self._resolve_blocked(gone_block, ts, "no calls within key_ttl_s", findings)
        self._count_block(event, ts, findings)
        key = (event.service, event.model)
        w = windows.get(key)
        if w is None:
            w = self._new_window(*key)
            for _, gone in windows.insert(key, w):
                findings.extend(self._resolve_all(gone, ts, "evicted: max_keys reached"))
        bucket = int(ts // self._bucket_s)
        if bucket > w.head:
            w.advance(bucket)
        elif bucket <= w.head - self.n_buckets:
            return tuple(findings) if findings else ()  # older than the whole window: it cannot change the SLO any more
        if ts > w.last_ts:
            w.last_ts = ts
        slot = bucket % self.n_buckets
        w.ring_calls[slot] += 1
        w.calls += 1
        if event.status == "error":
            w.ring_errors[slot] += 1
            w.errors += 1
        if event.invalid_fields and "latency_ms:" in event.invalid_fields:
            w.ring_untimed[slot] += 1
            w.untimed += 1
        else:
            latency_ms = event.latency_ms
            if latency_ms > w.latency_threshold_ms:
                w.ring_slow[slot] += 1
                w.slow += 1
            w.recent.append((ts, latency_ms))
        ttft = event.time_to_first_token_ms
        if ttft is not None and not (event.invalid_fields and "time_to_first_token_ms:" in event.invalid_fields):
            w.ring_ttft[slot] += 1
            w.ttft_calls += 1
            if ttft > w.ttft_threshold_ms:
                w.ring_ttft_slow[slot] += 1
                w.ttft_slow += 1
            w.recent_ttft.append((ts, ttft))
        if w.calls >= self.min_calls:
            self._judge(w, ts, findings)
        return tuple(findings) if findings else ()

    def _count_block(self, event: LlmCall, ts: float, findings: list[Finding]) -> None:
        """Count the call in its (service, provider, model) window; judge the blocked share."""
        key = (event.service, event.provider, event.model)
        blocks = self._blocks
        b = blocks.get(key)
        if b is None:
            b = self._new_block_window(*key)
            for _, gone in blocks.insert(key, b):
                self._resolve_blocked(gone, ts, "evicted: max_keys reached", findings)
        bucket = int(ts // self._bucket_s)
        if bucket > b.head:
            b.advance(bucket)
        elif bucket <= b.head - self.n_buckets:
            return
        if ts > b.last_ts:
            b.last_ts = ts
        slot = bucket % self.n_buckets
        b.ring_calls[slot] += 1
        b.calls += 1
        reason = event.finish_reason
        if reason and reason.lower() in self.blocked_finish_reasons:
            b.ring_blocked[slot] += 1
            b.blocked += 1
            b.reasons.append(reason)
        if b.calls < self.min_calls:
            return
        fires = transition(b.firing, b.blocked / b.calls, b.threshold, self.resolve_ratio)
        if fires is not None:
            b.firing = fires
            findings.append(self._blocked_finding(b, ts, resolved=not fires))

    def _blocked_finding(self, b: _BlockWindow, ts: float, *, resolved: bool, reason: str | None = None) -> Finding:
        share = b.blocked / b.calls if b.calls else 0.0
        evidence = BlockedEvidence(service=b.service, provider=b.provider, model=b.model, window_s=self.window_s,
                                   calls=b.calls, blocked_calls=b.blocked, blocked_share=share,
                                   finish_reasons=tuple(b.reasons), reason=reason).to_mapping()
        return Finding(detector=self.name, key=b.key, kind="provider_blocked",
                       severity=Severity.INFO if resolved else Severity.WARNING, ts=ts, value=share,
                       threshold=b.threshold, evidence=evidence, resolved=resolved)

    def _resolve_blocked(self, b: _BlockWindow, ts: float, reason: str, findings: list[Finding]) -> None:
        if b.firing:
            b.firing = False
            findings.append(self._blocked_finding(b, ts, resolved=True, reason=reason))

    def _judge(self, w: _SloWindow, ts: float, findings: list[Finding]) -> None:
        error_rate = w.errors / w.calls
        fires = transition(w.error_firing, error_rate, w.error_rate_threshold, self.resolve_ratio)
        if fires is not None:
            w.error_firing = fires
            findings.append(self._error_finding(w, ts, error_rate, resolved=not fires))
        timed = w.calls - w.untimed
        fires = transition(w.latency_firing, w.slow / timed if timed else 0.0, self._slow_fraction_limit,
                           self.resolve_ratio)
        if fires is not None:
            w.latency_firing = fires
            findings.append(self._latency_finding(w, ts, resolved=not fires))
        if w.ttft_calls < self.min_calls and not w.ttft_firing:
            return
        fires = transition(w.ttft_firing, w.ttft_slow / w.ttft_calls if w.ttft_calls else 0.0,
                           self._slow_ttft_limit, self.resolve_ratio)
        if fires is not None:
            w.ttft_firing = fires
            findings.append(self._ttft_finding(w, ts, resolved=not fires))

    def _evidence(self, w: _SloWindow, **extra: Any) -> dict[str, Any]:
        return SloEvidence(
            service=w.service, model=w.model, window_s=self.window_s, calls=w.calls,
            errors=w.errors, slow_calls=w.slow,
            error_rate=w.errors / w.calls if w.calls else 0.0,
            slow_fraction=w.slow / (w.calls - w.untimed) if w.calls > w.untimed else 0.0,
            calls_without_latency=w.untimed, **extra).to_mapping()

    def _error_finding(self, w: _SloWindow, ts: float, error_rate: float, *,
                       resolved: bool, reason: str | None = None) -> Finding:
        return Finding(detector=self.name, key=w.key, kind="error_rate",
                       severity=Severity.INFO if resolved else Severity.CRITICAL, ts=ts,
                       value=error_rate, threshold=w.error_rate_threshold,
                       evidence=self._evidence(w, reason=reason), resolved=resolved)

    def _latency_finding(self, w: _SloWindow, ts: float, *, resolved: bool,
                         reason: str | None = None) -> Finding:
        start = ts - self.window_s
        sample = [lat for t, lat in w.recent if t > start] or [lat for _, lat in w.recent]
        observed = nearest_rank_quantile(sample, self.latency_quantile) if sample else 0.0
        evidence = self._evidence(w, quantile=self.latency_quantile,
                                  latency_sample_size=len(sample),
                                  observed_quantile_ms=observed, reason=reason)
        return Finding(detector=self.name, key=w.key, kind="latency",
                       severity=Severity.INFO if resolved else Severity.WARNING, ts=ts,
                       value=observed, threshold=w.latency_threshold_ms, evidence=evidence,
                       resolved=resolved)

    def _ttft_finding(self, w: _SloWindow, ts: float, *, resolved: bool, reason: str | None = None) -> Finding:
        start = ts - self.window_s
        sample = [v for t, v in w.recent_ttft if t > start] or [v for _, v in w.recent_ttft]
        observed = nearest_rank_quantile(sample, self.ttft_quantile) if sample else 0.0
        evidence = self._evidence(w, quantile=self.ttft_quantile, latency_sample_size=len(sample),
                                  observed_quantile_ms=observed, reason=reason, calls_with_ttft=w.ttft_calls,
                                  slow_ttft_calls=w.ttft_slow)
        return Finding(detector=self.name, key=w.key, kind="ttft",
                       severity=Severity.INFO if resolved else Severity.WARNING, ts=ts,
                       value=observed, threshold=w.ttft_threshold_ms, evidence=evidence, resolved=resolved)

    def _resolve_all(self, w: _SloWindow, ts: float, reason: str) -> list[Finding]:
        out = []
        if w.error_firing:
            w.error_firing = False
            out.append(self._error_finding(w, ts, w.errors / w.calls if w.calls else 0.0,
                                           resolved=True, reason=reason))
        if w.latency_firing:
            w.latency_firing = False
            out.append(self._latency_finding(w, ts, resolved=True, reason=reason))
        if w.ttft_firing:
            w.ttft_firing = False
            out.append(self._ttft_finding(w, ts, resolved=True, reason=reason))
        return out

    def snapshot(self) -> dict[str, Any]:
        return {
            "version": 1,
            "lru": self._windows.snapshot_meta(),
            "windows": [[w.service, w.model, w.head, w.ring_calls, w.ring_errors, w.ring_slow,
                         w.error_firing, w.latency_firing, w.last_ts,
                         [list(p) for p in w.recent], w.ring_untimed, w.ring_ttft, w.ring_ttft_slow,
                         w.ttft_firing, [list(p) for p in w.recent_ttft]] for _, w in self._windows.items()],
            "blocks_lru": self._blocks.snapshot_meta(),
            "blocks": [[b.service, b.provider, b.model, b.head, b.ring_calls, b.ring_blocked, b.firing, b.last_ts,
                        list(b.reasons)] for _, b in self._blocks.items()],
        }

    def restore(self, snap: dict[str, Any]) -> None:
        self._windows.clear()
        self._windows.restore_meta(snap.get("lru", {}))
        n = self.n_buckets
        for (service, model, head, calls, errors, slow, err_f, lat_f, last_ts,
             recent, *later) in snap.get("windows", []):  # older checkpoints lack the later fields
            w = self._new_window(service, model)
            untimed, ttft, ttft_slow, ttft_f, recent_ttft = (later + [None] * 5)[:5]
            if len(calls) == n:
                w.head = head
                w.ring_calls, w.ring_errors, w.ring_slow = list(calls), list(errors), list(slow)
                if untimed is not None and len(untimed) == n:
                    w.ring_untimed = list(untimed)
                if ttft is not None and len(ttft) == n and len(ttft_slow) == n:
                    w.ring_ttft, w.ring_ttft_slow = list(ttft), list(ttft_slow)
                w.sum_rings()
            # else: n_buckets changed since the checkpoint; the window refills from new calls.
            w.error_firing, w.latency_firing, w.ttft_firing = bool(err_f), bool(lat_f), bool(ttft_f)
            w.last_ts = float(last_ts)
            w.recent.extend((float(t), float(lat)) for t, lat in recent)
            w.recent_ttft.extend((float(t), float(v)) for t, v in recent_ttft or ())
            self._windows.insert((service, model), w)
        self._blocks.clear()
        self._blocks.restore_meta(snap.get("blocks_lru", {}))
        for service, provider, model, head, calls, blocked, firing, last_ts, reasons in snap.get("blocks", []):
            b = self._new_block_window(service, provider, model)
            if len(calls) == n and len(blocked) == n:
                b.head = head
                b.ring_calls, b.ring_blocked = list(calls), list(blocked)
                b.calls, b.blocked = sum(calls), sum(blocked)
            b.firing, b.last_ts = bool(firing), float(last_ts)
            b.reasons.extend(str(r) for r in reasons)
            self._blocks.insert((service, provider, model), b)
