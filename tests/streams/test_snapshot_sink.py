"""Snapshot sink: when buffers flush, where files land, and what the DuckDB views show."""

from __future__ import annotations

import dataclasses
import json

import duckdb
import pytest

from agentwatch.events import Finding, GpuSample, LlmCall, LlmMessage, Severity, ToolCall
from agentwatch.streams.snapshots import SCHEMAS, SnapshotSink, connect, query_snapshots, refresh_catalog

# 1_700_000_000 is 2023-11-14 22:13:20 UTC; one hour later is 23:13:20 the same day.
T0 = 1_700_000_000.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _call(i: int, ts: float = T0, **kw) -> LlmCall:
    return LlmCall(ts=ts, trace_id=f"t{i}", span_id=f"s{i}", model="gpt-4o", input_tokens=i, **kw)


def _parquet_files(root, table):
    return sorted(p.relative_to(root / table).as_posix() for p in (root / table).glob("hour=*/*.parquet"))


def _count(root, table) -> int:
    return query_snapshots(root, f"SELECT count(*) AS n FROM {table}").column("n")[0].as_py()


def test_flush_by_row_count(tmp_path):
    clock = FakeClock()
    sink = SnapshotSink(tmp_path, writer_id="w1", flush_rows=3, flush_seconds=60, clock=clock)
    sink.add_events([_call(1), _call(2)])
    assert sink.flush() == 0
    assert not (tmp_path / "llm_calls").exists()
    sink.add_events([_call(3)])
    assert sink.flush() == 1
    assert sink.rows_written == {"llm_calls": 3}
    assert _count(tmp_path, "llm_calls") == 3
    assert sink.flush() == 0  # the buffer went with the file


def test_flush_by_age_of_the_oldest_row(tmp_path):
    clock = FakeClock()
    sink = SnapshotSink(tmp_path, writer_id="w1", flush_rows=1000, flush_seconds=5.0, clock=clock)
    sink.add_events([_call(1)])
    clock.now += 4.0
    sink.add_events([_call(2)])  # a newer row does not make the buffer younger
    assert sink.flush() == 0
    clock.now += 0.999
    assert sink.flush() == 0
    clock.now += 0.001  # the first row is now exactly 5 s old
    assert sink.flush() == 1
    assert _count(tmp_path, "llm_calls") == 2
    sink.add_events([_call(3)])
    clock.now += 4.9
    assert sink.flush() == 0  # a new buffer starts its own age
    assert sink.flush(force=True) == 1
    assert _count(tmp_path, "llm_calls") == 3


def test_gpu_readings_not_taken_are_null_in_sql_not_zero(tmp_path):
    """A process row and a device without a power sensor store NULL, so SQL averages skip them."""
    sink = SnapshotSink(tmp_path, writer_id="w1", flush_rows=1000, flush_seconds=60)
    sink.add_events([GpuSample(ts=T0, host="h", gpu=0, memory_used_bytes=8, utilization_pct=90.0,
                               temperature_c=70.0, power_w=300.0),
                     GpuSample(ts=T0, host="h", gpu=1, memory_used_bytes=8, utilization_pct=0.0,
                               temperature_c=40.0),  # power NotSupported
                     GpuSample(ts=T0, host="h", gpu=0, pid=4242, memory_used_bytes=4)])
    sink.flush(force=True)

    averages = query_snapshots(tmp_path, "SELECT avg(power_w) AS power, avg(utilization_pct) AS util, "
                                         "count(temperature_c) AS temps FROM gpu_samples").to_pylist()

    assert averages == [{"power": 300.0, "util": 45.0, "temps": 2}]


def test_invalid_sink_settings(tmp_path):
    with pytest.raises(ValueError):
        SnapshotSink(tmp_path, writer_id="w", flush_rows=0)
    with pytest.raises(ValueError):
        SnapshotSink(tmp_path, writer_id="w", flush_seconds=0)


def test_rows_of_two_hours_go_to_two_folders(tmp_path):
    sink = SnapshotSink(tmp_path, writer_id="w7", clock=FakeClock())
    sink.add_events([_call(1, ts=T0), _call(2, ts=T0 + 3600), _call(3, ts=T0 + 60)])
    assert sink.flush(force=True) == 2
    files = _parquet_files(tmp_path, "llm_calls")
    assert [f.split("/")[0] for f in files] == ["hour=2023-11-14T22", "hour=2023-11-14T23"]
    assert all(f.split("/")[1].startswith("part-w7-") for f in files)
    rows = query_snapshots(tmp_path, "SELECT CAST(hour AS VARCHAR) AS hour, list(span_id ORDER BY span_id) AS spans "
                                     "FROM llm_calls GROUP BY ALL ORDER BY hour").to_pylist()
    assert rows == [{"hour": "2023-11-14T22", "spans": ["s1", "s3"]}, {"hour": "2023-11-14T23", "spans": ["s2"]}]


