"""The notifier process: topic ``alerts`` -> policy -> SQLite outbox -> Slack/PagerDuty/Grafana.

No alert is lost
----------------
1. ``poll`` a batch (kafka-python, auto-commit off).
2. Decode each record; a malformed one goes to ``dead_letter`` (acknowledged by the broker)
   with the reason. Valid alerts go through :class:`~agentwatch.alerts.policy.AlertPolicy`.
   An alert whose identity (:func:`~agentwatch.alerts.model.alert_identity`: dedup key,
   status, finding time) was routed before is absorbed here, before the policy sees it.
3. One SQLite transaction: the notifications due, the policy changes (dedup counts, groups,
   rate-limit buckets) and the identities of the batch's alerts.
4. Only then commit the offsets to Kafka (the consumer group's commit is the only record of
   where to resume), and wake the destination workers.

Offsets are never kept in SQLite: the state directory outlives the embedded broker, which
starts again at offset 0 after a restart, so a remembered offset would skip new alerts. After a
SIGKILL the consumer re-reads what Kafka had not committed; those records' identities are in
SQLite, so they are absorbed, and rows not marked sent are sent again. Delivery is
at-least-once: the row in flight at the kill may arrive twice, which PagerDuty folds by
``dedup_key`` (no second incident) and Slack shows as one repeated message.

One notifier per ``state_dir``: the policy state (dedup, groups, rate limits) is local to it.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import orjson

from agentwatch.alerts.config import RoutesConfig, load_routes
from agentwatch.alerts.delivery import CircuitBreaker, DeliveryWorker
from agentwatch.alerts.model import Alert, MalformedAlertError, alert_from_record, alert_identity
from agentwatch.alerts.notifiers import Notifier, build_notifier
from agentwatch.alerts.outbox import SEEN_RETENTION_S, NotifierStore
from agentwatch.alerts.policy import AlertPolicy, Notification

log = logging.getLogger(__name__)

ALERTS_TOPIC = "alerts"
DEAD_LETTER_TOPIC = "dead_letter"
GROUP_ID = "agentwatch-notifier"
# Tansu (and a notifier restarted after a kill) rejoin a group only after the old member's
# session lapses; ~6 s keeps that short while heartbeats every 1 s keep a live member in.
SESSION_TIMEOUT_MS = 6000
HEARTBEAT_INTERVAL_MS = 1000
# Small waits keep alert latency low: the broker answers a fetch within 50 ms, an idle poll
# returns within 100 ms, so a grouping deadline or a stop request is noticed quickly.
FETCH_MAX_WAIT_MS = 50
POLL_TIMEOUT_MS = 100
SILENCE_REFRESH_S = 1.0
PRUNE_SENT_AFTER_S = 24 * 3600


@dataclass
class NotifierStats:
    consumed: int = 0
    # Records whose alert was routed already (re-read after a crash, or sent twice).
    duplicates: int = 0
    dead_lettered: int = 0
    notifications: int = 0
    kafka_commit_failures: int = 0


def dead_letter_record(topic: str, partition: int, offset: int, reason: str,
                       payload: bytes | None, key: bytes | None = None) -> bytes:
    return orjson.dumps({
        "topic": topic, "partition": partition, "offset": offset, "reason": reason,
        "payload_b64": base64.b64encode(payload or b"").decode(),
        "key_b64": base64.b64encode(key).decode() if key is not None else None,
        "source": "agentwatch-notifier", "ts": time.time(),
    })


class NotifierService:
    """The pieces of :func:`run_notifier`, separated so tests and the bench can inspect them."""

    def __init__(self, bootstrap_servers: str, config: RoutesConfig, state_dir: str | Path, *,
                 stop_event: threading.Event, topic: str = ALERTS_TOPIC,
                 dead_letter_topic: str = DEAD_LETTER_TOPIC, group_id: str = GROUP_ID,
                 notifiers: Mapping[str, Notifier] | None = None,
                 clock: Callable[[], float] = time.time, max_incidents: int = 50_000,
                 poll_timeout_ms: int = POLL_TIMEOUT_MS) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.config = config
        self.stop_event = stop_event
        self.topic = topic
        self.dead_letter_topic = dead_letter_topic
        self.group_id = group_id
        self.clock = clock
        self.poll_timeout_ms = poll_timeout_ms
        self.stats = NotifierStats()
        self.store = NotifierStore(state_dir)
        self.policy = AlertPolicy(config, max_incidents=max_incidents)
        incidents, meta = self.store.load_policy()
        self.policy.restore_parts(incidents, meta)
        notifiers = dict(notifiers or {})
        delivery = config.delivery
        self.workers: dict[str, DeliveryWorker] = {}
        for name, destination in config.destinations.items():
            notifier = notifiers.get(name) or build_notifier(destination)
            self.workers[name] = DeliveryWorker(
                name, notifier, self.store, stop_event=stop_event,
                breaker=CircuitBreaker(failure_threshold=delivery.breaker_failure_threshold,
                                       reset_timeout_s=delivery.breaker_reset_timeout_s),
                initial_backoff_s=delivery.initial_backoff_s, max_backoff_s=delivery.max_backoff_s,
                clock=clock)
        self._consumer: Any = None
        self._producer: Any = None

    # -- kafka

    def _make_consumer(self) -> Any:
        from kafka import KafkaConsumer

        return KafkaConsumer(
            self.topic, bootstrap_servers=self.bootstrap_servers, group_id=self.group_id,
            client_id=f"{self.group_id}-consumer", enable_auto_commit=False,
            auto_offset_reset="earliest", session_timeout_ms=SESSION_TIMEOUT_MS,
            max_poll_interval_ms=SESSION_TIMEOUT_MS, heartbeat_interval_ms=HEARTBEAT_INTERVAL_MS,
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS, max_poll_records=500, request_timeout_ms=10_000)

    def _dead_letter(self, items: list[tuple[Any, str]]) -> None:
        """Send to ``dead_letter`` and wait for the broker's ack before the offsets commit."""
        from kafka import KafkaProducer
        from kafka.errors import KafkaError

        from agentwatch.broker import MAX_MESSAGE_BYTES

        while not self.stop_event.is_set():
            try:
                if self._producer is None:
                    self._producer = KafkaProducer(
                        bootstrap_servers=self.bootstrap_servers, acks="all", linger_ms=0,
                        max_request_size=MAX_MESSAGE_BYTES, client_id=f"{self.group_id}-dlq")
                futures = [self._producer.send(
                    self.dead_letter_topic, key=rec.key,
                    value=dead_letter_record(rec.topic, rec.partition, rec.offset, reason,
                                             rec.value, rec.key)) for rec, reason in items]
                for future in futures:
                    future.get(timeout=5)
                self.stats.dead_lettered += len(items)
                for rec, reason in items:
                    log.warning("alert record %s[%d]@%d dead-lettered: %s", rec.topic,
                                rec.partition, rec.offset, reason)
                return
            except KafkaError as exc:
                log.error("dead_letter send failed, retrying: %s", exc)
                self.stop_event.wait(0.5)
        raise InterruptedError("stopped before dead letters were acknowledged")

    def _commit_kafka(self, offsets: Mapping[tuple[str, int], int]) -> None:
        from kafka import TopicPartition
        from kafka.errors import KafkaError
        from kafka.structs import OffsetAndMetadata

        try:
            self._consumer.commit({TopicPartition(t, p): OffsetAndMetadata(o, "", -1)
                                   for (t, p), o in offsets.items()})
        except KafkaError as exc:
            # Harmless: SQLite holds these alerts' identities, re-read records are absorbed.
            self.stats.kafka_commit_failures += 1
            log.warning("kafka offset commit failed (records will be re-read and absorbed): %s",
                        exc)

    def _log_broker_identity(self) -> None:
        """Log which cluster and which incarnation of the topic the group's offsets belong to.

        Only logged, nothing depends on it. Tansu answers the same cluster id (``tansu_cluster``
        unless started with ``--cluster-id``) from every instance; the topic id (a UUID made
        when the topic is created) is what changes when the in-memory broker is replaced.
        """
        from kafka.errors import KafkaError

        try:
            self._consumer.topics()  # one metadata round trip fills the client's cluster view
            cluster = self._consumer._client.cluster
            cluster_id, topic_id = cluster.cluster_id, cluster.topic_id(self.topic)
        except (KafkaError, AttributeError) as exc:
            log.info("broker identity not available: %s", exc)
            return
        log.info("consuming %s (topic id %s) as group %s from cluster %s at %s", self.topic,
                 topic_id, self.group_id, cluster_id, self.bootstrap_servers)

    # -- the loop

    def process(self, records: Mapping[Any, list[Any]], now: float) -> list[Notification]:
        """Route one poll batch; write outbox + state + identities durably; return notifications."""
        offsets: dict[tuple[str, int], int] = {}
        dead: list[tuple[Any, str]] = []
        decoded: list[tuple[Any, Alert, str]] = []
        for tp, batch in records.items():
            for rec in batch:
                offsets[(tp.topic, tp.partition)] = rec.offset + 1
                self.stats.consumed += 1
                try:
                    alert = alert_from_record(rec.value)
                except MalformedAlertError as exc:
                    dead.append((rec, str(exc)))
                    continue
                decoded.append((rec, alert, alert_identity(alert)))
        routed = self.store.seen_alerts(identity for _, _, identity in decoded)
        new_ids: list[str] = []
        notifications: list[Notification] = []
        for rec, alert, identity in decoded:
            if identity in routed:
                self.stats.duplicates += 1
                continue
            routed.add(identity)
            new_ids.append(identity)
            try:
                notifications += self.policy.observe(alert, now)
            except Exception as exc:  # a bug must not wedge the partition on one record
                log.exception("policy failed on alert %s", alert.id)
                dead.append((rec, f"policy error: {type(exc).__name__}: {exc}"))
        absorbed = len(decoded) - len(new_ids)
        if absorbed:
            log.info("absorbed %d alert records routed before (re-read or sent twice)", absorbed)
        notifications += self.policy.flush(now)
        if dead:
            self._dead_letter(dead)
        if new_ids or notifications:
            self.store.commit_batch(notifications, self.policy.drain_changes(),
                                    alert_ids=new_ids, now=now)
            self.stats.notifications += len(notifications)
            for destination in {n.destination for n in notifications}:
                self.workers[destination].notify()
        if offsets and self._consumer is not None:
            self._commit_kafka(offsets)
        return notifications

    def run(self) -> NotifierStats:
        from kafka.errors import KafkaError

        for worker in self.workers.values():
            worker.start()
        next_silence_refresh = 0.0
        next_prune = self.clock() + 60.0
        try:
            self._consumer = self._make_consumer()
            self._log_broker_identity()
            while not self.stop_event.is_set():
                now = self.clock()
                if now >= next_silence_refresh:
                    self.policy.set_silences(self.store.silences(active_at=now))
                    next_silence_refresh = now + SILENCE_REFRESH_S
                if now >= next_prune:
                    self.store.prune_finished(now - PRUNE_SENT_AFTER_S)
                    self.store.prune_seen(now - SEEN_RETENTION_S)
                    next_prune = now + 3600.0
                timeout_ms = self.poll_timeout_ms
                deadline = self.policy.next_deadline(now)
                if deadline is not None:
                    timeout_ms = int(min(timeout_ms, max(0.0, deadline - now) * 1000))
                try:
                    records = self._consumer.poll(timeout_ms=timeout_ms)
                except KafkaError as exc:
                    log.warning("poll failed: %s", exc)
                    self.stop_event.wait(0.2)
                    continue
                self.process(records, self.clock())
        except InterruptedError:
            pass
        finally:
            self.stop_event.set()
            if self._consumer is not None:
                self._consumer.close(autocommit=False)
            if self._producer is not None:
                self._producer.close(timeout=2)
            for worker in self.workers.values():
                worker.notify()
                worker.join(timeout=10)
            self.store.close()
        return self.stats


