"""AlertPolicy with a clock the test moves: routing, grouping, dedup, rate limit, resolve, silences."""

from __future__ import annotations

import dataclasses

import orjson
import pytest

from agentwatch.alerts.config import RateLimit, parse_routes
from agentwatch.alerts.model import alert_from_record, alert_record_from_finding
from agentwatch.alerts.policy import (Action, AlertPolicy, Matcher, Silence, TokenBucket,
                                      parse_duration)
from agentwatch.events import Finding, Severity

T0 = 1_700_000_000.0


def finding(detector="agent_loop", key="project=shop/trace=t1", kind="loop",
            severity=Severity.CRITICAL, ts=T0, resolved=False, **evidence):
    return Finding(detector=detector, key=key, kind=kind, severity=severity, ts=ts, value=7.0,
                   threshold=5.0, evidence=evidence, resolved=resolved)


def alert(**kw):
    return alert_from_record(alert_record_from_finding(finding(**kw)))


DESTS = {"slack-shop": {"type": "slack", "webhook_url": "http://127.0.0.1:1/a"},
         "slack-all": {"type": "slack", "webhook_url": "http://127.0.0.1:1/b"},
         "pd-shop": {"type": "pagerduty", "routing_key": "k",
                     "base_url": "https://127.0.0.1:1"},
         "grafana": {"type": "grafana", "url": "http://127.0.0.1:1"}}


def policy(routes, **extra):
    return AlertPolicy(parse_routes({"destinations": DESTS, "routes": routes, **extra}))


def sent(notifications):
    return sorted((n.destination, n.action.value, n.route,
                   tuple(sorted(a.alert.dedup_key for a in n.alerts))) for n in notifications)


# -- routing


def test_first_matching_route_wins_and_continue_adds_the_next():
    p = policy([
        {"name": "page-shop", "match": {"project": "shop"}, "min_severity": "critical",
         "destinations": ["pd-shop"], "continue": True},
        {"name": "shop", "match": {"project": ["shop", "shop-eu"]}, "destinations": ["slack-shop"]},
        {"name": "never", "match": {"project": "shop"}, "destinations": ["slack-all"]},
    ], default_destinations=["slack-all"])
    crit = alert(key="project=shop/trace=a")
    out = p.observe(crit, 10.0)
    assert sent(out) == [("pd-shop", "trigger", "page-shop", (crit.dedup_key,)),
                         ("slack-shop", "trigger", "shop", (crit.dedup_key,))]
    warn = alert(key="project=shop-eu/trace=b", severity=Severity.WARNING)
    assert sent(p.observe(warn, 11.0)) == [("slack-shop", "trigger", "shop", (warn.dedup_key,))]
    other = alert(key="project=bank/trace=c")
    assert sent(p.observe(other, 12.0)) == [("slack-all", "trigger", "default", (other.dedup_key,))]


def test_routes_match_detector_and_service_from_evidence():
    p = policy([{"name": "vram", "match": {"detector": "vram_leak", "service": "llm-gw"},
                 "destinations": ["pd-shop"]}])
    hit = alert(detector="vram_leak", key="host=h1/gpu=0", kind="trend", service="llm-gw")
    miss = alert(detector="vram_leak", key="host=h1/gpu=1", kind="trend", service="other")
    assert [n.destination for n in p.observe(hit, 1.0)] == ["pd-shop"]
    assert p.observe(miss, 1.0) == []  # no route, no default: nothing to send


def test_annotation_destinations_get_every_trigger_and_resolve():
    p = policy([], annotations=["grafana"])
    a = alert()
    assert sent(p.observe(a, 1.0)) == [("grafana", "trigger", "annotations", (a.dedup_key,))]
    r = alert(resolved=True, ts=T0 + 30)
    out = p.observe(r, 2.0)
    assert sent(out) == [("grafana", "resolve", "annotations", (a.dedup_key,))]
    assert out[0].alerts[0].first_seen == T0 and out[0].alerts[0].alert.ts == T0 + 30