def test_stray_temporary_files_are_ignored_by_readers(tmp_path):
    sink = SnapshotSink(tmp_path, writer_id="w1", clock=FakeClock())
    sink.add_events([_call(1), _call(2)])
    sink.flush(force=True)
    # A file being written (or left by a crash): never a whole Parquet file.
    hour_dir = tmp_path / "llm_calls" / "hour=2023-11-14T22"
    (hour_dir / ".part-w2-1700000000000-000001.parquet.tmp").write_bytes(b"PAR1 half a file")
    # and an hour folder that so far holds only a temporary file
    other = tmp_path / "llm_calls" / "hour=2023-11-14T23"
    other.mkdir()
    (other / ".part-w2-1700000000001-000002.parquet.tmp").write_bytes(b"PAR1")
    # a table whose only file is temporary reads as empty, not as an error
    (tmp_path / "tool_calls" / "hour=2023-11-14T22").mkdir(parents=True)
    (tmp_path / "tool_calls" / "hour=2023-11-14T22" / ".part-w2-1-000003.parquet.tmp").write_bytes(b"x")
    assert _count(tmp_path, "llm_calls") == 2
    assert _count(tmp_path, "tool_calls") == 0


def test_views_exist_empty_and_typed_before_any_file(tmp_path):
    con = connect(tmp_path)
    try:
        for table in list(SCHEMAS) + ["alerts"]:
            assert con.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,), table
        types = {name: dtype for name, dtype, *_ in con.execute("DESCRIBE llm_calls").fetchall()}
        assert (types["ts"], types["input_tokens"], types["cost_usd"], types["priced"], types["prompt"],
                types["hour"]) == ("DOUBLE", "BIGINT", "DOUBLE", "BOOLEAN", "VARCHAR", "VARCHAR")
        assert list(types)[: len(SCHEMAS["llm_calls"].names)] == SCHEMAS["llm_calls"].names
        gpu = {name: dtype for name, dtype, *_ in con.execute("DESCRIBE gpu_samples").fetchall()}
        assert (gpu["gpu"], gpu["simulated"], gpu["power_w"]) == ("BIGINT", "BOOLEAN", "DOUBLE")
        # typed columns: aggregates over the empty views are valid SQL
        assert con.execute("SELECT sum(cost_usd), max(input_tokens) FROM llm_calls").fetchone() == (None, None)
    finally:
        con.close()


def test_llm_calls_view_takes_prompt_and_response_from_log_messages(tmp_path):
    sink = SnapshotSink(tmp_path, writer_id="w1", clock=FakeClock())
    sink.add_events([
        LlmCall(ts=T0, trace_id="ta", span_id="sa"),  # no prompt on the span
        LlmCall(ts=T0, trace_id="tb", span_id="sb", prompt="own prompt", response="own response"),
        LlmCall(ts=T0, trace_id="tc", span_id="sc"),  # no messages at all
    ])
    sink.add_events([
        LlmMessage(ts=T0 + 3, trace_id="ta", span_id="sa", role="user", content="second question"),
        LlmMessage(ts=T0 + 1, trace_id="ta", span_id="sa", role="system", content="be kind"),
        LlmMessage(ts=T0 + 2, trace_id="ta", span_id="sa", role="user", content="first question"),
        LlmMessage(ts=T0 + 4, trace_id="ta", span_id="sa", role="assistant", content="the answer"),
        LlmMessage(ts=T0 + 5, trace_id="ta", span_id="OTHER", role="user", content="another call's prompt"),
        LlmMessage(ts=T0 + 2, trace_id="tb", span_id="sb", role="user", content="from logs"),
    ])
    sink.flush(force=True)
    rows = query_snapshots(tmp_path, "SELECT trace_id, prompt, response FROM llm_calls ORDER BY trace_id").to_pylist()
    assert rows == [
        {"trace_id": "ta", "prompt": "second question", "response": "the answer"},
        {"trace_id": "tb", "prompt": "own prompt", "response": "own response"},
        {"trace_id": "tc", "prompt": "", "response": ""},
    ]


