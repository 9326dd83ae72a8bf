"""Faults injected into the real stack (Tansu, rotel, worker, normaliser, notifier, local Slack and
PagerDuty receivers), proved by counting: spans acknowledged = distinct span ids stored, alerts
produced = alerts delivered, one PagerDuty incident per dedup key.

The same scenarios are the ``faults`` section of ``agentwatch bench``.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from agentwatch.alerts.testing import PagerDutyReceiver, SlackReceiver
from agentwatch.bench_faults import (AckedTraffic, kill_child, kill_normalizer, llm_request, post_http,
                                     run_fault, stored_span_ids, wait_for)
from agentwatch.stack import BrokerDied, Stack, StackError

from stack_helpers import stack_settings

pytestmark = pytest.mark.slow


def write_routes(path: Path, pagerduty: PagerDutyReceiver, slack: SlackReceiver) -> Path:
    path.write_text(
        "destinations:\n"
        f"  pd:\n    type: pagerduty\n    routing_key: faults-key\n    base_url: {pagerduty.url}\n"
        f"    ca_bundle: {pagerduty.ca_path}\n"
        f"  slack:\n    type: slack\n    webhook_url: {slack.url}/hook\n"
        "routes:\n  - name: loops\n    match: {detector: agent_loop}\n    destinations: [pd, slack]\n"
        "    group_wait_s: 0\n")
    return path


@pytest.fixture(scope="module")
def receivers():
    pagerduty, slack = PagerDutyReceiver().up(), SlackReceiver().up()
    yield pagerduty, slack
    pagerduty.down()
    slack.down()


@pytest.fixture(scope="module")
def alerting_stack(tmp_path_factory, receivers):
    work = tmp_path_factory.mktemp("faults")
    routes = write_routes(work / "routes.yaml", *receivers)
    settings = stack_settings(work / "data").model_copy(update={
        "alert_routes": routes, "alerts_state_dir": work / "alerts", "gpu_exporter": "off"})
    stack = Stack(settings, say=lambda _m: None).start()
    try:
        yield stack
    finally:
        stack.stop()


INJECTIONS = {
    "worker-0": lambda stack: kill_child(stack, "worker-0"),
    "normaliser": kill_normalizer,
    "notifier": lambda stack: kill_child(stack, "notifier"),
}


@pytest.mark.parametrize("victim", list(INJECTIONS))
def test_sigkill_of_a_child_loses_no_acknowledged_span_and_no_alert(alerting_stack, receivers, victim):
    pagerduty, _slack = receivers
    restarts_before = {c.name: c.restarts for c in alerting_stack.children}
    result = run_fault(alerting_stack, victim, INJECTIONS[victim], pagerduty=pagerduty)

    assert result.acknowledged > 500
    assert result.lost == 0, result
    assert result.stored == result.acknowledged
    assert result.recover_s is not None, "no span sent after the fault was stored"
    assert result.alerts_produced and result.alerts_delivered == result.alerts_produced, result
    assert result.max_pagerduty_incidents_per_key == 1, result
    if victim != "normaliser":  # the worker restarts its own normaliser; the supervisor the rest
        assert {c.name: c.restarts for c in alerting_stack.children}[victim] == restarts_before[victim] + 1
    assert alerting_stack.dead_child() is None


def test_stop_right_after_a_burst_writes_every_acknowledged_span(tmp_path):
    settings = stack_settings(tmp_path / "data").model_copy(update={"snapshot_flush_seconds": 2.0, "gpu_exporter": "off"})
    stack = Stack(settings, say=lambda _m: None).start()
    traffic = AckedTraffic(settings.otlp_http_port, spans_per_request=100)
    rng = random.Random(3)
    try:
        # A running stack first (the worker has processed traffic), as on-call would have it.
        traffic.send_one(rng)
        assert wait_for(lambda: len(stored_span_ids(settings.data_dir)[0]) >= 100, 60)
        for _ in range(30):
            traffic.send_one(rng)
        time.sleep(0.3)  # the burst is acknowledged; Ctrl-C comes 0.3 s later
    finally:
        started = time.monotonic()
        stack.stop()
        stop_s = time.monotonic() - started
    ids, _rows = stored_span_ids(settings.data_dir)
    assert traffic.refused == 0 and len(traffic.acknowledged) == 3100
    assert set(traffic.acknowledged) <= ids, f"{len(set(traffic.acknowledged) - ids)} acknowledged spans not stored"
    assert stack.forced_stops == [], "a clean stop must need no SIGKILL"
    print(f"stop after a burst of 3,000 spans took {stop_s:.1f}s")


def test_a_crash_loop_gives_up_loudly_and_a_dead_broker_stops_the_collector(tmp_path):
    from agentwatch.stack import RestartPolicy

    settings = stack_settings(tmp_path / "data").model_copy(update={"gpu_exporter": "off"})
    stack = Stack(settings, say=lambda _m: None,
                  restart_policy=RestartPolicy(initial_backoff_s=0.1, max_deaths=2, window_s=60)).start()
    try:
        worker = next(c for c in stack.children if c.name == "worker-0")

        def restarted() -> bool:
            stack.poll()
            return worker.restarts == 1 and worker.restart_at is None

        kill_child(stack, "worker-0")
        assert wait_for(restarted, 30, every_s=0.1)
        kill_child(stack, "worker-0")
        with pytest.raises(StackError, match=r"worker-0 died 2 times within 60s \(last: killed by SIGKILL\); giving up"):
            stack.supervise(lambda: False, every_s=0.05)

        # The broker dies: nothing may answer success any more.
        body, _ids = llm_request(1, rng=random.Random(9))
        assert post_http(settings.otlp_http_port, body) == 200
        stack.broker.proc.kill()
        stack.broker.proc.wait()
        with pytest.raises(BrokerDied, match="broker died"):
            stack.poll()
        collector = next(c for c in stack.children if c.name == "collector")
        assert collector.proc.wait(5) is not None
        assert post_http(settings.otlp_http_port, body) != 200
    finally:
        stack.stop()
