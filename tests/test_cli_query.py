"""`agentwatch query` over snapshot files, in each output format."""

from __future__ import annotations

import json
import time

from click.testing import CliRunner

from agentwatch.cli import main
from agentwatch.events import Finding, LlmCall, Severity
from agentwatch.streams.snapshots import SnapshotSink


def _data(tmp_path):
    sink = SnapshotSink(tmp_path, writer_id="t")
    sink.add_events([LlmCall(ts=1_800_000_000.0 + i, trace_id=f"t{i}", span_id="s", model=m, cost_usd=c)
                     for i, (m, c) in enumerate([("gpt-4o", 0.25), ("gpt-4o", 0.5), ("o3", 1.0)])])
    sink.flush(force=True)
    return tmp_path


SQL = "SELECT model, sum(cost_usd) AS cost FROM llm_calls GROUP BY model ORDER BY model"


def test_query_prints_csv(tmp_path):
    csv_out = CliRunner().invoke(main, ["query", SQL, "--format", "csv", "--data-dir", str(_data(tmp_path))])
    assert csv_out.exit_code == 0, csv_out.output
    assert csv_out.output.splitlines() == ['"model","cost"', '"gpt-4o",0.75', '"o3",1']


def test_query_json_is_one_array_and_jsonl_one_object_per_line(tmp_path):
    data = _data(tmp_path)
    expected = [{"model": "gpt-4o", "cost": 0.75}, {"model": "o3", "cost": 1.0}]
    json_out = CliRunner().invoke(main, ["query", SQL, "--format", "json", "--data-dir", str(data)])
    assert json_out.exit_code == 0, json_out.output
    assert json.loads(json_out.output) == expected
    jsonl_out = CliRunner().invoke(main, ["query", SQL, "--format", "jsonl", "--data-dir", str(data)])
    assert jsonl_out.exit_code == 0, jsonl_out.output
    assert [json.loads(line) for line in jsonl_out.output.splitlines()] == expected


def test_query_json_of_no_rows_is_an_empty_array_and_jsonl_prints_nothing(tmp_path):
    data = _data(tmp_path)
    sql = "SELECT model FROM llm_calls WHERE model = 'none'"
    assert CliRunner().invoke(main, ["query", sql, "--format", "json", "--data-dir", str(data)]).output == "[]\n"
    assert CliRunner().invoke(main, ["query", sql, "--format", "jsonl", "--data-dir", str(data)]).output == ""


def test_query_table_and_errors(tmp_path):
    data = _data(tmp_path)
    table = CliRunner().invoke(main, ["query", "SELECT count(*) AS n FROM llm_calls", "--data-dir", str(data)])
    assert table.exit_code == 0 and "3" in table.output
    bad = CliRunner().invoke(main, ["query", "SELECT nope FROM llm_calls", "--data-dir", str(data)])
    assert bad.exit_code != 0 and "query failed" in bad.output


