"""The GPU exporter: sample a GPU source every interval and produce to Kafka (``gpu_samples``).

Record format (what the stream worker decodes with :func:`agentwatch.streams.pipeline.decode_events`):
one record per device per sampling round, key ``b"<host>:<gpu>"`` (so a device's samples stay
ordered on one partition), value a JSON array of :class:`~agentwatch.events.GpuSample` objects:
the device row (``pid == 0``) first, then one row per compute process on that device.

The loop (:func:`run_exporter`) takes the source and the producer as arguments; the click
command :func:`gpu_exporter` builds them from options.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import click
import orjson

from agentwatch.broker import MAX_MESSAGE_BYTES
from agentwatch.collectors.gpu import DcgmSource, GpuSource, NvmlSampler, NvmlUnavailableError
from agentwatch.events import GpuSample

log = logging.getLogger(__name__)

DEFAULT_TOPIC = "gpu_samples"
DEFAULT_INTERVAL_S = 5.0
EXIT_NVML_UNAVAILABLE = 3  # distinct from click's usage errors (2)
EXIT_KAFKA_UNAVAILABLE = 4


def encode_round(samples: Iterable[GpuSample]) -> list[tuple[bytes, bytes]]:
    """``(key, value)`` records of one round: one per device, in device order."""
    by_device: dict[tuple[str, int], list[GpuSample]] = {}
    for sample in samples:
        by_device.setdefault((sample.host, sample.gpu), []).append(sample)
    return [(f"{host}:{gpu}".encode(), orjson.dumps(rows))
            for (host, gpu), rows in by_device.items()]


def decode_record(value: bytes) -> list[GpuSample]:
    """The inverse of one record of :func:`encode_round` (for tests and tools): the worker's decoder."""
    from agentwatch.streams.pipeline import decode_events

    return decode_events("gpu_samples", value)


@dataclass
class ExportStats:
    rounds: int = 0
    records: int = 0
    samples: int = 0
    failed_rounds: int = 0


def run_exporter(source: GpuSource, producer: Any, *, topic: str = DEFAULT_TOPIC,
                 interval_s: float = DEFAULT_INTERVAL_S, count: int | None = None,
                 stop: threading.Event | None = None,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 wait: Callable[[float], Any] | None = None) -> ExportStats:
    """Sample ``source`` every ``interval_s`` and send each round; returns what was sent.

    Rounds keep a fixed cadence (sleeping to the next deadline, skipping missed ones rather than
    bursting). A round whose sampling fails is logged and counted, and the loop goes on: a GPU
    that falls off the bus must not stop the other devices' samples. The producer is flushed
    after every round so a round is on the broker before the next is taken.

    Parameters
    ----------
    producer
        kafka-python ``KafkaProducer`` or anything with ``send(topic, key=, value=)``/``flush()``.
    count : int, optional
        Stop after this many rounds (``--once`` is 1); None runs until ``stop`` is set.
    wait : callable, optional
        Sleeps between rounds; default waits on ``stop`` so a signal ends the loop at once.
    """
    if interval_s <= 0:
        raise ValueError(f"interval_s must be > 0, got {interval_s}")
    stop = stop or threading.Event()
    wait = wait or stop.wait
    stats = ExportStats()
    next_round = monotonic()
    while not stop.is_set() and (count is None or stats.rounds + stats.failed_rounds < count):
        try:
            samples = source.sample(clock())
        except Exception as exc:  # noqa: BLE001 - NVML/HTTP errors vary by driver and exporter
            stats.failed_rounds += 1
            log.warning("GPU sampling failed (%s: %s); retrying next round",
                        type(exc).__name__, exc)
        else:
            for key, value in encode_round(samples):
                producer.send(topic, key=key, value=value)
                stats.records += 1
            stats.samples += len(samples)
            producer.flush()
            stats.rounds += 1
        if count is not None and stats.rounds + stats.failed_rounds >= count:
            break
        next_round += interval_s
        now = monotonic()
        if next_round < now:  # fell behind (slow scrape, suspended VM): realign, don't burst
            next_round = now + interval_s - (now - next_round) % interval_s
        wait(next_round - now)
    return stats


def make_producer(bootstrap_servers: str, *, client_id: str = "agentwatch-gpu-exporter") -> Any:
    """A kafka-python producer sized to the broker's message limit."""
    from kafka import KafkaProducer

    return KafkaProducer(bootstrap_servers=bootstrap_servers, client_id=client_id, acks=1,
                         linger_ms=20, retries=5, max_request_size=MAX_MESSAGE_BYTES,
                         request_timeout_ms=15000)


