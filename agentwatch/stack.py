"""The embedded-stack supervisor: broker, topics, collector, workers; started and stopped as one.

Every child runs in its own session (Ctrl-C reaches only the supervisor, which then stops the
children in order: workers first so they flush snapshots, then collector, then broker) and
with a parent-death signal, so a supervisor killed with SIGKILL leaves no orphans.
When any child dies, the supervisor prints the tail of its log and stops the rest.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from agentwatch.broker import (DEFAULT_TOPICS, EmbeddedBroker, create_topics, ensure_port_free,
                               wait_for_port)
from agentwatch.settings import Settings

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


class StackError(RuntimeError):
    pass


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log_path: Path

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as AGENTWATCH_* variables, so child processes read the same config."""
    env = {}
    for name, value in settings.model_dump(mode="json").items():
        if value is not None:
            env[f"AGENTWATCH_{name.upper()}"] = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    return env


@dataclass
class Stack:
    settings: Settings
    run_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="agentwatch-run-")))
    say: Callable[[str], None] = print
    children: list[Child] = field(default_factory=list)
    broker: EmbeddedBroker | None = None

    @property
    def bootstrap_servers(self) -> str:
        if self.settings.bootstrap_servers:
            return self.settings.bootstrap_servers
        return f"127.0.0.1:{self.settings.broker_port}"

    def worker_metrics_ports(self) -> list[int]:
        if not self.settings.metrics_port:
            return []
        return [self.settings.metrics_port + i for i in range(self.settings.workers)]

    def start(self, timeout_s: float = 30.0) -> "Stack":
        started = time.monotonic()
        s = self.settings
        # Check every port first, so a clash is reported before anything starts.
        if not s.bootstrap_servers:
            ensure_port_free(s.broker_port, "--broker-port")
        ensure_port_free(s.otlp_grpc_port, "--otlp-grpc-port")
        ensure_port_free(s.otlp_http_port, "--otlp-http-port")
        for port in self.worker_metrics_ports() + ([s.metrics_port + s.workers] if s.alert_routes and s.metrics_port else []):
            ensure_port_free(port, "--metrics-port")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            if not s.bootstrap_servers:
                self.broker = EmbeddedBroker(s.broker_port, log_path=self.run_dir / "broker.log").start()
                self.say(f"broker    Tansu (embedded, in-memory) on {self.bootstrap_servers}")
            create_topics(self.bootstrap_servers, DEFAULT_TOPICS)
            self._start_collector()
            self._start_workers(deadline=started + timeout_s)
            self._start_notifier()
            self._start_gpu_exporter()
        except BaseException:
            self.stop()
            raise
        self.say(f"ready in {time.monotonic() - started:.1f}s: OTLP gRPC 127.0.0.1:{s.otlp_grpc_port}, "
                 f"HTTP 127.0.0.1:{s.otlp_http_port}; snapshots in {s.data_dir}")
        return self

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        log_path = self.run_dir / f"{name}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**os.environ, **(env or {})}, start_new_session=True,
                                    preexec_fn=_die_with_parent)
        child = Child(name, proc, log_path)
        self.children.append(child)
        return child

    def _start_collector(self) -> None:
        from agentwatch.collectors.rotel import RotelConfig

        s = self.settings
        config = RotelConfig(brokers=self.bootstrap_servers, grpc_port=s.otlp_grpc_port, http_port=s.otlp_http_port,
                             max_message_bytes=s.max_message_bytes, max_span_bytes=s.collector_max_span_bytes,
                             pid_file=str(self.run_dir / "rotel.pid"))
        child = self._spawn("collector", config.command(), {"RUST_LOG": "warn"})
        try:
            wait_for_port(s.otlp_grpc_port, 10, child.proc)
            wait_for_port(s.otlp_http_port, 10, child.proc)
        except (RuntimeError, TimeoutError) as exc:
            raise StackError(f"collector (rotel) failed to start: {exc}\n{child.tail()}") from exc
        self.say(f"collector rotel -> kafka topic otlp_spans (protobuf), OTLP :{s.otlp_grpc_port}/:{s.otlp_http_port}")

    def _start_workers(self, deadline: float) -> None:
        s = self.settings
        env = settings_env(s.model_copy(update={"bootstrap_servers": self.bootstrap_servers}))
        ports = self.worker_metrics_ports()
        pending = []
        for i in range(s.workers):
            ready = self.run_dir / f"worker-{i}.ready"
            ready.unlink(missing_ok=True)
            argv = [sys.executable, "-m", "agentwatch", "worker", "--worker-index", str(i),
                    "--ready-file", str(ready), "--metrics-port", str(ports[i] if ports else 0)]
            pending.append((self._spawn(f"worker-{i}", argv, env), ready))
        for child, ready in pending:
            while not ready.exists():
                if child.proc.poll() is not None:
                    raise StackError(f"{child.name} exited with {child.proc.returncode} while starting:\n{child.tail()}")
                if time.monotonic() > deadline:
                    raise StackError(f"{child.name} not ready in time (no partitions assigned):\n{child.tail()}")
                time.sleep(0.1)
        metrics = f", /metrics on {', '.join(map(str, ports))}" if ports else ""
        self.say(f"workers   {s.workers} Faust worker(s) joined group {s.app_id!r}{metrics}")

    def _start_notifier(self) -> None:
        s = self.settings
        if s.alert_routes is None:
            self.say("alerts    no routes file (--alert-routes): alerts stay on the `alerts` topic and in snapshots")
            return
        metrics_port = s.metrics_port + s.workers if s.metrics_port else 0
        self._spawn("notifier", [sys.executable, "-m", "agentwatch", "notify", "--bootstrap-servers",
                                 self.bootstrap_servers, "--routes", str(s.alert_routes),
                                 "--state-dir", str(s.alerts_state_dir), "--metrics-port", str(metrics_port)])
        self.say(f"alerts    notifier delivering per {s.alert_routes}"
                 + (f", /metrics on {metrics_port}" if metrics_port else ""))

    def _start_gpu_exporter(self) -> None:
        s = self.settings
        if s.gpu_exporter != "auto":
            return
        import pynvml

        from agentwatch.collectors.gpu import nvml_available

        if not nvml_available(pynvml):
            self.say("gpu       NVML not available: GPU exporter not started "
                     "(see `agentwatch gpu-exporter --help` for dcgm and simulated sources)")
            return
        self._spawn("gpu-exporter", [sys.executable, "-m", "agentwatch", "gpu-exporter", "--bootstrap-servers",
                                     self.bootstrap_servers, "--interval", str(s.gpu_interval_s)])
        self.say(f"gpu       NVML exporter sampling every {s.gpu_interval_s:g}s -> gpu_samples")

    def dead_child(self) -> Child | None:
        for child in self.children:
            if child.proc.poll() is not None:
                return child
        if self.broker is not None and self.broker.proc is not None and self.broker.proc.poll() is not None:
            return Child("broker", self.broker.proc, self.run_dir / "broker.log")
        return None

    def supervise(self, should_stop: Callable[[], bool]) -> None:
        """Block until ``should_stop()`` or a child dies (then raise with its log tail)."""
        while not should_stop():
            dead = self.dead_child()
            if dead is not None:
                raise StackError(f"{dead.name} died with exit code {dead.proc.returncode}; last log lines:\n{dead.tail()}")
            time.sleep(0.2)

    def stop(self, timeout_s: float = 15.0) -> None:
        # Workers first (they flush snapshots on shutdown), then the collector, then the broker.
        for child in sorted(self.children, key=lambda c: 0 if c.name.startswith("worker") else 1):
            terminate_group(child.proc, timeout_s)
        self.children.clear()
        if self.broker is not None:
            self.broker.stop()
            self.broker = None

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def terminate_group(proc: subprocess.Popen, timeout_s: float) -> None:
    """Stop a child and everything it started (its process group, even when the leader is gone:
    a worker killed with SIGKILL leaves its normaliser process behind otherwise)."""
    _signal_group(proc.pid, signal.SIGTERM)
    if proc.poll() is None:
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
    deadline = time.monotonic() + timeout_s
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    _signal_group(proc.pid, signal.SIGKILL)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False