def test_query_on_empty_data_dir_sees_empty_typed_views(tmp_path):
    out = CliRunner().invoke(main, ["query", "SELECT count(*) AS n, sum(cost_usd) AS c FROM llm_calls",
                                    "--format", "json", "--data-dir", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output) == [{"n": 0, "c": None}]


# -- agentwatch findings --------------------------------------------------------------------

NOW = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC


def _finding(detector, key, kind, severity, ago_s, value=0.0, threshold=0.0, resolved=False):
    return Finding(detector=detector, key=key, kind=kind, severity=Severity(severity), ts=NOW - ago_s,
                   value=value, threshold=threshold, evidence={"why": "test"}, resolved=resolved)


def _findings_data(tmp_path):
    rows = [
        # fired, resolved, fired again (the second firing delivered twice): open since its first firing
        _finding("vram_leak", "host=h1/gpu=0", "leak", "warning", 5 * 3600, 1.2e9, 1e9),
        _finding("vram_leak", "host=h1/gpu=0", "leak", "info", 4 * 3600, resolved=True),
        _finding("vram_leak", "host=h1/gpu=0", "leak", "critical", 1800, 2.5e9, 1e9),
        _finding("vram_leak", "host=h1/gpu=0", "leak", "critical", 1800, 2.5e9, 1e9),
        # a loop that fired and was resolved when its trace went idle
        _finding("agent_loop", "t1", "repeated_tool_call", "warning", 3000, 3, 3),
        _finding("agent_loop", "t1", "repeated_tool_call", "info", 2000, resolved=True),
        # an old one, still open, last seen two days ago
        _finding("cost_anomaly", "project=shop/model=gpt-4o", "spike", "warning", 2 * 86400, 4.5, 3),
        # fired and resolved at the same instant: the firing counts
        _finding("retry_storm", "service=api", "retries", "warning", 600, 12, 10),
        _finding("retry_storm", "service=api", "retries", "info", 600, resolved=True),
    ]
    sink = SnapshotSink(tmp_path, writer_id="t")
    sink.add_events(rows)
    sink.flush(force=True)
    return tmp_path


def _findings(monkeypatch, data, *args):
    monkeypatch.setattr(time, "time", lambda: NOW)
    return CliRunner().invoke(main, ["findings", "--data-dir", str(data), *args])


def test_findings_table_shows_each_key_once_with_its_latest_state(tmp_path, monkeypatch):
    out = _findings(monkeypatch, _findings_data(tmp_path))
    assert out.exit_code == 0, out.output
    assert out.output == """\
STATE     SEVERITY  DETECTOR      KIND                KEY                        VALUE    THRESHOLD  FIRST SEEN            LAST SEEN             RESOLVED AT           FIRINGS
open      critical  vram_leak     leak                host=h1/gpu=0              2.5e+09  1e+09      2027-01-15 03:00:00Z  2027-01-15 07:30:00Z  -                     2
open      warning   retry_storm   retries             service=api                12       10         2027-01-15 07:50:00Z  2027-01-15 07:50:00Z  -                     1
open      warning   cost_anomaly  spike               project=shop/model=gpt-4o  4.5      3          2027-01-13 08:00:00Z  2027-01-13 08:00:00Z  -                     1
resolved  warning   agent_loop    repeated_tool_call  t1                         3        3          2027-01-15 07:10:00Z  2027-01-15 07:10:00Z  2027-01-15 07:26:40Z  1
"""  # noqa: E501


def test_findings_filters_by_since_detector_and_open(tmp_path, monkeypatch):
    data = _findings_data(tmp_path)

    def keys(*args):
        out = _findings(monkeypatch, data, "--format", "jsonl", *args)
        assert out.exit_code == 0, out.output
        return [(r["detector"], r["state"]) for r in map(json.loads, out.output.splitlines())]

    assert keys("--since", "1h") == [("vram_leak", "open"), ("retry_storm", "open"), ("agent_loop", "resolved")]
    assert keys("--since", "30m") == [("vram_leak", "open"), ("retry_storm", "open")]
    assert keys("--since", "2d") == keys() == [("vram_leak", "open"), ("retry_storm", "open"),
                                               ("cost_anomaly", "open"), ("agent_loop", "resolved")]
    assert keys("--open", "--since", "1h") == [("vram_leak", "open"), ("retry_storm", "open")]
    assert keys("--detector", "agent_loop") == [("agent_loop", "resolved")]
    assert keys("--detector", "agent_loop", "--detector", "retry_storm", "--open") == [("retry_storm", "open")]


def test_findings_json_is_one_array_with_unix_timestamps(tmp_path, monkeypatch):
    out = _findings(monkeypatch, _findings_data(tmp_path), "--format", "json", "--detector", "agent_loop")
    assert out.exit_code == 0, out.output
    assert json.loads(out.output) == [{
        "state": "resolved", "severity": "warning", "detector": "agent_loop", "kind": "repeated_tool_call",
        "key": "t1", "value": 3.0, "threshold": 3.0, "first_seen": NOW - 3000, "last_seen": NOW - 3000,
        "resolved_at": NOW - 2000, "firings": 1}]


def test_findings_with_none_and_a_bad_duration(tmp_path, monkeypatch):
    assert _findings(monkeypatch, tmp_path).output == "no findings\n"
    assert _findings(monkeypatch, tmp_path, "--format", "json").output == "[]\n"
    bad = _findings(monkeypatch, tmp_path, "--since", "an hour")
    assert bad.exit_code == 2 and "not a duration like 30m, 1h or 2d" in bad.output
