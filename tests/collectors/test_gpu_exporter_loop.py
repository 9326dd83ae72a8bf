"""The exporter loop (cadence, record format) and, marked slow, the loop against a real broker."""

from __future__ import annotations

import sys
import time

import orjson
import pytest
from click.testing import CliRunner

from agentwatch.collectors.gpu import NvmlSampler
from agentwatch.collectors.gpu_exporter import (decode_record, encode_round, gpu_exporter,
                                                make_producer, run_exporter)
from agentwatch.events import GpuSample, event_from_dict
from gpu_fake_nvml import FakeNvml


class RecordingProducer:
    def __init__(self):
        self.sent = []
        self.flushes = 0

    def send(self, topic, key, value):
        self.sent.append((topic, key, value))

    def flush(self):
        self.flushes += 1


class ScriptedClock:
    """Monotonic time that moves only when sampling takes time or the loop waits."""

    def __init__(self, sample_cost_s):
        self.now = 0.0
        self.sample_cost_s = list(sample_cost_s)
        self.waits = []

    def monotonic(self):
        return self.now

    def wait(self, seconds):
        self.waits.append(round(seconds, 9))
        self.now += seconds


class SlowSource:
    def __init__(self, clock):
        self.clock = clock
        self.ts = []

    def sample(self, ts):
        self.ts.append(ts)
        self.clock.now += self.clock.sample_cost_s.pop(0)
        return [GpuSample(ts=ts, host="h", gpu=0, memory_used_bytes=1)]


def test_rounds_keep_a_fixed_cadence_and_realign_after_falling_behind():
    clock = ScriptedClock([0.3, 0.3, 12.0, 0.3])
    source = SlowSource(clock)
    producer = RecordingProducer()
    stats = run_exporter(source, producer, interval_s=5.0, count=4, clock=lambda: 1000.0,
                         monotonic=clock.monotonic, wait=clock.wait)
    # round k is due at 5k; the third round starts at 10 and takes 12 s (ends at 22): the 15
    # and 20 deadlines are skipped and the next round lands on the 25 grid point, no burst
    assert clock.waits == [4.7, 4.7, 3.0]
    assert (stats.rounds, stats.records, stats.samples, stats.failed_rounds) == (4, 4, 4, 0)
    assert producer.flushes == 4  # every round is on the broker before the next is taken


def test_one_record_per_device_keyed_host_gpu_with_json_array_value():
    samples = FakeNvml_round()
    records = encode_round(samples)
    assert [k for k, _ in records] == [b"gpu-node-1:0", b"gpu-node-1:1"]
    rows0 = orjson.loads(records[0][1])
    assert [r["pid"] for r in rows0] == [0, 31337, 5150]
    # each array element holds exactly one GpuSample's fields
    assert [event_from_dict(GpuSample, r) for r in rows0] == samples[:3]
    assert decode_record(records[1][1]) == samples[3:]


def FakeNvml_round():  # noqa: N802 - reads as "a FakeNvml round"
    return NvmlSampler(FakeNvml(), host="gpu-node-1").sample(1_700_000_000.0)


def test_failed_round_is_counted_and_the_loop_continues():
    nvml = FakeNvml()
    sampler = NvmlSampler(nvml, host="h")

    class Flaky:
        calls = 0

        def sample(self, ts):
            Flaky.calls += 1
            if Flaky.calls == 2:
                raise nvml.NVMLError(15, "GPU is lost")
            return sampler.sample(ts)

    producer = RecordingProducer()
    stats = run_exporter(Flaky(), producer, interval_s=1.0, count=3, wait=lambda s: None)
    assert (stats.rounds, stats.failed_rounds, stats.records) == (2, 1, 4)


def _consume_all(bootstrap, topic, expected, timeout_s=30.0):
    from kafka import KafkaConsumer, TopicPartition

    # No consumer group: Tansu's group join waits for rebalance timeouts; assigning the
    # partitions directly reads everything from the start.
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                             auto_offset_reset="earliest", enable_auto_commit=False,
                             request_timeout_ms=15000)
    try:
        deadline = time.monotonic() + timeout_s
        partitions = None
        while partitions is None and time.monotonic() < deadline:
            partitions = consumer.partitions_for_topic(topic)
            if partitions is None:
                time.sleep(0.2)
        consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        records = []
        while len(records) < expected and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
        return records
    finally:
        consumer.close()


@pytest.mark.slow
def test_exporter_against_embedded_broker_round_trips_fake_nvml(monkeypatch):
    from agentwatch.broker import EmbeddedBroker, create_topics, free_port

    with EmbeddedBroker(port=free_port()) as broker:
        bootstrap = broker.bootstrap_servers
        create_topics(bootstrap, {"gpu_samples": 2})

        # 1) the loop with a real KafkaProducer
        nvml = FakeNvml()
        sampler = NvmlSampler(nvml, host="gpu-node-1")
        producer = make_producer(bootstrap)
        ts_values = iter([1_700_000_000.0, 1_700_000_005.0, 1_700_000_010.0])
        stats = run_exporter(sampler, producer, interval_s=0.05, count=3,
                             clock=lambda: next(ts_values))
        producer.close()
        assert (stats.rounds, stats.records) == (3, 6)

        # 2) the click command, with the fake standing in for pynvml
        monkeypatch.setitem(sys.modules, "pynvml", FakeNvml())
        result = CliRunner().invoke(gpu_exporter, [
            "--bootstrap-servers", bootstrap, "--host", "gpu-node-2", "--count", "2",
            "--interval", "0.1"])
        assert result.exit_code == 0, result.output
        assert "sent 4 records" in result.output

        # 3) the simulated source: labelled on stderr and on every sample
        result = CliRunner().invoke(gpu_exporter, [
            "--bootstrap-servers", bootstrap, "--source", "simulated", "--host", "sim-a",
            "--count", "2", "--interval", "0.1"])
        assert result.exit_code == 0, result.output
        assert "[SIMULATED GPU]" in result.output

        records = _consume_all(bootstrap, "gpu_samples", expected=12)

    assert len(records) == 12
    simulated = [decode_record(r.value) for r in records if r.key == b"sim-a:0"]
    assert len(simulated) == 2 and all(row.simulated for rows in simulated for row in rows)
    records = [r for r in records if r.key != b"sim-a:0"]
    by_key = {}
    for record in records:
        by_key.setdefault(record.key, []).append(decode_record(record.value))
    assert sorted(by_key) == [b"gpu-node-1:0", b"gpu-node-1:1", b"gpu-node-2:0", b"gpu-node-2:1"]
    # per key, rounds arrive in order (one partition per key) with the recorded readings
    node1_gpu0 = by_key[b"gpu-node-1:0"]
    assert [rows[0].ts for rows in node1_gpu0] == [1_700_000_000.0, 1_700_000_005.0,
                                                   1_700_000_010.0]
    assert [rows[0].memory_used_bytes for rows in node1_gpu0] == [14677966848, 14865661952,
                                                                  15053357056]
    assert [[r.pid for r in rows] for rows in node1_gpu0] == [[0, 31337, 5150], [0, 31337, 5150],
                                                              [0, 31337]]
    assert [rows[0].memory_used_bytes for rows in by_key[b"gpu-node-2:0"]] == [14677966848,
                                                                               14865661952]
    assert all(len(rows) == 1 and rows[0].gpu_name == "Tesla T4"
               for rows in by_key[b"gpu-node-1:1"])
    partition_of = {}
    for record in records:
        partition_of.setdefault(record.key, set()).add(record.partition)
    assert all(len(p) == 1 for p in partition_of.values())
