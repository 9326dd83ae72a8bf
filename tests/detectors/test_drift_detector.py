"""DriftDetector on seeded synthetic embeddings: positions, evidence, contract."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agentwatch.detectors.drift import DriftDetector, EmbeddedWindow
from agentwatch.events import Finding, Severity

DIM = 16
KEY = "service=shop"


def _window(rng, ts, size=100, shift=0.0, key=KEY, label="q"):
    vectors = rng.normal(size=(size, DIM))
    vectors[:, 0] += shift
    return EmbeddedWindow(key, ts, tuple(f"{label} {i}" for i in range(size)), vectors,
                          start_ts=ts - 60.0, seen=size * 3)


def _stream(seed=2, shifted_from=5, n=8):
    rng = np.random.default_rng(seed)
    return [_window(rng, 60.0 * (i + 1), shift=2.0 if i >= shifted_from else 0.0,
                    label="moved" if i >= shifted_from else "calm") for i in range(n)]


def _reference(seed=0, rows=400):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(rows, DIM)), [f"calm ref {i}" for i in range(rows)]


def _run(detector, windows):
    return [detector.update(w) for w in windows]


def test_skew_and_drift_fire_at_the_shift_and_drift_resolves_after_it():
    detector = DriftDetector(history_windows=1, permutations=100)
    detector.set_reference(KEY, *_reference())
    out = _run(detector, _stream())
    kinds = [[(f.kind, f.resolved) for f in found] for found in out]
    # Windows 0-4 match the reference; 5-7 moved by 2 sd on one axis. Drift compares with the
    # single previous window, so it fires on the first moved window only and resolves next.
    assert kinds[:5] == [[]] * 5
    assert kinds[5] == [("skew", False), ("drift", False)]
    assert kinds[6] == [("skew", False), ("drift", True)]
    assert kinds[7] == [("skew", False)]
    skew = out[5][0]
    assert isinstance(skew, Finding) and skew.detector == "drift" and skew.key == KEY
    assert skew.ts == 360.0 and skew.value > skew.threshold
    assert skew.evidence["window_size"] == 100 and skew.evidence["comparison_size"] == 400
    assert skew.evidence["reference_size"] == 400 and skew.evidence["window_seen"] == 300
    assert "mmd" in skew.evidence["decided_by"]
    scores = skew.evidence["scores"]
    for name in ("mmd", "centroid_cosine", "centroid_euclidean", "classifier_auc",
                 "drifted_components", "vocab_jsd", "new_token_share", "ood_share"):
        assert {"score", "threshold", "drifted"} <= set(scores[name])
    # Every window text says "moved", every reference text "calm": the vocabulary moved fully.
    assert scores["new_token_share"]["score"] == pytest.approx(0.5)  # "moved" of "moved i"
    assert scores["classifier_auc"]["score"] > 0.9
    json.dumps(skew.evidence)


def test_no_reference_means_no_skew_and_first_window_is_warm_up():
    detector = DriftDetector(history_windows=2, min_history_windows=2, permutations=100)
    out = _run(detector, _stream(shifted_from=3, n=5))
    # Window 0, 1: history too short. Window 2: calm vs calm. Window 3: moved vs calm.
    assert [[f.kind for f in found] for found in out] == [[], [], [], ["drift"], ["drift"]]


def test_out_of_distribution_rows_decide_and_are_the_examples():
    rng = np.random.default_rng(3)
    detector = DriftDetector(permutations=100, max_examples=4)
    reference, texts = _reference()
    reference[:, -4:] = 0.0  # the reference never uses the last 4 dimensions
    detector.set_reference(KEY, reference, texts)
    vectors = rng.normal(size=(100, DIM))
    vectors[:, -4:] = 0.0
    far = [7, 21, 50, 77, 90, 95, 3, 33, 66, 99, 12, 44]
    # Far rows live only in the unused dimensions: cosine similarity 0 to every reference row.
    vectors[far] = 0.0
    vectors[np.ix_(far, range(DIM - 4, DIM))] = rng.normal(size=(len(far), 4))
    texts = tuple(f"far {i}" if i in far else f"calm {i}" for i in range(100))
    found = detector.update(EmbeddedWindow(KEY, 60.0, texts, vectors))
    skew = [f for f in found if f.kind == "skew"]
    assert len(skew) == 1
    evidence = skew[0].evidence
    assert "ood_share" in evidence["decided_by"]
    assert evidence["scores"]["ood_share"]["score"] >= len(far) / 100
    assert [e["text"].split()[0] for e in evidence["examples"]] == ["far"] * 4
    assert all(abs(e["nearest_similarity"]) < 1e-6 for e in evidence["examples"])


def test_windows_smaller_than_min_are_skipped_and_not_kept():
    detector = DriftDetector(min_window_size=50, permutations=50)
    rng = np.random.default_rng(0)
    assert detector.update(_window(rng, 60.0, size=20)) == ()
    assert detector.snapshot()["keys"] == {}


def test_severity_is_critical_when_several_deciding_tests_reject():
    detector = DriftDetector(permutations=100)
    detector.set_reference(KEY, *_reference())
    found = detector.update(_window(np.random.default_rng(2), 60.0, shift=10.0))
    skew = found[0]
    assert set(skew.evidence["decided_by"]) == {"mmd", "ood_share"}
    assert skew.severity is Severity.CRITICAL


def test_snapshot_restore_round_trip_gives_identical_findings():
    windows = _stream(seed=4, shifted_from=4, n=7)
    reference = _reference()
    first = DriftDetector(permutations=100)
    first.set_reference(KEY, *reference)
    _run(first, windows[:3])
    snap = json.loads(json.dumps(first.snapshot()))
    second = DriftDetector(permutations=100)
    second.set_reference(KEY, *reference)
    second.restore(snap)
    assert _run(first, windows[3:]) == _run(second, windows[3:])


def test_deterministic_across_instances_and_seed_changes_the_permutations():
    windows = _stream(seed=5)
    runs = []
    for seed in (0, 0, 1):
        detector = DriftDetector(permutations=100, seed=seed)
        detector.set_reference(KEY, *_reference())
        runs.append([[f.evidence["scores"]["mmd"]["threshold"] for f in found]
                     for found in _run(detector, windows)])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_state_is_bounded():
    detector = DriftDetector(max_keys=3, history_windows=2, permutations=50)
    rng = np.random.default_rng(6)
    for i in range(12):
        detector.update(_window(rng, 60.0 * (i + 1), size=40, key=f"service=s{i % 6}"))
    snap = detector.snapshot()["keys"]
    assert list(snap) == ["service=s3", "service=s4", "service=s5"]
    assert all(len(state["history"]) <= 2 for state in snap.values())


def test_large_reference_is_subsampled_and_window_dimension_mismatch_skips_skew():
    detector = DriftDetector(max_reference_rows=100, permutations=50)
    detector.set_reference(KEY, *_reference(rows=300))
    rng = np.random.default_rng(7)
    wrong = EmbeddedWindow(KEY, 60.0, ("q",) * 40, rng.normal(size=(40, DIM + 1)))
    assert detector.update(wrong) == ()
    found = detector.update(_window(rng, 120.0, shift=5.0))
    assert found[0].kind == "skew" and found[0].evidence["reference_size"] == 100


@pytest.mark.parametrize("kwargs", [
    {"alpha": 0.0}, {"alpha": 0.6}, {"permutations": 5}, {"history_windows": 0},
    {"min_history_windows": 4}, {"min_window_size": 2}, {"skew_decide_on": ()},
    {"skew_decide_on": ("nope",)}, {"drift_decide_on": ("ood_share",)}, {"ood_quantile": 0.7},
    {"ood_similarity_threshold": 2.0}, {"ood_rate_slack": 0.5}, {"component_threshold": 0.0},
    {"component_share_threshold": 1.0}, {"max_keys": 0}, {"max_examples": -1},
    {"reference_sample_size": 3}, {"max_reference_rows": 5},
])
def test_invalid_config_is_rejected(kwargs):
    with pytest.raises(ValueError):
        DriftDetector(**kwargs)


def test_config_is_stored_under_its_names():
    detector = DriftDetector(alpha=0.02, permutations=77, history_windows=5, seed=9)
    assert (detector.alpha, detector.permutations, detector.history_windows, detector.seed) == \
        (0.02, 77, 5, 9)


def test_bad_reference_and_bad_window_raise():
    detector = DriftDetector()
    with pytest.raises(ValueError):
        detector.set_reference(KEY, np.zeros((5, DIM)))
    with pytest.raises(ValueError):
        detector.set_reference(KEY, np.zeros((20, DIM)), ["a"] * 3)
    with pytest.raises(ValueError):
        detector.update(EmbeddedWindow(KEY, 1.0, ("a", "b"), np.zeros((3, DIM))))


def test_registered():
    from agentwatch.detectors.registry import DETECTORS

    assert DETECTORS["drift"] is DriftDetector
    assert DriftDetector.accepts == (EmbeddedWindow,)
