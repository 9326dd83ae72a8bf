"""The notifier against a real broker (Tansu) and local HTTP receivers.

Covers: routing/dedup/resolve end to end, malformed records to dead_letter, a receiver outage
(OUTAGE_S, default the 60 s the issue asks for: many backoff cycles, and the circuit breaker
opens), and SIGKILL of the notifier process mid-delivery followed by a restart.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time

import orjson
import pytest
import yaml

from agentwatch.alerts.config import parse_routes
from agentwatch.alerts.model import alert_record_from_finding
from agentwatch.alerts.outbox import NotifierStore
from agentwatch.alerts.service import NotifierService
from agentwatch.alerts.testing import (GrafanaReceiver, PagerDutyReceiver, SlackReceiver,
                                       wait_until)
from agentwatch.broker import EmbeddedBroker, create_topics, free_port
from agentwatch.events import Finding, Severity

pytestmark = pytest.mark.slow

# The issue asks for a 60 s outage of Slack and PagerDuty; override locally for a quicker run.
OUTAGE_S = float(os.environ.get("AGENTWATCH_TEST_OUTAGE_S", "60"))
T0 = 1_700_000_000.0


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    with EmbeddedBroker(free_port(), log_path=log) as b:
        yield b


def topics(broker, name):
    alerts, dead = f"alerts_{name}", f"dead_letter_{name}"
    create_topics(broker.bootstrap_servers, {alerts: 2, dead: 1})
    return alerts, dead


def finding(i, *, project="shop", severity=Severity.CRITICAL, resolved=False, ts=None):
    return Finding(detector="agent_loop", key=f"project={project}/trace=t{i:03d}", kind="loop",
                   severity=severity, ts=ts if ts is not None else T0 + i, value=7.0,
                   threshold=5.0, evidence={"tool": "search", "repeats": 7}, resolved=resolved)


def produce(broker, topic, items):
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers, acks="all", linger_ms=0)
    for key, value in items:
        producer.send(topic, key=key.encode() if key else None, value=value)
    producer.flush(10)
    producer.close()


def produce_findings(broker, topic, findings):
    produce(broker, topic, [(f.dedup_key, alert_record_from_finding(f, dashboard_url="http://g/d/aw"))
                            for f in findings])


def committed_total(broker, topic, group):
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap_servers, group_id=group,
                             enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        return sum(consumer.committed(tp) or 0 for tp in tps)
    finally:
        consumer.close()


def read_topic(broker, topic, n, timeout_s=15.0):
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(topic, bootstrap_servers=broker.bootstrap_servers,
                             auto_offset_reset="earliest", consumer_timeout_ms=500)
    got = []
    deadline = time.monotonic() + timeout_s
    while len(got) < n and time.monotonic() < deadline:
        for rec in consumer:
            got.append(rec)
    consumer.close()
    return got


def routes_dict(slack, pd, grafana=None, **delivery):
    dests = {"slack-shop": {"type": "slack", "webhook_url": slack.url + "/services/shop"},
             "slack-all": {"type": "slack", "webhook_url": slack.url + "/services/all"},
             "pd-shop": {"type": "pagerduty", "routing_key": "${PD_KEY}", "base_url": pd.url,
                         "ca_bundle": pd.ca_path}}
    data = {"destinations": dests,
            "routes": [{"name": "page-shop", "match": {"project": "shop"},
                        "min_severity": "critical", "destinations": ["pd-shop", "slack-shop"]}],
            "default_destinations": ["slack-all"],
            "delivery": {"initial_backoff_s": 0.1, "max_backoff_s": 2.0,
                         "breaker_failure_threshold": 3, "breaker_reset_timeout_s": 2.0, **delivery}}
    if grafana is not None:
        dests["grafana"] = {"type": "grafana", "url": grafana.url, "token": "${GRAFANA_TOKEN}"}
        data["annotations"] = ["grafana"]
    return data


ENV = {"PD_KEY": "pd-test-key", "GRAFANA_TOKEN": "glsa_test"}


def start_service(broker, routes, state_dir, alerts_topic, dead_topic, group):
    stop = threading.Event()
    service = NotifierService(broker.bootstrap_servers, parse_routes(routes, env=ENV), state_dir,
                              stop_event=stop, topic=alerts_topic, dead_letter_topic=dead_topic,
                              group_id=group)
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    return service, stop, thread


def test_routes_dedups_resolves_and_dead_letters(broker, tmp_path):
    alerts_topic, dead_topic = topics(broker, "e2e")
    with SlackReceiver() as slack, PagerDutyReceiver() as pd, GrafanaReceiver() as grafana:
        service, stop, thread = start_service(broker, routes_dict(slack, pd, grafana), tmp_path,
                                              alerts_topic, dead_topic, "g-e2e")
        try:
            crit = finding(1)
            repeats = [dataclasses.replace(crit, ts=T0 + 10 * k) for k in range(1, 4)]
            warn = finding(2, project="bank", severity=Severity.WARNING)
            bad_json = b"{not json"
            bad_field = orjson.dumps({**orjson.loads(alert_record_from_finding(crit)),
                                      "severity": "apocalyptic"})
            produce_findings(broker, alerts_topic, [crit, *repeats, warn])
            produce(broker, alerts_topic, [("junk", bad_json), ("junk2", bad_field)])
            produce_findings(broker, alerts_topic, [dataclasses.replace(crit, resolved=True,
                                                                        ts=T0 + 50)])

            assert wait_until(lambda: len(slack.requests) >= 3 and len(pd.requests) >= 2
                              and len(grafana.requests) >= 3, 30)
            time.sleep(0.5)  # anything extra (a dedup failure) would arrive by now
            by_path = sorted((r.path, r.body["text"].split(" ")[0]) for r in slack.snapshot())
            assert by_path == [("/services/all", "[WARNING]"), ("/services/shop", "RESOLVED"),
                               ("/services/shop", "[CRITICAL]")]
            events = pd.events()
            assert [(e["event_action"], e["dedup_key"]) for e in events] == [
                ("trigger", crit.dedup_key), ("resolve", crit.dedup_key)]
            assert events[0]["routing_key"] == "pd-test-key"
            assert events[0]["payload"]["severity"] == "critical"
            assert events[0]["links"][0]["href"].startswith("http://g/d/aw?from=")
            assert pd.incidents_opened == 1 and not pd.incidents[crit.dedup_key][-1].open
            # The resolved Slack follow-up reports the dedup count of the incident (1 + 3).
            resolved_msg = next(r.body for r in slack.snapshot() if r.body["text"].startswith("RESOLVED"))
            count_field = [f["text"] for b in resolved_msg["blocks"] for f in b.get("fields", [])
                           if f["text"].startswith("*Count*")]
            assert count_field == ["*Count*\n4"]
            assert [r.headers["authorization"] for r in grafana.snapshot()] == ["Bearer glsa_test"] * 3
            assert sorted(r.body["tags"][-2] for r in grafana.snapshot()) == [
                "firing", "firing", "resolved"]

            dead = read_topic(broker, dead_topic, 2)
            reasons = {base64.b64decode(orjson.loads(r.value)["payload_b64"]):
                       orjson.loads(r.value)["reason"] for r in dead}
            assert "not JSON" in reasons[bad_json] and "apocalyptic" in reasons[bad_field]
            payloads = {base64.b64decode(orjson.loads(r.value)["payload_b64"]) for r in dead}
            assert payloads == {bad_json, bad_field}
            assert all(orjson.loads(r.value)["topic"] == alerts_topic for r in dead)
            # Every record (7 good + 2 bad) is committed once handled.
            assert wait_until(lambda: committed_total(broker, alerts_topic, "g-e2e") == 8, 10)
        finally:
            stop.set()
            thread.join(15)
    assert not thread.is_alive()
    store = NotifierStore(tmp_path)
    assert store.pending_counts() == {}
    assert len(store.rows("sent")) == 3 + 2 + 3
    store.close()


def test_receiver_outage_delivers_everything_afterwards(broker, tmp_path):
    alerts_topic, dead_topic = topics(broker, "outage")
    n = 20
    slack, pd = SlackReceiver(), PagerDutyReceiver()  # both down: nothing listens yet
    service, stop, thread = start_service(broker, routes_dict(slack, pd), tmp_path,
                                          alerts_topic, dead_topic, "g-outage")
    try:
        outage_started = time.monotonic()
        produce_findings(broker, alerts_topic, [finding(i) for i in range(n)])
        # Kafka offsets are committed once the alerts sit in the durable outbox, not delivered.
        assert wait_until(lambda: service.store.pending_counts() == {"pd-shop": n, "slack-shop": n}, 20)
        assert wait_until(lambda: committed_total(broker, alerts_topic, "g-outage") == n, 10)
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - outage_started)))
        for name in ("slack-shop", "pd-shop"):
            worker = service.workers[name]
            assert worker.breaker.times_opened >= 1, name
            assert worker.stats.transient_failures >= 3 and worker.stats.sent == 0
            assert worker.stats.circuit_rejections >= 1 or worker.breaker.times_opened >= 2
        slack.up()
        pd.up()
        assert wait_until(lambda: len(slack.requests) >= n and len(pd.requests) >= n, 30)
        time.sleep(0.3)
        assert sorted(r.body["blocks"][-1]["elements"][0]["text"].split("`")[1]
                      for r in slack.snapshot()) == sorted(finding(i).dedup_key for i in range(n))
        assert sorted(e["dedup_key"] for e in pd.events("trigger")) == sorted(
            finding(i).dedup_key for i in range(n))
        assert pd.incidents_opened == n
        assert service.store.pending_counts() == {}
    finally:
        stop.set()
        thread.join(15)
        slack.down()
        pd.down()


def _notifier_proc(broker, routes_path, state_dir, alerts_topic, dead_topic, log_path):
    env = {**os.environ, **ENV, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "agentwatch.alerts.cli", "notify", "--bootstrap-servers",
         broker.bootstrap_servers, "--routes", str(routes_path), "--state-dir", str(state_dir),
         "--topic", alerts_topic, "--dead-letter-topic", dead_topic, "--group-id", "g-kill"],
        stdout=open(log_path, "ab"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def test_sigkill_mid_delivery_then_restart_loses_nothing_and_opens_no_duplicate(broker, tmp_path):
    alerts_topic, dead_topic = topics(broker, "kill")
    n_fire, n_resolve = 40, 20
    fires = [finding(i) for i in range(n_fire)]
    resolves = [dataclasses.replace(f, resolved=True, ts=f.ts + 100) for f in fires[:n_resolve]]
    expected = {(f.dedup_key, "trigger") for f in fires} | {(f.dedup_key, "resolve") for f in resolves}
    # Slow receivers keep deliveries in flight when the kill lands.
    with SlackReceiver(delay_s=0.05) as slack, PagerDutyReceiver(delay_s=0.05) as pd:
        routes_path = tmp_path / "routes.yaml"
        routes_path.write_text(yaml.safe_dump(routes_dict(slack, pd)))
        state_dir = tmp_path / "state"
        log_path = tmp_path / "notifier.log"
        produce_findings(broker, alerts_topic, fires + resolves)
        proc = _notifier_proc(broker, routes_path, state_dir, alerts_topic, dead_topic, log_path)
        try:
            assert wait_until(lambda: len(slack.requests) >= 12, 60), log_path.read_text()
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            at_kill = len(slack.requests), len(pd.requests)
            assert at_kill[0] < len(expected) and at_kill[1] < len(expected)  # truly mid-flight

            proc = _notifier_proc(broker, routes_path, state_dir, alerts_topic, dead_topic, log_path)

            def slack_seen():
                return {(r.body["blocks"][-1]["elements"][0]["text"].split("`")[1],
                         "resolve" if r.body["text"].startswith("RESOLVED") else "trigger")
                        for r in slack.snapshot()}

            def pd_seen():
                return {(e["dedup_key"], e["event_action"]) for e in pd.events()}

            assert wait_until(lambda: slack_seen() == expected and pd_seen() == expected, 90), (
                len(slack_seen()), len(pd_seen()), log_path.read_text()[-3000:])
            time.sleep(0.5)
            # At-least-once: only the one row in flight per destination may arrive twice.
            assert len(slack.requests) - len(expected) <= 1
            assert len(pd.requests) - len(expected) <= 1
            # PagerDuty folds a repeated trigger into the open incident: no duplicate incident.
            assert pd.incidents_opened == n_fire
            assert sum(not h[-1].open for h in pd.incidents.values()) == n_resolve
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    store = NotifierStore(state_dir)
    assert store.pending_counts() == {}
    store.close()
