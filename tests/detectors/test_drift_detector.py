"""DriftDetector on seeded synthetic embeddings: positions, evidence, contract."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agentwatch.detectors.drift import (DECIDING_STATISTICS, DriftDetector, EmbeddedWindow,
                                        deciding_statistic)
from agentwatch.detectors.findings import evidence_of
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


def _out_of_distribution_window():
    """12 of 100 rows far from a reference that never uses the last 4 dimensions."""
    rng = np.random.default_rng(3)
    reference, texts = _reference()
    reference[:, -4:] = 0.0  # the reference never uses the last 4 dimensions
    vectors = rng.normal(size=(100, DIM))
    vectors[:, -4:] = 0.0
    far = [7, 21, 50, 77, 90, 95, 3, 33, 66, 99, 12, 44]
    # Far rows live only in the unused dimensions: cosine similarity 0 to every reference row.
    vectors[far] = 0.0
    vectors[np.ix_(far, range(DIM - 4, DIM))] = rng.normal(size=(len(far), 4))
    window_texts = tuple(f"far {i}" if i in far else f"calm {i}" for i in range(100))
    return (reference, texts), EmbeddedWindow(KEY, 60.0, window_texts, vectors), far


def test_out_of_distribution_rows_decide_and_are_the_examples():
    detector = DriftDetector(permutations=100, max_examples=4)
    reference, window, far = _out_of_distribution_window()
    detector.set_reference(KEY, *reference)
    found = detector.update(window)
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


def test_out_of_distribution_share_alone_decides_with_its_own_value_and_threshold():
    # The case of issue 15: the MMD stays under its threshold, the OOD share does not, and the
    # finding must carry the OOD share's numbers so that value > threshold finds it.
    detector = DriftDetector(permutations=100)
    reference, window, far = _out_of_distribution_window()
    detector.set_reference(KEY, *reference)
    (skew,) = detector.update(window)
    evidence = evidence_of(skew)
    mmd, ood = evidence.scores["mmd"], evidence.scores["ood_share"]
    assert evidence.decided_by == ("ood_share",) and mmd["score"] < mmd["threshold"]
    assert evidence.statistic == "ood_share"
    # Every far row has similarity 0 to the reference, so each counts as out of distribution.
    assert skew.value == ood["score"] >= len(far) / 100
    assert skew.threshold == ood["threshold"] and skew.value > skew.threshold


def test_the_rejecting_statistic_with_the_smallest_p_value_decides():
    detector = DriftDetector(permutations=100)
    detector.set_reference(KEY, *_reference())
    (skew,) = detector.update(_window(np.random.default_rng(2), 60.0, shift=10.0))
    evidence = evidence_of(skew)
    p = {name: evidence.scores[name]["p_value"] for name in evidence.decided_by}
    assert len(p) == 2 and evidence.statistic == min(p, key=p.get)
    decided = evidence.scores[evidence.statistic]
    assert (skew.value, skew.threshold) == (decided["score"], decided["threshold"])


def test_deciding_statistic_prefers_rejections_then_p_values_then_order():
    scores = {"mmd": {"p_value": 0.001, "drifted": False},
              "ood_share": {"p_value": 0.002, "drifted": True},
              "classifier_auc": {"p_value": 0.002, "drifted": True},
              "vocab_jsd": {"p_value": None, "drifted": True}}
    assert deciding_statistic(scores, ("mmd", "ood_share", "classifier_auc")) == "ood_share"
    assert deciding_statistic(scores, ("mmd", "classifier_auc", "ood_share")) == "classifier_auc"
    assert deciding_statistic(scores, ("vocab_jsd", "ood_share")) == "ood_share"
    assert deciding_statistic(scores, ("new_token_share",)) == "mmd"


@pytest.mark.parametrize("statistic", [s for s in DECIDING_STATISTICS if s != "ood_share"])
def test_each_deciding_statistic_reports_its_own_value_and_threshold(statistic):
    detector = DriftDetector(history_windows=1, permutations=100, skew_decide_on=(statistic,),
                             drift_decide_on=(statistic,))
    detector.set_reference(KEY, *_reference())
    found = [f for out in _run(detector, _stream()) for f in out]
    assert {f.kind for f in found if not f.resolved} == {"skew", "drift"}
    assert any(f.resolved for f in found)
    for finding in found:
        evidence = evidence_of(finding)
        assert evidence.statistic == statistic
        own = evidence.scores[statistic]
        assert (finding.value, finding.threshold) == (own["score"], own["threshold"])
        assert (finding.value > finding.threshold) is (not finding.resolved)


def test_value_over_threshold_in_sql_finds_every_raised_finding():
    duckdb = pytest.importorskip("duckdb")
    found = []
    for kwargs in ({}, {"skew_decide_on": ("classifier_auc",),
                        "drift_decide_on": ("centroid_euclidean",)}):
        detector = DriftDetector(history_windows=1, permutations=100, **kwargs)
        detector.set_reference(KEY, *_reference())
        found += [f for out in _run(detector, _stream()) for f in out]
    detector = DriftDetector(permutations=100)
    reference, window, _ = _out_of_distribution_window()
    detector.set_reference(KEY, *reference)
    found += detector.update(window)
    rows = [(i, f.evidence["statistic"], f.value, f.threshold, f.resolved)
            for i, f in enumerate(found)]
    assert {r[1] for r in rows} == {"mmd", "ood_share", "classifier_auc", "centroid_euclidean"}
    db = duckdb.connect()
    db.execute("CREATE TABLE findings (i INT, statistic TEXT, value DOUBLE, threshold DOUBLE, "
               "resolved BOOLEAN)")
    db.executemany("INSERT INTO findings VALUES (?, ?, ?, ?, ?)", rows)
    alarms = {i for (i,) in db.execute("SELECT i FROM findings WHERE value > threshold").fetchall()}
    assert alarms == {i for i, f in enumerate(found) if not f.resolved}


def test_every_check_is_readable_after_update_raised_or_calm():
    detector = DriftDetector(history_windows=1, permutations=100)
    detector.set_reference(KEY, *_reference())
    drifted = []
    for window in _stream():
        found = detector.update(window)
        raised = {f.kind: f for f in found if not f.resolved}
        drifted.append([(c.kind, c.drifted) for c in detector.last_checks])
        for check in detector.last_checks:
            assert (check.key, check.ts) == (KEY, window.ts)
            assert check.statistic in check.evidence.deciding
            own = check.evidence.scores[check.statistic]
            assert (check.value, check.threshold) == (own["score"], own["threshold"])
            assert (check.value > check.threshold) is check.drifted
            if check.kind in raised:
                assert (raised[check.kind].value, raised[check.kind].threshold) == (
                    check.value, check.threshold)
    calm = [("skew", False), ("drift", False)]
    assert drifted == [[("skew", False)], calm, calm, calm, calm,
                       [("skew", True), ("drift", True)], [("skew", True), ("drift", False)],
                       [("skew", True), ("drift", False)]]
    detector.update(_window(np.random.default_rng(9), 600.0, size=10))
    assert detector.last_checks == ()
