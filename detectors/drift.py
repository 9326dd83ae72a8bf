"""Embedding skew (window vs a reference set) and drift (window vs the previous windows).

Embedding happens outside the detector (the streams side samples prompts per key and window
and embeds them); the detector receives :class:`EmbeddedWindow` events and compares each window
with the reference bound to its key ("skew") and with the pooled previous windows of the same
key ("drift").

One check pools the window (``m`` rows) with a comparison sample (``n`` rows: a seeded
subsample of the reference, drawn once when it is bound, or of the previous windows) and uses
one set of label permutations (drawn once per ``(m, n)``) that calibrates every two-sample
statistic at once:

- ``mmd``: unbiased MMD^2 with an RBF kernel whose bandwidth is the median of the cross
  distances (the median heuristic, as Evidently computes it);
- ``centroid_cosine`` / ``centroid_euclidean``: distance between the two means;
- ``vocab_jsd`` / ``new_token_share``: Jensen-Shannon divergence (bits) of the token
  distributions, and the share of window tokens unseen in the comparison sample.

The permutation null of each is summarised by its mean, spread and skewness and its upper tail
read from the matching Pearson type III distribution, so the threshold at a small ``alpha``
does not need thousands of permutations (a plain empirical p-value is reported next to it).
The other statistics have closed-form nulls:

- ``classifier_auc``: two-fold cross-validated AUC of a shrinkage LDA separating window from
  comparison rows; threshold from the Mann-Whitney null (mean 0.5, known variance);
- ``ood_share`` (skew only): share of window rows whose nearest-reference cosine similarity is
  under the reference's own leave-one-out ``ood_quantile``; binomial tail against that rate;
- ``drifted_components``: share of embedding dimensions whose normed Wasserstein distance
  reaches ``component_threshold``, Evidently's "ratio" method; a fixed
  threshold, as in Evidently, so it is evidence, not a default decision.

A finding is raised when a test in ``skew_decide_on`` / ``drift_decide_on`` rejects at
``alpha`` divided among the deciding tests (Bonferroni), and resolved when it stops doing so.
Its ``value`` and ``threshold`` are those of the statistic that decided (the rejecting one with
the smallest p-value, named in the evidence's ``statistic``), so a raised finding always has
``value > threshold``; every other statistic is in the evidence. Every check, raised or calm,
is also readable after :meth:`DriftDetector.update` as :attr:`DriftDetector.last_checks`, so a
worker can show how close a calm key is to alarming.

Examples
--------
>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> detector = DriftDetector(permutations=100, min_window_size=20)
>>> detector.set_reference("service=shop", rng.normal(size=(300, 8)))
>>> same = EmbeddedWindow("service=shop", 60.0, ("q",) * 100, rng.normal(size=(100, 8)))
>>> detector.update(same)
()
>>> moved = EmbeddedWindow("service=shop", 120.0, ("q",) * 100, rng.normal(1.0, 1.0, (100, 8)))
>>> [(f.kind, f.key) for f in detector.update(moved)]
[('skew', 'service=shop'), ('drift', 'service=shop')]
"""

from __future__ import annotations

import base64
import math
import re
import zlib
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np
from scipy import sparse, stats

from agentwatch.detectors.bounded import check_at_least, check_positive
from agentwatch.detectors.evidence import Evidence
from agentwatch.events import Finding, Severity

# ---------------------------------------------------------------------------------------------
# The event


@dataclass(frozen=True, slots=True, eq=False)
class EmbeddedWindow:
    """A sampled window of prompts for one key, with their embeddings.

    Built by the streams side (``agentwatch.streams.drift_sampler``); never travels on Kafka.

    Parameters
    ----------
    key : str
        The monitored thing (``service=shop``), the same key the reference is bound to.
    ts : float
        Event time at which the window closed (unix seconds); the findings carry it.
    texts : tuple of str
        The sampled prompts; ``texts[i]`` is embedded in ``vectors[i]``.
    vectors : numpy.ndarray
        ``(len(texts), dim)`` embeddings.
    start_ts : float
        Event time at which the window opened.
    seen : int
        Prompts offered during the window before sampling (0 when unknown).
    """

    key: str
    ts: float
    texts: tuple[str, ...]
    vectors: np.ndarray
    start_ts: float = 0.0
    seen: int = 0


# ---------------------------------------------------------------------------------------------
# The evidence

DRIFT_METHOD = "mmd_rbf_median_heuristic+permutation_pearson3"


@dataclass(frozen=True, slots=True, kw_only=True)
class DriftEvidence(Evidence):
    """One window compared with its reference (``skew``) or with the key's recent windows
    (``drift``), statistic by statistic.

    ``scores`` maps each statistic (``mmd``, ``centroid_cosine``, ``classifier_auc``, ...) to its
    ``score``, ``threshold``, ``p_value`` (most) and ``drifted`` verdict, plus what that statistic
    needs to be read (``gamma``, ``component_threshold``, ...); non-finite numbers are ``None``.
    ``decided_by`` lists the deciding statistics that rejected; ``statistic`` is the one whose
    score and threshold the finding carries as its ``value`` and ``threshold`` (see
    :func:`deciding_statistic`; absent in evidence written before it existed). ``examples`` the
    window's prompts least like the comparison (``text``, ``nearest_similarity``).
    ``reference`` and ``reference_size`` are set for skew, ``history_windows`` and
    ``history_from_ts`` for drift.
    """

    method: str
    decided_by: tuple[str, ...]
    deciding: tuple[str, ...]
    alpha: float
    window_start_ts: float
    window_seen: int
    scores: Mapping[str, Mapping[str, Any]]
    window_size: int
    comparison_size: int
    alpha_per_test: float
    examples: tuple[Mapping[str, Any], ...]
    reference: str | None = None
    reference_size: int | None = None
    history_windows: int | None = None
    history_from_ts: float | None = None
    statistic: str | None = None


