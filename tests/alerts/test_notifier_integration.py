"""The notifier against a real broker (Tansu) and local HTTP receivers.

Covers: routing/dedup/resolve end to end, malformed records to dead_letter, a receiver outage
(OUTAGE_S, default the 60 s the issue asks for: many backoff cycles, and the circuit breaker
opens), SIGKILL of the notifier process while alerts stream in and are delivered, followed by a
restart, and a new (empty, offsets from 0) broker under the same state dir.
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
from collections import Counter

import orjson
import pytest
import yaml

from agentwatch.alerts.config import parse_routes
from agentwatch.alerts.model import alert_record_from_finding
from agentwatch.alerts.outbox import NotifierStore
from agentwatch.alerts.service import NotifierService
from agentwatch.broker import EmbeddedBroker, create_topics, free_port
from agentwatch.events import Finding, Severity
from tests.support.receivers import (GrafanaReceiver, PagerDutyReceiver, SlackReceiver,
                                     wait_until)

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
    # Two kinds of outage: nothing listens for Slack; PagerDuty answers 503 to every event.
    slack, pd = SlackReceiver(), PagerDutyReceiver()
    pd.status = 503
    pd.up()
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
        assert pd.rejected >= 3
        slack.up()
        pd.status = None
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


def test_records_read_again_after_a_lost_kafka_commit_are_absorbed_by_identity(broker, tmp_path):
    """The crash window between the SQLite commit and the Kafka commit, made certain: the first
    notifier never commits to Kafka, so the second reads every record again from offset 0."""
    alerts_topic, dead_topic = topics(broker, "reread")
    fires = [finding(i) for i in range(10)]
    resolves = [dataclasses.replace(f, resolved=True, ts=f.ts + 100) for f in fires[:4]]
    with SlackReceiver() as slack, PagerDutyReceiver() as pd:
        routes = routes_dict(slack, pd)
        service, stop, thread = start_service(broker, routes, tmp_path, alerts_topic, dead_topic,
                                              "g-reread")
        service._commit_kafka = lambda offsets: None  # "killed" before every Kafka commit
        produce_findings(broker, alerts_topic, fires + resolves)
        try:
            assert wait_until(lambda: len(pd.requests) >= 14 and len(slack.requests) >= 14, 20)
        finally:
            stop.set()
            thread.join(15)
        assert committed_total(broker, alerts_topic, "g-reread") == 0
        later = finding(50)
        produce_findings(broker, alerts_topic, [later])
        service, stop, thread = start_service(broker, routes, tmp_path, alerts_topic, dead_topic,
                                              "g-reread")
        try:
            assert wait_until(lambda: len(pd.requests) >= 15 and len(slack.requests) >= 15, 20)
            assert wait_until(lambda: committed_total(broker, alerts_topic, "g-reread") == 15, 10)
            time.sleep(0.3)
        finally:
            stop.set()
            thread.join(15)
    assert (service.stats.consumed, service.stats.duplicates) == (15, 14)
    assert Counter(e["dedup_key"] for e in pd.events("trigger")) == Counter(
        f.dedup_key for f in fires + [later])
    assert len(pd.events("resolve")) == 4 and len(slack.requests) == 15


def test_a_new_broker_under_the_same_state_dir_gets_every_new_alert_delivered(tmp_path):
    """A notifier restart with the embedded broker, or a second ``agentwatch up`` in the same
    directory: the new in-memory broker numbers offsets from 0 again and has no group commits,
    while the state dir remembers the alerts routed under the old one."""
    n, m = 12, 10
    before = [finding(i) for i in range(n)]
    resolve_0 = dataclasses.replace(before[0], resolved=True, ts=T0 + 100)
    # Nine new incidents, and the first one firing again after its resolve: a new PD incident.
    after = [finding(100 + i) for i in range(m - 1)] + [dataclasses.replace(before[0], ts=T0 + 500)]
    port, state_dir = free_port(), tmp_path / "state"
    with SlackReceiver() as slack, PagerDutyReceiver() as pd:
        for run, findings, triggers in ((0, [*before, resolve_0], n), (1, after, n + m)):
            with EmbeddedBroker(port, log_path=tmp_path / f"tansu{run}.log") as new_broker:
                alerts_topic, dead_topic = topics(new_broker, "restart")
                service, stop, thread = start_service(new_broker, routes_dict(slack, pd), state_dir,
                                                      alerts_topic, dead_topic, "g-restart")
                try:
                    produce_findings(new_broker, alerts_topic, findings)
                    assert wait_until(lambda: len(pd.events("trigger")) >= triggers
                                      and len(slack.requests) >= triggers + 1, 20), (
                        run, len(pd.events("trigger")), len(slack.requests), service.stats)
                    time.sleep(0.3)  # a duplicate would arrive by now
                finally:
                    stop.set()
                    thread.join(15)
                assert not thread.is_alive()
        assert (service.stats.consumed, service.stats.duplicates) == (m, 0)
    assert sorted(e["dedup_key"] for e in pd.events("trigger")) == sorted(
        f.dedup_key for f in before + after)
    assert [e["dedup_key"] for e in pd.events("resolve")] == [before[0].dedup_key]
    assert pd.incidents_opened == n + m
    assert [len(pd.incidents[f.dedup_key]) for f in before] == [2] + [1] * (n - 1)
    assert len(slack.requests) == n + m + 1


def _notifier_proc(broker, routes_path, state_dir, alerts_topic, dead_topic, log_path):
    env = {**os.environ, **ENV, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "agentwatch.alerts.cli", "notify", "--bootstrap-servers",
         broker.bootstrap_servers, "--routes", str(routes_path), "--state-dir", str(state_dir),
         "--topic", alerts_topic, "--dead-letter-topic", dead_topic, "--group-id", "g-kill"],
        stdout=open(log_path, "ab"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


class PacedProducer(threading.Thread):
    """Sends findings one at a time, ``interval_s`` apart, as detectors do while incidents unfold."""

    def __init__(self, broker, topic, findings, interval_s):
        super().__init__(daemon=True)
        self.broker, self.topic, self.findings, self.interval_s = broker, topic, findings, interval_s
        self.sent = 0

    def run(self):
        from kafka import KafkaProducer

        producer = KafkaProducer(bootstrap_servers=self.broker.bootstrap_servers, acks="all",
                                 linger_ms=0)
        try:
            for f in self.findings:
                producer.send(self.topic, key=f.dedup_key.encode(),
                              value=alert_record_from_finding(f)).get(10)
                self.sent += 1
                time.sleep(self.interval_s)
        finally:
            producer.close()


def test_sigkill_mid_stream_then_restart_loses_nothing_and_opens_no_duplicate(broker, tmp_path):
    alerts_topic, dead_topic = topics(broker, "kill")
    n_fire, n_resolve, n_before = 40, 20, 10
    fires = [finding(i) for i in range(n_fire)]
    resolves = [dataclasses.replace(f, resolved=True, ts=f.ts + 100) for f in fires[:n_resolve]]
    # After the first n_before fires, the rest arrive while the notifier runs, each resolve
    # a few records after its trigger.
    streamed = [f for pair in zip(fires[n_before:], resolves) for f in pair] + fires[n_before + n_resolve:]
    expected = {(f.dedup_key, "trigger") for f in fires} | {(f.dedup_key, "resolve") for f in resolves}
    # Slow receivers keep deliveries in flight when the kill lands.
    with SlackReceiver(delay_s=0.05) as slack, PagerDutyReceiver(delay_s=0.05) as pd:
        routes_path = tmp_path / "routes.yaml"
        routes_path.write_text(yaml.safe_dump(routes_dict(slack, pd)))
        state_dir = tmp_path / "state"
        log_path = tmp_path / "notifier.log"
        produce_findings(broker, alerts_topic, fires[:n_before])
        proc = _notifier_proc(broker, routes_path, state_dir, alerts_topic, dead_topic, log_path)
        stream = PacedProducer(broker, alerts_topic, streamed, interval_s=0.05)
        try:
            assert wait_until(lambda: len(slack.requests) >= 3, 60), log_path.read_text()
            stream.start()
            assert wait_until(lambda: stream.sent >= len(streamed) // 3, 20)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            at_kill = len(slack.requests), len(pd.requests), stream.sent
            # Truly mid-stream: alerts were still arriving and deliveries still owed.
            assert at_kill[0] < len(expected) and at_kill[1] < len(expected)
            assert at_kill[2] < len(streamed)

            proc = _notifier_proc(broker, routes_path, state_dir, alerts_topic, dead_topic, log_path)

            def slack_seen():
                return {(r.body["blocks"][-1]["elements"][0]["text"].split("`")[1],
                         "resolve" if r.body["text"].startswith("RESOLVED") else "trigger")
                        for r in slack.snapshot()}

            def pd_seen():
                return {(e["dedup_key"], e["event_action"]) for e in pd.events()}

            assert wait_until(lambda: slack_seen() == expected and pd_seen() == expected, 60), (
                at_kill, len(slack_seen()), len(pd_seen()), log_path.read_text()[-3000:])
            stream.join(10)
            time.sleep(0.5)
            # At-least-once: only the one row in flight per destination may arrive twice.
            assert len(slack.requests) - len(expected) <= 1
            assert len(pd.requests) - len(expected) <= 1
            # One PagerDuty incident per dedup_key; a trigger re-sent after the kill folds into it.
            triggers = Counter(e["dedup_key"] for e in pd.events("trigger"))
            assert set(triggers) == {f.dedup_key for f in fires}
            assert sum(triggers.values()) - n_fire <= 1
            assert [len(pd.incidents[f.dedup_key]) for f in fires] == [1] * n_fire
            assert pd.incidents_opened == n_fire
            assert sum(not h[-1].open for h in pd.incidents.values()) == n_resolve
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
        finally:
            stream.join(10)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    store = NotifierStore(state_dir)
    assert store.pending_counts() == {}
    store.close()