def test_catalog_is_written_on_first_flush_of_a_table_and_sees_later_files(tmp_path):
    sink = SnapshotSink(tmp_path, writer_id="w1", clock=FakeClock())
    catalog = tmp_path / "catalog.duckdb"
    assert not catalog.exists()
    sink.add_events([_call(1)])
    sink.flush(force=True)
    assert catalog.exists()

    def catalog_count(table):
        con = duckdb.connect(str(catalog), read_only=True)
        try:
            return con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        finally:
            con.close()

    assert (catalog_count("llm_calls"), catalog_count("tool_calls")) == (1, 0)
    sink.add_events([_call(2, ts=T0 + 7200)])  # a new file (and hour) of a known table
    sink.add_events([ToolCall(ts=T0, trace_id="t1", span_id="x", tool_name="search")])  # a new table
    sink.flush(force=True)
    assert (catalog_count("llm_calls"), catalog_count("tool_calls")) == (2, 1)
    assert refresh_catalog(tmp_path) is True


def test_findings_evidence_is_stored_as_json_text(tmp_path):
    evidence = {"tool": "search", "repeats": 4, "args": ["a", {"b": [1, 2]}], "ratio": 0.5}
    sink = SnapshotSink(tmp_path, writer_id="w1", clock=FakeClock())
    sink.add_events([Finding(detector="loops", key="trace=abc", kind="tool_loop", severity=Severity.WARNING,
                             ts=T0, value=4.0, threshold=3.0, evidence=evidence)])
    sink.flush(force=True)
    row = query_snapshots(tmp_path, "SELECT evidence, typeof(evidence) AS t, severity, resolved, value "
                                    "FROM findings").to_pylist()[0]
    assert row["t"] == "VARCHAR"
    assert json.loads(row["evidence"]) == evidence
    assert (row["severity"], row["resolved"], row["value"]) == ("warning", False, 4.0)


def test_free_form_alert_rows_keep_structured_fields_as_json(tmp_path):
    sink = SnapshotSink(tmp_path, writer_id="w1", clock=FakeClock())
    sink.add_rows("alerts", [{"id": "a1", "ts": T0, "labels": {"team": "shop"}, "count": 2}])
    sink.flush(force=True)
    row = query_snapshots(tmp_path, "SELECT id, labels, count FROM alerts").to_pylist()[0]
    assert (row["id"], json.loads(row["labels"]), row["count"]) == ("a1", {"team": "shop"}, 2)


def test_rows_stored_twice_by_a_redelivery_are_one_row_in_the_analyst_views(tmp_path):
    """A record processed by two workers (the first stalled past the session timeout, or killed
    before its commit) is written by both: the views count it once, the _raw views keep both."""
    calls = [_call(1, cost_usd=1.25), _call(2, cost_usd=0.5)]
    finding = Finding(detector="budget", key="project=p", kind="budget_daily_80pct", severity=Severity.WARNING,
                      ts=T0, value=0.8, threshold=0.8, evidence={"spent": 8.0})
    gpu = GpuSample(ts=T0, host="h", gpu=0, memory_used_bytes=8)
    for writer in ("stalled-w1", "new-owner-w0"):
        sink = SnapshotSink(tmp_path, writer_id=writer, clock=FakeClock())
        sink.add_events(calls)
        sink.add_events([ToolCall(ts=T0, trace_id="t1", span_id="tool", tool_name="search")])
        sink.add_events([finding])
        sink.add_events([gpu])
        sink.flush(force=True)
    # Not copies: another span of the same trace, another reading of the same GPU.
    sink.add_events([_call(3, cost_usd=0.5)])
    sink.add_events([dataclasses.replace(gpu, memory_used_bytes=9)])
    sink.flush(force=True)

    def one(sql):
        return query_snapshots(tmp_path, sql).to_pylist()[0]

    assert one("SELECT count(*) AS n, sum(cost_usd) AS cost FROM llm_calls") == {"n": 3, "cost": 2.25}
    assert one("SELECT count(*) AS n, sum(cost_usd) AS cost FROM llm_calls_raw") == {"n": 5, "cost": 4.0}
    counts = {table: _count(tmp_path, table) for table in ("tool_calls", "findings", "gpu_samples")}
    assert counts == {"tool_calls": 1, "findings": 1, "gpu_samples": 2}
    assert _count(tmp_path, "gpu_samples_raw") == 3
