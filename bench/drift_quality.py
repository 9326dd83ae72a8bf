"""Quality figures of the drift detector on real prompts (CLINC150): false alarms and power.

:func:`evaluate_clinc` measures, at the product defaults of
:class:`~agentwatch.detectors.drift.DriftDetector` and the drift sampler's window size:

- the false-alarm rate: windows drawn from the reference mix, each checked against the
  reference only (fresh key state per window), plus one long calm stream of the same mix
  (skew and drift over time);
- the power: for each shift share and kind (a share of prompts from other CLINC domains, or
  of out-of-scope queries), the fraction of seeds in which the first shifted window, after
  two calm ones, raises a skew (and, separately, a drift) finding;
- per kind, the smallest share detected in at least 90% of seeds.

``agentwatch drift evaluate`` runs it and writes the JSON (see
:mod:`agentwatch.reference_cli`).

The pools are the ones of :func:`agentwatch.reference.clinc_scenario`; they are embedded once
with the bundled model and cached as ``<pool>-<digest>.npy`` in ``cache_dir``, where the
digest is a SHA-256 of every pool's texts (the scheme of ``tests/detectors``' CLINC test, so
the same pools share files). The default cache dir is
``$XDG_CACHE_HOME/agentwatch/clinc-embeddings`` (``~/.cache/...`` without it). The key holds
the texts, not the model: clear the folder after changing the embedding model.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from scipy import stats

from agentwatch.detectors.drift import DriftDetector, EmbeddedWindow

KEY = "service=assistant"
POOLS = ("in_mix", "other_domains", "out_of_scope")
SHIFT_KINDS = {"other_domains": "other_share", "out_of_scope": "oos_share"}
RELIABLE_DETECTION = 0.90
CALM_STREAM_WINDOWS = 40
WINDOW_GAP_S = 300.0  # the drift sampler's default window_s; only orders the event times


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/agentwatch/clinc-embeddings`` (``~/.cache`` when unset)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "agentwatch" / "clinc-embeddings"


def sampler_window_size() -> int:
    """The drift sampler's default ``sample_size``: the rows a production window holds."""
    from agentwatch.streams.drift_sampler import DriftSampler

    return int(inspect.signature(DriftSampler).parameters["sample_size"].default)


def clinc_pools(clinc_dir: str | Path, *, pool_sizes: Mapping[str, int] | None = None,
                cache_dir: str | Path | None = None,
                progress: Callable[[str], None] | None = None
                ) -> tuple[dict[str, list[str]], dict[str, np.ndarray], bool]:
    """Texts and embeddings of the reference and of the three window pools.

    ``pool_sizes`` (``{"in_mix": 1500, ...}``) subsamples pools with ``default_rng(0)``, as
    the CLINC test does; ``None`` keeps every prompt. Returns ``(texts, vectors, cached)``
    with ``cached`` true when no embedding was computed.
    """
    from agentwatch.reference import clinc_scenario

    scenario = clinc_scenario(clinc_dir)
    rng = np.random.default_rng(0)
    texts = {"reference": list(scenario.reference)}
    for name in POOLS:
        pool = getattr(scenario, name)
        size = (pool_sizes or {}).get(name)
        if size is None or size >= len(pool):
            texts[name] = list(pool)
        else:
            texts[name] = [pool[i] for i in sorted(rng.choice(len(pool), size, replace=False))]
    digest = hashlib.sha256("\n".join(t for v in texts.values() for t in v).encode()).hexdigest()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    vectors: dict[str, np.ndarray] = {}
    embedder = None
    for name, items in texts.items():
        path = cache / f"{name}-{digest[:16]}.npy"
        if not path.exists():
            if embedder is None:
                from agentwatch.streams.embeddings import Embedder

                embedder = Embedder(max_sentences_per_s=None, threads=2, batch_size=128)
            if progress:
                progress(f"embedding {len(items)} {name} prompts -> {path}")
            tmp = path.with_name(path.stem + ".tmp.npy")
            np.save(tmp, embedder.encode(items))
            os.replace(tmp, path)  # a killed run leaves no truncated cache file behind
        vectors[name] = np.load(path)
    return texts, vectors, embedder is None


