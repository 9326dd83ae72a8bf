"""The embedded-stack supervisor: broker, topics, collector, workers; started and stopped as one.

Every child runs in its own session (Ctrl-C reaches only the supervisor) and with a parent-death
signal, so a supervisor killed with SIGKILL leaves no orphans.

Supervision works as systemd or Kubernetes would: a child that dies (worker, notifier, GPU
exporter, collector) is restarted with exponential backoff while the broker keeps running, and
the stack gives up loudly only when one child dies repeatedly within a short window. Nothing is
lost by a restart: every consumer resumes from its group's committed offsets (at-least-once) and
every side effect downstream is idempotent. The in-memory broker is the exception: when it dies
nothing can be stored any more, so the collector is killed at once (no client may get success
for data that cannot be stored) and the stack stops with an error.

A clean stop runs in data-flow order: the collector first (nothing new is acknowledged), then
the consumers drain what is already on the in-memory broker, then workers flush and commit,
then the broker stops.
"""

from __future__ import annotations

import collections
import ctypes
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from agentwatch.broker import (DEFAULT_TOPICS, EmbeddedBroker, create_topics, ensure_port_free,
                               unconsumed_records, wait_for_port)
from agentwatch.collectors.rotel import RECEIVER_AUTH
from agentwatch.collectors.rotel import endpoint as otlp_endpoint
from agentwatch.settings import Settings

_PR_SET_PDEATHSIG = 1


def _die_with_parent(sig: int = signal.SIGTERM) -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)
    except OSError:
        pass


class StackError(RuntimeError):
    pass


class BrokerDied(StackError):
    pass


# Each run keeps its logs in <data dir>/logs/run-<UTC time>/; the newest this many stay.
KEEP_RUN_LOGS = 10


def new_run_dir(data_dir: Path, keep: int = KEEP_RUN_LOGS) -> Path:
    """Create ``<data_dir>/logs/run-<UTC time>/`` for one run's logs and remove the oldest run
    folders beyond the newest ``keep`` (this one included)."""
    logs = Path(data_dir).absolute() / "logs"  # absolute: children get these paths too
    logs.mkdir(parents=True, exist_ok=True)
    while True:  # names sort by start time: a name taken this millisecond waits for the next
        now = time.time()
        run_dir = logs / f"run-{time.strftime('%Y%m%dT%H%M%S', time.gmtime(now))}.{int(now * 1000) % 1000:03d}Z"
        try:
            run_dir.mkdir()
            break
        except FileExistsError:
            time.sleep(0.001)
    runs = sorted(p for p in logs.glob("run-*") if p.is_dir())
    for old in runs[:max(0, len(runs) - keep)]:
        if old != run_dir:
            shutil.rmtree(old, ignore_errors=True)
    return run_dir


# The worker group consumes every topic but dead_letter and alerts (the notifier's).
WORKER_INPUT_TOPICS = tuple(name for name in DEFAULT_TOPICS if name not in ("dead_letter", "alerts"))


@dataclass(frozen=True)
class RestartPolicy:
    """Restart a dead child after an exponential backoff; give up after ``max_deaths`` deaths of
    one child within ``window_s``: a crash loop is a fault that restarting cannot mend."""

    initial_backoff_s: float = 0.5
    max_backoff_s: float = 15.0
    max_deaths: int = 5
    window_s: float = 60.0

    def backoff_s(self, recent_deaths: int) -> float:
        return min(self.max_backoff_s, self.initial_backoff_s * 2 ** max(0, recent_deaths - 1))


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log_path: Path
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    restarts: int = 0
    deaths: collections.deque = field(default_factory=lambda: collections.deque(maxlen=64))
    restart_at: float | None = None  # monotonic time of a scheduled restart

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


