"""Drift on real prompts (CLINC150) with the real embedding model, and agreement with Evidently.

The pools are embedded once per session and cached as .npy under pytest's cache dir, so the
many-seed false-alarm measurement runs on cached vectors.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from clinc_helpers import CLINC, POOL_SIZES, embedding_cache_dir

from agentwatch.detectors.drift import (DriftDetector, EmbeddedWindow, centroid_distances,
                                        classifier_auc, component_wasserstein, mmd2_unbiased)
from agentwatch.reference import mixed_window
from bench.drift_quality import clinc_pools

KEY = "service=assistant"
WINDOW = 200  # DriftSampler's default sample_size


@pytest.fixture(scope="module")
def pools(request, tmp_path_factory):
    texts, vectors, _ = clinc_pools(CLINC, pool_sizes=POOL_SIZES,
                                    cache_dir=embedding_cache_dir(request, tmp_path_factory))
    return texts, vectors


def _window(pools, rng, other_share=0.0, oos_share=0.0, size=WINDOW):
    texts, vectors = pools
    items = mixed_window([("in_mix", i) for i in range(len(texts["in_mix"]))], size, rng,
                         other=[("other_domains", i) for i in range(len(texts["other_domains"]))],
                         other_share=other_share,
                         oos=[("out_of_scope", i) for i in range(len(texts["out_of_scope"]))],
                         oos_share=oos_share)
    return (tuple(texts[p][i] for p, i in items),
            np.stack([vectors[p][i] for p, i in items]))


def _detector(pools, **kwargs):
    texts, vectors = pools
    detector = DriftDetector(**kwargs)
    detector.set_reference(KEY, vectors["reference"], texts["reference"], name="clinc-5-domains")
    return detector


def test_false_alarm_rate_on_reference_mix_windows_is_at_most_one_percent(pools):
    detector = _detector(pools)
    seeds = 200
    alarms = 0
    for seed in range(seeds):
        texts, vectors = _window(pools, np.random.default_rng(10_000 + seed))
        # A fresh key per seed: every window is checked against the reference only.
        detector.restore({"keys": {}})
        alarms += bool(detector.update(EmbeddedWindow(KEY, 300.0 * (seed + 1), texts, vectors)))
    # Also the drift-over-time path: one long calm stream of the same mix.
    stream_alarms = 0
    detector.restore({"keys": {}})
    rng = np.random.default_rng(99)
    for i in range(40):
        texts, vectors = _window(pools, rng)
        stream_alarms += len(detector.update(EmbeddedWindow(KEY, 300.0 * (i + 1), texts,
                                                            vectors)))
    checks = seeds + 40 * 2 - 1  # the first stream window has no history to drift from
    rate = (alarms + stream_alarms) / checks
    print(f"\nCLINC false-alarm rate: {alarms}/{seeds} skew-only windows, {stream_alarms} "
          f"findings in a 40-window stream -> {rate:.4f}")
    assert rate <= 0.01


@pytest.mark.parametrize("other_share,oos_share", [(0.15, 0.0), (0.0, 0.15), (1.0, 0.0)])
def test_shifted_window_is_detected_within_one_window(pools, other_share, oos_share):
    for seed in range(5):
        rng = np.random.default_rng(seed)
        detector = _detector(pools)
        calm = [_window(pools, rng) for _ in range(2)]
        shifted = _window(pools, rng, other_share=other_share, oos_share=oos_share)
        out = [detector.update(EmbeddedWindow(KEY, 300.0 * (i + 1), t, v))
               for i, (t, v) in enumerate([*calm, shifted])]
        assert out[0] == () and out[1] == ()
        kinds = {f.kind for f in out[2]}
        assert "skew" in kinds, (seed, [f.evidence["scores"] for f in out[2]])
        if other_share == 1.0:
            assert kinds == {"skew", "drift"}
        skew = next(f for f in out[2] if f.kind == "skew")
        moved = set(pools[0]["other_domains"]) | set(pools[0]["out_of_scope"])
        # The examples that moved most are mostly the injected prompts.
        examples = [e["text"] for e in skew.evidence["examples"]]
        assert sum(e in moved for e in examples) >= 3, examples


def test_scores_agree_with_evidently_on_the_same_samples(pools):
    from evidently.metrics.embeddings import (DistanceDriftMethod, MMDDriftMethod,
                                              ModelDriftMethod, RatioDriftMethod)

    texts, vectors = pools
    ref = vectors["reference"][:800].astype(np.float64)
    rng = np.random.default_rng(5)
    for other_share in (0.0, 0.5):
        _, cur = _window(pools, rng, other_share=other_share)
        cur = cur.astype(np.float64)

        def evidently(method):
            return method(pd.DataFrame(cur), pd.DataFrame(ref))[0]

        assert max(mmd2_unbiased(ref, cur), 0.0) == pytest.approx(
            evidently(MMDDriftMethod()), rel=1e-9, abs=1e-12)
        cosine, euclidean = centroid_distances(ref, cur)
        assert cosine == pytest.approx(evidently(DistanceDriftMethod(dist="cosine")), rel=1e-9)
        assert euclidean == pytest.approx(evidently(DistanceDriftMethod(dist="euclidean")),
                                          rel=1e-9)
        share = float((component_wasserstein(ref, cur) >= 0.1).mean())
        assert share == pytest.approx(evidently(RatioDriftMethod()), abs=1e-12)
        ours = classifier_auc(ref, cur, np.random.default_rng(0))
        theirs = evidently(ModelDriftMethod())
        # Different classifiers (shrinkage LDA vs SGD logistic regression), same question.
        assert abs(ours - theirs) < 0.1, (ours, theirs)
        if other_share:
            # Half the window is still in-mix, so a perfect separator of the rest scores 0.75.
            assert ours > 0.68 and theirs > 0.68
        else:
            assert ours < 0.65 and theirs < 0.65
