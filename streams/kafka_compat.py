"""The one place agentwatch bends a Kafka client: aiokafka's fetch wait, which Faust hard-codes.

Faust builds its consumer with ``fetch_max_wait_ms=1500`` and offers no setting for it. Tansu (the
embedded broker) answers a fetch only when that wait expires, not when data arrives, so every
Kafka hop cost up to 1.5 s and span -> alert latency was ~1.3 s p50. Capping the wait bounds each
hop; an idle consumer then polls a few times a second, which costs nothing measurable.

The cap wraps ``AIOKafkaConsumer.__init__`` for the process (Faust constructs the consumer
itself); it only lowers the wait and is applied once.
"""

from __future__ import annotations

from typing import Any


def cap_consumer_fetch_wait(max_wait_ms: int) -> None:
    import aiokafka

    original = aiokafka.AIOKafkaConsumer.__init__
    if getattr(original, "_agentwatch_cap", None) is not None:
        return

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["fetch_max_wait_ms"] = min(int(kwargs.get("fetch_max_wait_ms", 500)), max_wait_ms)
        original(self, *args, **kwargs)

    init._agentwatch_cap = max_wait_ms  # type: ignore[attr-defined]
    aiokafka.AIOKafkaConsumer.__init__ = init


def committed_offsets(bootstrap_servers: str, group: str, topic_partitions: list[tuple[str, int]]
                      ) -> dict[tuple[str, int], int | None]:
    """The group's committed offsets (None where nothing is committed), read without joining it."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers.split(","), group_id=group,
                             enable_auto_commit=False)
    try:
        return {(t, p): consumer.committed(TopicPartition(t, p)) for t, p in topic_partitions}
    finally:
        consumer.close()


def assignment_start_offsets(bootstrap_servers: str, group: str, topic_partitions: list[tuple[str, int]]
                             ) -> dict[tuple[str, int], int]:
    """Where the group's consumer starts each partition on assignment: the committed offset, or
    the log's first offset where nothing is committed (the workers reset to the earliest)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers.split(","), group_id=group,
                             enable_auto_commit=False)
    try:
        tps = [TopicPartition(t, p) for t, p in topic_partitions]
        begins = consumer.beginning_offsets(tps)
        starts = {}
        for tp in tps:
            committed = consumer.committed(tp)
            starts[(tp.topic, tp.partition)] = max(committed, begins[tp]) if committed is not None else begins[tp]
        return starts
    finally:
        consumer.close()


def fetch_range(bootstrap_servers: str, topic: str, partition: int, start: int, end: int, *,
                max_fetch_bytes: int, timeout_s: float = 60.0) -> list[tuple[int, bytes | None, bytes | None]]:
    """Records from ``[start, end)`` of one partition as (offset, key, value), about
    ``max_fetch_bytes`` of values at most (at least one record, whatever its size),
    read outside the group (no membership, no commits): the replay of a partition's state after
    a restore, in chunks. Records the log no longer holds (retention) are skipped: the first
    offset returned is then past ``start``."""
    import time

    from kafka import KafkaConsumer, TopicPartition

    tp = TopicPartition(topic, partition)
    consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers.split(","), group_id=None,
                             enable_auto_commit=False, max_partition_fetch_bytes=max_fetch_bytes,
                             fetch_max_bytes=max_fetch_bytes, auto_offset_reset="earliest")
    out: list[tuple[int, bytes | None, bytes | None]] = []
    size = 0
    try:
        consumer.assign([tp])
        consumer.seek(tp, start)
        deadline = time.monotonic() + timeout_s
        position = start
        while position < end and (not out or size < max_fetch_bytes):
            if time.monotonic() > deadline:
                raise TimeoutError(f"replay of {topic}[{partition}] {start}..{end} stopped at {position}")
            for message in consumer.poll(timeout_ms=500).get(tp, ()):
                if message.offset >= end or (out and size >= max_fetch_bytes):
                    position = end if message.offset >= end else position
                    break
                if message.offset >= position:
                    out.append((message.offset, message.key, message.value))
                    size += len(message.value or b"")
                    position = message.offset + 1
            else:
                position = max(position, consumer.position(tp))
    finally:
        consumer.close()
    return out
