"""What the embedded stack listens on, read from the kernel for each process it started.

By default every listening socket of the broker, the collector, the workers (and their normaliser
processes) and the supervisor's /metrics is on loopback. Binding the receivers elsewhere moves the
collector's two OTLP ports only, and says at start that rotel takes requests without any token:
which the second test shows, so the warning is not a figure of speech.
"""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

import psutil
import pytest
from stack_helpers import stack_settings

from agentwatch.stack import Stack

pytestmark = pytest.mark.slow

LOOPBACK = {"127.0.0.1", "::1"}


def _listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket ``pid`` and its descendants listen on."""
    root = psutil.Process(pid)
    found = set()
    for proc in [root, *root.children(recursive=True)]:
        try:
            conns = proc.net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        found |= {(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}
    return found


def _listeners_by_child(stack: Stack) -> dict[str, set[tuple[str, int]]]:
    by_child = {"broker": _listening(stack.broker.proc.pid)}
    by_child |= {child.name: _listening(child.proc.pid) for child in stack.children}
    # The supervisor serves its /metrics from this process, among whatever else the test runs.
    port = stack.supervisor_metrics_port()
    by_child["supervisor"] = {(ip, p) for ip, p in _listening(os.getpid()) if p == port}
    return by_child


def _start(tmp_path: Path, **overrides) -> tuple[Stack, list[str]]:
    said: list[str] = []
    stack = Stack(stack_settings(tmp_path / "data", **overrides), say=said.append)
    stack.start()
    return stack, said


def test_embedded_stack_listens_on_loopback_only(tmp_path):
    stack, said = _start(tmp_path)
    try:
        s = stack.settings
        listeners = _listeners_by_child(stack)
    finally:
        stack.stop()
    assert {name for name in listeners} >= {"broker", "collector", "worker-0", "supervisor"}
    for name, sockets in listeners.items():
        assert sockets, f"{name} listens on nothing"  # the lookup works for every process
        exposed = {sock for sock in sockets if sock[0] not in LOOPBACK}
        assert not exposed, f"{name} listens beyond loopback: {exposed}"
    assert ("127.0.0.1", s.broker_port) in listeners["broker"]
    assert {("127.0.0.1", s.otlp_grpc_port), ("127.0.0.1", s.otlp_http_port)} <= listeners["collector"]
    assert ("127.0.0.1", s.metrics_port) in listeners["worker-0"]
    assert not [line for line in said if line.startswith("warning")]


def test_non_loopback_bind_moves_only_the_otlp_ports_and_warns(tmp_path):
    stack, said = _start(tmp_path, otlp_bind_addr="0.0.0.0")
    try:
        s = stack.settings
        listeners = _listeners_by_child(stack)
        # rotel takes a request without any token, and with a wrong one: nothing checks them.
        statuses = []
        for headers in ({}, {"Authorization": "Bearer not-the-token"}):
            request = urllib.request.Request(f"http://127.0.0.1:{s.otlp_http_port}/v1/traces", data=b"",
                                             headers={"Content-Type": "application/x-protobuf", **headers})
            with urllib.request.urlopen(request, timeout=10) as response:
                statuses.append(response.status)
    finally:
        stack.stop()
    assert listeners["collector"] == {("0.0.0.0", s.otlp_grpc_port), ("0.0.0.0", s.otlp_http_port)}
    for name, sockets in listeners.items():
        if name != "collector":
            assert sockets and all(ip in LOOPBACK for ip, _ in sockets), f"{name}: {sockets}"
    (warning,) = [line for line in said if line.startswith("warning")]
    assert "OTLP receivers bind 0.0.0.0, not loopback" in warning
    assert "rotel) cannot require a token" in warning
    assert statuses == [200, 200]
