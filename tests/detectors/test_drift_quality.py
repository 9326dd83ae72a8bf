"""``evaluate_clinc`` / ``agentwatch drift evaluate`` on the real CLINC150 pools, few seeds.

The pools are the CLINC test's (same subsample, same digest), so both share the embedding
cache under pytest's cache dir and embed only once.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from clinc_helpers import CLINC, POOL_SIZES, embedding_cache_dir
from click.testing import CliRunner

from agentwatch.detectors.drift import DriftDetector
from agentwatch.reference_cli import drift_group
from bench import drift_quality
from bench.drift_quality import evaluate_clinc, format_table

SEEDS_CALM, SEEDS_SHIFT, SHIFTS = 20, 5, (0.15, 1.0)


@pytest.fixture(scope="module")
def result(request, tmp_path_factory):
    return evaluate_clinc(CLINC, seeds_calm=SEEDS_CALM, seeds_shift=SEEDS_SHIFT, shifts=SHIFTS,
                          cache_dir=embedding_cache_dir(request, tmp_path_factory),
                          pool_sizes=POOL_SIZES)


def test_settings_are_the_product_defaults(result):
    from agentwatch.streams.drift_sampler import DriftSampler

    defaults = DriftDetector()
    settings = result["detector"]
    assert settings["alpha"] == defaults.alpha
    assert settings["permutations"] == defaults.permutations
    assert settings["reference_sample_size"] == defaults.reference_sample_size
    assert settings["window_size"] == DriftSampler().sample_size
    assert settings["overrides"] == {}
    assert result["data"]["pool_rows"] == {"reference": 2000, **POOL_SIZES}
    assert json.loads(json.dumps(result)) == result  # JSON-able as it is


def test_false_alarm_counts_add_up_and_stay_rare(result):
    far = result["false_alarms"]
    stream = far["calm_stream"]
    # 20 skew-only windows + 40 stream windows with skew, 39 of them with drift too.
    assert far["checks"] == SEEDS_CALM + 2 * 40 - 1
    assert stream["checks"] == 79 and far["reference_windows"]["windows"] == SEEDS_CALM
    assert far["alarms"] == (far["reference_windows"]["alarms"] + stream["skew_findings"]
                             + stream["drift_findings"])
    assert far["rate"] == pytest.approx(far["alarms"] / far["checks"])
    assert 0.0 <= far["rate"] <= far["rate_upper_95"] <= 1.0
    # The bound is 1% over many seeds; with 99 checks, 5% still rejects a broken test.
    assert far["rate"] <= 0.05
    calm = result["calm_before_shift"]
    assert calm["windows"] == 2 * SEEDS_SHIFT
    assert 0 <= calm["seeds_with_findings"] <= 1


def test_full_shift_is_detected_in_every_seed_and_rates_are_consistent(result):
    assert set(result["power"]) == {"other_domains", "out_of_scope"}
    for kind, rows in result["power"].items():
        assert [r["share"] for r in rows] == list(SHIFTS)
        for r in rows:
            assert r["seeds"] == SEEDS_SHIFT
            for name in ("skew", "drift"):
                assert 0 <= r[f"{name}_detected"] <= SEEDS_SHIFT
                assert r[f"{name}_rate"] == pytest.approx(r[f"{name}_detected"] / SEEDS_SHIFT)
            assert max(r["skew_rate"], r["drift_rate"]) <= r["any_rate"] <= 1.0
            # Each detecting seed names at least one deciding statistic, none it cannot.
            assert set(r["skew_decided_by"]) <= {"mmd", "ood_share"}
            assert max(r["skew_decided_by"].values(), default=0) <= r["skew_detected"]
            if r["skew_detected"]:
                assert sum(r["skew_decided_by"].values()) >= r["skew_detected"]
        full = rows[-1]
        # A window made only of other prompts is skewed and drifted in every seed.
        assert full["skew_rate"] == 1.0 and full["drift_rate"] == 1.0, (kind, full)
        smallest = next((r["share"] for r in rows if r["skew_rate"] >= 0.9), None)
        assert result["smallest_reliable_shift"][kind] == smallest


def test_table_and_cli_write_the_figures(result, tmp_path, monkeypatch):
    table = format_table(result)
    assert "false alarms:" in table and "out_of_scope" in table
    calls = []

    def fake(clinc_dir, **kwargs):
        calls.append((Path(clinc_dir), kwargs))
        return result

    # The command imports evaluate_clinc from the module when it runs, so the figures above
    # stand in for a default-sized run (which embeds the full pools).
    monkeypatch.setattr(drift_quality, "evaluate_clinc", fake)
    out = tmp_path / "quality.json"
    run = CliRunner().invoke(drift_group, ["evaluate", "--seeds-calm", "7", "--seeds-shift", "3",
                                           "--shifts", "0.1,0.5", "--clinc-dir", str(CLINC),
                                           "-o", str(out)])
    assert run.exit_code == 0, run.output
    assert json.loads(out.read_text()) == result
    assert table in run.output
    (clinc_dir, kwargs), = calls
    assert clinc_dir == CLINC
    assert (kwargs["seeds_calm"], kwargs["seeds_shift"], kwargs["shifts"]) == (7, 3, (0.1, 0.5))
    bad = CliRunner().invoke(drift_group, ["evaluate", "--shifts", "a,b", "-o", str(out)])
    assert bad.exit_code != 0 and "--shifts" in bad.output


@pytest.mark.parametrize("kwargs", [{"shifts": ()}, {"shifts": (0.0,)}, {"shifts": (1.5,)},
                                    {"seeds_calm": 0}, {"seeds_shift": 0}])
def test_invalid_arguments_are_refused_before_any_work(kwargs, tmp_path):
    with pytest.raises(ValueError):
        evaluate_clinc(tmp_path / "missing", cache_dir=tmp_path, **kwargs)
