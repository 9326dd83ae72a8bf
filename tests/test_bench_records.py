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
