"""The Faust adapter's own rules, without a broker."""

from __future__ import annotations

import asyncio

from agentwatch.streams.app import Unacked, _send_until_accepted
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
