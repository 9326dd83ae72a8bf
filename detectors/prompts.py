"""A new prompt version doing worse than the one before it: cost, latency, errors, scores.

Prompt management tools (Langfuse, OpenLLMetry, the ``gen_ai.prompt.name``/``version``
attributes) tag each model call with the managed prompt and its version, and evaluators tag
their scores the same way. When a team ships version 8 of ``support-answer``, the question is
whether it is worse than version 7: dearer per call, slower, failing more, or scored lower.

Per (service, prompt name) this detector keeps, per version, the calls and errors and bounded
uniform samples (reservoirs) of the cost per call, the latency and the evaluation score. When a
version it has not seen appears, it is compared with the version the prompt was last used with
before it (its predecessor; after a rollback that is the version rolled back to). Each metric
is tested once both versions have ``min_samples`` values of it, and again each time the new
version's count of it doubles, ``looks`` times in all (30, 60, 120, 240 values by default); a
version that passed its last look is not tested again:

- cost per call and latency (higher is worse) and score (lower is worse): a one-sided
  Mann-Whitney U test of the new version's sample against the predecessor's (rank based: cost
  and latency are skewed, scores are often a few discrete levels, and ties are corrected for);
- error rate: a one-sided Fisher exact test on the exact counts (error counts are small at these
  sample sizes, where a two-proportion z-test fires far more often than its level says).

``alpha`` is the false-finding rate of a whole comparison (four metrics, ``looks`` looks each),
so each test is held to ``alpha / (4 x looks)`` (Bonferroni): identical versions must stay
quiet, and at ``alpha`` per test the sixteen tests of a comparison fire on about one equal
version in ten (measured: 0.01 per test, 200 seeded pairs of equal heavy-tailed versions). The
default 0.001 keeps a false finding to about one comparison in a thousand or fewer. A metric
regressed when its p-value is under that level AND the new version's mean is worse than the
predecessor's by more than ``min_effect`` of it (0.2: 20 % dearer, slower, more errors or a
lower score); a predecessor mean of 0 makes any significant worsening count. The first test with
a regressed metric fires ``prompt_version_regression`` naming the regressed metrics; the new
version is then not tested again. It resolves when a newer version appears or the prompt is
forgotten.

Findings' ``value``/``threshold``: the deciding metric's (smallest p-value among the regressed)
one-sided p-value as a standard-normal quantile, ``norm.isf(p)``, against the per-test level's,
``norm.isf(alpha / (4 x looks))`` (3.84 for the default 0.001 and 4 looks): a raised finding has
``value > threshold``, and both read like z-scores for every test. The p-values, means, sample
sizes and test statistics of every metric tested are in the evidence.

Calls and evaluations without a prompt name or version are ignored.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

from scipy.stats import fisher_exact, mannwhitneyu, norm

from agentwatch.detectors.bounded import EventTimeLru, check_at_least, check_positive
from agentwatch.detectors.evidence import Evidence
from agentwatch.detectors.keys import key_string
from agentwatch.events import Evaluation, Finding, LlmCall, Severity

_KEY_FIELDS = ("service", "prompt")
# Metrics in test order; the sampled ones index _Version.samples.
COST, LATENCY, SCORE, ERROR_RATE = "cost", "latency", "score", "error_rate"
_SAMPLED = (COST, LATENCY, SCORE)
_METRICS = (COST, LATENCY, ERROR_RATE, SCORE)
_HIGHER_IS_WORSE = {COST: True, LATENCY: True, ERROR_RATE: True, SCORE: False}
# p-values under this are reported as it: norm.isf(0) is infinite, and JSON has no infinity.
_P_FLOOR = 1e-300
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True, kw_only=True)
class PromptVersionEvidence(Evidence):
    """A new prompt version compared with its predecessor.

    ``metrics`` are the regressed metrics (``cost``, ``latency``, ``error_rate``, ``score``),
    ``deciding_metric`` the one whose p-value is the finding's value; ``alpha`` is the level of
    the whole comparison and ``alpha_per_test`` each test's. The tuples from ``checked`` on are
    parallel, one entry per metric tested at this comparison: the ``tests``
    (``mann_whitney_u`` or ``fisher_exact``) and their ``statistics`` (U of the new version's
    sample, or its error count) and one-sided ``p_values``; the ``previous_means``/``new_means``
    over
    every value seen (cost in USD per priced call, latency in ms, error rate, score),
    ``relative_changes`` towards worse (None when the previous mean is 0) and the sample sizes.
    A resolution repeats ``metrics`` and ``deciding_metric`` of the finding it ends, with empty
    tuples and a ``reason``.
    """

    service: str
    prompt_name: str
    version: str
    previous_version: str
    metrics: tuple[str, ...]
    deciding_metric: str
    alpha: float
    alpha_per_test: float
    min_effect: float
    checked: tuple[str, ...]
    tests: tuple[str, ...]
    statistics: tuple[float, ...]
    p_values: tuple[float, ...]
    previous_means: tuple[float, ...]
    new_means: tuple[float, ...]
    relative_changes: tuple[float | None, ...]
    previous_samples: tuple[int, ...]
    new_samples: tuple[int, ...]
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class MetricComparison:
    """One metric of two versions tested (:func:`compare_samples`, :func:`compare_error_rates`)."""

    metric: str
    test: str
    statistic: float
    p_value: float
    previous_mean: float
    new_mean: float
    relative_change: float | None
    previous_samples: int
    new_samples: int


def splitmix64(x: int) -> int:
    """A well-mixed 64-bit hash of the integer ``x`` (SplitMix64's finaliser): the reservoir's
    "random" slot choice, the same in every process and after a restore.

    >>> splitmix64(0), splitmix64(1) != splitmix64(2)
    (16294208416658607535, True)
    """
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def reservoir_slot(index: int, size: int) -> int | None:
    """Where value number ``index`` (0-based) goes in a reservoir of ``size`` (Algorithm R):
    appended while there is room, else slot ``j`` of a uniform ``j`` in ``[0, index]`` when
    ``j < size``, else dropped (None). Every value seen stays with probability ``size / seen``.

    >>> reservoir_slot(3, 10), [reservoir_slot(i, 2) for i in range(2, 7)]
    (3, [1, 1, None, None, None])
    """
    if index < size:
        return index
    j = splitmix64(index) % (index + 1)
    return j if j < size else None


def relative_worsening(previous: float, new: float, *, higher_is_worse: bool) -> float | None:
    """How much worse ``new`` is than ``previous``, as a fraction of ``previous`` (negative when
    better); None when ``previous`` is 0.

    >>> relative_worsening(0.010, 0.013, higher_is_worse=True)
    0.3
    >>> relative_worsening(0.8, 0.6, higher_is_worse=False)
    0.25
    """
    if previous == 0:
        return None
    diff = new - previous if higher_is_worse else previous - new
    return round(diff / abs(previous), 12)


def p_to_z(p: float) -> float:
    """A one-sided p-value as the standard-normal quantile it corresponds to, ``norm.isf(p)``
    (p under 1e-300 counts as 1e-300, so the result stays finite).

    >>> round(p_to_z(0.01), 4), p_to_z(0.5), round(p_to_z(0.0), 2)
    (2.3263, 0.0, 37.05)
    """
    return float(norm.isf(max(p, _P_FLOOR)))


def compare_samples(metric: str, previous: Sequence[float], new: Sequence[float], *,
                    previous_mean: float, new_mean: float, previous_count: int,
                    new_count: int, higher_is_worse: bool) -> MetricComparison:
    """One-sided Mann-Whitney U test that ``new`` tends to be worse (larger when
    ``higher_is_worse``, else smaller) than ``previous``, with the tie correction and the
    normal approximation (continuity corrected). The means and counts are of every value
    seen, the samples are what the reservoirs kept of them.

    >>> c = compare_samples("latency", [1.0, 2.0, 3.0] * 10, [3.0, 4.0, 5.0] * 10,
    ...                     previous_mean=2.0, new_mean=4.0, previous_count=30, new_count=30,
    ...                     higher_is_worse=True)
    >>> c.statistic, c.p_value < 1e-9, c.relative_change
    (850.0, True, 1.0)
    """
    result = mannwhitneyu(new, previous, alternative="greater" if higher_is_worse else "less",
                          method="asymptotic")
    p = float(result.pvalue)
    if not math.isfinite(p):  # every value equal on both sides: nothing to tell them apart
        p = 1.0
    return MetricComparison(
        metric=metric, test="mann_whitney_u", statistic=float(result.statistic), p_value=p,
        previous_mean=previous_mean, new_mean=new_mean,
        relative_change=relative_worsening(previous_mean, new_mean,
                                           higher_is_worse=higher_is_worse),
        previous_samples=previous_count, new_samples=new_count)


def compare_error_rates(previous_errors: int, previous_calls: int, new_errors: int,
                        new_calls: int) -> MetricComparison:
    """One-sided Fisher exact test that the new error rate is higher: the probability, with the
    margins of the 2x2 table fixed, of the new version having at least its error count
    (hypergeometric upper tail). The statistic is the new version's error count.

    >>> c = compare_error_rates(3, 100, 15, 100)
    >>> c.statistic, round(c.p_value, 5), c.relative_change
    (15.0, 0.0026, 4.0)
    """
    p_prev, p_new = previous_errors / previous_calls, new_errors / new_calls
    table = [[new_errors, new_calls - new_errors],
             [previous_errors, previous_calls - previous_errors]]
    p = float(fisher_exact(table, alternative="greater")[1])
    return MetricComparison(
        metric=ERROR_RATE, test="fisher_exact", statistic=float(new_errors), p_value=min(p, 1.0),
        previous_mean=p_prev, new_mean=p_new,
        relative_change=relative_worsening(p_prev, p_new, higher_is_worse=True),
        previous_samples=previous_calls, new_samples=new_calls)


def is_regression(c: MetricComparison, *, alpha: float, min_effect: float) -> bool:
    """Significant at ``alpha`` and worse by more than ``min_effect`` of the previous mean (any
    worsening when that mean is 0).

    >>> c = compare_error_rates(3, 100, 15, 100)
    >>> is_regression(c, alpha=0.01, min_effect=0.2), is_regression(c, alpha=0.001, min_effect=0.2)
    (True, False)
    >>> is_regression(c, alpha=0.01, min_effect=5.0)
    False
    """
    if not c.p_value < alpha:
        return False
    if c.relative_change is None:
        if _HIGHER_IS_WORSE[c.metric]:
            return c.new_mean > c.previous_mean
        return c.new_mean < c.previous_mean
    return c.relative_change > min_effect


class _Reservoir:
    __slots__ = ("seen", "total", "values")

    def __init__(self) -> None:
        self.seen = 0
        self.total = 0.0  # of every value seen: the exact mean
        self.values = array("d")

    def add(self, x: float, size: int) -> None:
        slot = reservoir_slot(self.seen, size)
        if slot is not None:
            if slot >= len(self.values):  # room left (or a reservoir_size raised since a restore)
                self.values.append(x)
            else:
                self.values[slot] = x
        self.seen += 1
        self.total += x

    @property
    def mean(self) -> float:
        return self.total / self.seen if self.seen else 0.0


class _Version:
    __slots__ = ("name", "first_ts", "last_ts", "calls", "errors", "samples", "next_check",
                 "looks")

    def __init__(self, name: str, ts: float, min_samples: int) -> None:
        self.name = name
        self.first_ts = self.last_ts = ts
        self.calls = 0
        self.errors = 0
        self.samples = tuple(_Reservoir() for _ in _SAMPLED)  # cost, latency, score
        # Per metric (in _METRICS order): the count of it at which it is next tested.
        self.next_check = [min_samples] * len(_METRICS)
        self.looks = [0] * len(_METRICS)  # tests done per metric

    def count(self, metric: str) -> int:
        return self.calls if metric == ERROR_RATE else self.samples[_SAMPLED.index(metric)].seen


class _Prompt:
    __slots__ = ("service", "prompt_name", "versions", "newest", "previous", "firing",
                 "fired_metrics", "fired_deciding", "fired_value", "fired_threshold", "last_ts")

    def __init__(self, service: str, prompt_name: str, ts: float) -> None:
        self.service = service
        self.prompt_name = prompt_name
        self.versions: dict[str, _Version] = {}
        self.newest = ""  # the version under test
        self.previous = ""  # its predecessor ("" for a prompt's first version)
        self.firing = False
        self.fired_metrics: tuple[str, ...] = ()
        self.fired_deciding = ""
        self.fired_value = 0.0
        self.fired_threshold = 0.0
        self.last_ts = ts

    @property
    def key(self) -> str:
        return key_string(_KEY_FIELDS, (self.service, self.prompt_name))


class PromptVersionRegressionDetector:
    """A new version of a managed prompt worse than its predecessor (two-sample tests).

    See the module docstring for the tests and the decision. Severity is ``warning``, ``info``
    on resolutions.

    Parameters
    ----------
    min_samples : int
        Values of a metric each version needs before the metric is tested.
    alpha : float
        Significance level of a whole comparison; each of its tests gets
        ``alpha / (4 x looks)``.
    min_effect : float
        The new version's mean must be worse by more than this fraction of the predecessor's.
    looks : int
        Tests per metric of a new version: at ``min_samples`` values, then each time its count
        doubles.
    reservoir_size : int
        Values of cost, latency and score kept per version (a uniform sample of all seen).
    max_versions : int
        Versions held per prompt (the one under test and its predecessor are always kept; the
        least recently used other one goes first). A version pushed out is new again if it
        returns.
    max_prompts : int
        Most (service, prompt name) keys held (least recently used go first).
    key_ttl_s : float
        Prompts without calls or scores for this long (event time) are forgotten.

    Attributes
    ----------
    evicted_prompts, evicted_versions : int
        Prompts pushed out by ``max_prompts`` and versions by ``max_versions`` (not counting TTL
        expiry): a growing count means the caps are too small for the traffic.

    Examples
    --------
    >>> det = PromptVersionRegressionDetector(min_samples=30)
    >>> def call(i, version, cost):
    ...     return LlmCall(ts=float(i), trace_id=str(i), span_id="s", service="support",
    ...                    prompt_name="answer", prompt_version=version, cost_usd=cost,
    ...                    priced=True, latency_ms=800.0 + i % 7)
    >>> calls = [call(i, "v7", 0.010 + 0.001 * (i % 5)) for i in range(40)]
    >>> calls += [call(40 + i, "v8", 0.015 + 0.001 * (i % 5)) for i in range(30)]
    >>> [(i, f.key, f.evidence["metrics"], round(f.value, 2), round(f.threshold, 2))
    ...  for i, c in enumerate(calls) for f in det.update(c)]
    [(69, 'service=support/prompt=answer', ['cost'], 7.15, 3.84)]
    """

    name: ClassVar[str] = "prompt_version_regression"
    partition_by: ClassVar[str] = "service"
    # Constructor arguments that bound the state: split over the partitions of its stage.
    state_caps: ClassVar[tuple[str, ...]] = ("max_prompts",)
    accepts: ClassVar[tuple[type, ...]] = (LlmCall, Evaluation)
    llm_call_reads: ClassVar[frozenset[str]] = frozenset({
        "ts", "service", "prompt_name", "prompt_version", "status", "invalid_fields", "cost_usd", "priced",
        "latency_ms"})

    def __init__(self, *, min_samples: int = 30, alpha: float = 0.001, min_effect: float = 0.2,
                 looks: int = 4, reservoir_size: int = 200, max_versions: int = 4,
                 max_prompts: int = 2_000,
                 key_ttl_s: float = 30 * 86_400.0) -> None:
        check_at_least("min_samples", min_samples, 2)
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        check_positive("min_effect", min_effect, allow_zero=True)
        check_at_least("looks", looks, 1)
        check_at_least("reservoir_size", reservoir_size, min_samples)
        check_at_least("max_versions", max_versions, 2)
        check_at_least("max_prompts", max_prompts, 1)
        check_positive("key_ttl_s", key_ttl_s)
        self.min_samples = min_samples
        self.alpha = float(alpha)
        self.min_effect = float(min_effect)
        self.looks = looks
        self.reservoir_size = reservoir_size
        self.max_versions = max_versions
        self.max_prompts = max_prompts
        self.key_ttl_s = float(key_ttl_s)
        self.evicted_prompts = 0
        self.evicted_versions = 0
        self._alpha_per_test = self.alpha / (len(_METRICS) * looks)
        self._threshold = p_to_z(self._alpha_per_test)
        self._scratch: list[Finding] = []
        self._prompts: EventTimeLru[tuple[str, str], _Prompt] = EventTimeLru(max_prompts, key_ttl_s)

    def state_size(self) -> int:
        return sum(1 + len(p.versions) for _, p in self._prompts.items())

    def update(self, event: LlmCall | Evaluation) -> Sequence[Finding]:
        ts = event.ts
        findings = self._scratch  # reused: a fresh list per event is GC pressure
        findings.clear()
        prompts = self._prompts
        if prompts.next_sweep_ts <= ts:
            for _, gone in prompts.expire(ts):
                self._resolve(gone, ts, "no calls or scores within key_ttl_s", findings)
        prompt_name, version_name = event.prompt_name, event.prompt_version
        if not prompt_name or not version_name:
            return tuple(findings) if findings else ()
        if isinstance(event, Evaluation):
            score = event.score
            if score is None or not math.isfinite(score):  # a label only
                return tuple(findings) if findings else ()
        key = (event.service, prompt_name)
        p = prompts.get(key)
        if p is None:
            p = _Prompt(event.service, prompt_name, ts)
            for _, gone in prompts.insert(key, p):
                self.evicted_prompts += 1
                self._resolve(gone, ts, "evicted: max_prompts reached", findings)
        if ts > p.last_ts:
            p.last_ts = ts
        v = p.versions.get(version_name)
        if v is None:
            v = self._new_version(p, version_name, ts, findings)
        elif ts > v.last_ts:
            v.last_ts = ts
        size = self.reservoir_size
        if isinstance(event, Evaluation):
            v.samples[2].add(float(event.score), size)  # type: ignore[arg-type]
            touched: tuple[str, ...] = (SCORE,)
        else:
            v.calls += 1
            if event.status == "error":
                v.errors += 1
            invalid = event.invalid_fields
            # An unpriced call's cost (0) and a nulled latency are unknown, not cheap or fast.
            if (event.priced or event.cost_usd > 0) and "cost_usd:" not in invalid:
                v.samples[0].add(event.cost_usd, size)
            if "latency_ms:" not in invalid:
                v.samples[1].add(event.latency_ms, size)
            touched = (COST, LATENCY, ERROR_RATE)
        if p.firing or not p.previous or version_name != p.newest:
            return tuple(findings) if findings else ()
        previous = p.versions[p.previous]
        due = [m for m in touched
               if v.looks[_METRICS.index(m)] < self.looks
               and v.count(m) >= v.next_check[_METRICS.index(m)]
               and previous.count(m) >= self.min_samples]
        if not due:
            return tuple(findings) if findings else ()
        comparisons = []
        for metric in due:
            comparisons.append(self._compare(metric, previous, v))
            i = _METRICS.index(metric)
            v.next_check[i] = 2 * v.count(metric)
            v.looks[i] += 1
        regressed = [c for c in comparisons
                     if is_regression(c, alpha=self._alpha_per_test, min_effect=self.min_effect)]
        if regressed:
            deciding = min(regressed, key=lambda c: c.p_value)
            p.firing = True
            p.fired_metrics = tuple(c.metric for c in regressed)
            p.fired_deciding = deciding.metric
            p.fired_value = p_to_z(deciding.p_value)
            p.fired_threshold = self._threshold
            findings.append(self._finding(p, ts, comparisons))
        return tuple(findings) if findings else ()

    def _new_version(self, p: _Prompt, name: str, ts: float, findings: list[Finding]) -> _Version:
        if p.versions:
            if p.firing:
                self._resolve(p, ts, f"superseded by version {name}", findings)
            # The predecessor is the version last used before this one appeared (after a
            # rollback, the one rolled back to), not the one first seen last.
            p.previous = max(p.versions.values(), key=lambda v: v.last_ts).name
        p.newest = name
        v = p.versions[name] = _Version(name, ts, self.min_samples)
        if len(p.versions) > self.max_versions:
            keep = (p.newest, p.previous)
            oldest = min((u for u in p.versions.values() if u.name not in keep),
                         key=lambda u: u.last_ts)
            del p.versions[oldest.name]
            self.evicted_versions += 1
        return v

    def _compare(self, metric: str, previous: _Version, new: _Version) -> MetricComparison:
        if metric == ERROR_RATE:
            return compare_error_rates(previous.errors, previous.calls, new.errors, new.calls)
        i = _SAMPLED.index(metric)
        a, b = previous.samples[i], new.samples[i]
        return compare_samples(metric, a.values, b.values, previous_mean=a.mean,
                               new_mean=b.mean, previous_count=a.seen, new_count=b.seen,
                               higher_is_worse=_HIGHER_IS_WORSE[metric])

    def _resolve(self, p: _Prompt, ts: float, reason: str, findings: list[Finding]) -> None:
        if not p.firing:
            return
        p.firing = False
        findings.append(self._finding(p, ts, (), resolved=True, reason=reason))

    def _finding(self, p: _Prompt, ts: float, comparisons: Sequence[MetricComparison], *,
                 resolved: bool = False, reason: str | None = None) -> Finding:
        evidence = PromptVersionEvidence(
            service=p.service, prompt_name=p.prompt_name, version=p.newest,
            previous_version=p.previous, metrics=p.fired_metrics,
            deciding_metric=p.fired_deciding, alpha=self.alpha,
            alpha_per_test=self._alpha_per_test, min_effect=self.min_effect,
            checked=tuple(c.metric for c in comparisons),
            tests=tuple(c.test for c in comparisons),
            statistics=tuple(c.statistic for c in comparisons),
            p_values=tuple(c.p_value for c in comparisons),
            previous_means=tuple(c.previous_mean for c in comparisons),
            new_means=tuple(c.new_mean for c in comparisons),
            relative_changes=tuple(c.relative_change for c in comparisons),
            previous_samples=tuple(c.previous_samples for c in comparisons),
            new_samples=tuple(c.new_samples for c in comparisons), reason=reason)
        return Finding(detector=self.name, key=p.key, kind="prompt_version_regression",
                       severity=Severity.INFO if resolved else Severity.WARNING, ts=ts,
                       value=p.fired_value, threshold=p.fired_threshold,
                       evidence=evidence.to_mapping(), resolved=resolved)

    def snapshot(self) -> dict[str, Any]:
        return {
            "version": 1,
            "evicted": [self.evicted_prompts, self.evicted_versions],
            "lru": self._prompts.snapshot_meta(),
            "prompts": [[p.service, p.prompt_name, p.newest, p.previous, p.firing,
                         list(p.fired_metrics), p.fired_deciding, p.fired_value,
                         p.fired_threshold, p.last_ts,
                         [[v.name, v.first_ts, v.last_ts, v.calls, v.errors, list(v.next_check),
                           list(v.looks),
                           [[r.seen, r.total, r.values.tolist()] for r in v.samples]]
                          for v in p.versions.values()]]
                        for _, p in self._prompts.items()],
        }

    def restore(self, snap: dict[str, Any]) -> None:
        self._prompts.clear()
        self.evicted_prompts, self.evicted_versions = (int(n) for n in snap.get("evicted", [0, 0]))
        self._prompts.restore_meta(snap.get("lru", {}))
        size = self.reservoir_size
        for (service, prompt_name, newest, previous, firing, fired_metrics, fired_deciding,
             fired_value, fired_threshold, last_ts, versions) in snap.get("prompts", []):
            p = _Prompt(str(service), str(prompt_name), float(last_ts))
            p.newest, p.previous, p.firing = str(newest), str(previous), bool(firing)
            p.fired_metrics = tuple(str(m) for m in fired_metrics)
            p.fired_deciding = str(fired_deciding)
            p.fired_value, p.fired_threshold = float(fired_value), float(fired_threshold)
            for name, first_ts, v_last_ts, calls, errors, next_check, looks, samples in versions:
                v = _Version(str(name), float(first_ts), self.min_samples)
                v.last_ts, v.calls, v.errors = float(v_last_ts), int(calls), int(errors)
                v.next_check = [int(n) for n in next_check]
                v.looks = [int(n) for n in looks]
                for r, (seen, total, values) in zip(v.samples, samples):
                    # A smaller reservoir_size since the checkpoint keeps a prefix: still a
                    # sample of what was seen, if no longer a uniform one.
                    r.seen, r.total, r.values = int(seen), float(total), array("d", values[:size])
                p.versions[v.name] = v
            self._prompts.insert((p.service, p.prompt_name), p)  # in LRU order; caps may shrink
