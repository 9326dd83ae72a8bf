"""The default `agentwatch demo`: a clean baseline, then a mix of incidents (drift among them:
real stack, real embeddings), and a closing table that pairs every injected incident with the
finding it raised and the alert's delivery."""

from __future__ import annotations

from collections import Counter

import pytest
from stack_helpers import stack_settings

from agentwatch.demo import DEFAULT_INCIDENTS, EXPECTED, run_demo
from agentwatch.streams.snapshots import connect

pytestmark = pytest.mark.slow


def _routes(path, slack):
    detectors = ", ".join(EXPECTED[i].detector for i in DEFAULT_INCIDENTS)
    path.write_text(
        "destinations:\n"
        f"  slack:\n    type: slack\n    webhook_url: {slack.url}/hook\n"
        f"routes:\n  - name: demo\n    match: {{detector: [{detectors}]}}\n"
        "    destinations: [slack]\n    group_by: [detector]\n    group_wait_s: 0\n")
    return path


def test_default_demo_closes_with_every_incident_and_its_finding(tmp_path, receivers):
    _pagerduty, slack = receivers
    settings = stack_settings(tmp_path / "data", gpu_exporter="off",
                              alert_routes=_routes(tmp_path / "routes.yaml", slack),
                              alerts_state_dir=tmp_path / "alerts")
    said: list[str] = []
    summary = run_demo(settings, duration_s=40.0, say=said.append)

    table = said[-1].split("== incidents injected -> findings raised ==", 1)[1].splitlines()[2:]
    rows = {line.split()[0]: line for line in table}
    assert set(rows) == set(DEFAULT_INCIDENTS), said[-1]
    outcomes = {o["incident"]: o for o in summary["incident_outcomes"]}
    con = connect(settings.data_dir)
    try:
        for incident in DEFAULT_INCIDENTS:
            outcome, row = outcomes[incident], rows[incident]
            expected = EXPECTED[incident]
            assert outcome["injections"] > 0 and outcome["found_at"] is not None, row
            assert outcome["detector"] == expected.detector and expected.key_part in outcome["key"]
            # Found after it was injected, and the table says so with the same numbers.
            assert 0 < outcome["seconds_to_finding"] < 120, row
            assert row.split()[1:3] == [str(outcome["injections"]), expected.detector], row
            assert f"{outcome['seconds_to_finding']:.1f} s" in row and outcome["kind"] in row, row
            # The finding the table names is in the findings table, raised after the injection.
            (count,) = con.execute(
                "SELECT count(*) FROM findings WHERE detector = ? AND kind = ? AND key = ? "
                "AND NOT resolved AND ts >= ?", [expected.detector, outcome["kind"], outcome["key"],
                                                 outcome["injected_at"]]).fetchone()
            assert count >= 1, row
            assert outcome["delivered_to"] == ["slack"] or outcome["delivered_to"] == ("slack",), row
            assert "slack after" in row, row
        # Drift is raised on the service whose prompts changed; an unchanged one may see a rare
        # false alarm (at most 1% of windows), never more than the drifting one.
        drift = Counter(key for (key,) in con.execute(
            "SELECT key FROM findings WHERE detector = 'drift' AND NOT resolved").fetchall())
        assert drift[outcomes["drift"]["key"]] == max(drift.values()), drift
    finally:
        con.close()
    delivered = " ".join(str(r.body) for r in slack.snapshot())
    for incident in DEFAULT_INCIDENTS:
        assert EXPECTED[incident].detector in delivered, incident