# -- dedup and resolve


def test_repeats_while_firing_count_up_without_a_new_notification():
    p = policy([{"name": "all", "destinations": ["pd-shop", "slack-shop"]}])
    assert len(p.observe(alert(ts=T0), 1.0)) == 2
    for i in range(1, 5):
        assert p.observe(alert(ts=T0 + 10 * i), 1.0 + i) == []
    inc = p.incident(alert().dedup_key)
    assert (inc.count, inc.first_seen, inc.last_seen) == (5, T0, T0 + 40)
    assert p.stats.deduplicated == 4

    resolved = p.observe(alert(resolved=True, ts=T0 + 50), 7.0)
    assert sent(resolved) == [("pd-shop", "resolve", "all", (alert().dedup_key,)),
                              ("slack-shop", "resolve", "all", (alert().dedup_key,))]
    assert resolved[0].alerts[0].count == 5
    # Firing again after the resolve is a new incident: notified again, count restarts.
    again = p.observe(alert(ts=T0 + 60), 8.0)
    assert len(again) == 2 and again[0].alerts[0].count == 1
    assert again[0].id != p.observe(alert(resolved=True, ts=T0 + 61), 9.0)[0].id


def test_resolve_without_firing_is_ignored():
    p = policy([{"name": "all", "destinations": ["slack-shop"]}])
    assert p.observe(alert(resolved=True), 1.0) == []
    assert p.stats.orphan_resolves == 1


def test_notification_ids_are_deterministic():
    a, b = policy([{"name": "all", "destinations": ["slack-shop"]}]), policy(
        [{"name": "all", "destinations": ["slack-shop"]}])
    assert [n.id for n in a.observe(alert(), 1.0)] == [n.id for n in b.observe(alert(), 99.0)]


# -- grouping


def test_grouping_window_sends_one_message_per_group_when_the_window_closes():
    p = policy([{"name": "shop", "match": {"project": "shop"}, "destinations": ["slack-shop"],
                 "group_by": ["detector", "project"], "group_wait_s": 30}])
    keys = [f"project=shop/trace=t{i}" for i in range(3)]
    assert p.observe(alert(key=keys[0]), 100.0) == []
    assert p.observe(alert(key=keys[1]), 110.0) == []
    assert p.observe(alert(key="project=shop/model=m", detector="cost"), 115.0) == []
    assert p.next_deadline(115.0) == 130.0
    assert p.flush(129.9) == []
    # A repeat inside the window updates the count carried by the group message.
    assert p.observe(alert(key=keys[0], ts=T0 + 5), 120.0) == []
    out = p.flush(130.0)
    assert sent(out) == [("slack-shop", "trigger", "shop",
                          tuple(sorted(f"agent_loop:loop:{k}" for k in keys[:2])))]
    assert {a.alert.dedup_key: a.count for a in out[0].alerts}[f"agent_loop:loop:{keys[0]}"] == 2
    # The third group (detector=cost) opened at 115 and closes at 145.
    assert p.next_deadline(130.0) == 145.0
    assert sent(p.flush(145.0)) == [("slack-shop", "trigger", "shop",
                                     ("cost:loop:project=shop/model=m",))]
    assert p.next_deadline(146.0) is None


def test_an_incident_resolved_inside_its_group_window_is_never_sent():
    p = policy([{"name": "all", "destinations": ["slack-shop"], "group_wait_s": 30}])
    p.observe(alert(key="project=shop/trace=a"), 100.0)
    p.observe(alert(key="project=shop/trace=b"), 101.0)
    assert p.observe(alert(key="project=shop/trace=a", resolved=True), 105.0) == []
    out = p.flush(131.0)
    assert sent(out) == [("slack-shop", "trigger", "all", ("agent_loop:loop:project=shop/trace=b",))]


# -- rate limit