class SupervisorMetrics:
    """What only the supervisor sees: restarts of its children and the collector's export failures."""

    def __init__(self, registry: Any | None = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = registry if registry is not None else CollectorRegistry()
        self.restarts = Counter("agentwatch_supervisor_restarts", "Children restarted after they died",
                                ["child"], registry=self.registry)
        self.up = Gauge("agentwatch_supervisor_child_up", "1 while the child process runs", ["child"],
                        registry=self.registry)
        self.export_failures = Counter("agentwatch_collector_export_failures",
                                       "Collector log lines reporting a failed export to Kafka",
                                       registry=self.registry)


def is_loopback(addr: str) -> bool:
    """Whether ``addr`` (an IP literal) reaches this host only."""
    try:
        return ipaddress.ip_address(addr.strip("[]")).is_loopback
    except ValueError:
        return False


def otlp_exposure_warning(bind_addr: str, token_set: bool, collector_checks_token: bool) -> str | None:
    """What `up` must say before its OTLP receivers listen on ``bind_addr``; None when safe.

    Loopback is safe. Another address is safe only with a token the collector checks; rotel
    checks none (``collectors/rotel.py`` ``RECEIVER_AUTH``), so for it a token set is named as
    not enforced rather than taken as protection.
    """
    if is_loopback(bind_addr) or (token_set and collector_checks_token):
        return None
    exposed = (f"warning: OTLP receivers bind {bind_addr}, not loopback: anyone who can reach this host's "
               "OTLP ports can send spans and logs (fake costs, fake pages) or flood the pipeline.")
    if not collector_checks_token:
        why = (" The embedded collector (rotel) cannot require a token"
               + (", so AGENTWATCH_OTLP_TOKEN is set but NOT enforced" if token_set else "")
               + ". Bind 127.0.0.1 behind an authenticating proxy, restrict the ports with a firewall, "
               "or run the compose stack (otelcol with a bearer token).")
    else:
        why = " Set AGENTWATCH_OTLP_TOKEN so that senders must present it."
    return exposed + why


# Never handed to children: workers do not authenticate senders, and the environment of a
# process is readable by more than the process itself.
_CHILD_ENV_EXCLUDE = {"otlp_token"}


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as AGENTWATCH_* variables, so child processes read the same config."""
    env = {}
    for name, value in settings.model_dump(mode="json", exclude=_CHILD_ENV_EXCLUDE).items():
        if value is not None:
            env[f"AGENTWATCH_{name.upper()}"] = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    # Secrets dump masked ("**********"); the workers need this one's value to hash alike.
    env["AGENTWATCH_PII_HASH_KEY"] = settings.pii_hash_key.get_secret_value()
    return env


@dataclass
class Stack:
    settings: Settings
    run_dir: Path | None = None  # None = new_run_dir(settings.data_dir), made on construction
    say: Callable[[str], None] = print
    children: list[Child] = field(default_factory=list)
    broker: EmbeddedBroker | None = None
    log_epoch: str = ""  # set when an embedded broker starts (see Settings.log_epoch)
    restart_policy: RestartPolicy = field(default_factory=RestartPolicy)
    metrics: SupervisorMetrics = field(default_factory=SupervisorMetrics)
    # A clean stop waits for the consumers to drain the in-memory broker while they make
    # progress, giving up after drain_stall_s without any, or after drain_timeout_s in all.
    drain_stall_s: float = 10.0
    drain_timeout_s: float = 30.0
    # Children that had to be killed by the last stop (a clean stop needs none).
    forced_stops: list[str] = field(default_factory=list)
    _collector_log: Any = None  # a CollectorLogWatch on the collector's log
    _metrics_server: Any = None

    def __post_init__(self) -> None:
        if self.run_dir is None:
            self.run_dir = new_run_dir(self.settings.data_dir)

    @property
    def bootstrap_servers(self) -> str:
        if self.settings.bootstrap_servers:
            return self.settings.bootstrap_servers
        return f"127.0.0.1:{self.settings.broker_port}"

    def worker_metrics_ports(self) -> list[int]:
        if not self.settings.metrics_port:
            return []
        return [self.settings.metrics_port + i for i in range(self.settings.workers)]

    def supervisor_metrics_port(self) -> int:
        """After the workers' and the notifier's ports; 0 when metrics are off."""
        s = self.settings
        return s.metrics_port + s.workers + 1 if s.metrics_port else 0

    def start(self, timeout_s: float = 30.0) -> "Stack":
        started = time.monotonic()
        s = self.settings
        # Check every port first, so a clash is reported before anything starts.
        if not s.bootstrap_servers:
            ensure_port_free(s.broker_port, "--broker-port")
        try:
            otlp_endpoint(s.otlp_bind_addr, s.otlp_grpc_port)
        except ValueError as exc:
            raise StackError(str(exc)) from None
        # ensure_port_free binds an IPv4 socket: an IPv6 address is probed on IPv4 loopback.
        otlp_probe = _probe_host(s.otlp_bind_addr) if ":" not in s.otlp_bind_addr else "127.0.0.1"
        ensure_port_free(s.otlp_grpc_port, "--otlp-grpc-port", otlp_probe)
        ensure_port_free(s.otlp_http_port, "--otlp-http-port", otlp_probe)
        for port in self.worker_metrics_ports() + ([s.metrics_port + s.workers] if s.alert_routes and s.metrics_port else []):
            ensure_port_free(port, "--metrics-port")
        if self.supervisor_metrics_port():
            ensure_port_free(self.supervisor_metrics_port(), "--metrics-port")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.say(f"logs      {self.run_dir}")
        warning = otlp_exposure_warning(s.otlp_bind_addr, s.otlp_token is not None, RECEIVER_AUTH)
        if warning:
            self.say(warning)
        try:
            if self.supervisor_metrics_port():
                from agentwatch.dashboards.metrics import serve_metrics

                self._metrics_server = serve_metrics(self.metrics.registry, self.supervisor_metrics_port(),
                                                     s.metrics_addr)
            if not s.bootstrap_servers:
                self.broker = EmbeddedBroker(s.broker_port, log_path=self.run_dir / "broker.log").start()
                # Its logs start empty: offsets saved against an earlier broker mean nothing now.
                self.log_epoch = f"embedded-{time.time_ns()}"
                self.say(f"broker    Tansu (embedded, in-memory) on {self.bootstrap_servers}")
            create_topics(self.bootstrap_servers, DEFAULT_TOPICS)
            self._start_collector()
            self._start_workers(deadline=started + timeout_s)
            self._start_notifier()
            self._start_gpu_exporter()
        except BaseException:
            self.stop()
            raise
        if self.supervisor_metrics_port():
            self.say(f"supervise restarts a child that dies (backoff {self.restart_policy.initial_backoff_s:g}s up to "
                     f"{self.restart_policy.max_backoff_s:g}s), /metrics on {self.supervisor_metrics_port()}")
        self.say(f"ready in {time.monotonic() - started:.1f}s: OTLP gRPC {s.otlp_bind_addr}:{s.otlp_grpc_port}, "
                 f"HTTP {s.otlp_bind_addr}:{s.otlp_http_port}; snapshots in {s.data_dir}")
        return self

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        log_path = self.run_dir / f"{name}.log"
        child = Child(name, _popen(argv, env or {}, log_path), log_path, argv=argv, env=env or {})
        self.children.append(child)
        self.metrics.up.labels(name).set(1)
        return child

    def _start_collector(self) -> None:
        from agentwatch.collectors.rotel import CollectorLogWatch, RotelConfig

        s = self.settings
        config = RotelConfig(brokers=self.bootstrap_servers, grpc_port=s.otlp_grpc_port, http_port=s.otlp_http_port,
                             bind_addr=s.otlp_bind_addr, max_message_bytes=s.max_message_bytes,
                             pid_file=str(self.run_dir / "rotel.pid"))
        child = self._spawn("collector", config.command(), {"RUST_LOG": "warn"})
        self._collector_log = CollectorLogWatch(child.log_path)
        try:
            for port in (s.otlp_grpc_port, s.otlp_http_port):
                wait_for_listener(_probe_host(s.otlp_bind_addr), port, 10, child.proc)
        except (RuntimeError, TimeoutError) as exc:
            raise StackError(f"collector (rotel) failed to start: {exc}\n{child.tail()}") from exc
        self.say(f"collector rotel -> kafka topic otlp_spans (protobuf), OTLP :{s.otlp_grpc_port}/:{s.otlp_http_port}")

    def _start_workers(self, deadline: float) -> None:
        s = self.settings
        env = settings_env(s.model_copy(update={"bootstrap_servers": self.bootstrap_servers,
                                                "log_epoch": self.log_epoch or s.log_epoch}))
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

    def broker_died(self) -> bool:
        return self.broker is not None and self.broker.proc is not None and self.broker.proc.poll() is not None

    def supervise(self, should_stop: Callable[[], bool], every_s: float = 0.2) -> None:
        """Keep the stack running until ``should_stop()``: restart dead children, report collector
        export failures; raise :class:`StackError` when a child keeps dying or the broker died."""
        while not should_stop():
            self.poll()
            time.sleep(every_s)

    def poll(self) -> None:
        """One supervision step (``supervise`` loops over it; the demo calls it between sends)."""
        if self.broker_died():
            self._on_broker_death()
        now = time.monotonic()
        policy = self.restart_policy
        for child in self.children:
            if child.restart_at is not None:
                if now >= child.restart_at:
                    self._restart(child)
                continue
            code = child.proc.poll()
            if code is None:
                continue
            self.metrics.up.labels(child.name).set(0)
            # A killed worker can leave its normaliser process behind for a moment.
            _signal_group(child.proc.pid, signal.SIGKILL)
            child.deaths.append(now)
            recent = sum(1 for t in child.deaths if now - t <= policy.window_s)
            if recent >= policy.max_deaths:
                raise StackError(f"{child.name} died {recent} times within {policy.window_s:g}s "
                                 f"(last: {describe_exit(code)}); giving up. Last log lines:\n{child.tail()}")
            delay = policy.backoff_s(recent)
            child.restart_at = now + delay
            self.say(f"{child.name} died ({describe_exit(code)}); restarting in {delay:.1f}s "
                     f"(restart {child.restarts + 1}); log: {child.log_path}")
        self._report_export_failures()

    def _restart(self, child: Child) -> None:
        child.restart_at = None
        child.proc = _popen(child.argv, child.env, child.log_path)
        child.restarts += 1
        self.metrics.restarts.labels(child.name).inc()
        self.metrics.up.labels(child.name).set(1)
        self.say(f"{child.name} restarted (pid {child.proc.pid}, restart {child.restarts})")

    def _report_export_failures(self) -> None:
        if self._collector_log is None:
            return
        failures = self._collector_log.new_failures()
        if failures:
            self.metrics.export_failures.inc(len(failures))
            self.say(f"collector: {len(failures)} export(s) to Kafka failed; first: {failures[0]}")

    def _on_broker_death(self) -> None:
        code = self.broker.proc.returncode
        # Nothing may answer success while nothing can store: stop the receivers at once.
        for child in self.children:
            if child.name == "collector":
                _signal_group(child.proc.pid, signal.SIGKILL)
        raise BrokerDied(
            f"broker died ({describe_exit(code)}): the embedded broker keeps topics in memory, so what "
            f"was not yet consumed is lost; the collector was stopped so no sender gets success for data "
            f"that cannot be stored. Last log lines:\n{Child('broker', self.broker.proc, self.run_dir / 'broker.log').tail()}")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop in data-flow order; on the in-memory broker, drain it before it goes."""
        by_role: dict[str, list[Child]] = {"collector": [], "gpu": [], "worker": [], "notifier": []}
        for child in self.children:
            role = "worker" if child.name.startswith("worker") else "gpu" if child.name.startswith("gpu") else child.name
            by_role.setdefault(role, []).append(child)
        phases: list[str] = []
        started = time.monotonic()
        terminate_all([c.proc for c in by_role["collector"] + by_role["gpu"]], timeout_s)
        if self.broker is not None and not self.broker_died():
            # A consumer waiting out its backoff starts now: what is on the in-memory broker is
            # lost unless someone consumes it before the broker stops.
            for child in by_role["worker"] + by_role["notifier"]:
                if child.restart_at is not None:
                    self._restart(child)
        phases.append(f"receivers {time.monotonic() - started:.1f}s")
        if self.broker is not None and not self.broker_died() and self.children:
            mark = time.monotonic()
            self._drain(by_role)
            phases.append(f"drain {time.monotonic() - mark:.1f}s")
        mark = time.monotonic()
        consumers = by_role["worker"] + [c for role, cs in by_role.items()
                                         if role not in ("collector", "gpu", "worker") for c in cs]
        forced = terminate_all([c.proc for c in consumers], timeout_s)
        self.forced_stops = [c.name for c in consumers if c.proc in forced]
        for name in self.forced_stops:
            self.say(f"stop: {name} did not stop within {timeout_s:g}s and was killed")
        phases.append(f"workers and notifier {time.monotonic() - mark:.1f}s")
        self.children.clear()
        if self.broker is not None:
            self.broker.stop()
            self.broker = None
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server = None
        if consumers:
            self.say(f"stopped in {time.monotonic() - started:.1f}s ({', '.join(phases)})")

    def _drain(self, by_role: dict[str, list[Child]]) -> None:
        """Wait until the worker and notifier groups have committed everything on the broker; say
        what is left when they cannot (no live consumer, or no progress for drain_stall_s)."""
        from agentwatch.alerts.service import ALERTS_TOPIC, GROUP_ID as NOTIFIER_GROUP

        groups = {}  # group -> (topics, its consumers)
        if by_role["worker"]:
            groups[self.settings.app_id] = (WORKER_INPUT_TOPICS, by_role["worker"])
        if by_role["notifier"]:
            groups[NOTIFIER_GROUP] = ((ALERTS_TOPIC,), by_role["notifier"])
        for child in by_role["worker"]:
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGUSR1)  # write buffered rows at every tick now
        started = last_progress = time.monotonic()
        left: dict[str, dict] = {}
        remaining = None
        while groups:
            try:
                left = {g: r for g, (topics, _) in groups.items()
                        if (r := unconsumed_records(self.bootstrap_servers, g, topics))}
            except Exception as exc:  # a broken broker: nothing more to wait for
                self.say(f"stop: could not read the consumer groups' progress ({exc})")
                return
            total = sum(n for records in left.values() for n in records.values())
            now = time.monotonic()
            if remaining is None or total < remaining:
                remaining, last_progress = total, now
            consuming = [g for g in left if any(c.proc.poll() is None for c in groups[g][1])]
            if not consuming or now - last_progress > self.drain_stall_s or now - started > self.drain_timeout_s:
                break
            time.sleep(0.25)
        for group, records in left.items():
            self.say(f"stop: {sum(records.values())} record(s) not consumed by {group} after "
                     f"{time.monotonic() - started:.1f}s are lost with the in-memory broker: {dict(records)}")

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _probe_host(bind_addr: str) -> str:
    """Where to reach a socket bound to ``bind_addr`` from this host (a wildcard: loopback)."""
    ip = ipaddress.ip_address(bind_addr.strip("[]"))
    if ip.is_unspecified:
        return "::1" if ip.version == 6 else "127.0.0.1"
    return str(ip)


