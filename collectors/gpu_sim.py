"""A simulated GPU for the demo and the tests: the memory profiles VRAM leak detection must judge.

Every sample it makes carries ``simulated=True`` and a host/GPU name that says so; nothing here
touches NVML. A profile is a pure function of the elapsed (event) time, so a run is reproducible
and can be produced faster than real time (a 40-minute incident backfilled in seconds).

Profiles (process memory, on top of the CUDA context):

- ``leak``: a fixed amount never freed per inference (the seed incidents: ~180 MB each).
- ``step_leak``: a large block kept every ``step_period_s`` (a cache that is never evicted).
- ``sawtooth``: grows per inference and is garbage collected back every ``gc_every`` inferences.
- ``sawtooth_leak``: the same, but each collection leaves ``leak_per_cycle_bytes`` behind.
- ``plateau``: an allocator cache that fills over the first inferences, then stays flat.
- ``vllm_prealloc``: the server reserves ~90% of the card up front (KV-cache pool), then flat.
- ``restart``: the ``leak`` profile, restarted (new pid, memory back to the base) every
  ``restart_every_s``.

Every profile also "crashes" like the real incidents: once the device would pass
``oom_fraction`` of the card, the process is replaced by a new one at the base level.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from agentwatch.events import GpuSample, LlmCall

MIB = 1 << 20
GIB = 1 << 30

PROFILES = ("leak", "step_leak", "sawtooth", "sawtooth_leak", "plateau", "vllm_prealloc",
            "restart")

SIMULATED_GPU_NAME = "Simulated GPU (agentwatch demo, not NVML)"


@dataclass(frozen=True)
class SimProfile:
    """Parameters of one simulated workload (sizes in bytes, times in seconds)."""

    name: str = "leak"
    total_bytes: int = 8 * GIB
    context_bytes: int = 300 * MIB  # CUDA context etc., counted on the device, not the process
    base_bytes: int = 1 * GIB  # weights and workspace once the process is up
    inferences_per_s: float = 1 / 60
    leak_bytes_per_inference: int = 180 * MIB
    step_bytes: int = 512 * MIB
    step_period_s: float = 240.0
    gc_every: int = 4  # sawtooth: inferences between collections (a 4-minute cycle)
    sawtooth_bytes_per_inference: int = 300 * MIB
    leak_per_cycle_bytes: int = 400 * MIB
    cache_bytes: int = 2 * GIB  # plateau: what the allocator cache settles at
    cache_fill_inferences: int = 3
    prealloc_fraction: float = 0.9
    # vLLM budgets gpu_memory_utilization (0.9) but CUDA graphs and non-torch allocations land
    # on top, so the card reads slightly above 90%: above the usual crash threshold, by design.
    prealloc_overhead_bytes: int = 200 * MIB
    restart_every_s: float = 1500.0
    oom_fraction: float = 0.97
    noise_bytes: float = 0.0  # standard deviation of the reading jitter

    def __post_init__(self) -> None:
        if self.name not in PROFILES:
            raise ValueError(f"unknown profile {self.name!r}; choose one of {', '.join(PROFILES)}")
        if not self.inferences_per_s > 0:
            raise ValueError(f"inferences_per_s must be > 0, got {self.inferences_per_s}")
        if self.total_bytes <= self.context_bytes + self.base_bytes:
            raise ValueError("total_bytes must exceed context_bytes + base_bytes")


def inferences_completed(profile: SimProfile, elapsed_s: float) -> int:
    """Inferences finished ``elapsed_s`` after the start: the k-th (k >= 1) at ``(k - 1/2) / rate``.

    Half a period of phase keeps every fixed window of a whole number of periods holding exactly
    that many inferences, whatever its alignment to the process start.
    """
    return max(0, math.floor(max(0.0, elapsed_s) * profile.inferences_per_s + 0.5 + 1e-9))


def process_bytes(profile: SimProfile, elapsed_s: float) -> float:
    """Memory of the process ``elapsed_s`` after it started (before any OOM restart)."""
    p = profile
    n = inferences_completed(p, elapsed_s)
    if p.name in ("leak", "restart"):
        return p.base_bytes + p.leak_bytes_per_inference * n
    if p.name == "step_leak":
        return p.base_bytes + p.step_bytes * math.floor(max(0.0, elapsed_s) / p.step_period_s)
    if p.name in ("sawtooth", "sawtooth_leak"):
        cycles, within = divmod(n, p.gc_every)
        kept = p.leak_per_cycle_bytes * cycles if p.name == "sawtooth_leak" else 0
        return p.base_bytes + kept + p.sawtooth_bytes_per_inference * within
    if p.name == "plateau":
        return p.base_bytes + p.cache_bytes * min(1.0, n / p.cache_fill_inferences)
    if p.name == "vllm_prealloc":
        return p.prealloc_fraction * p.total_bytes - p.context_bytes + p.prealloc_overhead_bytes
    raise AssertionError(p.name)


class SimulatedGpuSource:
    """A GPU source (same ``sample(ts)`` shape as the NVML and DCGM sources) that simulates.

    Parameters
    ----------
    profile : SimProfile | str
        The workload; a name takes that profile's defaults.
    start_ts : float
        When the first simulated process starts (event time).
    host : str
        Host name on the samples; the default says it is simulated.
    gpu : int
        Device index.
    first_pid : int
        Pid of the first process; each restart takes the next one.
    seed : int
        Seeds the reading jitter (a function of ``seed`` and the timestamp only).
    """

    def __init__(self, profile: SimProfile | str = "leak", *, start_ts: float,
                 host: str = "sim-gpu-node", gpu: int = 0, first_pid: int = 4242,
                 process_name: str = "sim-inference-server", seed: int = 0) -> None:
        self.profile = SimProfile(name=profile) if isinstance(profile, str) else profile
        self.start_ts = float(start_ts)
        self.host = host
        self.gpu = gpu
        self.first_pid = first_pid
        self.process_name = process_name
        self.seed = seed

    def _process_at(self, ts: float) -> tuple[int, float, float]:
        """(pid, process start ts, process bytes) at ``ts``, following restarts and OOMs."""
        p = self.profile
        started = self.start_ts
        restarts = 0
        if p.name == "restart":
            k = math.floor(max(0.0, ts - self.start_ts) / p.restart_every_s)
            restarts, started = k, self.start_ts + k * p.restart_every_s
        oom_bytes = p.oom_fraction * p.total_bytes - p.context_bytes
        # Deterministic OOM crashes: walk forward from each (re)start to the first OOM.
        for _ in range(10_000):
            elapsed = ts - started
            used = process_bytes(p, elapsed)
            if used < oom_bytes:
                return self.first_pid + restarts, started, used
            crash = self._first_oom(started, ts, oom_bytes)
            restarts += 1
            started = crash
        raise RuntimeError("simulated process restarts too often")

    def _first_oom(self, started: float, ts: float, oom_bytes: float) -> float:
        # Memory only changes at whole seconds in every profile: bisect on seconds.
        lo, hi = 0, max(1, math.ceil(ts - started))
        while lo < hi:
            mid = (lo + hi) // 2
            if process_bytes(self.profile, mid) >= oom_bytes:
                hi = mid
            else:
                lo = mid + 1
        return started + lo

    def sample(self, ts: float) -> list[GpuSample]:
        """The device row (pid 0) and the process row at ``ts``, marked ``simulated``."""
        p = self.profile
        pid, _started, proc = self._process_at(ts)
        if p.noise_bytes > 0:
            rng = np.random.default_rng([self.seed, int(round(ts * 1000))])
            proc = max(0.0, proc + rng.normal(0.0, p.noise_bytes))
        proc_bytes = int(proc)
        used = min(p.total_bytes, p.context_bytes + proc_bytes)
        free = p.total_bytes - used
        util = 0.0 if p.inferences_per_s <= 0 else min(100.0, 35.0 + 600.0 * p.inferences_per_s)
        common = dict(ts=float(ts), host=self.host, gpu=self.gpu,
                      gpu_uuid=f"GPU-sim-{self.host}-{self.gpu}", gpu_name=SIMULATED_GPU_NAME,
                      memory_free_bytes=free, memory_total_bytes=p.total_bytes, simulated=True)
        return [
            GpuSample(**common, pid=0, memory_used_bytes=used, utilization_pct=util,
                      temperature_c=55.0 + util / 5.0, power_w=80.0 + 2.0 * util),
            GpuSample(**common, pid=pid, process_name=self.process_name,
                      memory_used_bytes=proc_bytes),
        ]

    def inference_times(self, ts_from: float, ts_to: float) -> list[float]:
        """Times in ``[ts_from, ts_to)`` at which the simulated server finished an inference."""
        rate = self.profile.inferences_per_s
        # k-th inference at start + (k - 1/2) / rate, as in inferences_completed()
        first = math.ceil((ts_from - self.start_ts) * rate + 0.5 - 1e-9)
        last = math.ceil((ts_to - self.start_ts) * rate + 0.5 - 1e-9)
        return [self.start_ts + (k - 0.5) / rate for k in range(max(first, 1), last)]

    def llm_calls(self, ts_from: float, ts_to: float, *, service: str = "sim-inference-server",
                  model: str = "sim-llama-8b") -> list[LlmCall]:
        """The LLM calls the simulated server served in ``[ts_from, ts_to)`` (for MiB/inference)."""
        return [LlmCall(ts=t, trace_id=f"{int(t * 1000):032x}", span_id=f"{int(t * 1000):016x}",
                        service=service, host=self.host, provider="simulated", model=model,
                        operation="chat", input_tokens=512, output_tokens=128,
                        latency_ms=800.0)
                for t in self.inference_times(ts_from, ts_to)]

    def close(self) -> None:
        pass


@dataclass
class SimulatedRun:
    """What :func:`produce_simulated` sent."""

    profile: str
    host: str
    start_ts: float
    end_ts: float
    rounds: int = 0
    gpu_records: int = 0
    llm_call_records: int = 0
    simulated: bool = True
    label: str = ""
    topics: dict[str, str] = field(default_factory=dict)


def simulated_stream(source: SimulatedGpuSource, *, start_ts: float, duration_s: float,
                     interval_s: float = 5.0, with_llm_calls: bool = True
                     ) -> list[tuple[float, list[GpuSample], list[LlmCall]]]:
    """Rounds ``(ts, samples, calls since the previous round)`` over ``duration_s``."""
    rounds = []
    n = int(math.floor(duration_s / interval_s + 1e-9))
    prev = start_ts
    for k in range(n + 1):
        ts = start_ts + k * interval_s
        calls = source.llm_calls(prev, ts) if with_llm_calls and k else []
        rounds.append((ts, source.sample(ts), calls))
        prev = ts
    return rounds


def produce_simulated(bootstrap_servers: str, *, profile: str | SimProfile = "leak",
                      duration_s: float = 2400.0, interval_s: float = 5.0,
                      topic: str = "gpu_samples", llm_calls_topic: str | None = "llm_calls",
                      host: str = "sim-gpu-node", gpu: int = 0, start_ts: float | None = None,
                      speedup: float | None = None, seed: int = 0, producer: Any = None,
                      clock: Callable[[], float] = time.time,
                      sleep: Callable[[float], None] = time.sleep,
                      echo: Callable[[str], None] | None = None) -> SimulatedRun:
    """Produce a simulated GPU incident to Kafka, labelled simulated everywhere.

    Sends ``duration_s`` of simulated time, one sampling round every ``interval_s``, as the GPU
    exporter does (one record per device per round, key ``host:gpu``, value a JSON array of
    :class:`GpuSample`), plus the LLM calls the simulated server served (one JSON object per
    record on ``llm_calls_topic``, keyed by trace id; ``None`` sends none) so the detector can
    compute MiB leaked per inference.

    Parameters
    ----------
    start_ts : float, optional
        Event time of the first round; by default ``duration_s`` before now, so the incident
        is backfilled and ends at the present.
    speedup : float, optional
        Pace the rounds at ``interval_s / speedup`` wall seconds; None sends as fast as the
        broker takes them.
    producer : optional
        A kafka-python ``KafkaProducer`` (or anything with ``send``/``flush``); made from
        ``bootstrap_servers`` when omitted and closed at the end.
    echo : callable, optional
        Receives progress lines (each starts with ``[SIMULATED GPU]``).
    """
    import orjson

    from agentwatch.collectors.gpu_exporter import encode_round, make_producer

    start = float(clock() - duration_s if start_ts is None else start_ts)
    source = SimulatedGpuSource(profile, start_ts=start, host=host, gpu=gpu, seed=seed)
    name = source.profile.name
    label = (f"[SIMULATED GPU] profile={name} host={host} gpu={gpu} "
             f"{source.profile.total_bytes / GIB:.0f} GiB card; not NVML data")
    run = SimulatedRun(profile=name, host=host, start_ts=start, end_ts=start, label=label,
                       topics={"gpu_samples": topic, "llm_calls": llm_calls_topic or ""})
    if echo:
        echo(label)
    own = producer is None
    if own:
        producer = make_producer(bootstrap_servers, client_id="agentwatch-gpu-sim")
    try:
        rounds = simulated_stream(source, start_ts=start, duration_s=duration_s,
                                  interval_s=interval_s, with_llm_calls=llm_calls_topic is not None)
        for k, (ts, samples, calls) in enumerate(rounds):
            for key, value in encode_round(samples):
                producer.send(topic, key=key, value=value)
                run.gpu_records += 1
            for call in calls:
                producer.send(llm_calls_topic, key=call.trace_id.encode(), value=orjson.dumps(call))
                run.llm_call_records += 1
            run.rounds += 1
            run.end_ts = ts
            if echo and k % max(1, int(300 / interval_s)) == 0:
                device = samples[0]
                echo(f"[SIMULATED GPU] t+{ts - start:6.0f}s used "
                     f"{device.memory_used_bytes / MIB:7.0f} MiB of "
                     f"{device.memory_total_bytes / MIB:.0f} MiB (pid {samples[-1].pid})")
            if speedup:
                sleep(interval_s / speedup)
        producer.flush()
    finally:
        if own:
            producer.close()
    return run


def describe(profile: SimProfile) -> str:
    """One line for demo output: what the profile simulates."""
    return json.dumps({"profile": profile.name, "simulated": True,
                       "total_mib": profile.total_bytes // MIB,
                       "leak_mib_per_inference": profile.leak_bytes_per_inference / MIB,
                       "inferences_per_s": profile.inferences_per_s})


__all__: Sequence[str] = ("PROFILES", "SimProfile", "SimulatedGpuSource", "SimulatedRun",
                          "inferences_completed", "process_bytes",
                          "produce_simulated", "simulated_stream", "describe")