def build_source(source: str, *, nvml: Any = None, dcgm_url: str | None = None,
                 host: str | None = None, profile: str = "leak",
                 clock: Callable[[], float] = time.time) -> GpuSource:
    """The source named by ``--source``; raises NvmlUnavailableError / click.UsageError."""
    if source == "nvml":
        if nvml is None:
            try:
                import pynvml as nvml  # package nvidia-ml-py
            except ImportError as exc:
                raise NvmlUnavailableError("the pynvml module (package nvidia-ml-py) is not "
                                           "installed") from exc
        return NvmlSampler(nvml, host=host)
    if source == "dcgm":
        if not dcgm_url:
            raise click.UsageError("--source dcgm needs --dcgm-url http://HOST:9400/metrics")
        try:
            return DcgmSource(dcgm_url, host=host)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from exc
    if source == "simulated":
        from agentwatch.collectors.gpu_sim import SimulatedGpuSource

        return SimulatedGpuSource(profile, start_ts=clock(), host=host or "sim-gpu-node")
    raise click.UsageError(f"unknown source {source!r}")


@click.command("gpu-exporter")
@click.option("--bootstrap-servers", default="127.0.0.1:9092", show_default=True,
              envvar="AGENTWATCH_BOOTSTRAP_SERVERS", help="Kafka bootstrap servers.")
@click.option("--interval", "interval_s", type=click.FloatRange(min=0.1), default=5.0,
              show_default=True, help="Seconds between sampling rounds.")
@click.option("--source", type=click.Choice(["nvml", "dcgm", "simulated"]), default="nvml",
              show_default=True, help="NVML on this host, a dcgm-exporter endpoint, or a "
                                      "simulated GPU (labelled simulated).")
@click.option("--dcgm-url", default=None, help="dcgm-exporter metrics URL (with --source dcgm).")
@click.option("--profile", type=click.Choice(["leak", "step_leak", "sawtooth", "sawtooth_leak",
                                              "plateau", "vllm_prealloc", "restart"]),
              default="leak", show_default=True, help="Workload of --source simulated.")
@click.option("--host", default=None, help="Host name on the samples (default: this host; "
                                           "for dcgm the exporter's Hostname label).")
@click.option("--topic", default=DEFAULT_TOPIC, show_default=True)
@click.option("--once", is_flag=True, help="Send one round and exit.")
@click.option("--count", type=click.IntRange(min=1), default=None,
              help="Send this many rounds and exit.")
def gpu_exporter(bootstrap_servers: str, interval_s: float, source: str, dcgm_url: str | None,
                 profile: str, host: str | None, topic: str, once: bool,
                 count: int | None) -> None:
    """Sample GPU memory, utilisation, temperature and power and produce to Kafka."""
    if once:
        count = 1
    try:
        gpu_source = build_source(source, dcgm_url=dcgm_url, host=host, profile=profile)
    except NvmlUnavailableError as exc:
        click.echo(f"agentwatch gpu-exporter: {exc}", err=True)
        sys.exit(EXIT_NVML_UNAVAILABLE)
    if source == "simulated":
        click.echo(f"[SIMULATED GPU] profile={profile}: samples are simulated (simulated=true), "
                   "not read from NVML", err=True)
    try:
        producer = make_producer(bootstrap_servers)
    except Exception as exc:  # NoBrokersAvailable and friends
        gpu_source.close()
        click.echo(f"agentwatch gpu-exporter: cannot reach Kafka at {bootstrap_servers} "
                   f"({type(exc).__name__}: {exc})", err=True)
        sys.exit(EXIT_KAFKA_UNAVAILABLE)
    stop = threading.Event()

    def _stop(signum: int, _frame: Any) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        stats = run_exporter(gpu_source, producer, topic=topic, interval_s=interval_s,
                             count=count, stop=stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        producer.flush()
        producer.close()
        gpu_source.close()
    click.echo(f"agentwatch gpu-exporter: sent {stats.records} records ({stats.samples} samples, "
               f"{stats.rounds} rounds, {stats.failed_rounds} failed) to {topic}", err=True)
    if count is not None and stats.rounds == 0:
        sys.exit(1)


__all__: Sequence[str] = ("encode_round", "decode_record", "run_exporter", "make_producer",
                          "build_source", "gpu_exporter", "ExportStats", "EXIT_NVML_UNAVAILABLE")
