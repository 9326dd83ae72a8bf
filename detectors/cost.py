"""Cost detectors: spikes against a robust baseline, project budgets, and retry storms.

Three detectors, one concern (money):

- :class:`CostAnomalyDetector` keeps, per key (project, project/model, service, user), the cost
  and tokens of each event-time interval and a robust baseline of them (EWMA level + EWMA of the
  absolute deviation, spikes clipped before they enter it), and reports an interval whose running
  total crosses ``baseline + threshold_sigmas * scale`` at the very call that crosses it.
- :class:`BudgetDetector` tracks daily and monthly spend per project against configured budgets:
  findings at 50/80/100% and when the burn rate projects an overrun before the period ends.
- :class:`RetryStormDetector` spots the same prompt from the same client repeated within seconds
  (a client timeout + automatic retry multiplies cost without anyone noticing) and counts the
  cost the repeats wasted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timezone
from operator import attrgetter
from typing import Any, Callable, ClassVar, Mapping, Sequence

from agentwatch.detectors.bounded import EventTimeLru, check_at_least, check_positive, stable_hash
from agentwatch.detectors.evidence import Evidence
from agentwatch.detectors.keys import key_string
from agentwatch.events import Finding, LlmCall, Severity

# Mean absolute deviation of a normal variable is sigma * sqrt(2/pi): scale it back to sigma so
# ``threshold_sigmas`` reads like a z-score.
_MAD_TO_SIGMA = math.sqrt(math.pi / 2.0)
_INF = float("inf")
_GROUPABLE = ("project", "model", "service", "user", "agent", "provider", "host", "prompt_name",
              "prompt_version")


@dataclass(frozen=True, slots=True, kw_only=True)
class CostSpikeEvidence(Evidence):
    """A key's interval whose cost (or, with unpriced calls, tokens) crossed its threshold.

    The key's fields (``project``, ``model``, ...; see ``group_by``) are set for the fields of
    the finding's key only. ``trigger`` (``"cost"`` or ``"tokens"``) is absent on a resolution.
    """

    project: str | None = None
    model: str | None = None
    service: str | None = None
    user: str | None = None
    agent: str | None = None
    provider: str | None = None
    host: str | None = None
    prompt_name: str | None = None
    prompt_version: str | None = None
    interval_start: float
    interval_s: float
    calls: int
    baseline_cost_usd: float
    observed_cost_usd: float
    excess_cost_usd: float
    baseline_tokens: float
    observed_tokens: int
    threshold_tokens: float
    history_intervals: int
    unpriced_calls: int
    trigger: str | None = None


class _CostSeries:
    __slots__ = ("group", "values", "bucket", "cost", "tokens", "calls", "base_cost", "dev_cost",
                 "base_tokens", "dev_tokens", "history", "firing", "spike", "thr_cost",
                 "thr_tokens", "last_ts", "unpriced")

    def __init__(self, group: int, values: tuple[str, ...], bucket: int) -> None:
        self.group = group
        self.values = values
        self.bucket = bucket
        self.cost = 0.0
        self.tokens = 0
        self.calls = 0
        self.unpriced = 0  # calls in the open interval whose cost is unknown
        self.base_cost = self.dev_cost = 0.0
        self.base_tokens = self.dev_tokens = 0.0
        self.history = 0  # closed intervals folded into the baseline
        self.firing = False
        self.spike = False  # the current interval has crossed a threshold
        self.thr_cost = _INF
        self.thr_tokens = _INF
        self.last_ts = float("-inf")


def robust_ewma_step(base: float, dev: float, x: float, alpha: float) -> tuple[float, float]:
    """One EWMA step of level ``base`` and mean absolute deviation ``dev`` towards ``x``."""
    dev += alpha * (abs(x - base) - dev)
    base += alpha * (x - base)
    return base, dev


def spike_threshold(base: float, dev: float, *, sigmas: float, min_rel_scale: float,
                    min_excess: float) -> float:
    """``base`` plus the larger of ``sigmas`` robust sigmas and ``min_excess``.

    The scale never drops below ``min_rel_scale * base``: a perfectly steady series has a
    deviation near zero and would otherwise page on a cent.
    """
    scale = max(dev * _MAD_TO_SIGMA, min_rel_scale * base)
    return base + max(sigmas * scale, min_excess)


class CostAnomalyDetector:
    """Cost and token spikes per key against a robust rolling baseline of event-time intervals.

    Only intervals in which a key had calls enter its baseline: a user active a few minutes a day
    is judged against their active minutes, not against a baseline of zeros that any call would
    exceed. A spike fires once; it resolves when a later interval stays under the threshold (or
    the key went quiet for a whole interval).

    Parameters
    ----------
    group_by : Sequence[Sequence[str]]
        The keys: each entry lists LlmCall fields whose values form one key
        (``("project", "model")`` -> ``project=shop/model=gpt-4o``; ``("project",
        "prompt_name")`` for spend per managed prompt). Calls with an empty value for a field
        of a key are not counted under it (a call without a prompt name, under a prompt key).
        The entries must share a field (``partition_by``, the first shared one): workers split
        calls by it, so each key's calls meet in one worker whatever the worker count.
    interval_s : float
        Interval length (event time) of the cost and token totals.
    alpha : float
        EWMA weight of a new interval (the first ``1/alpha`` intervals are averaged evenly).
    threshold_sigmas : float
        Robust sigmas above the baseline an interval must reach.
    min_history : int
        Closed intervals a key needs before it can spike (warm-up).
    min_rel_scale : float
        Floor of the scale, as a fraction of the baseline.
    min_excess_usd, min_excess_tokens : float
        An interval must exceed the baseline by at least this much to count as a spike. Token
        spikes are judged only in intervals with unpriced calls (model missing from the pricing
        table): where cost is known, it is the cost that pages.
    max_keys : int
        Most keys held (least recently seen go first).
    key_ttl_s : float
        Keys without calls for this long (event time) are forgotten.

    Examples
    --------
    >>> det = CostAnomalyDetector(group_by=[("project",)], min_history=3, min_excess_usd=1.0)
    >>> calls = [LlmCall(ts=60.0 * i, trace_id="t", span_id="s", project="shop", cost_usd=0.5)
    ...          for i in range(4)]
    >>> calls += [LlmCall(ts=240.0 + i, trace_id="t", span_id="s", project="shop", cost_usd=0.5)
    ...           for i in range(4)]
    >>> [(f.kind, f.value, f.evidence["excess_cost_usd"]) for c in calls for f in det.update(c)]
    [('cost_spike', 2.0, 1.5)]
    """

    name: ClassVar[str] = "cost_anomaly"
    # Constructor arguments that bound the state: split over the partitions of its stage.
    state_caps: ClassVar[tuple[str, ...]] = ("max_keys",)
    accepts: ClassVar[tuple[type, ...]] = (LlmCall,)

    def __init__(self, *,
                 group_by: Sequence[Sequence[str]] = (("project",), ("project", "model"),
                                                      ("project", "service"), ("project", "user")),
                 interval_s: float = 60.0, alpha: float = 0.1, threshold_sigmas: float = 6.0,
                 min_history: int = 10, min_rel_scale: float = 0.05, min_excess_usd: float = 0.5,
                 min_excess_tokens: float = 50_000, max_keys: int = 20_000,
                 key_ttl_s: float = 7 * 86_400.0) -> None:
        group_by = tuple(tuple(str(f) for f in fields) for fields in group_by)
        if not group_by or any(not fields for fields in group_by):
            raise ValueError("group_by must list at least one non-empty tuple of fields")
        for fields in group_by:
            unknown = set(fields) - set(_GROUPABLE)
            if unknown:
                raise ValueError(f"group_by fields {sorted(unknown)} unknown; use {_GROUPABLE}")
        shared = [f for f in group_by[0] if all(f in fields for fields in group_by)]
        if not shared:
            raise ValueError(f"group_by entries {[list(g) for g in group_by]} share no field: every key's calls "
                             "must meet on one partition, so every entry needs a common field (e.g. project)")
        check_positive("interval_s", interval_s)
        check_positive("threshold_sigmas", threshold_sigmas)
        check_positive("min_rel_scale", min_rel_scale, allow_zero=True)
        check_positive("min_excess_usd", min_excess_usd, allow_zero=True)
        check_positive("min_excess_tokens", min_excess_tokens, allow_zero=True)
        check_positive("key_ttl_s", key_ttl_s)
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        check_at_least("min_history", min_history, 1)
        check_at_least("max_keys", max_keys, 1)
        self.group_by = group_by
        self.llm_call_reads = frozenset({"ts", "cost_usd", "priced", "input_tokens", "output_tokens",
                                         *(f for fields in group_by for f in fields)})
        # The field every key includes: the stream partitions this detector's calls by it.
        self.partition_by = shared[0]
        self.interval_s = float(interval_s)
        self.alpha = float(alpha)
        self.threshold_sigmas = float(threshold_sigmas)
        self.min_history = min_history
        self.min_rel_scale = float(min_rel_scale)
        self.min_excess_usd = float(min_excess_usd)
        self.min_excess_tokens = float(min_excess_tokens)
        self.max_keys = max_keys
        self.key_ttl_s = float(key_ttl_s)
        # attrgetter of one field returns a bare value; normalise to tuples once, here.
        self._getters: list[Callable[[Any], tuple[str, ...]]] = [
            attrgetter(*fields) if len(fields) > 1 else _single_getter(fields[0])
            for fields in group_by]
        self._scratch: list[Finding] = []
        self._series: EventTimeLru[tuple, _CostSeries] = EventTimeLru(max_keys, key_ttl_s)

    def state_size(self) -> int:
        return len(self._series)

    def update(self, event: LlmCall) -> Sequence[Finding]:
        ts = event.ts
        series = self._series
        findings = self._scratch  # reused: a fresh list per event is GC pressure
        findings.clear()
        if series.next_sweep_ts <= ts:
            for _, gone in series.expire(ts):
                if gone.firing:  # quiet for key_ttl_s: whatever spiked is long over
                    findings.append(self._finding(gone, ts, resolved=True))
        bucket = int(ts // self.interval_s)
        cost = event.cost_usd
        tokens = event.input_tokens + event.output_tokens
        priced = event.priced or cost > 0
        entries = series.entries
        move_to_end = entries.move_to_end
        for group, getter in enumerate(self._getters):
            values = getter(event)
            if not all(values):
                continue
            key = (group, values)
            s = entries.get(key)
            if s is not None:
                move_to_end(key)
            if s is None:
                s = _CostSeries(group, values, bucket)
                series.insert(key, s)
            elif bucket > s.bucket:
                resolved = self._close_interval(s, bucket, ts)
                if resolved is not None:
                    findings.append(resolved)
            # An event older than the open interval is counted in it: intervals close on the next
            # interval's first call, so a straggler has nowhere else to go.
            if ts > s.last_ts:
                s.last_ts = ts
            s.cost += cost
            s.tokens += tokens
            s.calls += 1
            if not priced:
                s.unpriced += 1
            # Tokens judge only intervals with unpriced calls (cost cannot see those); where
            # cost is known, a token spike that costs less than min_excess_usd pages nobody.
            if not s.spike and (s.cost > s.thr_cost or (s.unpriced and s.tokens > s.thr_tokens)):
                s.spike = True
                if not s.firing:
                    s.firing = True
                    findings.append(self._finding(s, ts, resolved=False))
        return tuple(findings) if findings else ()

    def _close_interval(self, s: _CostSeries, bucket: int, ts: float) -> Finding | None:
        """Fold the open interval into the baseline and open ``bucket``."""
        finding = None
        # A quiet interval in between was under any threshold, so the spike is over either way.
        if s.firing and (not s.spike or bucket > s.bucket + 1):
            s.firing = False
            finding = self._finding(s, ts, resolved=True)
        alpha = max(self.alpha, 1.0 / (s.history + 1))
        cost, tokens = s.cost, float(s.tokens)
        if s.history >= self.min_history:
            # Clip before learning so one spike does not inflate the baseline; a lasting level
            # shift still moves it, by up to a threshold's width per interval.
            cost = min(cost, s.thr_cost)
            tokens = min(tokens, s.thr_tokens)
        if s.history == 0:  # no level yet to measure a deviation from
            s.base_cost, s.dev_cost, s.base_tokens, s.dev_tokens = cost, 0.0, tokens, 0.0
        else:
            s.base_cost, s.dev_cost = robust_ewma_step(s.base_cost, s.dev_cost, cost, alpha)
            s.base_tokens, s.dev_tokens = robust_ewma_step(s.base_tokens, s.dev_tokens, tokens,
                                                           alpha)
        s.history += 1
        s.bucket = bucket
        s.cost = 0.0
        s.tokens = 0
        s.calls = 0
        s.unpriced = 0
        s.spike = False
        self._set_thresholds(s)
        return finding

    def _set_thresholds(self, s: _CostSeries) -> None:
        if s.history < self.min_history:
            s.thr_cost = s.thr_tokens = _INF
            return
        s.thr_cost = spike_threshold(s.base_cost, s.dev_cost, sigmas=self.threshold_sigmas,
                                     min_rel_scale=self.min_rel_scale,
                                     min_excess=self.min_excess_usd)
        s.thr_tokens = spike_threshold(s.base_tokens, s.dev_tokens, sigmas=self.threshold_sigmas,
                                       min_rel_scale=self.min_rel_scale,
                                       min_excess=self.min_excess_tokens)

    def _finding(self, s: _CostSeries, ts: float, *, resolved: bool) -> Finding:
        fields = self.group_by[s.group]
        trigger = None if resolved else "cost" if s.cost > s.thr_cost else "tokens"
        evidence = CostSpikeEvidence(
            **dict(zip(fields, s.values)),
            interval_start=s.bucket * self.interval_s, interval_s=self.interval_s,
            calls=s.calls, baseline_cost_usd=s.base_cost, observed_cost_usd=s.cost,
            excess_cost_usd=s.cost - s.base_cost, baseline_tokens=s.base_tokens,
            observed_tokens=s.tokens, threshold_tokens=s.thr_tokens,
            history_intervals=s.history, unpriced_calls=s.unpriced, trigger=trigger)
        return Finding(detector=self.name, key=key_string(fields, s.values), kind="cost_spike",
                       severity=Severity.INFO if resolved else Severity.WARNING, ts=ts,
                       value=s.cost, threshold=s.thr_cost, evidence=evidence.to_mapping(),
                       resolved=resolved)

    def snapshot(self) -> dict[str, Any]:
        return {
            "version": 1,
            "lru": self._series.snapshot_meta(),
            "series": [[s.group, list(s.values), s.bucket, s.cost, s.tokens, s.calls, s.base_cost,
                        s.dev_cost, s.base_tokens, s.dev_tokens, s.history, s.firing, s.spike,
                        s.last_ts, s.unpriced] for _, s in self._series.items()],
        }

    def restore(self, snap: dict[str, Any]) -> None:
        self._series.clear()
        self._series.restore_meta(snap.get("lru", {}))
        for (group, values, bucket, cost, tokens, calls, base_cost, dev_cost, base_tokens,
             dev_tokens, history, firing, spike, last_ts, unpriced) in snap.get("series", []):
            if group >= len(self.group_by) or len(values) != len(self.group_by[group]):
                continue  # group_by changed since the checkpoint
            s = _CostSeries(group, tuple(values), bucket)
            s.cost, s.tokens, s.calls = float(cost), int(tokens), int(calls)
            s.base_cost, s.dev_cost = float(base_cost), float(dev_cost)
            s.base_tokens, s.dev_tokens = float(base_tokens), float(dev_tokens)
            s.history, s.firing, s.spike = int(history), bool(firing), bool(spike)
            s.last_ts, s.unpriced = float(last_ts), int(unpriced)
            self._set_thresholds(s)
            self._series.insert((group, s.values), s)


def _single_getter(field_name: str) -> Callable[[Any], tuple[str, ...]]:
    get = attrgetter(field_name)
    return lambda event: (get(event),)


# --------------------------------------------------------------------------------------------
# Budgets

_PERIODS = {"daily_usd": "daily", "monthly_usd": "monthly"}


def period_bounds(period: str, ts: float) -> tuple[float, float]:
    """UTC start and end (unix seconds) of the day or calendar month containing ``ts``."""
    if period == "daily":
        start = math.floor(ts / 86_400.0) * 86_400.0
        return start, start + 86_400.0
    moment = datetime.fromtimestamp(ts, timezone.utc)
    start = datetime(moment.year, moment.month, 1, tzinfo=timezone.utc)
    end = datetime(moment.year + moment.month // 12, moment.month % 12 + 1, 1, tzinfo=timezone.utc)
    return start.timestamp(), end.timestamp()


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetEvidence(Evidence):
    """A project's spend in its daily or monthly budget period.

    The burn-rate fields are set on ``budget_<period>_burn_rate`` findings only;
    ``projected_exhaustion_ts`` only while the projection fires with spend so far.
    """

    project: str
    period: str
    period_start: float
    period_end: float
    budget_usd: float
    spent_usd: float
    spent_fraction: float
    projected_usd: float | None = None
    burn_rate_usd_per_h: float | None = None
    observed_s: float | None = None
    projected_exhaustion_ts: float | None = None


class _BudgetPeriod:
    __slots__ = ("project", "period", "budget_usd", "start", "end", "spent", "first_ts",
                 "levels_fired", "burn_firing", "last_ts")

    def __init__(self, project: str, period: str, budget_usd: float) -> None:
        self.project = project
        self.period = period
        self.budget_usd = budget_usd
        self.start = self.end = _INF  # no period open yet
        self.spent = 0.0
        self.first_ts = _INF
        self.levels_fired = 0  # how many of the sorted levels have fired this period
        self.burn_firing = False
        self.last_ts = float("-inf")


class BudgetDetector:
    """Daily and monthly spend per project against configured budgets.

    Fires once per period at each of ``levels`` (fractions of the budget) and once when the burn
    rate so far projects an overrun before the period ends; at the period's end the fired
    findings resolve (spend starts again from zero). Projects without a budget cost nothing.

    The burn rate is spend over the time observed in the period (from the first call seen in it,
    so a worker started mid-period does not under-estimate it) and is judged only after
    ``burn_min_elapsed_fraction`` of the period has been observed; the projection resolves when it
    falls under ``burn_resolve_ratio`` x budget.

    Parameters
    ----------
    budgets : Mapping[str, Mapping[str, float]]
        ``{project: {"daily_usd": x, "monthly_usd": y}}``; either period may be left out.
    levels : Sequence[float]
        Fractions of the budget that each fire a finding (``budget_daily_80pct``).
    burn_min_elapsed_fraction : float
        Fraction of the period that must be observed before projecting.
    burn_resolve_ratio : float
        The projection finding resolves below this fraction of the budget.

    Examples
    --------
    >>> det = BudgetDetector(budgets={"shop": {"daily_usd": 10.0}})
    >>> calls = [LlmCall(ts=3600.0 * i, trace_id="t", span_id="s", project="shop", cost_usd=1.0)
    ...          for i in range(5)]
    >>> [(f.kind, f.value) for c in calls for f in det.update(c)]
    [('budget_daily_burn_rate', 32.0), ('budget_daily_50pct', 5.0)]
    """

    name: ClassVar[str] = "budget"
    partition_by: ClassVar[str] = "project"
    accepts: ClassVar[tuple[type, ...]] = (LlmCall,)
    llm_call_reads: ClassVar[frozenset[str]] = frozenset({"ts", "project", "cost_usd"})

    def __init__(self, *, budgets: Mapping[str, Mapping[str, float]] | None = None,
                 levels: Sequence[float] = (0.5, 0.8, 1.0),
                 burn_min_elapsed_fraction: float = 0.1, burn_resolve_ratio: float = 0.9) -> None:
        budgets = {str(p): {str(k): float(v) for k, v in b.items()}
                   for p, b in (budgets or {}).items()}
        for project, limits in budgets.items():
            unknown = set(limits) - set(_PERIODS)
            if unknown:
                raise ValueError(f"budgets[{project!r}] has unknown keys {sorted(unknown)}; "
                                 f"use {sorted(_PERIODS)}")
            for k, v in limits.items():
                if not v > 0:
                    raise ValueError(f"budgets[{project!r}][{k!r}] must be > 0, got {v}")
        levels = tuple(sorted(float(x) for x in levels))
        if not levels or any(not x > 0 for x in levels) or len(set(levels)) != len(levels):
            raise ValueError(f"levels must be distinct positive fractions, got {levels}")
        if not 0 <= burn_min_elapsed_fraction < 1:
            raise ValueError("burn_min_elapsed_fraction must be in [0, 1), "
                             f"got {burn_min_elapsed_fraction}")
        if not 0 < burn_resolve_ratio <= 1:
            raise ValueError(f"burn_resolve_ratio must be in (0, 1], got {burn_resolve_ratio}")
        self.budgets = budgets
        self.levels = levels
        self.burn_min_elapsed_fraction = float(burn_min_elapsed_fraction)
        self.burn_resolve_ratio = float(burn_resolve_ratio)
        self._scratch: list[Finding] = []
        self._periods: dict[str, list[_BudgetPeriod]] = {
            project: [_BudgetPeriod(project, _PERIODS[k], v) for k, v in sorted(limits.items())]
            for project, limits in budgets.items()}

    def state_size(self) -> int:
        return sum(len(p) for p in self._periods.values())

    def update(self, event: LlmCall) -> Sequence[Finding]:
        periods = self._periods.get(event.project)
        if periods is None:
            return ()
        findings = self._scratch  # reused: a fresh list per event is GC pressure
        findings.clear()
        ts = event.ts
        for p in periods:
            if ts >= p.end or p.end == _INF:
                self._roll(p, ts, findings)
            elif ts < p.start:
                continue  # a straggler from a closed period; its spend was already judged
            if ts > p.last_ts:
                p.last_ts = ts
            if ts < p.first_ts:
                p.first_ts = ts
            p.spent += event.cost_usd
            self._judge(p, ts, findings)
        return tuple(findings) if findings else ()

    def _roll(self, p: _BudgetPeriod, ts: float, findings: list[Finding]) -> None:
        for i in range(p.levels_fired):
            findings.append(self._level_finding(p, ts, self.levels[i], resolved=True))
        if p.burn_firing:
            findings.append(self._burn_finding(p, ts, projected=p.spent, resolved=True))
        p.start, p.end = period_bounds(p.period, ts)
        p.spent = 0.0
        p.first_ts = ts
        p.levels_fired = 0
        p.burn_firing = False

    def _judge(self, p: _BudgetPeriod, ts: float, findings: list[Finding]) -> None:
        budget = p.budget_usd
        while p.levels_fired < len(self.levels) and p.spent >= self.levels[p.levels_fired] * budget:
            findings.append(self._level_finding(p, ts, self.levels[p.levels_fired],
                                                resolved=False))
            p.levels_fired += 1
        observed = ts - max(p.start, p.first_ts)
        if observed <= 0 or observed < self.burn_min_elapsed_fraction * (p.end - p.start):
            return
        projected = p.spent + p.spent / observed * (p.end - ts)
        if p.burn_firing:
            if projected < self.burn_resolve_ratio * budget:
                p.burn_firing = False
                findings.append(self._burn_finding(p, ts, projected=projected, resolved=True))
        elif projected > budget and p.spent < budget:
            p.burn_firing = True
            findings.append(self._burn_finding(p, ts, projected=projected, resolved=False))

    @staticmethod
    def _evidence(p: _BudgetPeriod, **burn: float | None) -> dict[str, Any]:
        return BudgetEvidence(project=p.project, period=p.period, period_start=p.start,
                              period_end=p.end, budget_usd=p.budget_usd, spent_usd=p.spent,
                              spent_fraction=p.spent / p.budget_usd, **burn).to_mapping()

    def _level_finding(self, p: _BudgetPeriod, ts: float, level: float, *,
                       resolved: bool) -> Finding:
        severity = (Severity.INFO if resolved or level < 0.8 else
                    Severity.WARNING if level < 1.0 else Severity.CRITICAL)
        return Finding(detector=self.name, key=key_string(("project",), (p.project,)),
                       kind=f"budget_{p.period}_{round(level * 100)}pct", severity=severity,
                       ts=ts, value=p.spent, threshold=level * p.budget_usd,
                       evidence=self._evidence(p), resolved=resolved)

    def _burn_finding(self, p: _BudgetPeriod, ts: float, *, projected: float,
                      resolved: bool) -> Finding:
        observed = max(ts - max(p.start, p.first_ts), 1e-9)
        exhaustion = None
        if not resolved and p.spent > 0:
            exhaustion = ts + (p.budget_usd - p.spent) * observed / p.spent
        evidence = self._evidence(p, projected_usd=projected,
                                  burn_rate_usd_per_h=p.spent / observed * 3600.0,
                                  observed_s=observed, projected_exhaustion_ts=exhaustion)
        return Finding(detector=self.name, key=key_string(("project",), (p.project,)),
                       kind=f"budget_{p.period}_burn_rate",
                       severity=Severity.INFO if resolved else Severity.WARNING, ts=ts,
                       value=projected, threshold=p.budget_usd, evidence=evidence,
                       resolved=resolved)

    def snapshot(self) -> dict[str, Any]:
        return {"version": 1, "periods": [
            [p.project, p.period, _json_float(p.start), _json_float(p.end), p.spent,
             _json_float(p.first_ts), p.levels_fired, p.burn_firing, _json_float(p.last_ts)]
            for periods in self._periods.values() for p in periods]}

    def restore(self, snap: dict[str, Any]) -> None:
        self._periods = {project: [_BudgetPeriod(project, _PERIODS[k], v)
                                   for k, v in sorted(limits.items())]
                         for project, limits in self.budgets.items()}
        by_name = {(p.project, p.period): p for ps in self._periods.values() for p in ps}
        for project, period, start, end, spent, first_ts, fired, burn, last_ts in snap.get(
                "periods", []):
            p = by_name.get((project, period))
            if p is None:
                continue  # budget removed from config since the checkpoint
            p.start, p.end, p.first_ts = _float(start), _float(end), _float(first_ts)
            p.spent, p.levels_fired, p.burn_firing = float(spent), int(fired), bool(burn)
            p.last_ts = -_INF if last_ts is None else float(last_ts)  # -inf: no spend yet


def _json_float(x: float) -> float | None:
    return None if math.isinf(x) else x


def _float(x: float | None) -> float:
    return _INF if x is None else float(x)


# --------------------------------------------------------------------------------------------
# Retry storms


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryStormEvidence(Evidence):
    """One client's repeats of one prompt: how many, over what time, and the cost wasted.

    ``trace_ids`` lists the first few traces of the storm.
    """

    prompt_hash: str
    calls: int
    retries: int
    wasted_cost_usd: float
    first_ts: float
    last_ts: float
    trace_ids: tuple[str, ...]
    project: str
    service: str
    user: str
    session: str


_CLIENT_FIELDS = ("project", "service", "user", "session")


class _Repeat:
    __slots__ = ("first_ts", "last_ts", "count", "wasted_usd", "firing", "trace_ids", "client")

    def __init__(self, ts: float, trace_id: str, client: tuple[str, str, str, str]) -> None:
        self.first_ts = self.last_ts = ts
        self.count = 1
        self.wasted_usd = 0.0
        self.firing = False
        self.trace_ids = [trace_id]
        self.client = client


class RetryStormDetector:
    """The same prompt from the same client repeated within seconds, and the cost it wasted.

    The repeat key is (project, service, user, session, input tokens, prompt hash). The input token
    count is in it because prompts are stored truncated: two different requests that share a
    long system prompt truncate to the same text, but not to the same token count.

    A storm fires once when ``min_repeats`` identical calls have each followed the previous within
    ``window_s``, and resolves (with the final count and wasted cost) once the gap exceeds it.

    Parameters
    ----------
    window_s : float
        Largest gap between two identical calls that still counts as a retry.
    min_repeats : int
        Identical calls (the first included) that make a storm.
    max_entries : int
        Most distinct (client, prompt) entries held; entries expire ``window_s`` after their
        last call.

    Examples
    --------
    >>> det = RetryStormDetector(min_repeats=3)
    >>> calls = [LlmCall(ts=2.0 * i, trace_id=f"t{i}", span_id="s", user="ann", prompt="hi",
    ...                  input_tokens=12, cost_usd=0.25) for i in range(4)]
    >>> [(f.value, f.evidence["wasted_cost_usd"]) for c in calls for f in det.update(c)]
    [(3.0, 0.5)]
    """

    name: ClassVar[str] = "retry_storm"
    partition_by: ClassVar[str] = "project"
    state_caps: ClassVar[tuple[str, ...]] = ("max_entries",)
    accepts: ClassVar[tuple[type, ...]] = (LlmCall,)
    llm_call_reads: ClassVar[frozenset[str]] = frozenset({
        "ts", "trace_id", "project", "service", "user", "session", "input_tokens", "prompt", "cost_usd"})
    _MAX_TRACE_IDS: ClassVar[int] = 5

    def __init__(self, *, window_s: float = 10.0, min_repeats: int = 3,
                 max_entries: int = 100_000) -> None:
        check_positive("window_s", window_s)
        check_at_least("min_repeats", min_repeats, 2)
        check_at_least("max_entries", max_entries, 1)
        self.window_s = float(window_s)
        self.min_repeats = min_repeats
        self.max_entries = max_entries
        self._scratch: list[Finding] = []
        self._repeats: EventTimeLru[tuple, _Repeat] = EventTimeLru(max_entries, window_s)

    def state_size(self) -> int:
        return len(self._repeats)

    def update(self, event: LlmCall) -> Sequence[Finding]:
        ts = event.ts
        repeats = self._repeats
        findings = self._scratch  # reused: a fresh list per event is GC pressure
        findings.clear()
        if repeats.next_sweep_ts <= ts:
            for (_, _, digest), gone in repeats.expire(ts):
                if gone.firing:
                    findings.append(self._finding(gone, digest, ts, resolved=True))
        prompt = event.prompt
        if not prompt:
            return tuple(findings) if findings else ()  # nothing to compare: the instrumentation did not capture prompts
        client = (event.project, event.service, event.user, event.session)
        digest = stable_hash(prompt)
        key = (client, event.input_tokens, digest)
        r = repeats.get(key)
        if r is not None and ts - r.last_ts <= self.window_s:
            r.count += 1
            r.wasted_usd += event.cost_usd
            if ts > r.last_ts:
                r.last_ts = ts
            if len(r.trace_ids) < self._MAX_TRACE_IDS and event.trace_id not in r.trace_ids:
                r.trace_ids.append(event.trace_id)
            if not r.firing and r.count >= self.min_repeats:
                r.firing = True
                findings.append(self._finding(r, digest, ts, resolved=False))
            return tuple(findings) if findings else ()
        if r is not None and r.firing:  # the gap ended the old storm before the sweep saw it
            findings.append(self._finding(r, digest, ts, resolved=True))
        for (_, _, old_digest), gone in repeats.insert(key, _Repeat(ts, event.trace_id, client)):
            if gone.firing:
                findings.append(self._finding(gone, old_digest, ts, resolved=True))
        return tuple(findings) if findings else ()

    def _finding(self, r: _Repeat, digest: str, ts: float, *, resolved: bool) -> Finding:
        project, service, user, session = r.client
        evidence = RetryStormEvidence(
            prompt_hash=digest, calls=r.count, retries=r.count - 1, wasted_cost_usd=r.wasted_usd,
            first_ts=r.first_ts, last_ts=r.last_ts, trace_ids=tuple(r.trace_ids),
            project=project, service=service, user=user, session=session)
        return Finding(
            detector=self.name, key=key_string(_CLIENT_FIELDS, r.client),
            kind="retry_storm", severity=Severity.INFO if resolved else Severity.WARNING, ts=ts,
            value=float(r.count), threshold=float(self.min_repeats),
            evidence=evidence.to_mapping(), resolved=resolved)

    def snapshot(self) -> dict[str, Any]:
        return {"version": 1, "lru": self._repeats.snapshot_meta(), "repeats": [
            [list(client), tokens, digest, r.first_ts, r.last_ts, r.count, r.wasted_usd, r.firing,
             list(r.trace_ids)] for (client, tokens, digest), r in self._repeats.items()]}

    def restore(self, snap: dict[str, Any]) -> None:
        self._repeats.clear()
        self._repeats.restore_meta(snap.get("lru", {}))
        for client, tokens, digest, first_ts, last_ts, count, wasted, firing, traces in snap.get(
                "repeats", []):
            client = tuple(client)
            r = _Repeat(float(first_ts), "", client)
            r.last_ts, r.count, r.wasted_usd = float(last_ts), int(count), float(wasted)
            r.firing, r.trace_ids = bool(firing), list(traces)
            self._repeats.insert((client, int(tokens), digest), r)