def test_token_bucket_refills_at_its_rate():
    bucket = TokenBucket(RateLimit(max_notifications=2, per_s=60))
    assert bucket.available(0.0) == 2
    bucket.consume(0.0, 2)
    assert bucket.available(29.0) == 0
    assert bucket.next_token_at(29.0) == pytest.approx(30.0)
    assert bucket.available(30.0) == 1
    assert bucket.available(1000.0) == 2  # capped at the burst size


def test_rate_limit_holds_excess_and_sends_it_as_one_digest():
    p = policy([{"name": "all", "destinations": ["slack-shop"],
                 "rate_limit": {"max_notifications": 2, "per_s": 60}}])
    out = []
    for i in range(6):
        out += p.observe(alert(key=f"project=shop/trace=t{i}"), 100.0 + i)
    # Two tokens: the first two alerts go out at once, the other four wait.
    assert [len(n.alerts) for n in out] == [1, 1]
    assert p.flush(110.0) == []
    assert p.next_deadline(110.0) == pytest.approx(130.0)  # 1 token per 30 s since t=100
    digest = p.flush(130.0)
    assert len(digest) == 1 and digest[0].group_key == "rate-limited digest"
    assert sorted(a.alert.key for a in digest[0].alerts) == [
        f"project=shop/trace=t{i}" for i in range(2, 6)]
    assert p.stats.rate_limited_digests == 1
    # Resolves are never rate limited: on-call must learn at once that a page cleared.
    resolves = [p.observe(alert(key=f"project=shop/trace=t{i}", resolved=True), 131.0 + i)
                for i in range(6)]
    assert all(len(r) == 1 and r[0].action is Action.RESOLVE for r in resolves)


# -- silences


def test_silence_suppresses_matching_alerts_until_it_ends_then_a_repeat_pages():
    p = policy([{"name": "all", "destinations": ["pd-shop"]}], annotations=["grafana"])
    p.set_silences([Silence("s1", (Matcher.parse("detector=agent_loop"),
                                   Matcher.parse("project=shop")), 100.0, 200.0)])
    loop_shop = alert(key="project=shop/trace=a")
    out = p.observe(loop_shop, 150.0)
    assert sent(out) == [("grafana", "trigger", "annotations", (loop_shop.dedup_key,))]
    assert p.stats.silenced == 1
    other_project = alert(key="project=bank/trace=a")
    assert [n.destination for n in p.observe(other_project, 150.0)] == ["grafana", "pd-shop"]
    # Still inside the silence: a repeat is only counted.
    assert p.observe(alert(key="project=shop/trace=a", ts=T0 + 1), 199.0) == []
    # The silence has ended and the incident still fires: the next repeat pages.
    late = p.observe(alert(key="project=shop/trace=a", ts=T0 + 2), 200.0)
    assert sent(late) == [("pd-shop", "trigger", "all", (loop_shop.dedup_key,))]
    assert late[0].alerts[0].count == 3


def test_a_silenced_incident_that_resolves_sends_no_resolve_page():
    p = policy([{"name": "all", "destinations": ["pd-shop"]}])
    p.set_silences([Silence("s", (Matcher.parse("key=~project=shop/.*"),), 0.0, 1e12)])
    assert p.observe(alert(), 1.0) == []
    assert p.observe(alert(resolved=True), 2.0) == []


@pytest.mark.parametrize("text,labels,expected", [
    ("project=shop", {"project": "shop"}, True),
    ("project=shop", {"project": "shopx"}, False),
    ("project!=shop", {"project": "bank"}, True),
    ("project!=shop", {}, True),
    ("key=~project=shop/.*", {"key": "project=shop/trace=1"}, True),
    ("key=~shop", {"key": "project=shop/trace=1"}, False),  # full match, not search
])
def test_matchers(text, labels, expected):
    assert Matcher.parse(text).matches(labels) is expected


@pytest.mark.parametrize("bad", ["project", "=shop", "x=~(", ""])
def test_bad_matchers_raise(bad):
    with pytest.raises(ValueError):
        Matcher.parse(bad)


