"""Outbox delivery: circuit breaker, retries, ordering, permanent failures; notifier payloads."""

from __future__ import annotations

import threading

import pytest
from click.testing import CliRunner

from agentwatch.alerts.cli import silence
from agentwatch.alerts.config import parse_routes
from agentwatch.alerts.delivery import BreakerState, CircuitBreaker, DeliveryWorker
from agentwatch.alerts.model import alert_from_record, alert_record_from_finding
from agentwatch.alerts.notifiers import (PermanentDeliveryError, TransientDeliveryError,
                                         build_notifier)
from agentwatch.alerts.outbox import NotifierStore
from agentwatch.alerts.policy import AlertPolicy
from agentwatch.alerts.slack import MAX_ALERTS_LISTED
from agentwatch.events import Finding, Severity
from tests.support.receivers import (GrafanaReceiver, PagerDutyReceiver, SlackReceiver,
                                     wait_until)

T0 = 1_700_000_000.0


def alert(i=0, resolved=False, project="shop"):
    return alert_from_record(alert_record_from_finding(Finding(
        detector="agent_loop", key=f"project={project}/trace=t{i}", kind="loop",
        severity=Severity.CRITICAL, ts=T0 + i + (100 if resolved else 0), value=7.0,
        threshold=5.0, evidence={"tool": "search"}, resolved=resolved),
        dashboard_url="http://g/d/aw"))


def notifications(n, destination="d", group_wait_s=0):
    cfg = parse_routes({"destinations": {destination: {"type": "slack", "webhook_url": "http://x"}},
                        "routes": [{"name": "all", "destinations": [destination],
                                    "group_wait_s": group_wait_s}]})
    p = AlertPolicy(cfg)
    out = []
    for i in range(n):
        out += p.observe(alert(i), 1.0)
    return out, p


# -- circuit breaker


def test_breaker_opens_after_threshold_and_half_opens_after_timeout():
    b = CircuitBreaker(failure_threshold=3, reset_timeout_s=10)
    for t in (0.0, 1.0):
        b.record_failure(t)
        assert b.state is BreakerState.CLOSED and b.allow(t)
    b.record_failure(2.0)
    assert b.state is BreakerState.OPEN and b.retry_at == 12.0
    assert not b.allow(11.9)
    assert b.allow(12.0) and b.state is BreakerState.HALF_OPEN
    b.record_failure(12.5)  # the trial call failed: open again, for a full timeout
    assert b.state is BreakerState.OPEN and b.retry_at == 22.5 and b.times_opened == 2
    assert b.allow(22.5)
    b.record_success()
    assert b.state is BreakerState.CLOSED and b.consecutive_failures == 0


def test_breaker_validates():
    with pytest.raises(ValueError):
        CircuitBreaker(failure_threshold=0)
    with pytest.raises(ValueError):
        CircuitBreaker(reset_timeout_s=0)


# -- delivery worker with a scripted notifier


class ScriptedNotifier:
    """Raises the scripted errors in order, then succeeds; records what got through."""

    def __init__(self, script):
        self.script = list(script)
        self.calls = 0
        self.delivered = []
        self.closed = False

    def send(self, notification):
        self.calls += 1
        if self.script:
            error = self.script.pop(0)
            if error is not None:
                raise error
        self.delivered.append(notification.id)

    def close(self):
        self.closed = True


def run_worker(tmp_path, notifier, rows, *, threshold=3, reset_s=0.05):
    store = NotifierStore(tmp_path)
    store.commit_batch(rows, None, now=0.0)
    stop = threading.Event()
    worker = DeliveryWorker(rows[0].destination, notifier, store, stop_event=stop,
                            breaker=CircuitBreaker(failure_threshold=threshold,
                                                   reset_timeout_s=reset_s),
                            initial_backoff_s=0.005, max_backoff_s=0.02)
    worker.start()
    return store, stop, worker