@dataclass(frozen=True, slots=True)
class DriftCheck:
    """One comparison of a window, raised or calm: what :attr:`DriftDetector.last_checks` holds.

    ``kind`` is ``skew`` or ``drift``; ``value`` and ``threshold`` are those of ``statistic``
    (:func:`deciding_statistic`), ``drifted`` whether a deciding statistic rejected, and
    ``evidence`` the full comparison (the evidence a finding of this check carries).
    """

    key: str
    kind: str
    ts: float
    statistic: str
    value: float
    threshold: float
    drifted: bool
    evidence: DriftEvidence


# ---------------------------------------------------------------------------------------------
# Pure statistics


def pairwise_sq_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared euclidean distances between the rows of ``a`` and ``b`` (clipped at 0)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(sq, 0.0)


def median_heuristic_gamma(x: np.ndarray, y: np.ndarray) -> float:
    """RBF ``gamma = 1 / median(cross distance)^2``: Evidently's bandwidth for its MMD method.

    Degenerate samples (all cross distances 0) get ``gamma = 1`` so the kernel stays finite.
    """
    median = float(np.median(np.sqrt(pairwise_sq_distances(x, y))))
    return 1.0 / (median * median) if median > 0 else 1.0


def rbf_kernel(a: np.ndarray, b: np.ndarray, gamma: float) -> np.ndarray:
    """``exp(-gamma * |a_i - b_j|^2)``."""
    return np.exp(-gamma * pairwise_sq_distances(a, b))


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, gamma: float | None = None) -> float:
    """Unbiased MMD^2 between samples ``x`` and ``y`` with an RBF kernel.

    ``gamma`` defaults to :func:`median_heuristic_gamma`. Equals Evidently's ``MMD2u`` on the
    same rows (its reported score is this clipped at 0).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError("mmd2_unbiased needs at least 2 rows in each sample")
    if gamma is None:
        gamma = median_heuristic_gamma(x, y)
    kxx = rbf_kernel(x, x, gamma)
    kyy = rbf_kernel(y, y, gamma)
    kxy = rbf_kernel(x, y, gamma)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1.0))
                 + (kyy.sum() - np.trace(kyy)) / (n * (n - 1.0))
                 - 2.0 * kxy.sum() / (m * n))


def mmd2_unbiased_by_labels(kernel: np.ndarray, in_first: np.ndarray) -> np.ndarray:
    """Unbiased MMD^2 of many splits of one pooled kernel matrix at once.

    Parameters
    ----------
    kernel : (N, N) array
        Kernel over the pooled rows.
    in_first : (N, P) array of 0/1
        Column ``p`` marks the rows of the first sample in split ``p``; every column has the
        same count ``m``.

    Returns
    -------
    (P,) array of MMD^2_u values.
    """
    labels = np.asarray(in_first, dtype=kernel.dtype)
    size = kernel.shape[0]
    m = float(labels[:, 0].sum())
    n = size - m
    row_sums = kernel.sum(1, dtype=np.float64)
    diag = np.diagonal(kernel).astype(np.float64)
    total, total_diag = float(row_sums.sum()), float(diag.sum())
    s_xx = np.einsum("ip,ip->p", labels, kernel @ labels, dtype=np.float64)
    r_x = row_sums @ labels
    d_x = diag @ labels
    s_xy = r_x - s_xx
    s_yy = total - 2.0 * r_x + s_xx
    return ((s_xx - d_x) / (m * (m - 1.0)) + (s_yy - (total_diag - d_x)) / (n * (n - 1.0))
            - 2.0 * s_xy / (m * n))


def centroid_distances(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(cosine distance, euclidean distance) between the means of ``x`` and ``y``."""
    cx = np.asarray(x, dtype=np.float64).mean(0)
    cy = np.asarray(y, dtype=np.float64).mean(0)
    return _cosine_distance(cx[None, :], cy[None, :])[0], float(np.linalg.norm(cx - cy))


def _cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine distance of two equally shaped 2-D arrays."""
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = (a * b).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        sim = np.where(norms > 0, dots / norms, 0.0)
    return 1.0 - sim


def component_wasserstein(reference: np.ndarray, current: np.ndarray) -> np.ndarray:
    """Per-dimension Wasserstein-1 distance normed by the reference column's std.

    Evidently's ``wasserstein`` stattest (std floored at 0.001), for every column at once:
    W1 is the integral of |Q_ref(u) - Q_cur(u)| over u in [0, 1], and both empirical quantile
    functions are step functions whose steps sit at i/n_ref and j/n_cur for every column
    alike, so one merged grid and two plain sorts replace a scipy call per dimension.
    """
    ref = np.asarray(reference, dtype=np.float64)
    cur = np.asarray(current, dtype=np.float64)
    return _wasserstein_of_sorted(_sorted_columns(ref), _sorted_columns(cur), ref.std(0))


def _sorted_columns(vectors: np.ndarray) -> np.ndarray:
    """``(dim, rows)``: each embedding dimension's values in ascending order."""
    return np.sort(np.ascontiguousarray(vectors.T), axis=1)


