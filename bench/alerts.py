"""Notifier share of the alert latency: alert record produced -> Slack webhook received.

``bench_alert_delivery()`` starts an embedded broker (or uses ``bootstrap_servers``), a local
Slack receiver and the real notifier service (policy, SQLite outbox with synchronous=FULL,
delivery worker), produces ``n_alerts`` distinct firing loop alerts one by one, and measures
for each the wall time from just before ``producer.send`` to the receiver reading the request.
The lead's end-to-end bench (span export -> webhook) adds the stages before topic ``alerts``;
:func:`dedup_key_of_slack_message` maps a received Slack body back to its alert for that.
"""

from __future__ import annotations

import tempfile
import threading
import time
from typing import Any

import numpy as np

from agentwatch.alerts.config import parse_routes
from agentwatch.alerts.model import alert_record_from_finding
from agentwatch.events import Finding, Severity
from tests.support.receivers import ReceivedRequest, SlackReceiver, wait_until


def dedup_key_of_slack_message(body: Any) -> str | None:
    """The dedup key in a trigger/resolve message's context block (one-alert messages)."""
    try:
        text = body["blocks"][-1]["elements"][0]["text"]
        return text.split("`")[1]
    except (KeyError, IndexError, TypeError):
        return None


def bench_alert_delivery(n_alerts: int = 200, *, bootstrap_servers: str | None = None,
                         interval_s: float = 0.02) -> dict[str, Any]:
    """Return p50/p99/max latency (ms) of produce -> webhook over ``n_alerts`` alerts."""
    from kafka import KafkaProducer

    from agentwatch.alerts.service import NotifierService
    from agentwatch.broker import EmbeddedBroker, create_topics, free_port

    broker = None
    if bootstrap_servers is None:
        broker = EmbeddedBroker(free_port()).start()
        bootstrap_servers = broker.bootstrap_servers
    topic, dead = f"alerts_bench_{int(time.time())}", "dead_letter"
    create_topics(bootstrap_servers, {topic: 2, dead: 1})
    sent_at: dict[str, float] = {}
    received_at: dict[str, float] = {}

    def on_request(request: ReceivedRequest) -> None:
        key = dedup_key_of_slack_message(request.body)
        if key is not None:
            received_at.setdefault(key, request.received_at)

    slack = SlackReceiver()
    slack.on_request = on_request
    slack.up()
    stop = threading.Event()
    state_dir = tempfile.mkdtemp(prefix="agentwatch-alert-bench-")
    routes = parse_routes({"destinations": {"slack": {"type": "slack", "webhook_url": slack.url}},
                           "default_destinations": ["slack"], "defaults": {"group_wait_s": 0}})
    service = NotifierService(bootstrap_servers, routes, state_dir, stop_event=stop, topic=topic,
                              dead_letter_topic=dead, group_id=f"bench-{topic}")
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    producer = KafkaProducer(bootstrap_servers=bootstrap_servers, acks="all", linger_ms=0)
    try:
        # Warm-up alert: the group join (~3 s on Tansu) is start-up cost, not alert latency.
        warm = Finding(detector="agent_loop", key="project=bench/trace=warmup", kind="loop",
                       severity=Severity.CRITICAL, ts=time.time(), value=6, threshold=5)
        producer.send(topic, key=warm.dedup_key.encode(), value=alert_record_from_finding(warm))
        producer.flush()
        if not wait_until(lambda: warm.dedup_key in received_at, 30):
            raise RuntimeError("notifier did not deliver the warm-up alert within 30 s")
        for i in range(n_alerts):
            f = Finding(detector="agent_loop", key=f"project=bench/trace=t{i:05d}", kind="loop",
                        severity=Severity.CRITICAL, ts=time.time(), value=6, threshold=5,
                        evidence={"tool": "search", "repeats": 6})
            record = alert_record_from_finding(f, dashboard_url="http://127.0.0.1:3000/d/aw")
            sent_at[f.dedup_key] = time.time()
            producer.send(topic, key=f.dedup_key.encode(), value=record)
            producer.flush()
            time.sleep(interval_s)  # paced like an incident stream, not one burst
        wait_until(lambda: all(k in received_at for k in sent_at), 60)
    finally:
        producer.close()
        stop.set()
        thread.join(15)
        slack.down()
        if broker is not None:
            broker.stop()
    latencies = np.array([received_at[k] - sent_at[k] for k in sent_at if k in received_at]) * 1000
    return {
        "alerts": n_alerts, "delivered": int(latencies.size),
        "p50_ms": round(float(np.percentile(latencies, 50)), 1) if latencies.size else None,
        "p99_ms": round(float(np.percentile(latencies, 99)), 1) if latencies.size else None,
        "max_ms": round(float(latencies.max()), 1) if latencies.size else None,
        "what": "alert record produced -> Slack webhook received (notifier share; no grouping)",
    }


if __name__ == "__main__":
    print(bench_alert_delivery())