def test_transient_failures_are_retried_in_order_until_delivered(tmp_path):
    rows, _ = notifications(4)
    transient = TransientDeliveryError("503")
    notifier = ScriptedNotifier([transient] * 7)
    store, stop, worker = run_worker(tmp_path, notifier, rows)
    try:
        assert wait_until(lambda: len(notifier.delivered) == 4, 10)
    finally:
        stop.set()
        worker.join(5)
    assert notifier.delivered == [r.id for r in rows]  # outbox order kept through retries
    assert worker.stats.transient_failures == 7
    assert worker.breaker.times_opened >= 2  # 3 failures open it; the half-open trial fails too
    sent = store.rows("sent")
    assert [r.id for r in sent] == [r.id for r in rows]
    assert sent[0].attempts == 8 and sent[0].last_error == "503"
    assert notifier.closed
    store.close()


def test_permanent_failure_is_kept_as_failed_and_the_queue_moves_on(tmp_path):
    rows, _ = notifications(3)
    notifier = ScriptedNotifier([None, PermanentDeliveryError("HTTP 404: no_service")])
    store, stop, worker = run_worker(tmp_path, notifier, rows)
    try:
        assert wait_until(lambda: len(notifier.delivered) == 2, 10)
    finally:
        stop.set()
        worker.join(5)
    assert notifier.delivered == [rows[0].id, rows[2].id]
    failed = store.rows("failed")
    assert [r.id for r in failed] == [rows[1].id] and "no_service" in failed[0].last_error
    store.close()


def test_stop_during_backoff_leaves_the_row_pending(tmp_path):
    rows, _ = notifications(1)
    notifier = ScriptedNotifier([TransientDeliveryError("down")] * 10_000)
    store, stop, worker = run_worker(tmp_path, notifier, rows)
    assert wait_until(lambda: notifier.calls >= 2, 10)
    stop.set()
    worker.join(5)
    assert not worker.is_alive()
    assert [r.id for r in store.rows("pending")] == [rows[0].id]
    store.close()


def test_outbox_insert_is_idempotent_and_records_routed_alert_identities(tmp_path):
    rows, policy = notifications(2)
    store = NotifierStore(tmp_path)
    assert store.commit_batch(rows, policy.drain_changes(), alert_ids=["a", "b"], now=10.0) == 2
    assert store.commit_batch(rows, None, alert_ids=["b", "c"], now=20.0) == 0
    assert store.seen_alerts(["a", "c", "d", "a"]) == {"a", "c"}
    assert store.seen_alerts(f"id{i}" for i in range(1200)) == set()  # more than one IN chunk
    incidents, meta = store.load_policy()
    assert sorted(i["dedup_key"] for i in incidents) == sorted(
        a.alert.dedup_key for r in rows for a in r.alerts)
    store.close()


def test_seen_alert_identities_are_pruned_by_age_then_count(tmp_path):
    store = NotifierStore(tmp_path)
    for i in range(6):
        store.commit_batch((), None, alert_ids=[f"id{i}"], now=float(i))
    assert store.prune_seen(before=2.0, max_rows=100) == 2  # id0, id1 too old
    assert store.prune_seen(before=0.0, max_rows=3) == 1  # the oldest beyond the cap
    assert store.seen_alerts(f"id{i}" for i in range(6)) == {"id3", "id4", "id5"}
    store.close()


# The first layout (schema version 0): consumed offsets in SQLite, no seen_alerts.
_V0_SCHEMA = """
CREATE TABLE outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, destination TEXT NOT NULL,
    action TEXT NOT NULL, payload BLOB NOT NULL, created_at REAL NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending', attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '', finished_at REAL
);
CREATE INDEX outbox_pending ON outbox (destination, status, seq);
CREATE TABLE consumed_offsets (
    topic TEXT NOT NULL, partition INTEGER NOT NULL, next_offset INTEGER NOT NULL,
    PRIMARY KEY (topic, partition)
);
CREATE TABLE incidents (dedup_key TEXT PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE policy_meta (id INTEGER PRIMARY KEY CHECK (id = 1), data BLOB NOT NULL);
CREATE TABLE silences (
    id TEXT PRIMARY KEY, matchers TEXT NOT NULL, starts_at REAL NOT NULL, ends_at REAL NOT NULL,
    comment TEXT NOT NULL DEFAULT '', created_by TEXT NOT NULL DEFAULT ''
);
"""