def _wasserstein_of_sorted(ref_sorted: np.ndarray, cur_sorted: np.ndarray,
                           ref_std: np.ndarray) -> np.ndarray:
    n_ref, n_cur = ref_sorted.shape[1], cur_sorted.shape[1]
    steps = np.unique(np.concatenate([np.arange(n_ref) / n_ref, np.arange(n_cur) / n_cur,
                                      [1.0]]))
    lower, widths = steps[:-1], np.diff(steps)
    # Index of the quantile step holding each interval; the tiny offset guards i/n rounding.
    ref_idx = np.minimum((lower * n_ref + 1e-9).astype(np.int64), n_ref - 1)
    cur_idx = np.minimum((lower * n_cur + 1e-9).astype(np.int64), n_cur - 1)
    gaps = np.abs(ref_sorted[:, ref_idx] - cur_sorted[:, cur_idx])
    return (gaps @ widths) / np.maximum(ref_std, 0.001)


_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(text: str) -> list[str]:
    """Lower-case word tokens (letters/digits, with an apostrophe suffix kept)."""
    return _TOKEN.findall(text.lower())


def _entropy_bits(counts: np.ndarray) -> np.ndarray:
    """Shannon entropy (bits) of each row of a count matrix."""
    totals = counts.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(totals > 0, counts / np.where(totals > 0, totals, 1.0), 0.0)
        logs = np.where(p > 0, np.log2(np.where(p > 0, p, 1.0)), 0.0)
    return -(p * logs).sum(1)


