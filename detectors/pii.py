"""PII exposure per service: a new entity type, and a jump in an entity type's rate.

The normaliser redacts personal data and secrets and emits a
:class:`~agentwatch.events.PiiDetection` per span field and entity type with how many it found
(never the value). This detector watches those counts per (service, entity type):

- ``new_pii_entity``: a service that has sent traffic (any :class:`~agentwatch.events.LlmCall`
  or detection) for at least ``warmup_s`` starts sending an entity type it never sent before,
  e.g. a support bot that never handled card numbers now has them in its prompts. A brand-new
  service's first detections are what it normally sends, not news: they are learned silently.
- ``pii_rate_jump``: the count of a (service, entity type) in the current tumbling event-time
  window exceeds ``max(min_count, rate_factor x baseline)``, where the baseline is an average
  over the closed windows, empty ones included (a burst after silence is news too). It fires
  at the detection that crosses the threshold, at most once per window and not again while it
  is open, and resolves when a later window closes at or under its threshold.

``LlmCall`` events only tell when a service was first (and last) seen. "Never sent before"
means within the state the detector holds: a (service, entity type) without detections for
``key_ttl_s``, or pushed out by ``max_keys``, is new again when it returns, and a service
forgotten the same way is brand new again (its next detections are learned, not reported).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

from agentwatch.detectors.bounded import EventTimeLru, check_at_least, check_positive
from agentwatch.detectors.evidence import Evidence
from agentwatch.detectors.keys import key_string
from agentwatch.events import Finding, LlmCall, PiiDetection, Severity

_KEY_FIELDS = ("service", "entity")


@dataclass(frozen=True, slots=True, kw_only=True)
class PiiExposureEvidence(Evidence):
    """One (service, entity type) when it was judged. Counts and field names only, no values.

    ``fields`` lists the newest distinct fields (``llm_calls.prompt``, ...) the entity type was
    found in. ``window_start``/``window_count`` describe the window judged: the open one on a
    firing, the one that closed under the threshold on a resolution. ``baseline`` is the
    average count per window over the closed windows (``baseline_windows`` of them).
    ``service_age_s`` (``new_pii_entity`` only) is how long the service had been seen;
    ``reason`` is set on resolutions.
    """

    service: str
    entity_type: str
    fields: tuple[str, ...]
    window_start: float
    window_s: float
    window_count: int
    baseline: float
    baseline_windows: int
    service_age_s: float | None = None
    reason: str | None = None


class _Service:
    __slots__ = ("first_ts", "last_ts", "firing")

    def __init__(self, ts: float) -> None:
        self.first_ts = self.last_ts = ts
        # Entity types of this service with a rate jump open: any later event of the service
        # closes their windows, so a burst that stopped resolves without waiting for the next
        # detection of its type.
        self.firing: list[str] = []


class _Entity:
    __slots__ = ("service", "entity_type", "fields", "window", "count", "baseline", "closed",
                 "firing", "last_ts")

    def __init__(self, service: str, entity_type: str, window: int, ts: float) -> None:
        self.service = service
        self.entity_type = entity_type
        self.fields: list[str] = []
        self.window = window  # index (event time // window_s) of the open window
        self.count = 0  # detections in the open window
        self.baseline = 0.0
        self.closed = 0  # closed windows folded into the baseline
        self.firing = False
        self.last_ts = ts

    @property
    def key(self) -> str:
        return key_string(_KEY_FIELDS, (self.service, self.entity_type))


def rate_threshold(baseline: float, *, rate_factor: float, min_count: float) -> float:
    """The count a window must exceed: ``rate_factor`` x baseline, never under ``min_count``.

    >>> rate_threshold(1.0, rate_factor=3.0, min_count=5), rate_threshold(4.0, rate_factor=3.0, min_count=5)
    (5.0, 12.0)
    """
    return float(max(min_count, rate_factor * baseline))


def fold_window(baseline: float, closed: int, count: float, alpha: float) -> float:
    """The baseline after one more closed window of ``count``: the plain mean of the first
    ``1/alpha`` windows, an EWMA of weight ``alpha`` after that.

    >>> fold_window(0.0, 0, 4.0, 0.1), fold_window(4.0, 1, 2.0, 0.1), fold_window(3.0, 20, 13.0, 0.1)
    (4.0, 3.0, 4.0)
    """
    weight = max(alpha, 1.0 / (closed + 1))
    return baseline + weight * (count - baseline)


def fold_empty_windows(baseline: float, closed: int, n: int, alpha: float) -> float:
    """The baseline after ``n`` more closed windows without detections, in O(1) for any ``n``.

    Equal to ``n`` calls of :func:`fold_window` with ``count=0`` (up to rounding): while the
    mean phase lasts each empty window scales the mean by ``c / (c + 1)``, which telescopes to
    ``closed / (closed + m)``; after it, each scales the EWMA by ``1 - alpha``.

    >>> fold_empty_windows(6.0, 2, 1, 0.1), fold_empty_windows(10.0, 50, 2, 0.5)
    (4.0, 2.5)
    """
    if n <= 0:
        return baseline
    # Windows c = closed, closed + 1, ... are averaged evenly while 1 / (c + 1) > alpha.
    mean_end = max(closed, math.ceil(1.0 / alpha - 1.0))
    m = min(n, mean_end - closed)
    if m > 0:
        baseline = baseline * closed / (closed + m)
    if n > m:
        baseline *= (1.0 - alpha) ** (n - m)
    return baseline


class PiiExposureDetector:
    """New PII entity types per service, and jumps in an entity type's rate over its baseline.

    Per (service, entity type) the detector counts detections in tumbling event-time windows of
    ``window_s``. When a window closes its count is folded into the baseline: the plain mean of
    the first ``1/alpha`` closed windows, then an EWMA of weight ``alpha``. Windows without any
    detection count as zeros; a long gap is folded in O(1). Once ``baseline_windows`` windows
    have closed, a window whose count exceeds ``max(min_count, rate_factor x baseline)`` fires
    ``pii_rate_jump`` at the detection that crosses it; it resolves when a later window closes
    at or under its threshold (noticed at the service's next event, of any kind). A window's
    count enters the baseline clipped at its threshold, so one burst does not blind the
    detector to the next one, while a lasting new level still lifts the baseline.

    ``new_pii_entity`` fires when a service seen for at least ``warmup_s`` sends an entity type
    it has not sent before. It is a notice: it does not resolve itself.

    Findings' ``value``/``threshold``: a window's count vs the rate threshold for
    ``pii_rate_jump``; the service's age vs ``warmup_s`` for ``new_pii_entity``. Severity is
    ``warning``, ``critical`` for the types in ``critical_entities`` (secrets: a credential in
    flight must be rotated, redacted or not), ``info`` on resolutions.

    Parameters
    ----------
    warmup_s : float
        How long (event time) a service must have been seen before a new entity type is news.
    window_s : float
        Length of the tumbling count windows (event time).
    baseline_windows : int
        Closed windows a (service, entity type) needs before its rate is judged.
    rate_factor : float
        A window fires when its count exceeds this multiple of the baseline...
    min_count : int
        ...and this many detections.
    alpha : float
        EWMA weight of a closed window (the first ``1/alpha`` windows are averaged evenly).
    critical_entities : Sequence[str]
        Entity types whose findings are ``critical``.
    max_services : int
        Most services held (least recently seen go first).
    max_keys : int
        Most (service, entity type) keys held (least recently detected go first).
    key_ttl_s : float
        Services and keys without events for this long (event time) are forgotten.

    Attributes
    ----------
    evicted_services, evicted_keys : int
        Entries pushed out by ``max_services`` / ``max_keys`` (not counting TTL expiry): a
        growing count means the caps are too small for the traffic.

    Examples
    --------
    >>> det = PiiExposureDetector(warmup_s=600.0, window_s=60.0, baseline_windows=3)
    >>> events = [LlmCall(ts=60.0 * i, trace_id="t", span_id="s", service="shop")
    ...           for i in range(11)]
    >>> events += [PiiDetection(ts=60.0 * i + 1, trace_id="t", span_id="s", service="shop",
    ...                         entity_type="EMAIL", field="llm_calls.prompt", count=1)
    ...            for i in range(10, 15)]
    >>> events += [PiiDetection(ts=901.0, trace_id="t", span_id="s", service="shop",
    ...                         entity_type="EMAIL", field="llm_calls.response", count=6)]
    >>> [(f.kind, f.key, f.value, f.threshold) for e in events for f in det.update(e)]
    [('new_pii_entity', 'service=shop/entity=EMAIL', 601.0, 600.0), ('pii_rate_jump', 'service=shop/entity=EMAIL', 6.0, 5.0)]
    """

    name: ClassVar[str] = "pii_exposure"
    partition_by: ClassVar[str] = "service"
    # Constructor arguments that bound the state: split over the partitions of its stage.
    state_caps: ClassVar[tuple[str, ...]] = ("max_services", "max_keys")
    accepts: ClassVar[tuple[type, ...]] = (LlmCall, PiiDetection)
    llm_call_reads: ClassVar[frozenset[str]] = frozenset({"ts", "service"})
    _MAX_FIELDS: ClassVar[int] = 8

    def __init__(self, *, warmup_s: float = 3_600.0, window_s: float = 300.0,
                 baseline_windows: int = 12, rate_factor: float = 3.0, min_count: int = 5,
                 alpha: float = 0.1, critical_entities: Sequence[str] = ("SECRET",),
                 max_services: int = 10_000, max_keys: int = 50_000,
                 key_ttl_s: float = 30 * 86_400.0) -> None:
        check_positive("warmup_s", warmup_s, allow_zero=True)
        check_positive("window_s", window_s)
        check_at_least("baseline_windows", baseline_windows, 1)
        check_at_least("rate_factor", rate_factor, 1.0)
        check_at_least("min_count", min_count, 1)
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if isinstance(critical_entities, str):
            raise ValueError("critical_entities must be a sequence of entity types, "
                             f"not the string {critical_entities!r}")
        critical_entities = tuple(str(t) for t in critical_entities)
        check_at_least("max_services", max_services, 1)
        check_at_least("max_keys", max_keys, 1)
        check_positive("key_ttl_s", key_ttl_s)
        self.warmup_s = float(warmup_s)
        self.window_s = float(window_s)
        self.baseline_windows = baseline_windows
        self.rate_factor = float(rate_factor)
        self.min_count = min_count
        self.alpha = float(alpha)
        self.critical_entities = critical_entities
        self.max_services = max_services
        self.max_keys = max_keys
        self.key_ttl_s = float(key_ttl_s)
        self.evicted_services = 0
        self.evicted_keys = 0
        self._critical = frozenset(critical_entities)
        self._scratch: list[Finding] = []
        self._services: EventTimeLru[str, _Service] = EventTimeLru(max_services, key_ttl_s)
        self._entities: EventTimeLru[tuple[str, str], _Entity] = EventTimeLru(max_keys, key_ttl_s)

    def state_size(self) -> int:
        return len(self._services) + len(self._entities)

    def _threshold(self, e: _Entity) -> float:
        return rate_threshold(e.baseline, rate_factor=self.rate_factor, min_count=self.min_count)

    def update(self, event: LlmCall | PiiDetection) -> Sequence[Finding]:
        ts = event.ts
        findings = self._scratch  # reused: a fresh list per event is GC pressure
        findings.clear()
        entities, services = self._entities, self._services
        if entities.next_sweep_ts <= ts:
            for _, gone in entities.expire(ts):
                self._forget(gone, ts, "no detections within key_ttl_s", findings)
        if services.next_sweep_ts <= ts:
            services.expire(ts)
        name = event.service
        svc = services.get(name)
        if svc is None:
            svc = _Service(ts)
            self.evicted_services += len(services.insert(name, svc))
        else:
            if ts < svc.first_ts:
                svc.first_ts = ts
            if ts > svc.last_ts:
                svc.last_ts = ts
        window = int(ts // self.window_s)
        if svc.firing:
            self._advance_firing(name, svc, window, ts, findings)
        if not isinstance(event, PiiDetection):  # a call only tells the service is alive
            return tuple(findings) if findings else ()
        entity_type, count = event.entity_type, event.count
        if not entity_type or count <= 0:
            return tuple(findings) if findings else ()
        key = (name, entity_type)
        e = entities.get(key)
        new = e is None
        if e is None:
            e = _Entity(name, entity_type, window, ts)
            for _, gone in entities.insert(key, e):
                self.evicted_keys += 1
                self._forget(gone, ts, "evicted: max_keys reached", findings)
        elif window > e.window:
            self._advance(e, svc, window, ts, findings)
        if ts > e.last_ts:
            e.last_ts = ts
        fields, field_name = e.fields, event.field
        if field_name in fields:
            fields.remove(field_name)
        fields.append(field_name)
        if len(fields) > self._MAX_FIELDS:
            del fields[0]
        # A straggler older than the open window is counted in it: windows close on a later
        # window's first event, so it has nowhere else to go.
        e.count += count
        if new:
            age = ts - svc.first_ts
            if age >= self.warmup_s:
                findings.append(self._finding(e, "new_pii_entity", ts, value=age,
                                              threshold=self.warmup_s, service_age_s=age))
        elif not e.firing and e.closed >= self.baseline_windows:
            threshold = self._threshold(e)
            if e.count > threshold:
                e.firing = True
                svc.firing.append(entity_type)
                findings.append(self._finding(e, "pii_rate_jump", ts, value=float(e.count),
                                              threshold=threshold))
        return tuple(findings) if findings else ()

    def _advance_firing(self, name: str, svc: _Service, window: int, ts: float,
                        findings: list[Finding]) -> None:
        for entity_type in list(svc.firing):
            e = self._entities.entries.get((name, entity_type))  # not a detection: LRU order kept
            if e is None or not e.firing:
                svc.firing.remove(entity_type)
            elif window > e.window:
                self._advance(e, svc, window, ts, findings)

    def _advance(self, e: _Entity, svc: _Service | None, window: int, ts: float,
                 findings: list[Finding]) -> None:
        """Close the open window of ``e`` and the empty ones up to ``window``, which opens."""
        threshold = self._threshold(e)
        judged = e.closed >= self.baseline_windows
        if e.firing:
            # The firing window itself exceeded its threshold; a later one under it (or an empty
            # one in between) ends the jump.
            under = e.count <= threshold
            if under or window > e.window + 1:
                e.firing = False
                if svc is not None and e.entity_type in svc.firing:
                    svc.firing.remove(e.entity_type)
                closed_window, closed_count = (e.window, e.count) if under else (e.window + 1, 0)
                findings.append(self._finding(
                    e, "pii_rate_jump", ts, value=float(closed_count), threshold=threshold,
                    resolved=True, reason="window closed under the threshold",
                    window_start=closed_window * self.window_s, window_count=closed_count))
        # Clip before learning so one burst does not lift the baseline over the next one.
        count = min(e.count, threshold) if judged else e.count
        e.baseline = fold_window(e.baseline, e.closed, count, self.alpha)
        e.closed += 1
        empty = window - e.window - 1
        e.baseline = fold_empty_windows(e.baseline, e.closed, empty, self.alpha)
        e.closed += max(0, empty)
        e.window = window
        e.count = 0

    def _forget(self, e: _Entity, ts: float, reason: str, findings: list[Finding]) -> None:
        if not e.firing:
            return
        e.firing = False
        svc = self._services.entries.get(e.service)
        if svc is not None and e.entity_type in svc.firing:
            svc.firing.remove(e.entity_type)
        findings.append(self._finding(e, "pii_rate_jump", ts, value=float(e.count),
                                      threshold=self._threshold(e), resolved=True,
                                      reason=reason))

    def _finding(self, e: _Entity, kind: str, ts: float, *, value: float, threshold: float,
                 resolved: bool = False, reason: str | None = None,
                 service_age_s: float | None = None, window_start: float | None = None,
                 window_count: int | None = None) -> Finding:
        evidence = PiiExposureEvidence(
            service=e.service, entity_type=e.entity_type, fields=tuple(e.fields),
            window_start=e.window * self.window_s if window_start is None else window_start,
            window_s=self.window_s, window_count=e.count if window_count is None else window_count,
            baseline=e.baseline, baseline_windows=e.closed, service_age_s=service_age_s,
            reason=reason)
        severity = (Severity.INFO if resolved else
                    Severity.CRITICAL if e.entity_type in self._critical else Severity.WARNING)
        return Finding(detector=self.name, key=e.key, kind=kind, severity=severity, ts=ts,
                       value=float(value), threshold=float(threshold),
                       evidence=evidence.to_mapping(), resolved=resolved)

    def snapshot(self) -> dict[str, Any]:
        return {
            "version": 1,
            "evicted": [self.evicted_services, self.evicted_keys],
            "services_lru": self._services.snapshot_meta(),
            "services": [[name, s.first_ts, s.last_ts, list(s.firing)]
                         for name, s in self._services.items()],
            "entities_lru": self._entities.snapshot_meta(),
            "entities": [[e.service, e.entity_type, list(e.fields), e.window, e.count, e.baseline,
                          e.closed, e.firing, e.last_ts] for _, e in self._entities.items()],
        }

    def restore(self, snap: dict[str, Any]) -> None:
        self._services.clear()
        self._entities.clear()
        self.evicted_services, self.evicted_keys = (int(n) for n in snap.get("evicted", [0, 0]))
        self._services.restore_meta(snap.get("services_lru", {}))
        for name, first_ts, last_ts, firing in snap.get("services", []):
            s = _Service(float(first_ts))
            s.last_ts = float(last_ts)
            s.firing = [str(t) for t in firing]
            self._services.insert(name, s)  # in LRU order; the caps may have shrunk since
        self._entities.restore_meta(snap.get("entities_lru", {}))
        for (service, entity_type, fields, window, count, baseline, closed, firing,
             last_ts) in snap.get("entities", []):
            e = _Entity(service, entity_type, int(window), float(last_ts))
            e.fields = [str(f) for f in fields][-self._MAX_FIELDS:]
            e.count, e.baseline, e.closed = int(count), float(baseline), int(closed)
            e.firing = bool(firing)
            self._entities.insert((service, entity_type), e)
