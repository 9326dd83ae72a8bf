"""The benchmark harness: distinct, coherent input records past the SDK-made pool; the transport floor."""

from __future__ import annotations

import pytest

from bench.runner import make_records
from agentwatch.streams.otlp import decode_traces


def _spans(payload: bytes) -> list:
    return [span for rs in decode_traces(payload).resource_spans for ss in rs.scope_spans for span in ss.spans]


def test_replayed_records_carry_fresh_ids_later_times_and_intact_parent_links():
    records = make_records(6, spans_per_record=100, pool_spans=150)  # the pool is replayed 3+ times
    per_record = [_spans(payload) for payload in records]
    spans = [span for record in per_record for span in record]
    assert len(spans) == 600
    ids = {(s.trace_id, s.span_id) for s in spans}
    assert len(ids) == 600  # a replay never repeats a span of an earlier one
    # A replay's spans point at parents of the same replay: only links cut by the set's two ends
    # (a trace begun before the first record or finished after the last) can be missing.
    with_parent = [s for s in spans if s.parent_span_id]
    linked = [s for s in with_parent if (s.trace_id, s.parent_span_id) in ids]
    assert len(linked) >= 0.9 * len(with_parent)
    # The pool is made in end-time order and a replay starts after the one before it ended,
    # so event time only moves on from record to record, across replays too.
    last_end = [max(s.end_time_unix_nano for s in record) for record in per_record]
    assert last_end == sorted(last_end) and len(set(last_end)) == len(last_end)


@pytest.mark.slow
def test_transport_floor_passes_every_record_through_the_real_broker_and_a_forwarding_worker():
    from bench.transport_floor import bench_transport_floor

    records = make_records(8, spans_per_record=200)
    floor = bench_transport_floor(records, spans_per_record=200, timeout_s=120)
    assert floor["spans"] == 1600  # it returns only once all 8 records came out of the far side
    assert floor["spans_per_s"] > 0
    assert set(floor["cpu_us_per_span"]) == {"forwarder", "broker", "bench_client"}
    assert floor["cpu_us_per_span"]["broker"] > 0  # measured on the real broker process


def _fake_run(workers: int, rate: int) -> dict:
    roles = {"bench": 5.0, "broker": 20.0, "collector": 0.5}
    for i in range(workers):
        roles |= {f"worker-{i}": 40.0, f"worker-{i}-normaliser": 10.0}
    return {"workers": workers, "spans": 1000, "seconds": 1000 / rate, "spans_per_s": rate,
            "stage_committed_s": {}, "cpu_us_per_span": {**roles, "total": sum(roles.values())}}


def test_end_to_end_rounds_interleave_the_floor_and_both_worker_counts_and_report_medians(monkeypatch):
    import bench.end_to_end as e2e
    import bench.transport_floor as floor
    from bench.runner import _continuity, _table

    order = []
    rates = iter([100_000, 30_000, 35_000, 120_000, 20_000, 25_000])

    def fake_floor(records, spans_per_record, warmup=None):
        order.append("floor")
        return {"spans_per_s": next(rates), "cpu_us_per_span": {"forwarder": 3.0, "broker": 4.0, "bench_client": 1.0}}

    def fake_run(records, warmup, *, workers, expected_rows, spans_per_record=1000):
        order.append(workers)
        return _fake_run(workers, next(rates))

    monkeypatch.setattr(floor, "bench_transport_floor", fake_floor)
    monkeypatch.setattr(e2e, "run_end_to_end", fake_run)
    result = e2e.bench_end_to_end_rounds([b"x"], [b"w"], 1000, rounds=2, say=lambda _m: None)
    assert order == ["floor", 1, 2, "floor", 1, 2]
    assert result["workers_1"]["spans_per_s"] == {"median": 25_000, "range": [20_000, 30_000]}
    assert result["workers_2"]["spans_per_s"]["range"] == [25_000, 35_000]
    assert result["transport_floor"]["spans_per_s"]["median"] == 110_000
    assert result["ratio_to_transport_floor"]["workers_1"]["per_round"] == [0.3, round(20_000 / 120_000, 3)]
    assert result["two_workers_vs_one"]["per_round"] == [round(35 / 30, 3), 1.25]
    cpu = result["cpu_us_per_span"]
    assert set(cpu["workers_2"]) >= {"broker", "worker-0", "worker-1-normaliser", "bench", "total"}
    assert cpu["transport_floor"]["total"] == 8.0

    results = {"end_to_end": result}
    _continuity(results)
    assert results["end_to_end_spans_per_s"] == 25_000  # the 1-worker median, under its old name
    assert results["transport_floor"]["spans_per_s"] == 110_000
    table = _table(results)
    assert "end_to_end_workers_2_spans_per_s" in table and "worker-1-normaliser" in table


@pytest.mark.slow
def test_end_to_end_clock_stops_when_the_worker_group_committed_everything_and_rows_are_written():
    from bench.end_to_end import run_end_to_end
    from bench.runner import bench_normalize

    built = make_records(5, spans_per_record=200)
    warmup, records = built[:2], built[2:]
    _, events = bench_normalize(records)
    run = run_end_to_end(records, warmup, workers=1, expected_rows=events, spans_per_record=200, timeout_s=120)
    assert run["rows_written"] == events == run["rows_expected"]
    assert set(run["stage_committed_s"]) == {"map", "trace", "keyed"}
    assert "worker-0-main" in run["worker_threads_cpu_us_per_span"]
    assert {"broker", "worker-0", "worker-0-normaliser", "bench", "total"} <= set(run["cpu_us_per_span"])
    assert run["cpu_us_per_span"]["worker-0"] > 0


def test_worker_threads_are_grouped_into_the_loop_the_drift_thread_and_the_rest():
    import threading
    import time

    import psutil

    from agentwatch.streams.drift_stage import lower_thread_priority
    from bench.end_to_end import worker_thread_seconds

    def spin(lower: bool, stop: threading.Event) -> None:
        if lower:
            lower_thread_priority()
        while not stop.is_set():
            sum(range(1000))

    stop = threading.Event()
    threads = [threading.Thread(target=spin, args=(lower, stop)) for lower in (True, False)]
    for t in threads:
        t.start()
    started = time.process_time()
    while time.process_time() - started < 0.5:  # main thread busy too
        sum(range(1000))
    try:  # threads are read while they live
        seconds = worker_thread_seconds({"worker-0": psutil.Process(), "worker-0-normaliser": psutil.Process(),
                                         "broker": psutil.Process()})
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert set(seconds) == {"worker-0-main", "worker-0-drift", "worker-0-other-threads"}
    assert seconds["worker-0-main"] > 0.1
    assert seconds["worker-0-drift"] > 0 and seconds["worker-0-other-threads"] > 0


def test_a_run_that_misses_rows_names_the_table_they_are_missing_from(tmp_path):
    from agentwatch.events import LlmCall, ToolCall
    from agentwatch.streams.snapshots import SnapshotSink
    from bench.end_to_end import _rows_by_table

    sink = SnapshotSink(tmp_path, writer_id="w0")
    sink.add_events([LlmCall(ts=1_700_000_000.0 + i, trace_id=f"t{i}", span_id=f"s{i}") for i in range(3)])
    sink.add_events([ToolCall(ts=1_700_000_000.0, trace_id="t0", span_id="x")])
    sink.flush(force=True)

    assert _rows_by_table(tmp_path) == {"llm_calls": 3, "tool_calls": 1, "agent_steps": 0}