def test_a_version_0_database_is_migrated_and_its_offsets_no_longer_skip_alerts(tmp_path):
    import sqlite3

    import orjson

    from agentwatch.alerts.outbox import DB_NAME, SCHEMA_VERSION
    from agentwatch.alerts.service import NotifierService

    rows, _ = notifications(1, destination="s")
    old = sqlite3.connect(tmp_path / DB_NAME)
    old.executescript(_V0_SCHEMA)
    old.execute("INSERT INTO outbox (id, destination, action, payload, created_at)"
                " VALUES (?, ?, ?, ?, ?)", (rows[0].id, "s", "trigger",
                                            orjson.dumps(rows[0].to_dict()), 1.0))
    old.execute("INSERT INTO consumed_offsets VALUES ('alerts', 0, 1000)")
    old.commit()
    old.close()

    service = NotifierService("unused:9092", _slack_routes(), tmp_path,
                              stop_event=threading.Event())
    db = sqlite3.connect(tmp_path / DB_NAME)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "consumed_offsets" not in tables and "seen_alerts" in tables
    db.close()
    assert [r.id for r in service.store.rows("pending")] == [rows[0].id]  # kept across the migration
    # The old file said partition 0 was read up to offset 1000: a new broker's offset 0 still counts.
    out = service.process({_TP0: _records(range(2), trace=lambda i: f"new{i}")}, now=5.0)
    assert len(out) == 2 and service.stats.duplicates == 0
    service.store.close()
    NotifierStore(tmp_path).close()  # opening a migrated file again is a no-op


def test_a_database_from_a_newer_notifier_is_refused(tmp_path):
    import sqlite3

    from agentwatch.alerts.outbox import DB_NAME, SCHEMA_VERSION

    NotifierStore(tmp_path).close()
    db = sqlite3.connect(tmp_path / DB_NAME)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(RuntimeError, match="newer"):
        NotifierStore(tmp_path)


# -- notifier payloads against local receivers


def test_slack_block_kit_messages():
    with SlackReceiver() as slack:
        notifier = build_notifier(parse_routes({"destinations": {"s": {
            "type": "slack", "webhook_url": slack.url + "/services/T/B/x"}}}).destinations["s"])
        cfg = parse_routes({"destinations": {"s": {"type": "slack", "webhook_url": "http://x"}},
                            "routes": [{"name": "all", "destinations": ["s"], "group_wait_s": 5,
                                        "group_by": ["project"]}]})
        p = AlertPolicy(cfg)
        for i in range(MAX_ALERTS_LISTED + 2):
            p.observe(alert(i), 1.0)
        group = p.flush(6.0)[0]
        single = [n for n in AlertPolicy(parse_routes({
            "destinations": {"s": {"type": "slack", "webhook_url": "http://x"}},
            "default_destinations": ["s"]})).observe(alert(0), 1.0)]
        notifier.send(single[0])
        notifier.send(group)
        body_single, body_group = (r.body for r in slack.snapshot())
    assert slack.requests[0].path == "/services/T/B/x"
    types = [b["type"] for b in body_single["blocks"]]
    assert types[0] == "header" and "actions" in types
    assert "FIRING CRITICAL" in body_single["blocks"][0]["text"]["text"]
    button = next(b for b in body_single["blocks"] if b["type"] == "actions")["elements"][0]
    assert button["url"].startswith("http://g/d/aw?from=")
    assert any("agentwatch query" in b.get("text", {}).get("text", "") for b in body_single["blocks"])
    assert body_group["blocks"][0]["text"]["text"].endswith(f"{MAX_ALERTS_LISTED + 2} alerts FIRING · all")
    assert body_group["blocks"][-1]["elements"][0]["text"] == "…and 2 more alerts"
    assert len(body_group["blocks"]) <= 50
    assert body_group["text"].endswith("| +9 more")