def evaluate_clinc(clinc_dir: str | Path, *, seeds_calm: int = 300, seeds_shift: int = 100,
                   shifts: Sequence[float] = (0.05, 0.10, 0.15),
                   cache_dir: str | Path | None = None,
                   progress: Callable[[str], None] | None = None,
                   pool_sizes: Mapping[str, int] | None = None,
                   window_size: int | None = None,
                   **detector_kwargs: Any) -> dict[str, Any]:
    """False-alarm rate and power of :class:`DriftDetector` on CLINC150 windows.

    Parameters
    ----------
    clinc_dir : str or Path
        Folder holding ``data_full.json`` and ``domains.json``.
    seeds_calm : int
        Reference-mix windows checked against the reference only (each with fresh key state).
    seeds_shift : int
        Seeds per (kind, share): two calm windows, then the shifted one.
    shifts : sequence of float
        Shares of the window replaced by other-domain (or out-of-scope) prompts.
    cache_dir : str or Path or None
        Embedding cache (default :func:`default_cache_dir`).
    progress : callable or None
        Called with a line of text as the stages go.
    pool_sizes : mapping or None
        Subsample the window pools (see :func:`clinc_pools`); ``None`` uses every prompt.
    window_size : int or None
        Prompts per window (default: the drift sampler's ``sample_size``).
    **detector_kwargs
        Override detector defaults (none: the product defaults are what is measured).

    Returns
    -------
    dict
        JSON-able: ``detector`` (settings), ``data``, ``false_alarms``, ``power`` (per kind,
        per share), ``smallest_reliable_shift`` (per kind; ``None`` when no share reached
        90%), ``timings_s``.
    """
    if seeds_calm < 1 or seeds_shift < 1:
        raise ValueError("seeds_calm and seeds_shift must be >= 1")
    shifts = tuple(float(s) for s in shifts)
    if not shifts or any(not 0.0 < s <= 1.0 for s in shifts):
        raise ValueError(f"shifts must be shares in (0, 1], got {shifts}")
    say = progress or (lambda line: None)
    window = int(window_size or sampler_window_size())
    started = time.perf_counter()

    texts, vectors, cached = clinc_pools(clinc_dir, pool_sizes=pool_sizes,
                                         cache_dir=cache_dir, progress=progress)
    embedded = time.perf_counter()
    detector = DriftDetector(**detector_kwargs)
    detector.set_reference(KEY, vectors["reference"], texts["reference"],
                           name="clinc-reference-domains")
    index = {name: [(name, i) for i in range(len(texts[name]))] for name in POOLS}

    def draw(rng: np.random.Generator, kind: str | None = None,
             share: float = 0.0) -> tuple[tuple[str, ...], np.ndarray]:
        from agentwatch.reference import mixed_window

        shares = {"other_share": 0.0, "oos_share": 0.0}
        if kind is not None:
            shares[SHIFT_KINDS[kind]] = share
        items = mixed_window(index["in_mix"], window, rng, other=index["other_domains"],
                             oos=index["out_of_scope"], **shares)
        return (tuple(texts[p][i] for p, i in items),
                np.stack([vectors[p][i] for p, i in items]))

    def check(ts: float, window_texts: tuple[str, ...], window_vectors: np.ndarray) -> Any:
        return detector.update(EmbeddedWindow(KEY, ts, window_texts, window_vectors,
                                              start_ts=ts - WINDOW_GAP_S, seen=window))

    # -- false alarms: windows of the reference mix ----------------------------------------
    say(f"false alarms: {seeds_calm} reference-mix windows vs the reference")
    window_alarms = 0
    for seed in range(seeds_calm):
        window_texts, window_vectors = draw(np.random.default_rng(10_000 + seed))
        detector.restore({"keys": {}})  # every window is checked against the reference only
        window_alarms += bool(check(WINDOW_GAP_S * (seed + 1), window_texts, window_vectors))
    say(f"false alarms: a {CALM_STREAM_WINDOWS}-window calm stream (skew + drift)")
    detector.restore({"keys": {}})
    rng = np.random.default_rng(99)
    stream = {"skew": 0, "drift": 0}
    for i in range(CALM_STREAM_WINDOWS):
        for finding in check(WINDOW_GAP_S * (i + 1), *draw(rng)):
            stream[finding.kind] += 1
    # The first stream window has no history to drift from.
    stream_checks = 2 * CALM_STREAM_WINDOWS - detector.min_history_windows
    checks = seeds_calm + stream_checks
    alarms = window_alarms + stream["skew"] + stream["drift"]
    calm_done = time.perf_counter()

    # -- power: two calm windows, then a shifted one -----------------------------------------
    say(f"power: {seeds_shift} seeds x {len(SHIFT_KINDS)} kinds x {len(shifts)} shares")
    tally = {kind: {share: {"skew": 0, "drift": 0, "any": 0, "skew_decided_by": {}}
                    for share in shifts} for kind in SHIFT_KINDS}
    calm_seeds_with_findings = calm_findings = 0
    for seed in range(seeds_shift):
        rng = np.random.default_rng(20_000 + seed)
        # Distinct event times per seed, so the detector's folds differ between seeds too.
        base = 1.0e6 * (seed + 1)
        detector.restore({"keys": {}})
        calm = [check(base + WINDOW_GAP_S * (i + 1), *draw(rng)) for i in range(2)]
        raised = sum(len(found) for found in calm)
        calm_findings += raised
        calm_seeds_with_findings += bool(raised)
        # The same two calm windows precede every shifted one of this seed.
        after_calm = detector.snapshot()
        for kind_index, kind in enumerate(SHIFT_KINDS):
            for share in shifts:
                detector.restore(after_calm)
                shift_rng = np.random.default_rng([20_000 + seed, kind_index,
                                                   int(round(share * 1000))])
                found = check(base + WINDOW_GAP_S * 3, *draw(shift_rng, kind, share))
                kinds = {f.kind for f in found if not f.resolved}
                row = tally[kind][share]
                row["skew"] += "skew" in kinds
                row["drift"] += "drift" in kinds
                row["any"] += bool(kinds)
                for f in found:
                    if f.kind == "skew" and not f.resolved:
                        for name in f.evidence["decided_by"]:
                            row["skew_decided_by"][name] = row["skew_decided_by"].get(name, 0) + 1
        if progress and (seed + 1) % max(1, seeds_shift // 10) == 0:
            say(f"  power: {seed + 1}/{seeds_shift} seeds")
    finished = time.perf_counter()

    power = {kind: [{"share": share, "seeds": seeds_shift,
                     "skew_detected": row["skew"], "skew_rate": row["skew"] / seeds_shift,
                     "drift_detected": row["drift"], "drift_rate": row["drift"] / seeds_shift,
                     "any_rate": row["any"] / seeds_shift,
                     "skew_decided_by": dict(sorted(row["skew_decided_by"].items()))}
                    for share, row in tally[kind].items()]
             for kind in SHIFT_KINDS}
    smallest = {kind: next((r["share"] for r in sorted(rows, key=lambda r: r["share"])
                            if r["skew_rate"] >= RELIABLE_DETECTION), None)
                for kind, rows in power.items()}
    return {
        "detector": {"alpha": detector.alpha, "permutations": detector.permutations,
                     "reference_sample_size": detector.reference_sample_size,
                     "history_windows": detector.history_windows,
                     "skew_decide_on": list(detector.skew_decide_on),
                     "drift_decide_on": list(detector.drift_decide_on),
                     "window_size": window, "overrides": dict(detector_kwargs)},
        "data": {"clinc_dir": str(clinc_dir), "key": KEY,
                 "pool_rows": {name: len(items) for name, items in texts.items()},
                 "embeddings_cached": cached},
        "false_alarms": {
            "alarms": alarms, "checks": checks, "rate": alarms / checks,
            # One-sided 95% Clopper-Pearson bound: what the checks can vouch for.
            "rate_upper_95": float(stats.beta.ppf(0.95, alarms + 1, checks - alarms)),
            "reference_windows": {"windows": seeds_calm, "alarms": window_alarms},
            "calm_stream": {"windows": CALM_STREAM_WINDOWS, "checks": stream_checks,
                            "skew_findings": stream["skew"], "drift_findings": stream["drift"]},
        },
        "power": power,
        "calm_before_shift": {"seeds": seeds_shift, "windows": 2 * seeds_shift,
                              "seeds_with_findings": calm_seeds_with_findings,
                              "findings": calm_findings},
        "reliable_detection": RELIABLE_DETECTION,
        "smallest_reliable_shift": smallest,
        "timings_s": {"embeddings": round(embedded - started, 2),
                      "false_alarms": round(calm_done - embedded, 2),
                      "power": round(finished - calm_done, 2),
                      "total": round(finished - started, 2)},
    }


def format_table(result: Mapping[str, Any]) -> str:
    """The figures of :func:`evaluate_clinc` as a small text table."""
    d, far = result["detector"], result["false_alarms"]
    lines = [
        f"DriftDetector alpha={d['alpha']} permutations={d['permutations']} "
        f"reference_sample_size={d['reference_sample_size']} window={d['window_size']}",
        f"false alarms: {far['alarms']}/{far['checks']} checks = {far['rate']:.4f} "
        f"(95% upper bound {far['rate_upper_95']:.4f}; {far['reference_windows']['alarms']}/"
        f"{far['reference_windows']['windows']} reference-mix windows, "
        f"{far['calm_stream']['skew_findings'] + far['calm_stream']['drift_findings']} findings "
        f"in {far['calm_stream']['checks']} calm-stream checks)",
        f"calm windows before a shift: {result['calm_before_shift']['seeds_with_findings']}/"
        f"{result['calm_before_shift']['seeds']} seeds raised a finding",
        f"{'shift kind':15} {'share':>6} {'skew':>7} {'drift':>7} {'either':>7}",
    ]
    for kind, rows in result["power"].items():
        for r in rows:
            lines.append(f"{kind:15} {r['share']:6.2f} {r['skew_rate']:7.2f} "
                         f"{r['drift_rate']:7.2f} {r['any_rate']:7.2f}")
    smallest = ", ".join(f"{k}={'none' if v is None else f'{v:.2f}'}"
                         for k, v in result["smallest_reliable_shift"].items())
    lines.append(f"smallest share detected (skew) in >= "
                 f"{result['reliable_detection']:.0%} of seeds: {smallest}")
    lines.append(f"wall time: {result['timings_s']['total']:.1f} s "
                 f"(embeddings {result['timings_s']['embeddings']:.1f} s)")
    return "\n".join(lines)