def test_durations():
    assert parse_duration("2h") == 7200
    assert parse_duration("1h30m") == 5400
    assert parse_duration("90s") == 90
    for bad in ("2", "h", "-1h", "2 hours", "0s"):
        with pytest.raises(ValueError):
            parse_duration(bad)


# -- state


def test_snapshot_restore_round_trip_continues_identically():
    routes = [{"name": "all", "destinations": ["slack-shop", "pd-shop"], "group_wait_s": 10,
               "rate_limit": {"max_notifications": 1, "per_s": 60}}]
    a, b = policy(routes), policy(routes)
    script = [(alert(key=f"project=shop/trace=t{i % 3}", ts=T0 + i), 100.0 + i) for i in range(5)]
    for al, now in script[:3]:
        a.observe(al, now)
    b.restore(orjson.loads(orjson.dumps(a.snapshot())))
    rest_a = [n.to_dict() for al, now in script[3:] for n in a.observe(al, now)] + [
        n.to_dict() for n in a.flush(200.0)]
    rest_b = [n.to_dict() for al, now in script[3:] for n in b.observe(al, now)] + [
        n.to_dict() for n in b.flush(200.0)]
    assert rest_a == rest_b and rest_a  # same notifications, and there were some
    assert a.snapshot() == b.snapshot()


def test_incremental_changes_rebuild_the_same_state():
    p = policy([{"name": "all", "destinations": ["slack-shop"], "group_wait_s": 5}])
    saved: dict = {}
    meta: dict = {}
    for i in range(6):
        p.observe(alert(key=f"project=shop/trace=t{i % 4}", ts=T0 + i), 100.0 + i)
        if i == 3:
            p.observe(alert(key="project=shop/trace=t0", resolved=True, ts=T0 + 3.5), 103.5)
        changes = p.drain_changes()
        saved.update(changes.upserted)
        for k in changes.deleted:
            saved.pop(k, None)
        meta = changes.meta
    q = policy([{"name": "all", "destinations": ["slack-shop"], "group_wait_s": 5}])
    q.restore_parts(saved.values(), meta)
    assert sorted(q.snapshot()["incidents"], key=lambda d: d["dedup_key"]) == sorted(
        p.snapshot()["incidents"], key=lambda d: d["dedup_key"])
    assert q.snapshot()["groups"] == p.snapshot()["groups"]


def test_incident_memory_is_bounded():
    cfg = parse_routes({"destinations": DESTS, "routes": [{"name": "all",
                                                          "destinations": ["slack-shop"]}]})
    p = AlertPolicy(cfg, max_incidents=50)
    for i in range(500):
        p.observe(alert(key=f"project=shop/trace=t{i}"), 100.0 + i)
    assert len(p.snapshot()["incidents"]) == 50
    assert p.stats.evicted_incidents == 450
    # The most recent incidents are the ones kept.
    assert p.incident("agent_loop:loop:project=shop/trace=t499") is not None
    assert p.incident("agent_loop:loop:project=shop/trace=t0") is None


def test_constructor_validates():
    cfg = parse_routes({"destinations": DESTS})
    with pytest.raises(ValueError):
        AlertPolicy(cfg, max_incidents=0)
    with pytest.raises(ValueError):
        Silence("x", (), 0.0, 1.0)
    with pytest.raises(ValueError):
        Silence("x", (Matcher.parse("a=b"),), 5.0, 5.0)


def test_replaced_alert_keeps_latest_fields():
    p = policy([{"name": "all", "destinations": ["slack-shop"], "group_wait_s": 10}])
    p.observe(alert(ts=T0), 1.0)
    newer = dataclasses.replace(alert(ts=T0 + 9), value=42.0)
    p.observe(newer, 2.0)
    out = p.flush(11.0)
    assert out[0].alerts[0].alert.value == 42.0 and out[0].alerts[0].count == 2