def test_pagerduty_events_and_grafana_annotations():
    with PagerDutyReceiver() as pd, GrafanaReceiver() as grafana:
        cfg = parse_routes({"destinations": {
            "pd": {"type": "pagerduty", "routing_key": "rk", "base_url": pd.url,
                   "ca_bundle": pd.ca_path},
            "g": {"type": "grafana", "url": grafana.url, "dashboard_uid": "aw", "panel_id": 4}},
            "default_destinations": ["pd"], "annotations": ["g"]})
        notifiers = {k: build_notifier(d) for k, d in cfg.destinations.items()}
        p = AlertPolicy(cfg)
        for n in p.observe(alert(1), 1.0) + p.observe(alert(1, resolved=True), 2.0):
            notifiers[n.destination].send(n)
        notifiers["pd"].acknowledge("manual-key")
    dedup = alert(1).dedup_key
    assert [(e["event_action"], e["dedup_key"]) for e in pd.events()] == [
        ("trigger", dedup), ("resolve", dedup), ("acknowledge", "manual-key")]
    payload = pd.events()[0]["payload"]
    assert (payload["source"], payload["component"], payload["class"], payload["group"]) == (
        "shop", "agent_loop", "loop", "shop")
    assert payload["custom_details"]["count"] == 1 and payload["timestamp"].startswith("2023-11-14T22:13:21")
    first, second = (r.body for r in grafana.snapshot())
    assert (first["time"], first["timeEnd"], first["dashboardUID"], first["panelId"]) == (
        int((T0 + 1) * 1000), None, "aw", 4)
    assert (second["time"], second["timeEnd"]) == (int((T0 + 1) * 1000), int((T0 + 101) * 1000))
    assert "resolved" in second["tags"] and "firing" in first["tags"]


@pytest.mark.parametrize("status,error", [(503, TransientDeliveryError), (429, TransientDeliveryError),
                                          (400, PermanentDeliveryError)])
def test_http_errors_are_classified(status, error):
    rows, _ = notifications(1)
    with SlackReceiver() as slack, PagerDutyReceiver() as pd:
        slack.status = pd.status = status
        cfg = parse_routes({"destinations": {
            "s": {"type": "slack", "webhook_url": slack.url},
            "pd": {"type": "pagerduty", "routing_key": "rk", "base_url": pd.url, "ca_bundle": pd.ca_path}}})
        for name in ("s", "pd"):
            with pytest.raises(error):
                build_notifier(cfg.destinations[name]).send(rows[0])
        assert slack.rejected == 1 and pd.rejected == 1  # one call each: no hidden client retries


def test_unreachable_endpoints_are_transient():
    rows, _ = notifications(1)
    dead = SlackReceiver()  # never started: connection refused
    dead_pd = PagerDutyReceiver()
    cfg = parse_routes({"destinations": {
        "s": {"type": "slack", "webhook_url": dead.url},
        "pd": {"type": "pagerduty", "routing_key": "rk", "base_url": dead_pd.url},
        "g": {"type": "grafana", "url": dead.url}}})
    for name in ("s", "pd", "g"):
        with pytest.raises(TransientDeliveryError):
            build_notifier(cfg.destinations[name]).send(rows[0])


# -- silence CLI


def test_silence_cli_add_list_remove(tmp_path):
    runner = CliRunner()
    state = ["--state-dir", str(tmp_path)]
    added = runner.invoke(silence, ["add", "--match", "detector=agent_loop", "--match",
                                    "project=shop", "--for", "2h", "--comment", "deploy", *state])
    assert added.exit_code == 0, added.output
    silence_id = added.output.split()[0]
    listed = runner.invoke(silence, ["list", *state])
    assert silence_id in listed.output and "detector=agent_loop project=shop" in listed.output
    assert "active" in listed.output and "# deploy" in listed.output
    store = NotifierStore(tmp_path)
    (s,) = store.silences()
    assert s.ends_at - s.starts_at == 7200
    assert s.matches({"detector": "agent_loop", "project": "shop"})
    store.close()
    assert runner.invoke(silence, ["remove", silence_id, *state]).exit_code == 0
    assert runner.invoke(silence, ["remove", silence_id, *state]).exit_code != 0
    assert "no silences" in runner.invoke(silence, ["list", *state]).output
    bad = runner.invoke(silence, ["add", "--match", "oops", "--for", "2h", *state])
    assert bad.exit_code != 0 and "NAME=VALUE" in bad.output


