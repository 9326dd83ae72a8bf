"""Helpers for tests that start the real embedded stack on free ports."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from agentwatch.broker import free_port
from agentwatch.settings import Settings


def stack_settings(data_dir: Path, **overrides) -> Settings:
    return Settings(broker_port=free_port(), otlp_grpc_port=free_port(), otlp_http_port=free_port(),
                    metrics_port=free_port(4), data_dir=data_dir, snapshot_flush_seconds=0.5, **overrides)


def wait_until(predicate: Callable[[], object], timeout_s: float = 30.0, every_s: float = 0.25) -> object:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s (last value {value!r})")
        time.sleep(every_s)


def write_routes(path: Path, pagerduty, slack, routing_key: str = "faults-key") -> Path:
    """Routes that page the local PagerDuty and Slack receivers for loop findings at once."""
    path.write_text(
        "destinations:\n"
        f"  pd:\n    type: pagerduty\n    routing_key: {routing_key}\n    base_url: {pagerduty.url}\n"
        f"    ca_bundle: {pagerduty.ca_path}\n"
        f"  slack:\n    type: slack\n    webhook_url: {slack.url}/hook\n"
        "routes:\n  - name: loops\n    match: {detector: agent_loop}\n    destinations: [pd, slack]\n"
        "    group_wait_s: 0\n")
    return path
