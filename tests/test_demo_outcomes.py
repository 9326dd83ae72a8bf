"""The demo's incident bookkeeping without a stack: findings read back from real snapshots,
the closing table, and the CLI's incident choice."""

from __future__ import annotations

from dataclasses import asdict

import pytest
from click.testing import CliRunner

from agentwatch import cli
from agentwatch.demo import (DEFAULT_INCIDENTS, EXPECTED, IncidentOutcome, format_incident_table,
                             look_for_findings)
from agentwatch.events import Finding, Severity
from agentwatch.streams.snapshots import SnapshotSink
from agentwatch.traffic import SERVICES

T0 = 1_800_000_000.0


def _write(data_dir, findings):
    sink = SnapshotSink(data_dir, writer_id="t")
    sink.add_events(findings)
    sink.flush(force=True)


def _finding(detector, key, ts, kind="k", resolved=False):
    return Finding(detector=detector, key=key, kind=kind, severity=Severity.WARNING, ts=ts,
                   value=2.0, threshold=1.0, resolved=resolved)


def test_the_first_finding_after_injection_on_the_incident_key_is_taken(tmp_path):
    bank, travel = f"service={SERVICES[0].name}", f"service={SERVICES[1].name}"
    _write(tmp_path, [
        _finding("drift", bank, T0 - 5, kind="before"),  # a baseline false alarm
        _finding("drift", travel, T0 + 3, kind="other_service"),
        _finding("drift", bank, T0 + 8, kind="resolution", resolved=True),
        _finding("drift", bank, T0 + 20, kind="drift"),
        _finding("drift", bank, T0 + 12, kind="drift"),
        _finding("agent_loop", "t1", T0 + 1, kind="repeated_tool_call"),
    ])
    drift = IncidentOutcome("drift", "drift", injections=3, injected_at=T0)
    loop = IncidentOutcome("loop", "agent_loop", injections=1, injected_at=T0 + 2)
    not_yet = IncidentOutcome("retry_storm", "retry_storm")
    found = look_for_findings(tmp_path, [drift, loop, not_yet], now=T0 + 30)
    assert found == [drift]
    assert (drift.kind, drift.key, drift.found_at, drift.seconds_to_finding) == (
        "drift", bank, T0 + 30, 30.0)
    # The loop finding came before this loop was injected: not this incident's.
    assert loop.found_at is None and not_yet.found_at is None


def test_closing_table_lists_each_incident_with_its_outcome():
    found = IncidentOutcome("loop", "agent_loop", injections=12, injected_at=T0, found_at=T0 + 2.25,
                            kind="repeated_tool_call", key="abc", severity="warning",
                            delivered_to=("slack",), delivered_at=T0 + 3.5)
    missing = IncidentOutcome("drift", "drift", injections=40, injected_at=T0)
    never = IncidentOutcome("cost_spike", "cost_anomaly")
    rows = [asdict(o) | {"seconds_to_finding": o.seconds_to_finding,
                         "seconds_to_delivery": o.seconds_to_delivery}
            for o in (found, missing, never)]
    lines = format_incident_table(rows, routes="routes.yaml")
    assert lines[2].split() == ["loop", "12", "agent_loop", "repeated_tool_call", "abc", "2.2", "s",
                                "slack", "after", "3.5", "s"]
    assert lines[3].split() == ["drift", "40", "drift", "NO", "FINDING"]
    assert lines[4].split()[:3] == ["cost_spike", "-", "cost_anomaly"] and "not injected" in lines[4]
    assert "no --alert-routes" in format_incident_table(rows[:1], routes=None)[2]


def test_every_default_incident_has_an_expectation():
    assert set(DEFAULT_INCIDENTS) <= set(EXPECTED)


@pytest.mark.parametrize("args, expected", [
    ([], None), (["--incident", "none"], ()), (["--incident", "loop", "--incident", "drift"],
                                               ("loop", "drift"))])
def test_cli_incident_choice(monkeypatch, tmp_path, args, expected):
    seen = {}
    monkeypatch.setattr("agentwatch.demo.run_demo", lambda settings, **kw: seen.update(kw))
    result = CliRunner().invoke(cli.main, ["demo", "--data-dir", str(tmp_path), *args])
    assert result.exit_code == 0, result.output
    assert seen["incidents"] == expected


def test_cli_refuses_none_with_other_incidents(tmp_path):
    result = CliRunner().invoke(cli.main, ["demo", "--data-dir", str(tmp_path), "--incident", "none",
                                           "--incident", "loop"])
    assert result.exit_code != 0 and "'none' cannot be combined" in result.output
