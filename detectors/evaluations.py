"""Evaluation score drops per (service, evaluation name) against the scores' own baseline.

Evaluators (LLM-as-judge, heuristics, user feedback) attach a ``gen_ai.evaluation.result`` to a
model call: a name (``relevance``, ``faithfulness``), a score and/or a label. A prompt change, a
model upgrade or a broken retrieval index shows first as a lower mean score on the evaluations
that already run; this detector reports it.

Per (service, evaluation name) the scores are averaged over tumbling event-time windows of
``window_s``. A closed window with at least ``min_samples`` scores enters the baseline: its mean,
its within-window variance and its count, averaged evenly over the first ``1/alpha`` such
windows and by an EWMA of weight ``alpha`` after that. Once ``baseline_windows`` windows are in,
the open window is judged when its count of scores reaches ``min_samples`` and again each time
it doubles (20, 40, 80, ...: a few looks a window; a look at every score, on a day of windows,
added up to false alarms on steady seeded streams). It fires ``evaluation_score_drop`` when its
mean is under the baseline mean by more than

``allowed_drop = max(min_drop, sigmas x baseline_sd x sqrt(1/n + 1/n_baseline))``

``n`` the window's scores so far, ``baseline_sd`` the square root of the baseline's
within-window variance, ``n_baseline`` the scores the baseline rests on (its mean count per
window times its windows, at most ``(2 - alpha) / alpha`` windows: an EWMA's effective length).
That is ``sigmas`` standard errors of the difference of the two means under the baseline's own
noise (a baseline of three windows is itself uncertain), and never less than ``min_drop`` in the
score's units, so a steady evaluator with near-constant scores does not page on a hair's
change. It fires once; later windows are judged when they close, and the first that closes with
``min_samples`` scores and a drop at or under its allowed drop resolves it. While it fires the
baseline is frozen: a lasting drop stays reported until the scores recover (or the key is
forgotten), it is not learned as the new normal.

Label-only evaluations (no score) and non-finite scores are ignored. The explanation text is
never read: findings carry counts and means only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

from agentwatch.detectors.bounded import EventTimeLru, check_at_least, check_positive
from agentwatch.detectors.evidence import Evidence
from agentwatch.detectors.keys import key_string
from agentwatch.events import Evaluation, Finding, Severity

_KEY_FIELDS = ("service", "evaluation")


@dataclass(frozen=True, slots=True, kw_only=True)
class EvaluationDropEvidence(Evidence):
    """One (service, evaluation name) when its window was judged. Scores' counts and means only.

    ``window_start``/``window_scores``/``window_mean`` describe the window judged: the open one
    on a firing, the one that closed at or above the threshold on a resolution. ``drop`` is
    ``baseline_mean - window_mean`` (negative when the scores rose) and ``allowed_drop`` the
    threshold it was held to; ``baseline_windows`` closed windows make the baseline, resting on
    ``baseline_scores`` (effective) scores. ``reason`` is set on resolutions.
    """

    service: str
    evaluation: str
    window_start: float
    window_s: float
    window_scores: int
    window_mean: float
    baseline_mean: float
    baseline_sd: float
    baseline_windows: int
    baseline_scores: float
    drop: float
    allowed_drop: float
    reason: str | None = None


class _Series:
    __slots__ = ("service", "evaluation", "window", "n", "mean", "m2", "base_mean", "base_var",
                 "base_count", "closed", "firing", "last_ts")

    def __init__(self, service: str, evaluation: str, window: int, ts: float) -> None:
        self.service = service
        self.evaluation = evaluation
        self.window = window  # index (event time // window_s) of the open window
        self.n = 0  # scores in the open window
        self.mean = 0.0  # their mean and sum of squared deviations (Welford)
        self.m2 = 0.0
        self.base_mean = 0.0
        self.base_var = 0.0
        self.base_count = 0.0  # scores per baseline window
        self.closed = 0  # windows folded into the baseline
        self.firing = False
        self.last_ts = ts

    @property
    def key(self) -> str:
        return key_string(_KEY_FIELDS, (self.service, self.evaluation))


def welford_add(n: int, mean: float, m2: float, x: float) -> tuple[int, float, float]:
    """Count, mean and sum of squared deviations after one more value ``x`` (Welford).

    >>> welford_add(*welford_add(*welford_add(0, 0.0, 0.0, 1.0), 3.0), 5.0)
    (3, 3.0, 8.0)
    """
    n += 1
    delta = x - mean
    mean += delta / n
    m2 += delta * (x - mean)
    return n, mean, m2


def sample_variance(n: int, m2: float) -> float:
    """The unbiased variance of ``n`` values whose squared deviations sum to ``m2`` (0 for n < 2).

    >>> sample_variance(3, 8.0), sample_variance(1, 0.0)
    (4.0, 0.0)
    """
    return m2 / (n - 1) if n > 1 else 0.0


def fold_baseline(base: tuple[float, ...], closed: int, window: tuple[float, ...],
                  alpha: float) -> tuple[float, ...]:
    """The baseline (mean, within-window variance, count) after one more closed window: each
    the plain average of the first ``1/alpha`` windows, an EWMA of weight ``alpha`` after.

    >>> fold_baseline((0.0, 0.0, 0.0), 0, (0.8, 0.04, 20.0), 0.1)
    (0.8, 0.04, 20.0)
    >>> fold_baseline((0.8, 0.04, 20.0), 1, (0.6, 0.02, 40.0), 0.1)
    (0.7, 0.03, 30.0)
    """
    weight = max(alpha, 1.0 / (closed + 1))
    return tuple(b + weight * (w - b) for b, w in zip(base, window))


def baseline_scores(base_count: float, closed: int, alpha: float) -> float:
    """How many scores the baseline mean rests on: scores per window times the windows it
    averages, at most ``(2 - alpha) / alpha`` of them (the effective length of an EWMA).

    >>> baseline_scores(30.0, 3, 0.1), round(baseline_scores(30.0, 100, 0.1), 6)
    (90.0, 570.0)
    """
    return base_count * min(closed, (2.0 - alpha) / alpha)


def allowed_drop(base_var: float, n: int, n_baseline: float, *, sigmas: float,
                 min_drop: float) -> float:
    """How far under the baseline mean a window mean of ``n`` scores may fall: ``sigmas``
    standard errors of the difference between it and a baseline mean of ``n_baseline`` scores
    under the baseline's variance, at least ``min_drop``.

    >>> allowed_drop(0.04, 20, 80.0, sigmas=4.0, min_drop=0.05)
    0.2
    >>> allowed_drop(0.0, 20, 80.0, sigmas=4.0, min_drop=0.05)
    0.05
    """
    return max(min_drop, sigmas * math.sqrt(max(base_var, 0.0) * (1.0 / n + 1.0 / n_baseline)))


def is_look(n: int, min_samples: int) -> bool:
    """Whether a window is judged at its ``n``-th score: ``min_samples`` times a power of two.

    >>> [n for n in range(1, 100) if is_look(n, 20)]
    [20, 40, 80]
    """
    q, r = divmod(n, min_samples)
    return r == 0 and q > 0 and q & (q - 1) == 0


class EvaluationDropDetector:
    """Mean evaluation scores per (service, evaluation name) dropping under their baseline.

    See the module docstring for the statistic. Findings' ``value`` is the drop
    (``baseline_mean - window_mean``), ``threshold`` the allowed drop, so a raised finding has
    ``value > threshold``. Severity is ``warning``, ``info`` on resolutions.

    Parameters
    ----------
    window_s : float
        Length of the tumbling score windows (event time).
    min_samples : int
        Scores a window needs to be judged or to enter the baseline.
    baseline_windows : int
        Windows (each with ``min_samples`` scores) a key needs before it is judged.
    sigmas : float
        Standard errors of the difference of the means a drop must exceed... (5 by default:
        pass/fail scores are skewed, a window of 20 at an 80 % pass rate falls far more often
        than a normal tail says; at 4, two days of hourly windows from a steady 80 % judge
        fired in 2 of 200 seeded runs, at 5 in none).
    min_drop : float
        ...and this much, in the score's units (0.05 on a 0-1 scale is five points).
    alpha : float
        EWMA weight of a closed window (the first ``1/alpha`` windows are averaged evenly).
    max_keys : int
        Most (service, evaluation name) keys held (least recently scored go first).
    key_ttl_s : float
        Keys without scores for this long (event time) are forgotten, resolving what they had
        firing.

    Attributes
    ----------
    evicted_keys : int
        Keys pushed out by ``max_keys`` (not counting TTL expiry): a growing count means the cap
        is too small for the traffic.

    Examples
    --------
    >>> det = EvaluationDropDetector(window_s=60.0, min_samples=4, baseline_windows=2)
    >>> scores = [0.9, 0.7, 0.9, 0.7] * 2 + [0.4, 0.3, 0.4, 0.3]  # baseline 0.8, sd 0.1155
    >>> events = [Evaluation(ts=15.0 * i, trace_id="t", span_id=str(i), service="rag",
    ...                      name="relevance", score=s) for i, s in enumerate(scores)]
    >>> [(i, f.kind, f.key, round(f.value, 2), round(f.threshold, 4))
    ...  for i, e in enumerate(events) for f in det.update(e)]
    [(11, 'evaluation_score_drop', 'service=rag/evaluation=relevance', 0.45, 0.3536)]
    """

    name: ClassVar[str] = "evaluation_drop"
    partition_by: ClassVar[str] = "service"
    # Constructor arguments that bound the state: split over the partitions of its stage.
    state_caps: ClassVar[tuple[str, ...]] = ("max_keys",)
    accepts: ClassVar[tuple[type, ...]] = (Evaluation,)

    def __init__(self, *, window_s: float = 3_600.0, min_samples: int = 20,
                 baseline_windows: int = 3, sigmas: float = 5.0, min_drop: float = 0.05,
                 alpha: float = 0.1, max_keys: int = 10_000,
                 key_ttl_s: float = 7 * 86_400.0) -> None:
        check_positive("window_s", window_s)
        check_at_least("min_samples", min_samples, 2)
        check_at_least("baseline_windows", baseline_windows, 1)
        check_positive("sigmas", sigmas)
        check_positive("min_drop", min_drop, allow_zero=True)
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        check_at_least("max_keys", max_keys, 1)
        check_positive("key_ttl_s", key_ttl_s)
        self.window_s = float(window_s)
        self.min_samples = min_samples
        self.baseline_windows = baseline_windows
        self.sigmas = float(sigmas)
        self.min_drop = float(min_drop)
        self.alpha = float(alpha)
        self.max_keys = max_keys
        self.key_ttl_s = float(key_ttl_s)
        self.evicted_keys = 0
        self._scratch: list[Finding] = []
        self._series: EventTimeLru[tuple[str, str], _Series] = EventTimeLru(max_keys, key_ttl_s)

    def state_size(self) -> int:
        return len(self._series)

    def _n_baseline(self, s: _Series) -> float:
        return baseline_scores(s.base_count, s.closed, self.alpha)

    def _allowed(self, s: _Series, n: int) -> float:
        return allowed_drop(s.base_var, n, self._n_baseline(s), sigmas=self.sigmas,
                            min_drop=self.min_drop)

    def update(self, event: Evaluation) -> Sequence[Finding]:
        ts = event.ts
        findings = self._scratch  # reused: a fresh list per event is GC pressure
        findings.clear()
        series = self._series
        if series.next_sweep_ts <= ts:
            for _, gone in series.expire(ts):
                self._forget(gone, ts, "no scores within key_ttl_s", findings)
        score = event.score
        if score is None or not math.isfinite(score):  # a label only: nothing to average
            return tuple(findings) if findings else ()
        window = int(ts // self.window_s)
        key = (event.service, event.name)
        s = series.get(key)
        if s is None:
            s = _Series(event.service, event.name, window, ts)
            for _, gone in series.insert(key, s):
                self.evicted_keys += 1
                self._forget(gone, ts, "evicted: max_keys reached", findings)
        elif window > s.window:
            self._close(s, window, ts, findings)
        if ts > s.last_ts:
            s.last_ts = ts
        # A straggler older than the open window is counted in it: windows close on a later
        # window's first score, so it has nowhere else to go.
        s.n, s.mean, s.m2 = welford_add(s.n, s.mean, s.m2, float(score))
        if not s.firing and s.closed >= self.baseline_windows and is_look(s.n, self.min_samples):
            drop, allowed = s.base_mean - s.mean, self._allowed(s, s.n)
            if drop > allowed:
                s.firing = True
                findings.append(self._finding(s, ts, drop, allowed))
        return tuple(findings) if findings else ()

    def _close(self, s: _Series, window: int, ts: float, findings: list[Finding]) -> None:
        """Close the open window of ``s``; ``window`` opens."""
        if s.n >= self.min_samples:
            if s.firing:
                drop, allowed = s.base_mean - s.mean, self._allowed(s, s.n)
                if drop <= allowed:
                    s.firing = False
                    findings.append(self._finding(s, ts, drop, allowed, resolved=True,
                                                  reason="window closed at or above the threshold"))
            else:
                s.base_mean, s.base_var, s.base_count = fold_baseline(
                    (s.base_mean, s.base_var, s.base_count), s.closed,
                    (s.mean, sample_variance(s.n, s.m2), float(s.n)), self.alpha)
                s.closed += 1
        s.window = window
        s.n, s.mean, s.m2 = 0, 0.0, 0.0

    def _forget(self, s: _Series, ts: float, reason: str, findings: list[Finding]) -> None:
        if not s.firing:
            return
        s.firing = False
        n = max(s.n, 1)
        findings.append(self._finding(s, ts, s.base_mean - s.mean if s.n else 0.0,
                                      self._allowed(s, n), resolved=True, reason=reason))

    def _finding(self, s: _Series, ts: float, drop: float, allowed: float, *,
                 resolved: bool = False, reason: str | None = None) -> Finding:
        evidence = EvaluationDropEvidence(
            service=s.service, evaluation=s.evaluation, window_start=s.window * self.window_s,
            window_s=self.window_s, window_scores=s.n, window_mean=s.mean,
            baseline_mean=s.base_mean, baseline_sd=math.sqrt(max(s.base_var, 0.0)),
            baseline_windows=s.closed, baseline_scores=self._n_baseline(s), drop=drop,
            allowed_drop=allowed, reason=reason)
        return Finding(detector=self.name, key=s.key, kind="evaluation_score_drop",
                       severity=Severity.INFO if resolved else Severity.WARNING, ts=ts,
                       value=float(drop), threshold=float(allowed),
                       evidence=evidence.to_mapping(), resolved=resolved)

    def snapshot(self) -> dict[str, Any]:
        return {
            "version": 1,
            "evicted": self.evicted_keys,
            "lru": self._series.snapshot_meta(),
            "series": [[s.service, s.evaluation, s.window, s.n, s.mean, s.m2, s.base_mean,
                        s.base_var, s.base_count, s.closed, s.firing, s.last_ts]
                       for _, s in self._series.items()],
        }

    def restore(self, snap: dict[str, Any]) -> None:
        self._series.clear()
        self.evicted_keys = int(snap.get("evicted", 0))
        self._series.restore_meta(snap.get("lru", {}))
        for (service, evaluation, window, n, mean, m2, base_mean, base_var, base_count, closed,
             firing, last_ts) in snap.get("series", []):
            s = _Series(str(service), str(evaluation), int(window), float(last_ts))
            s.n, s.mean, s.m2 = int(n), float(mean), float(m2)
            s.base_mean, s.base_var, s.closed = float(base_mean), float(base_var), int(closed)
            s.base_count = float(base_count)
            s.firing = bool(firing)
            self._series.insert((s.service, s.evaluation), s)  # in LRU order; caps may have shrunk