# -- crash between the SQLite commit and the Kafka commit; a broker that starts again at 0


def _slack_routes():
    return parse_routes({"destinations": {"s": {"type": "slack", "webhook_url": "http://127.0.0.1:9"}},
                         "default_destinations": ["s"]})


def _tp(partition):
    from kafka import TopicPartition

    return TopicPartition("alerts", partition)


_TP0 = _tp(0)


def _records(indexes, *, trace=lambda i: f"t{i % 3}", partition=0, first_offset=0,
             resolved=lambda i: False, ts=lambda i: T0 + i):
    from collections import namedtuple

    Record = namedtuple("Record", "topic partition offset key value")
    return [Record("alerts", partition, first_offset + n, None, alert_record_from_finding(Finding(
        detector="agent_loop", key=f"project=shop/trace={trace(i)}", kind="loop",
        severity=Severity.CRITICAL, ts=ts(i), value=7.0, threshold=5.0, resolved=resolved(i))))
        for n, i in enumerate(indexes)]


def test_records_reread_after_a_crash_are_absorbed_not_routed_twice(tmp_path):
    from agentwatch.alerts.service import NotifierService

    records = _records(range(5))
    first = NotifierService("unused:9092", _slack_routes(), tmp_path, stop_event=threading.Event())
    out = first.process({_TP0: records[:4]}, now=100.0)
    assert len(out) == 3  # t0, t1, t2 fire; the 4th record repeats t0
    first.store.close()  # "killed" here: Kafka never got the commit for offsets 0..3

    second = NotifierService("unused:9092", _slack_routes(), tmp_path, stop_event=threading.Event())
    assert second.process({_TP0: records}, now=101.0) == []  # 0..3 absorbed, 4 repeats t1
    assert second.stats.duplicates == 4 and second.stats.consumed == 5
    assert len(second.store.rows("pending")) == 3
    assert second.policy.incident("agent_loop:loop:project=shop/trace=t1").count == 2
    assert second.policy.incident("agent_loop:loop:project=shop/trace=t0").count == 2
    # A record sent twice within one batch (a producer's retry) is absorbed too.
    assert second.process({_TP0: _records([7, 7], first_offset=5)}, now=102.0) == []
    assert second.stats.duplicates == 5
    assert second.policy.incident("agent_loop:loop:project=shop/trace=t1").count == 3
    second.store.close()


def test_a_broker_that_starts_again_at_offset_0_gets_every_new_alert_routed(tmp_path):
    """The same state dir under a new in-memory broker (notifier restart, second ``up``)."""
    from agentwatch.alerts.service import NotifierService

    first = NotifierService("unused:9092", _slack_routes(), tmp_path, stop_event=threading.Event())
    assert len(first.process({_TP0: _records(range(6), trace=str)}, now=100.0)) == 6
    first.store.close()

    second = NotifierService("unused:9092", _slack_routes(), tmp_path, stop_event=threading.Event())
    fresh = _records(range(10, 14), trace=str)  # offsets 0..3 again, new alerts
    assert len(second.process({_TP0: fresh}, now=200.0)) == 4
    assert second.stats.duplicates == 0
    second.store.close()


def test_pagerduty_lifecycle_fire_resolve_fire_again_survives_rereading(tmp_path):
    """A new firing of a resolved dedup key is a new alert; re-reading any of it pages nobody."""
    from agentwatch.alerts.service import NotifierService

    lifecycle = _records(range(4), trace=lambda i: "x", resolved=lambda i: i in (1, 3),
                         ts=lambda i: T0 + 10 * i)  # fire, resolve, fire again, resolve again
    service = NotifierService("unused:9092", _slack_routes(), tmp_path,
                              stop_event=threading.Event())
    out = service.process({_TP0: lifecycle}, now=100.0)
    assert [n.action.value for n in out] == ["trigger", "resolve", "trigger", "resolve"]
    assert service.process({_TP0: lifecycle}, now=101.0) == []
    assert service.stats.duplicates == 4
    service.store.close()