def vocabulary_shift(first_counts: np.ndarray, second_counts: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Jensen-Shannon divergence (bits) and new-token share for rows of token counts.

    Row ``i`` of ``first_counts`` (the window) is compared with row ``i`` of
    ``second_counts`` (the comparison sample); both are counts over one vocabulary.
    The new-token share is the share of the first row's tokens whose term never occurs in the
    second row.
    """
    first = np.atleast_2d(np.asarray(first_counts, dtype=np.float64))
    second = np.atleast_2d(np.asarray(second_counts, dtype=np.float64))
    t1 = np.maximum(first.sum(1, keepdims=True), 1.0)
    t2 = np.maximum(second.sum(1, keepdims=True), 1.0)
    mixture = 0.5 * (first / t1 + second / t2)
    jsd = _entropy_bits(mixture) - 0.5 * (_entropy_bits(first) + _entropy_bits(second))
    new_share = (first * (second == 0)).sum(1) / t1[:, 0]
    return np.maximum(jsd, 0.0), new_share


def classifier_auc(x: np.ndarray, y: np.ndarray, rng: np.random.Generator,
                   shrinkage: float = 0.5) -> float:
    """Two-fold cross-validated ROC AUC of a shrinkage LDA telling ``y`` rows from ``x`` rows.

    Numpy only: the within-class covariance is shrunk towards its mean variance times the
    identity, which keeps the solve stable when rows are fewer than dimensions.
    0.5 means the samples cannot be told apart; 1.0 perfectly separated.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    fold_x = rng.permutation(len(x)) % 2
    fold_y = rng.permutation(len(y)) % 2
    aucs = []
    for test in (0, 1):
        tx, ty = x[fold_x != test], y[fold_y != test]
        ex, ey = x[fold_x == test], y[fold_y == test]
        if min(len(tx), len(ty), len(ex), len(ey)) < 2:
            continue
        mx, my = tx.mean(0), ty.mean(0)
        centred = np.concatenate([tx - mx, ty - my], axis=0).astype(np.float32)
        cov = (centred.T @ centred).astype(np.float64) / max(len(centred) - 2, 1)
        scale = np.trace(cov) / cov.shape[0]
        cov = (1.0 - shrinkage) * cov + shrinkage * scale * np.eye(cov.shape[0])
        # numpy's LAPACK, not scipy.linalg's: scipy bundles its own OpenBLAS, whose threads
        # spin against numpy's and slowed the whole check 2x here.
        weights = np.linalg.solve(cov, my - mx)
        scores = np.concatenate([ex @ weights, ey @ weights])
        aucs.append(_auc(scores, len(ex)))
    return float(np.mean(aucs)) if aucs else 0.5


def _auc(scores: np.ndarray, n_negative: int) -> float:
    """AUC of the last ``len(scores) - n_negative`` scores (positives) over the first ones."""
    ranks = stats.rankdata(scores)
    n_pos = len(scores) - n_negative
    return float((ranks[n_negative:].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_negative))


def auc_null_std(n_first: int, n_second: int) -> float:
    """Standard deviation of the AUC of an uninformative score, two folds averaged."""
    a, b = max(n_first / 2.0, 1.0), max(n_second / 2.0, 1.0)
    return math.sqrt((a + b + 1.0) / (12.0 * a * b)) / math.sqrt(2.0)


def nearest_similarity(window: np.ndarray, reference_unit: np.ndarray, block: int = 2048
                       ) -> np.ndarray:
    """Cosine similarity of each window row to its nearest row of a unit-normed reference."""
    unit = _unit_rows(window).astype(reference_unit.dtype)
    best = np.full(len(unit), -np.inf)
    for start in range(0, len(reference_unit), block):
        sims = unit @ reference_unit[start:start + block].T
        best = np.maximum(best, sims.max(1))
    return best


def leave_one_out_nearest_similarity(reference_unit: np.ndarray, block: int = 1024
                                     ) -> np.ndarray:
    """Each reference row's cosine similarity to its nearest *other* reference row."""
    size = len(reference_unit)
    best = np.full(size, -np.inf)
    for start in range(0, size, block):
        sims = reference_unit[start:start + block] @ reference_unit.T
        rows = np.arange(sims.shape[0])
        sims[rows, start + rows] = -np.inf
        best[start:start + block] = sims.max(1)
    return best


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    v = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.where(norms > 0, norms, 1.0)


@dataclass(frozen=True, slots=True)
class NullTail:
    """A permutation null summarised as a Pearson type III distribution."""

    mean: float
    std: float
    skew: float

    @classmethod
    def fit(cls, null: np.ndarray) -> "NullTail":
        null = np.asarray(null, dtype=np.float64)
        mean = float(null.mean())
        centred = null - mean
        variance = float(centred @ centred) / len(null)
        std = math.sqrt(variance)
        # scipy.stats.skew (biased), without its per-call overhead
        skew = float((centred ** 3).mean()) / variance ** 1.5 if std > 0 else 0.0
        return cls(mean, std, skew if math.isfinite(skew) else 0.0)

    def threshold(self, alpha: float) -> float:
        if self.std == 0:
            return self.mean
        return float(stats.pearson3.isf(alpha, self.skew, loc=self.mean, scale=self.std))

    def p_value(self, observed: float) -> float:
        if self.std == 0:
            return 1.0 if observed <= self.mean else 0.0
        return float(stats.pearson3.sf(observed, self.skew, loc=self.mean, scale=self.std))


def deciding_statistic(scores: Mapping[str, Mapping[str, Any]], deciding: Sequence[str]) -> str:
    """The statistic a check's verdict is reported by: among the deciding statistics that
    rejected (else among all deciding ones present), the one with the smallest p-value, the
    first in ``deciding`` on a tie. p-values compare across statistics; scores do not. When
    no deciding statistic could be computed (vocabulary statistics of a reference without
    texts), ``mmd``, which every check computes.

    >>> scores = {"mmd": {"p_value": 0.2, "drifted": False},
    ...           "ood_share": {"p_value": 1e-6, "drifted": True}}
    >>> deciding_statistic(scores, ("mmd", "ood_share"))
    'ood_share'
    >>> deciding_statistic({"mmd": {"p_value": 0.2, "drifted": False}}, ("mmd", "ood_share"))
    'mmd'
    """
    present = [s for s in deciding if s in scores]
    rejected = [s for s in present if scores[s]["drifted"]]

    def p_value(name: str) -> float:
        p = scores[name].get("p_value")
        return float(p) if p is not None and math.isfinite(p) else math.inf

    return min(rejected or present, key=p_value) if present else "mmd"


# ---------------------------------------------------------------------------------------------
# The detector

PERMUTATION_STATISTICS = ("mmd", "centroid_cosine", "centroid_euclidean", "vocab_jsd",
                          "new_token_share")
DECIDING_STATISTICS = PERMUTATION_STATISTICS + ("classifier_auc", "ood_share")
_CACHED_SPLIT_SIZES = 4  # window/comparison sizes whose permutation labels are kept


@dataclass(slots=True)
class _Reference:
    name: str
    vectors: np.ndarray  # float64, as given
    unit: np.ndarray  # row-normed, for cosine similarity
    texts: tuple[str, ...]
    similarity_threshold: float
    expected_ood_share: float
    comparison: "_ComparisonSample"  # the seeded subsample every skew check compares with


@dataclass(slots=True)
class _ComparisonSample:
    """A comparison sample with everything a check reuses from it.

    Built once per reference (so a skew check only computes the window's side) and once per
    drift check from the pooled history.
    """

    vectors: np.ndarray  # float32 (n, dim)
    sq_norms: np.ndarray  # float32 (n,)
    sq_distances: np.ndarray  # float32 (n, n): the comparison block of the pooled matrix
    sorted_columns: np.ndarray  # float32 (dim, n), for the per-dimension Wasserstein distance
    column_std: np.ndarray  # float64 (dim,)
    mean: np.ndarray  # float64 (dim,)
    vocabulary: dict  # term -> column of ``counts``
    counts: Any  # scipy CSR document x term counts (None without texts)

    @classmethod
    def build(cls, vectors: np.ndarray, texts: Sequence[str]) -> "_ComparisonSample":
        exact = np.asarray(vectors, dtype=np.float64)
        v32 = exact.astype(np.float32)
        sq_norms = (v32 * v32).sum(1)
        vocabulary: dict[str, int] = {}
        counts = _count_rows(texts, vocabulary) if texts else None
        return cls(v32, sq_norms, _sq_distances(v32, v32, sq_norms, sq_norms),
                   _sorted_columns(v32), exact.std(0), exact.mean(0), vocabulary, counts)


def _sq_distances(a: np.ndarray, b: np.ndarray, a_sq_norms: np.ndarray,
                  b_sq_norms: np.ndarray) -> np.ndarray:
    """Squared euclidean distances in float32, from one product (clipped at 0)."""
    sq = a @ b.T
    sq *= -2.0
    sq += a_sq_norms[:, None]
    sq += b_sq_norms[None, :]
    return np.maximum(sq, 0.0, out=sq)


@dataclass(slots=True)
class _KeyState:
    history: deque = field(default_factory=deque)  # of (ts, texts, vectors float32)
    active: set = field(default_factory=set)  # kinds currently raised


class DriftDetector:
    """Embedding skew against a reference and drift against the previous windows, per key.

    Parameters
    ----------
    alpha : float
        Family-wise false-alarm rate per check; divided among the deciding tests.
    permutations : int
        Label permutations drawn per check (one set shared by all permutation statistics).
    reference_sample_size : int
        Comparison rows drawn (seeded) from the reference when it is bound, and from the
        pooled history per drift check; bounds the cost of a check. The nearest-reference
        similarity uses the whole reference.
    history_windows : int
        Previous windows kept per key for the drift comparison.
    min_history_windows : int
        Previous windows needed before drift is checked.
    min_window_size : int
        Windows with fewer sampled prompts are skipped (and not kept as history).
    skew_decide_on, drift_decide_on : tuple of str
        Statistics whose rejection raises a skew / drift finding; any of
        ``mmd, centroid_cosine, centroid_euclidean, vocab_jsd, new_token_share,
        classifier_auc, ood_share`` (``ood_share`` for skew only).
    ood_quantile : float
        Without ``ood_similarity_threshold``, the threshold is this quantile of the
        reference's leave-one-out nearest-neighbour similarity, so about this share of
        reference-like prompts fall under it.
    ood_similarity_threshold : float or None
        Fixed cosine-similarity threshold for "out of distribution".
    ood_rate_slack : float
        The binomial test is against the reference's own under-threshold rate times this.
        Leave-one-out within a reference overstates how close new prompts of the same mix
        come to it (references hold near-paraphrases of each other): on CLINC150 held-out
        in-mix prompts fall under the 5% quantile 6.4% of the time, so 1.25 by default.
    component_threshold : float
        A dimension counts as drifted when its Wasserstein distance normed by the reference
        std reaches this. Evidently's default 0.1 suits large samples; at 200-row windows the
        sampling noise alone is about 0.08, so 0.1 marks ~40% of dimensions of undrifted
        windows (CLINC150), hence 0.2 here.
    component_share_threshold : float
        Share of drifted dimensions above which ``drifted_components`` flags (Evidently: 0.2).
    max_examples : int
        Example prompts carried by a finding (those least similar to the comparison set).
    max_keys : int
        Keys with history kept (least recently updated evicted first). References are bound
        by the worker and not evicted.
    max_reference_rows : int
        References larger than this are subsampled (seeded) when set.
    seed : int
        Seeds the permutations, subsamples and folds: permutations from (seed, m, n), the
        reference sample from (seed, key), and each check's history sample and folds from
        (seed, key, kind, ts), so results do not depend on the order keys are checked in.
    """

    name: ClassVar[str] = "drift"
    # Windows are keyed by the sampler's key fields; the stream partitions prompts by the first.
    partition_by: ClassVar[str] = "service"
    accepts: ClassVar[tuple[type, ...]] = (EmbeddedWindow,)

    def __init__(self, *, alpha: float = 0.005, permutations: int = 200,
                 reference_sample_size: int = 1000, history_windows: int = 3,
                 min_history_windows: int = 1, min_window_size: int = 30,
                 skew_decide_on: Sequence[str] = ("mmd", "ood_share"),
                 drift_decide_on: Sequence[str] = ("mmd",),
                 ood_quantile: float = 0.05, ood_similarity_threshold: float | None = None,
                 ood_rate_slack: float = 1.25,
                 component_threshold: float = 0.2,
                 component_share_threshold: float = 0.2, max_examples: int = 5,
                 max_keys: int = 128, max_reference_rows: int = 5000, seed: int = 0) -> None:
        if not 0.0 < alpha < 0.5:
            raise ValueError(f"alpha must be in (0, 0.5), got {alpha}")
        check_at_least("permutations", permutations, 20)
        check_at_least("reference_sample_size", reference_sample_size, 10)
        check_at_least("history_windows", history_windows, 1)
        if not 1 <= min_history_windows <= history_windows:
            raise ValueError("min_history_windows must be in [1, history_windows], got "
                             f"{min_history_windows}")
        check_at_least("min_window_size", min_window_size, 5)
        skew_decide_on, drift_decide_on = tuple(skew_decide_on), tuple(drift_decide_on)
        for label, chosen, allowed in (
                ("skew_decide_on", skew_decide_on, DECIDING_STATISTICS),
                ("drift_decide_on", drift_decide_on,
                 tuple(s for s in DECIDING_STATISTICS if s != "ood_share"))):
            if not chosen or any(s not in allowed for s in chosen):
                raise ValueError(f"{label} must be a non-empty subset of {allowed}, got {chosen}")
        if not 0.0 < ood_quantile < 0.5:
            raise ValueError(f"ood_quantile must be in (0, 0.5), got {ood_quantile}")
        if ood_similarity_threshold is not None and not -1.0 <= ood_similarity_threshold <= 1.0:
            raise ValueError("ood_similarity_threshold must be in [-1, 1], got "
                             f"{ood_similarity_threshold}")
        check_at_least("ood_rate_slack", ood_rate_slack, 1.0)
        check_positive("component_threshold", component_threshold)
        if not 0.0 < component_share_threshold < 1.0:
            raise ValueError("component_share_threshold must be in (0, 1), got "
                             f"{component_share_threshold}")
        check_at_least("max_examples", max_examples, 0)
        check_at_least("max_keys", max_keys, 1)
        check_at_least("max_reference_rows", max_reference_rows, 10)
        self.alpha = alpha
        self.permutations = permutations
        self.reference_sample_size = reference_sample_size
        self.history_windows = history_windows
        self.min_history_windows = min_history_windows
        self.min_window_size = min_window_size
        self.skew_decide_on = skew_decide_on
        self.drift_decide_on = drift_decide_on
        self.ood_quantile = ood_quantile
        self.ood_similarity_threshold = ood_similarity_threshold
        self.ood_rate_slack = ood_rate_slack
        self.component_threshold = component_threshold
        self.component_share_threshold = component_share_threshold
        self.max_examples = max_examples
        self.max_keys = max_keys
        self.max_reference_rows = max_reference_rows
        self.seed = seed
        self._references: dict[str, _Reference] = {}
        self._keys: OrderedDict[str, _KeyState] = OrderedDict()
        self._labels: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._last_checks: tuple[DriftCheck, ...] = ()

    # -- references ---------------------------------------------------------------------------

    def set_reference(self, key: str, vectors: np.ndarray, texts: Sequence[str] = (),
                      *, name: str = "") -> None:
        """Bind reference embeddings (and their texts, for the vocabulary statistics) to ``key``.

        Computes the out-of-distribution similarity threshold once, here, from the
        reference's leave-one-out nearest-neighbour similarities.
        """
        vectors = np.asarray(vectors, dtype=np.float64)
        if vectors.ndim != 2 or len(vectors) < 10:
            raise ValueError("reference vectors must be a 2-D array with at least 10 rows")
        texts = tuple(texts)
        if texts and len(texts) != len(vectors):
            raise ValueError("reference texts and vectors differ in length")
        if len(vectors) > self.max_reference_rows:
            rng = np.random.default_rng([self.seed, zlib.crc32(key.encode())])
            keep = np.sort(rng.choice(len(vectors), self.max_reference_rows, replace=False))
            vectors = vectors[keep]
            texts = tuple(texts[i] for i in keep) if texts else ()
        unit = _unit_rows(vectors)
        loo = leave_one_out_nearest_similarity(unit)
        if self.ood_similarity_threshold is None:
            threshold = float(np.quantile(loo, self.ood_quantile))
        else:
            threshold = float(self.ood_similarity_threshold)
        # The expected share is measured, not assumed: ties and a fixed threshold move it.
        expected = float(np.clip((loo < threshold).mean(), 1.0 / len(loo), 1.0))
        # One seeded comparison sample per reference: its side of every statistic (distances,
        # sorted columns, term counts) is computed here once, not on every check.
        rng = np.random.default_rng([self.seed, zlib.crc32(key.encode()), 1])
        idx = _subsample(len(vectors), self.reference_sample_size, rng)
        comparison = _ComparisonSample.build(vectors[idx],
                                             [texts[i] for i in idx] if texts else ())
        self._references[key] = _Reference(name or key, vectors, unit.astype(np.float32),
                                           texts, threshold, expected, comparison)

    def clear_reference(self, key: str) -> None:
        """Forget the reference bound to ``key`` (skew is no longer checked for it)."""
        self._references.pop(key, None)

    @property
    def reference_keys(self) -> tuple[str, ...]:
        return tuple(self._references)

    @property
    def last_checks(self) -> tuple[DriftCheck, ...]:
        """The checks the latest :meth:`update` made (skew, then drift), raised or calm;
        ``()`` when it checked nothing (window too small, no reference and no history yet)."""
        return self._last_checks

    # -- the contract ---------------------------------------------------------------------------

    def update(self, event: EmbeddedWindow) -> Sequence[Finding]:
        self._last_checks = ()
        vectors = np.asarray(event.vectors, dtype=np.float64)
        if vectors.ndim != 2 or len(vectors) != len(event.texts):
            raise ValueError("EmbeddedWindow.vectors must be (len(texts), dim)")
        if len(vectors) < self.min_window_size:
            return ()
        state = self._keys.get(event.key)
        if state is None:
            state = _KeyState(history=deque(maxlen=self.history_windows))
            self._keys[event.key] = state
            while len(self._keys) > self.max_keys:
                self._keys.popitem(last=False)
        else:
            self._keys.move_to_end(event.key)
        findings: list[Finding] = []

        reference = self._references.get(event.key)
        if reference is not None and reference.vectors.shape[1] == vectors.shape[1]:
            rng = self._rng(event.key, "skew", event.ts)
            result = self._compare(vectors, event.texts, reference.comparison, rng,
                                   self.skew_decide_on, reference)
            result["reference"] = reference.name
            result["reference_size"] = len(reference.vectors)
            findings.extend(self._decide(state, event, "skew", result, self.skew_decide_on))

        usable = [h for h in state.history if h[2].shape[1] == vectors.shape[1]]
        if len(usable) >= self.min_history_windows:
            rng = self._rng(event.key, "drift", event.ts)
            past_vectors = np.concatenate([h[2] for h in usable], axis=0).astype(np.float64)
            past_texts = tuple(t for h in usable for t in h[1])
            idx = _subsample(len(past_vectors), self.reference_sample_size, rng)
            comparison = _ComparisonSample.build(past_vectors[idx],
                                                 [past_texts[i] for i in idx])
            result = self._compare(vectors, event.texts, comparison, rng,
                                   self.drift_decide_on, None)
            result["history_windows"] = len(usable)
            result["history_from_ts"] = float(usable[0][0])
            findings.extend(self._decide(state, event, "drift", result, self.drift_decide_on))

        state.history.append((float(event.ts), tuple(event.texts),
                              vectors.astype(np.float32)))
        return tuple(findings)

    def snapshot(self) -> dict[str, Any]:
        """Per-key history and raised kinds. References are not included: the worker binds
        them again from the reference store after a restore."""
        keys = {}
        for key, state in self._keys.items():
            keys[key] = {
                "active": sorted(state.active),
                "history": [{"ts": ts, "texts": list(texts), "shape": list(vec.shape),
                             "vectors_f32_b64": base64.b64encode(
                                 np.ascontiguousarray(vec, dtype="<f4").tobytes()).decode()}
                            for ts, texts, vec in state.history],
            }
        return {"version": 1, "keys": keys}

    def restore(self, snap: dict[str, Any]) -> None:
        self._keys = OrderedDict()
        for key, data in list(snap.get("keys", {}).items())[-self.max_keys:]:
            state = _KeyState(history=deque(maxlen=self.history_windows),
                              active=set(data.get("active", ())))
            for item in data.get("history", ()):
                raw = base64.b64decode(item["vectors_f32_b64"])
                vec = np.frombuffer(raw, dtype="<f4").reshape(item["shape"]).astype(np.float32)
                state.history.append((float(item["ts"]), tuple(item["texts"]), vec))
            self._keys[key] = state

    def state_size(self) -> int:
        """Keys with history held (capped by ``max_keys``; references are config, not state)."""
        return len(self._keys)

    # -- internals ------------------------------------------------------------------------------

    def _rng(self, key: str, kind: str, ts: float) -> np.random.Generator:
        return np.random.default_rng([self.seed, zlib.crc32(key.encode()), zlib.crc32(
            kind.encode()), int(round(ts * 1000.0)) & 0xFFFFFFFF])

    def _split_labels(self, m: int, n: int) -> np.ndarray:
        """``(m + n, 1 + permutations)`` 0/1 float32: column 0 marks the window rows of the
        pooled sample, every other column a random m-subset.

        The permutations depend only on the sizes and the seed, never on the data, so they are
        drawn once per (m, n) and reused (a few sizes kept): the null stays valid and a check
        skips the draw.
        """
        labels = self._labels.get((m, n))
        if labels is not None:
            self._labels.move_to_end((m, n))
            return labels
        rng = np.random.default_rng([self.seed, m, n])
        # A random m-subset per permutation is all a split needs: partition, not a full sort.
        picks = np.argpartition(rng.random((self.permutations, m + n)), m - 1, axis=1)[:, :m]
        labels = np.zeros((m + n, 1 + self.permutations), dtype=np.float32)
        labels[:m, 0] = 1.0
        labels[picks, np.arange(1, self.permutations + 1)[:, None]] = 1.0
        self._labels[(m, n)] = labels
        while len(self._labels) > _CACHED_SPLIT_SIZES:
            self._labels.popitem(last=False)
        return labels

    def _compare(self, window: np.ndarray, window_texts: Sequence[str],
                 comparison: _ComparisonSample, rng: np.random.Generator,
                 deciding: Sequence[str], reference: _Reference | None) -> dict[str, Any]:
        """All statistics of window vs comparison, each with threshold and verdict."""
        m, n = len(window), len(comparison.vectors)
        alpha_each = self.alpha / len(deciding)
        labels = self._split_labels(m, n)

        scores: dict[str, dict[str, Any]] = {}
        # One pooled distance matrix serves the bandwidth (its cross block) and the kernel;
        # the comparison block comes precomputed. float32 halves the cost of the products,
        # which dominate a check.
        window32 = window.astype(np.float32)
        window_sq_norms = (window32 * window32).sum(1)
        sq = np.empty((m + n, m + n), dtype=np.float32)
        sq[:m, :m] = _sq_distances(window32, window32, window_sq_norms, window_sq_norms)
        cross = _sq_distances(window32, comparison.vectors, window_sq_norms, comparison.sq_norms)
        sq[:m, m:] = cross
        sq[m:, :m] = cross.T
        sq[m:, m:] = comparison.sq_distances
        median = _median_sqrt(cross)
        gamma = 1.0 / (median * median) if median > 0 else 1.0
        kernel = np.exp(sq * np.float32(-gamma), out=sq)
        np.fill_diagonal(kernel, 1.0)
        mmd = mmd2_unbiased_by_labels(kernel, labels)
        mmd_observed = float(mmd[0])
        scores["mmd"] = self._permutation_verdict(max(mmd_observed, 0.0), mmd_observed,
                                                  mmd[1:], alpha_each)
        scores["mmd"]["gamma"] = gamma

        # Centroids of every split from one product: window mean = labels' @ X / m.
        window_sums = labels[:m].T @ window32 + labels[m:].T @ comparison.vectors
        window_means = window_sums.astype(np.float64) / m
        total = window.sum(0) + comparison.mean * n
        rest_means = (total[None, :] - window_means * m) / n
        cos_null = _cosine_distance(window_means[1:], rest_means[1:])
        euc_null = np.linalg.norm(window_means[1:] - rest_means[1:], axis=1)
        # The observed distances in float64, as Evidently computes them.
        window_mean = window.mean(0)
        cos_obs = float(_cosine_distance(window_mean[None, :], comparison.mean[None, :])[0])
        euc_obs = float(np.linalg.norm(window_mean - comparison.mean))
        scores["centroid_cosine"] = self._permutation_verdict(cos_obs, cos_obs, cos_null,
                                                              alpha_each)
        scores["centroid_euclidean"] = self._permutation_verdict(euc_obs, euc_obs, euc_null,
                                                                 alpha_each)

        if comparison.counts is not None:
            # Window terms unseen in the comparison vocabulary get new columns in a copy.
            window_vocabulary = dict(comparison.vocabulary)
            window_rows = _count_rows(window_texts, window_vocabulary)
            comparison_counts = comparison.counts.copy()
            comparison_counts.resize((n, window_rows.shape[1]))
            counts = sparse.vstack([window_rows, comparison_counts], format="csr")
            totals = np.asarray(counts.sum(0)).ravel()
            # Row 0: the observed window's term counts; the rest: each permuted split's.
            split_counts = np.asarray(counts.T @ labels, dtype=np.float64).T
            jsd, new_share = vocabulary_shift(split_counts, totals[None, :] - split_counts)
            scores["vocab_jsd"] = self._permutation_verdict(float(jsd[0]), float(jsd[0]),
                                                            jsd[1:], alpha_each)
            scores["new_token_share"] = self._permutation_verdict(
                float(new_share[0]), float(new_share[0]), new_share[1:], alpha_each)

        auc = classifier_auc(comparison.vectors, window, rng)
        auc_threshold = 0.5 + float(stats.norm.isf(alpha_each)) * auc_null_std(n, m)
        scores["classifier_auc"] = {
            "score": auc, "threshold": auc_threshold,
            "p_value": float(stats.norm.sf((auc - 0.5) / auc_null_std(n, m))),
            "drifted": auc > auc_threshold}

        distances = _wasserstein_of_sorted(comparison.sorted_columns, _sorted_columns(window32),
                                           comparison.column_std)
        share = float((distances >= self.component_threshold).mean())
        scores["drifted_components"] = {
            "score": share, "threshold": self.component_share_threshold,
            "component_test": "wasserstein_normed",
            "component_threshold": self.component_threshold,
            "drifted": share > self.component_share_threshold}

        if reference is not None:
            nearest = nearest_similarity(window, reference.unit)
            outside = int((nearest < reference.similarity_threshold).sum())
            p0 = min(reference.expected_ood_share * self.ood_rate_slack, 1.0)
            scores["ood_share"] = {
                "score": outside / m,
                "threshold": float(stats.binom.isf(alpha_each, m, p0)) / m,
                "p_value": float(stats.binom.sf(outside - 1, m, p0)),
                "similarity_threshold": reference.similarity_threshold,
                "expected_share": p0,
                "drifted": bool(stats.binom.sf(outside - 1, m, p0) <= alpha_each)}
        else:
            nearest = nearest_similarity(window, _unit_rows(comparison.vectors))
        order = np.argsort(nearest, kind="stable")[:self.max_examples]
        examples = [{"text": window_texts[i], "nearest_similarity": round(float(nearest[i]), 4)}
                    for i in order]
        return {"scores": scores, "window_size": m, "comparison_size": n,
                "alpha_per_test": alpha_each, "examples": examples}

    @staticmethod
    def _permutation_verdict(score: float, observed: float, null: np.ndarray,
                             alpha_each: float) -> dict[str, Any]:
        tail = NullTail.fit(null)
        threshold = tail.threshold(alpha_each)
        p_value = tail.p_value(observed)
        return {"score": float(score), "threshold": float(threshold), "p_value": p_value,
                "p_value_empirical": float((1 + (null >= observed).sum()) / (1 + len(null))),
                "drifted": bool(p_value <= alpha_each)}

    def _decide(self, state: _KeyState, event: EmbeddedWindow, kind: str,
                result: dict[str, Any], deciding: Sequence[str]) -> list[Finding]:
        scores = result["scores"]
        rejected = [s for s in deciding if s in scores and scores[s]["drifted"]]
        statistic = deciding_statistic(scores, deciding)
        value = float(scores[statistic]["score"])
        threshold = float(scores[statistic]["threshold"])
        result = _jsonable(result)
        result["examples"] = tuple(result["examples"])
        typed = DriftEvidence(
            method=DRIFT_METHOD, decided_by=tuple(rejected), deciding=tuple(deciding),
            alpha=_jsonable(self.alpha), window_start_ts=_jsonable(float(event.start_ts)),
            window_seen=int(event.seen), statistic=statistic, **result)
        self._last_checks += (DriftCheck(event.key, kind, float(event.ts), statistic, value,
                                         threshold, bool(rejected), typed),)
        evidence = typed.to_mapping()
        if rejected:
            state.active.add(kind)
            severity = Severity.CRITICAL if len(rejected) > 1 else Severity.WARNING
            return [Finding(self.name, event.key, kind, severity, float(event.ts),
                            value, threshold, evidence)]
        if kind in state.active:
            state.active.discard(kind)
            return [Finding(self.name, event.key, kind, Severity.INFO, float(event.ts),
                            value, threshold, evidence, resolved=True)]
        return []


def _subsample(size: int, limit: int, rng: np.random.Generator) -> np.ndarray:
    if size <= limit:
        return np.arange(size)
    return np.sort(rng.choice(size, limit, replace=False))


def _median_sqrt(squared: np.ndarray) -> float:
    """``median(sqrt(squared))`` without a square root per element (sqrt is monotone)."""
    flat = squared.ravel()
    half = flat.size // 2
    if flat.size % 2:
        return float(np.sqrt(np.partition(flat, half)[half]))
    low, high = np.partition(flat, [half - 1, half])[[half - 1, half]]
    return float((np.sqrt(low) + np.sqrt(high)) / 2.0)


def _count_rows(texts: Sequence[str], vocabulary: dict[str, int]) -> sparse.csr_matrix:
    """Document x term counts; terms missing from ``vocabulary`` are added to it in place."""
    rows: list[int] = []
    cols: list[int] = []
    for row, text in enumerate(texts):
        terms = tokenize(text)
        rows.extend([row] * len(terms))
        cols.extend([vocabulary.setdefault(term, len(vocabulary)) for term in terms])
    # Repeated (row, term) pairs are summed into counts by the conversion to CSR.
    return sparse.coo_matrix((np.ones(len(rows)), (rows, cols)),
                             shape=(len(texts), max(len(vocabulary), 1))).tocsr()


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return v if math.isfinite(v) else None
    return value
