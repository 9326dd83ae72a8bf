"""The Faust adapter's own rules, without a broker."""

from __future__ import annotations

import asyncio

from agentwatch.streams.app import OffsetContinuity, _send_until_accepted
from agentwatch.streams.partition_checkpoint import Unacked
from agentwatch.streams.dataflow import Record, Send, TracePartition


class FlakyTopic:
    """Refuses the first ``failures`` sends the way aiokafka does for a partition it does not know."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.sent: list[tuple[bytes | None, bytes, int | None]] = []

    async def send(self, *, key, value, partition, headers) -> None:
        if self.failures:
            self.failures -= 1
            raise AssertionError("Unrecognized partition")
        self.sent.append((key, value, partition))


def test_a_failed_send_is_retried_until_it_goes_out_once() -> None:
    topic = FlakyTopic(failures=3)
    asyncio.run(_send_until_accepted(topic, Send("usage", 5, b"[]", key=b"k"), first_backoff_s=0.001))
    assert topic.sent == [(b"k", b"[]", 5)] and topic.failures == 0


def test_a_checkpoint_waits_for_every_record_below_its_offsets() -> None:
    unacked = Unacked()
    state = TracePartition(3, runner=None)
    records = [Record("llm_calls", 3, offset, b"[]") for offset in (10, 11, 12)]
    for record in records:
        unacked.add(record)
    unacked.add(Record("llm_calls", 4, 0, b"[]"))  # another partition's records do not count
    assert not unacked.clear_below(state, {"llm_calls": 12})
    unacked.done(records[0])
    assert not unacked.clear_below(state, {"llm_calls": 12})
    unacked.done(records[1])
    assert unacked.clear_below(state, {"llm_calls": 12})  # 12 itself is after the snapshot
    assert not unacked.clear_below(state, {"llm_calls": 13})


def test_a_checkpoint_is_written_only_after_its_records_are_written_and_committed(tmp_path) -> None:
    from agentwatch.detectors.loops import LoopDetector
    from agentwatch.detectors.runner import DetectorRunner
    from agentwatch.streams.dataflow import Dataflow
    from agentwatch.streams.partition_checkpoint import PartitionCheckpointer, PartitionCheckpointStore

    store = PartitionCheckpointStore(tmp_path, "a")
    flow = Dataflow(partitions={"llm_calls": 8, "tool_calls": 8, "agent_steps": 8, "usage": 8},
                    build_detectors=lambda: [LoopDetector()], checkpoints=store)
    unacked = Unacked()
    call = b'[{"ts": 1.0, "trace_id": "t", "span_id": "s1", "tool_name": "search"}]'
    record = Record("tool_calls", 2, 7, call)
    unacked.add(record)
    flow.on_record(record)
    events: list[str] = []

    async def flush(force: bool) -> None:
        events.append("flush")
        if events.count("flush") == 3:  # its rows land on the third flush
            unacked.done(record)

    committed = {("tool_calls", 2): 8}

    async def commit(topic_partitions):
        events.append("commit")
        assert topic_partitions == [("tool_calls", 2)]
        if events.count("commit") == 1:
            assert not store.stored(), "a file was written before the commit"
        return dict(committed)

    checkpointer = PartitionCheckpointer(flow, unacked, flush, commit, every_s=30.0)
    assert asyncio.run(checkpointer.save(flow.owned_states())) == 1
    assert events == ["flush", "flush", "flush", "commit"]
    assert store.load("trace", 2)["offsets"] == {"tool_calls": 8}

    stuck = Record("tool_calls", 2, 8, call.replace(b"s1", b"s2"))
    unacked.add(stuck)
    flow.on_record(stuck)
    events.clear()
    assert asyncio.run(checkpointer.save(flow.owned_states(), wait_s=0.2)) == 0  # never written: skipped
    assert "commit" not in events and store.load("trace", 2)["offsets"] == {"tool_calls": 8}

    unacked.done(stuck)  # written and acknowledged, but the group's commit stays at 8
    events.clear()
    assert asyncio.run(checkpointer.save(flow.owned_states())) == 0
    assert events[-1] == "commit" and store.load("trace", 2)["offsets"] == {"tool_calls": 8}
    committed[("tool_calls", 2)] = 9
    assert asyncio.run(checkpointer.save(flow.owned_states())) == 1
    assert store.load("trace", 2)["offsets"] == {"tool_calls": 9}


def test_offsets_that_jump_within_an_assignment_are_named_and_seek_backs_are_not() -> None:
    continuity = OffsetContinuity()
    handed = [("llm_calls", 6, o) for o in (14, 15, 17, 16, 18)] + [("llm_calls", 2, 40), ("usage", 6, 3)]

    skipped = [continuity.check(*h) for h in handed]

    # The first record of a partition starts it wherever the group resumes; 16 after 17 is a seek
    # back (records handed again), not a gap; only 15 -> 17 skipped one.
    assert skipped == [None, None, (16, 17), None, None, None, None]
    assert continuity.check("llm_calls", 6, 25) == (19, 25)  # six never handed over


def test_a_partition_given_up_starts_afresh_when_it_comes_back() -> None:
    continuity = OffsetContinuity()
    continuity.check("llm_calls", 6, 10)
    continuity.forget([("llm_calls", 6)])  # its next owner moved it on meanwhile

    assert continuity.check("llm_calls", 6, 90) is None
    assert continuity.check("llm_calls", 6, 92) == (91, 92)


def test_the_first_record_of_an_assignment_is_checked_against_where_the_consumer_started() -> None:
    continuity = OffsetContinuity()
    continuity.start_at("llm_calls", 6, 40)  # the group's committed offset when it was assigned
    continuity.start_at("llm_calls", 2, 7)

    assert continuity.check("llm_calls", 6, 43) == (40, 43)  # 40..42 never handed over
    assert continuity.check("llm_calls", 2, 7) is None
    continuity.start_at("llm_calls", 2, 3)  # a later start does not move a partition already going
    assert continuity.check("llm_calls", 2, 8) is None
