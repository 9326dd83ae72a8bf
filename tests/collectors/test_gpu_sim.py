"""The simulated GPU: profiles, labelling, restarts, and producing a simulated incident."""

from __future__ import annotations

import time

import orjson
import pytest

from agentwatch.collectors.gpu_exporter import decode_record
from agentwatch.collectors.gpu_sim import (SimProfile, SimulatedGpuSource, produce_simulated,
                                           simulated_stream)
from agentwatch.detectors.vram import VramLeakDetector
from agentwatch.events import LlmCall, event_from_dict

MIB = 1 << 20
T0 = 1_700_000_040.0


def test_every_sample_is_labelled_simulated():
    src = SimulatedGpuSource("sawtooth", start_ts=T0)
    rows = [r for k in range(50) for r in src.sample(T0 + 5 * k)]
    assert rows and all(r.simulated for r in rows)
    assert all("Simulated" in r.gpu_name and r.host == "sim-gpu-node" for r in rows)
    device, proc = src.sample(T0)
    assert (device.pid, proc.pid) == (0, 4242)
    # device = process + 300 MiB context; free + used = total
    assert device.memory_used_bytes == proc.memory_used_bytes + 300 * MIB
    assert device.memory_free_bytes + device.memory_used_bytes == device.memory_total_bytes


def test_leak_profile_180_mib_per_inference_and_oom_restart():
    src = SimulatedGpuSource("leak", start_ts=T0)
    # inferences finish at 30 s, 90 s, ...: at 100 s two are done -> 1024 + 360 MiB
    assert src.sample(T0 + 100)[1].memory_used_bytes == (1024 + 360) * MIB
    assert src.inference_times(T0, T0 + 600) == [T0 + 30 + 60 * k for k in range(10)]
    # OOM at 97% of 8 GiB: 1024 + 180n >= 7646.24 MiB first at n = 37, i.e. at 2190 s
    assert src.sample(T0 + 2185)[1].pid == 4242
    after = src.sample(T0 + 2190)[1]
    assert (after.pid, after.memory_used_bytes) == (4243, 1024 * MIB)


def test_restart_profile_changes_pid_and_drops_to_base():
    src = SimulatedGpuSource("restart", start_ts=T0)
    before, after = src.sample(T0 + 1495)[1], src.sample(T0 + 1500)[1]
    assert (before.pid, after.pid) == (4242, 4243)
    assert before.memory_used_bytes > 5 * 1024 * MIB and after.memory_used_bytes == 1024 * MIB


def test_noise_is_seeded_by_timestamp_not_call_order():
    p = SimProfile(name="plateau", noise_bytes=20 * MIB)
    a = SimulatedGpuSource(p, start_ts=T0, seed=3)
    b = SimulatedGpuSource(p, start_ts=T0, seed=3)
    forward = [a.sample(T0 + 5 * k) for k in range(20)]
    backward = [b.sample(T0 + 5 * k) for k in reversed(range(20))][::-1]
    assert forward == backward
    assert len({r[1].memory_used_bytes for r in forward}) > 10


def test_unknown_profile_is_rejected():
    with pytest.raises(ValueError, match="unknown profile"):
        SimProfile(name="nope")


class RecordingProducer:
    def __init__(self):
        self.sent = []

    def send(self, topic, key, value):
        self.sent.append((topic, key, value))

    def flush(self):
        pass


def test_produce_simulated_backfills_a_labelled_incident_ending_now():
    producer = RecordingProducer()
    lines = []
    run = produce_simulated("unused:0", profile="leak", duration_s=600, producer=producer,
                            clock=lambda: T0 + 600, echo=lines.append)
    gpu = [(k, v) for t, k, v in producer.sent if t == "gpu_samples"]
    calls = [(k, v) for t, k, v in producer.sent if t == "llm_calls"]
    assert (run.rounds, run.gpu_records, run.llm_call_records) == (121, 121, 10)
    assert (len(gpu), len(calls)) == (121, 10)
    assert (run.start_ts, run.end_ts, run.simulated) == (T0, T0 + 600, True)
    assert all(k == b"sim-gpu-node:0" for k, _ in gpu)
    rows = decode_record(gpu[0][1])
    assert [r.pid for r in rows] == [0, 4242] and all(r.simulated for r in rows)
    call = event_from_dict(LlmCall, orjson.loads(calls[0][1]))
    assert call.host == "sim-gpu-node" and call.ts == T0 + 30
    assert lines and all(line.startswith("[SIMULATED GPU]") for line in lines)
    assert "not NVML" in run.label


def test_produce_simulated_paces_with_speedup():
    naps = []
    produce_simulated("unused:0", profile="plateau", duration_s=20, producer=RecordingProducer(),
                      clock=lambda: T0, speedup=50.0, sleep=naps.append, llm_calls_topic=None)
    assert naps == [0.1] * 5


@pytest.mark.slow
def test_simulated_incident_through_the_broker_is_detected():
    """Demo path minus the worker: produce the incident to Tansu, consume it, run the detector."""
    from kafka import KafkaConsumer, TopicPartition

    from agentwatch.broker import EmbeddedBroker, create_topics, free_port

    with EmbeddedBroker(port=free_port()) as broker:
        bootstrap = broker.bootstrap_servers
        create_topics(bootstrap, {"gpu_samples": 2, "llm_calls": 2})
        run = produce_simulated(bootstrap, profile="leak", duration_s=900, start_ts=T0)
        consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                                 auto_offset_reset="earliest", enable_auto_commit=False)
        try:
            consumer.assign([TopicPartition(t, p) for t in ("gpu_samples", "llm_calls")
                             for p in (0, 1)])
            records = []
            deadline = time.monotonic() + 30
            while len(records) < run.gpu_records + run.llm_call_records and \
                    time.monotonic() < deadline:
                for batch in consumer.poll(timeout_ms=500).values():
                    records.extend(batch)
        finally:
            consumer.close()
    assert len(records) == run.gpu_records + run.llm_call_records == 181 + 15
    events = []
    for r in records:
        if r.topic == "gpu_samples":
            events += decode_record(r.value)
        else:
            events.append(event_from_dict(LlmCall, orjson.loads(r.value)))
    events.sort(key=lambda e: (e.ts, getattr(e, "pid", -1)))  # calls before that round's rows
    det = VramLeakDetector()
    found = [f for e in events for f in det.update(e)]
    assert [(f.ts - T0, str(f.severity), f.key) for f in found] == [
        (600.0, "warning", "host=sim-gpu-node/gpu=0/pid=4242")]
    assert found[0].evidence["simulated"] is True
    assert found[0].evidence["mib_per_inference"] == pytest.approx(180.0)
    # the same stream straight from the source gives the same findings
    src = SimulatedGpuSource("leak", start_ts=T0)
    direct = VramLeakDetector()
    again = [f for _, s, c in simulated_stream(src, start_ts=T0, duration_s=900)
             for e in c + s for f in direct.update(e)]
    assert again == found
