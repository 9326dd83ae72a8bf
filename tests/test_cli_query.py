"""`agentwatch query` over snapshot files, in each output format."""

from __future__ import annotations

import json

from click.testing import CliRunner

from agentwatch.cli import main
from agentwatch.events import LlmCall
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