def run_notifier(bootstrap_servers: str, routes_path: str | Path | None, state_dir: str | Path,
                 *, stop_event: threading.Event, routes: RoutesConfig | None = None,
                 env: Mapping[str, str] | None = None, topic: str = ALERTS_TOPIC,
                 dead_letter_topic: str = DEAD_LETTER_TOPIC, group_id: str = GROUP_ID,
                 notifiers: Mapping[str, Notifier] | None = None,
                 clock: Callable[[], float] = time.time, metrics_port: int = 0) -> NotifierStats:
    """Consume ``topic`` and deliver alerts until ``stop_event`` is set; returns counters.

    Parameters
    ----------
    bootstrap_servers : str
        Kafka bootstrap servers (``127.0.0.1:9092``).
    routes_path : path or None
        The routes YAML (``${ENV}`` references resolved from ``env``); ignored when ``routes``
        is given.
    state_dir : path
        Directory for ``notifier.sqlite3`` (outbox, routed alert identities, policy state,
        silences). Where to resume reading is the consumer group's commit on the broker.
    stop_event : threading.Event
        Set it to stop; pending rows stay in the outbox for the next start.
    notifiers : mapping, optional
        Destination name -> notifier, replacing the one built from the routes file (tests).
    """
    if routes is None:
        if routes_path is None:
            raise ValueError("give routes_path or routes")
        routes = load_routes(routes_path, env)
    service = NotifierService(bootstrap_servers, routes, state_dir, stop_event=stop_event,
                              topic=topic, dead_letter_topic=dead_letter_topic, group_id=group_id,
                              notifiers=notifiers, clock=clock)
    if metrics_port:
        from prometheus_client import CollectorRegistry

        from agentwatch.alerts.metrics import NotifierCollector
        from agentwatch.dashboards.metrics import serve_metrics

        registry = CollectorRegistry()
        registry.register(NotifierCollector(service))
        serve_metrics(registry, metrics_port)
    return service.run()