def wait_for_listener(host: str, port: int, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    """Wait until ``host:port`` accepts connections (``broker.wait_for_port`` knows loopback only)."""
    if host == "127.0.0.1":
        return wait_for_port(port, timeout_s, proc)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout_s:.0f}s")


def _popen(argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **env}, start_new_session=True, preexec_fn=_die_with_parent)


def terminate_all(procs: list[subprocess.Popen], timeout_s: float) -> list[subprocess.Popen]:
    """Stop children side by side (each flushes on its own, so N workers take as long as one);
    returns those that had to be killed."""
    for proc in procs:
        _signal_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    return [proc for proc in procs
            if terminate_group(proc, max(0.1, deadline - time.monotonic()), signalled=True)]


def terminate_group(proc: subprocess.Popen, timeout_s: float, signalled: bool = False) -> bool:
    """Stop a child and everything it started (its process group, even when the leader is gone:
    a worker killed with SIGKILL leaves its normaliser process behind otherwise).

    Returns True when the child had to be killed because it did not stop within ``timeout_s``.
    """
    forced = False
    if not signalled:
        _signal_group(proc.pid, signal.SIGTERM)
    if proc.poll() is None:
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            forced = True
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
    deadline = time.monotonic() + timeout_s
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    _signal_group(proc.pid, signal.SIGKILL)
    return forced


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
