"""Alert records: what the detector agent writes to topic `alerts` and the notifier reads back."""

from __future__ import annotations

import subprocess
from urllib.parse import parse_qs, urlsplit

import orjson
import pytest

from agentwatch.alerts.config import load_routes, parse_routes
from agentwatch.alerts.model import (AlertStatus, MalformedAlertError, alert_from_record,
                                     alert_record_from_finding, dashboard_for, grafana_deep_link)
from agentwatch.dashboards.grafana import all_dashboards
from agentwatch.events import Finding, Severity

T0 = 1_700_000_000.5


def loop_finding(**kw):
    base = dict(detector="agent_loop", key="project=shop/trace=ab12", kind="loop",
                severity=Severity.CRITICAL, ts=T0, value=7.0, threshold=5.0,
                evidence={"tool": "search", "arguments": '{"q": "x"}', "repeats": 7,
                          "service": "checkout"})
    base.update(kw)
    return Finding(**base)


def test_record_carries_the_contract_fields():
    rec = orjson.loads(alert_record_from_finding(loop_finding(), dashboard_url="http://g:3000/d/aw"))
    assert rec["dedup_key"] == "agent_loop:loop:project=shop/trace=ab12"
    assert (rec["detector"], rec["kind"], rec["key"]) == ("agent_loop", "loop", "project=shop/trace=ab12")
    assert rec["severity"] == "critical" and rec["status"] == "firing"
    assert (rec["value"], rec["threshold"], rec["ts"]) == (7.0, 5.0, T0)
    assert rec["details"]["repeats"] == 7
    assert rec["labels"] == {"project": "shop", "trace": "ab12", "service": "checkout",
                             "tool": "search"}
    assert "agent_loop" in rec["summary"] and "CRITICAL" in rec["summary"]
    assert isinstance(rec["id"], str) and len(rec["id"]) == 24


def test_grafana_link_has_the_time_range_around_the_finding():
    rec = orjson.loads(alert_record_from_finding(loop_finding(), dashboard_url="http://g/d/aw?orgId=1"))
    url = urlsplit(rec["links"][0]["url"])
    q = parse_qs(url.query)
    assert url.path == "/d/aw" and q["orgId"] == ["1"]
    lo, hi = int(q["from"][0]), int(q["to"][0])
    assert lo < T0 * 1000 < hi
    assert (T0 * 1000 - lo, hi - T0 * 1000) == (30 * 60_000, 10 * 60_000)


def test_no_dashboard_url_means_no_grafana_link():
    assert orjson.loads(alert_record_from_finding(loop_finding()))["links"] == []


# One finding per detector the registry builds, keyed as that detector keys them.
EVERY_DETECTOR = [
    ("agent_loop", "loop", "4bf92f3577b34da6a3ce929d0e0e4736", {"service": "checkout", "project": "shop"}),
    ("hallucinated_tool", "unknown_tool", "4bf92f3577b34da6a3ce929d0e0e4736", {"service": "checkout"}),
    ("drift", "embedding", "service=checkout", {}),
    ("vram_leak", "vram_leak", "host=gpu-1/gpu=0/pid=42", {}),
    ("cost_anomaly", "cost_spike", "project=shop/model=gpt-4o", {}),
    ("budget", "daily", "project=shop", {}),
    ("retry_storm", "retry_storm", "project=shop/service=checkout/user=u1/session=s1", {}),
    ("slo", "error_rate", "service=checkout/model=gpt-4o", {}),
    ("slo", "latency", "service=checkout/model=gpt-4o", {}),
    ("pii_exposure", "new_pii_entity", "service=checkout/entity=EMAIL", {}),
    ("evaluation_drop", "evaluation_score_drop", "service=checkout/evaluation=relevance", {}),
    ("prompt_version_regression", "prompt_version_regression", "service=checkout/prompt=support", {}),
    ("some_future_detector", "odd", "a&b=c d", {}),
]


def test_every_registered_detector_is_in_the_link_table():
    from agentwatch.detectors.registry import build_detectors

    named = {d for d, *_ in EVERY_DETECTOR}
    assert {type(d).name for d in build_detectors({})} <= named


def test_the_link_table_names_real_dashboards_and_panels():
    dashboards = {d["uid"]: d for d in all_dashboards()}
    for detector, kind, _key, _ev in EVERY_DETECTOR:
        uid, panel = dashboard_for(detector, kind)
        assert uid in dashboards, (detector, uid)
        titles = {p.get("title") for p in dashboards[uid]["panels"]}
        assert panel is None or panel in titles, (detector, panel)
    assert dashboard_for("drift")[0] == "agentwatch-drift"
    assert dashboard_for("vram_leak")[0] == "agentwatch-gpu"
    assert dashboard_for("agent_loop")[0] == dashboard_for("hallucinated_tool")[0] == "agentwatch-agents"
    assert {dashboard_for(d)[0] for d in ("cost_anomaly", "budget", "retry_storm", "slo")} == {"agentwatch-overview"}


@pytest.mark.parametrize("detector,kind,key,evidence", EVERY_DETECTOR, ids=[f"{d}-{k}" for d, k, *_ in EVERY_DETECTOR])
def test_every_detector_gets_a_deep_link_around_the_finding(detector, kind, key, evidence):
    finding = loop_finding(detector=detector, kind=kind, key=key, evidence=evidence)
    rec = orjson.loads(alert_record_from_finding(finding, grafana_url="http://grafana.example:3000/"))
    assert len(rec["links"]) == 1
    link = rec["links"][0]
    url = urlsplit(link["url"])
    assert (url.scheme, url.netloc) == ("http", "grafana.example:3000")
    assert url.path == f"/d/{dashboard_for(detector, kind)[0]}"
    assert link["title"].startswith("Grafana: agentwatch / ")
    q = parse_qs(url.query)
    lo, hi = int(q["from"][0]), int(q["to"][0])
    assert lo < T0 * 1000 < hi and hi - lo <= 60 * 60_000
    panel = dashboard_for(detector, kind)[1]
    if panel is None:
        assert "viewPanel" not in q
    else:
        dashboard = next(d for d in all_dashboards() if d["uid"] == url.path.rsplit("/", 1)[1])
        assert [p["title"] for p in dashboard["panels"] if str(p["id"]) == q["viewPanel"][0]] == [panel]
    # Round trip through the notifier's reader: the link survives validation.
    assert alert_from_record(orjson.dumps(rec)).links[0].url == link["url"]


def test_deep_link_variables_come_from_the_key_and_are_url_encoded():
    def query(detector, kind, key, evidence=None):
        link = grafana_deep_link("https://g.example/grafana", loop_finding(
            detector=detector, kind=kind, key=key, evidence=evidence or {}))
        assert link.url.startswith("https://g.example/grafana/d/")
        return urlsplit(link.url).query, parse_qs(urlsplit(link.url).query)

    raw, q = query("budget", "daily", "project=R&D shop/user=u1")
    assert q["var-project"] == ["R&D shop"] and "var-service" not in q and "var-user" not in q
    assert "var-project=R%26D%20shop" in raw  # & and space encoded, not splitting the query
    _raw, q = query("slo", "error_rate", "service=checkout/model=gpt-4o")
    assert q["var-service"] == ["checkout"] and "var-project" not in q
    _raw, q = query("vram_leak", "vram_leak", "host=gpu-1/gpu=0/pid=42")
    assert q["var-host"] == ["gpu-1"]
    raw, q = query("drift", "embedding", "service=checkout/model=a+b")
    assert q["var-key"] == ["service=checkout/model=a+b"] and "%2B" in raw
    # The key wins over evidence; evidence fills what a trace-id key cannot say.
    _raw, q = query("agent_loop", "loop", "service=from-key", {"service": "from-evidence"})
    assert q["var-service"] == ["from-key"]
    _raw, q = query("agent_loop", "loop", "4bf92f3577b34da6a3ce929d0e0e4736", {"service": "checkout"})
    assert q["var-service"] == ["checkout"]
    _raw, q = query("agent_loop", "loop", "4bf92f3577b34da6a3ce929d0e0e4736")
    assert not any(name.startswith("var-") for name in q)


def test_no_grafana_url_means_no_deep_link():
    assert orjson.loads(alert_record_from_finding(loop_finding(), grafana_url=""))["links"] == []


def test_the_worker_wires_the_grafana_url_into_every_alert_record(tmp_path):
    from agentwatch.alerts.model import alert_record_from_finding as record
    from agentwatch.settings import Settings
    from agentwatch.streams.worker import build_dataflow

    def built(grafana_url):
        settings = Settings(data_dir=tmp_path, grafana_url=grafana_url, detector_checkpoint_s=0)
        return build_dataflow(settings, alert_record=record).alert_record

    links = orjson.loads(built("http://localhost:3000")(loop_finding()))["links"]
    assert [urlsplit(link["url"]).path for link in links] == ["/d/agentwatch-agents"]
    assert orjson.loads(built("")(loop_finding()))["links"] == []


def test_query_command_selects_this_incident_and_survives_the_shell():
    tricky = loop_finding(key="project=o'brien/trace=\"x\"$HOME")
    rec = orjson.loads(alert_record_from_finding(tricky))
    # Let bash itself parse the command: a shell function stands in for `agentwatch`.
    shown = subprocess.run(["bash", "-c", 'agentwatch() { printf "%s\\0" "$@"; }; ' + rec["query"]],
                           capture_output=True, check=True, env={"HOME": "/root"}).stdout
    argv = shown.decode().split("\0")[:-1]
    assert argv[0] == "query" and len(argv) == 2
    sql = argv[1]
    assert sql.startswith("SELECT * FROM findings WHERE detector = 'agent_loop'")
    assert "key = 'project=o''brien/trace=\"x\"$HOME'" in sql
    assert f"ts BETWEEN {int(T0) - 3600} AND {int(T0) + 301}" in sql


def test_resolved_finding_becomes_a_resolved_record_with_another_id():
    firing = orjson.loads(alert_record_from_finding(loop_finding()))
    resolved = orjson.loads(alert_record_from_finding(loop_finding(resolved=True, ts=T0 + 60)))
    assert resolved["status"] == "resolved" and resolved["dedup_key"] == firing["dedup_key"]
    assert resolved["id"] != firing["id"]
    # Same finding twice (worker redelivery) -> same id.
    assert orjson.loads(alert_record_from_finding(loop_finding()))["id"] == firing["id"]


def test_round_trip():
    data = alert_record_from_finding(loop_finding(), dashboard_url="http://g/d/aw")
    a = alert_from_record(data)
    assert a.status is AlertStatus.FIRING and a.severity is Severity.CRITICAL
    assert orjson.loads(orjson.dumps(a.to_dict())) == orjson.loads(data)


def test_non_json_evidence_is_stringified_not_fatal():
    rec = orjson.loads(alert_record_from_finding(loop_finding(evidence={"obj": object(), 3: "x"})))
    assert isinstance(rec["details"]["obj"], str) and rec["details"]["3"] == "x"


@pytest.mark.parametrize("payload,reason", [
    (b"not json", "not JSON"),
    (b"[1, 2]", "not an object"),
    (None, "tombstone"),
    (b'{"id": "x"}', "dedup_key"),
])
def test_malformed_records_say_why(payload, reason):
    with pytest.raises(MalformedAlertError, match=reason):
        alert_from_record(payload)


@pytest.mark.parametrize("field,value,reason", [
    ("severity", "urgent", "severity"),
    ("status", "maybe", "status"),
    ("ts", "yesterday", "ts"),
    ("ts", -1, "ts"),
    ("labels", {"a": 1}, "labels"),
    ("links", "http://x", "links"),
])
def test_field_validation(field, value, reason):
    rec = orjson.loads(alert_record_from_finding(loop_finding()))
    rec[field] = value
    with pytest.raises(MalformedAlertError, match=reason):
        alert_from_record(orjson.dumps(rec))


# -- routes file


def test_routes_file_resolves_env_references(tmp_path):
    path = tmp_path / "routes.yaml"
    path.write_text("""
destinations:
  slack: {type: slack, webhook_url: "${SLACK_URL}"}
  pd: {type: pagerduty, routing_key: "${PD_KEY}", base_url: "${PD_URL:-https://events.pagerduty.com}"}
routes:
  - {name: crit, match: {severity: critical}, destinations: [pd, slack]}
default_destinations: [slack]
""")
    cfg = load_routes(path, env={"SLACK_URL": "http://127.0.0.1:9/hook", "PD_KEY": "secret"})
    assert cfg.destinations["slack"].webhook_url == "http://127.0.0.1:9/hook"
    assert cfg.destinations["pd"].routing_key == "secret"
    assert cfg.destinations["pd"].base_url == "https://events.pagerduty.com"
    with pytest.raises(ValueError, match="PD_KEY"):
        load_routes(path, env={"SLACK_URL": "x"})


def test_example_routes_file_is_valid():
    from pathlib import Path

    import agentwatch.alerts as pkg

    example = Path(pkg.__file__).parent / "routes.example.yaml"
    env = {"SLACK_WEBHOOK_ONCALL": "http://127.0.0.1:1/a", "SLACK_WEBHOOK_SHOP": "http://127.0.0.1:1/b",
           "PAGERDUTY_ROUTING_KEY_SHOP": "k", "GRAFANA_TOKEN": "t"}
    cfg = load_routes(example, env=env)
    assert cfg.routes and cfg.destinations


@pytest.mark.parametrize("bad,match", [
    ({"destinations": {"s": {"type": "slack", "webhook_url": "x"}}, "default_destinations": ["nope"]},
     "unknown destination"),
    ({"destinations": {"s": {"type": "smoke", "webhook_url": "x"}}}, "type"),
    ({"destinations": {"s": {"type": "slack", "webhook_url": "x"}},
      "routes": [{"name": "a", "destinations": ["s"], "rate_limit": {"max_notifications": 0, "per_s": 1}}]},
     "max_notifications"),
])
def test_bad_routes_are_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        parse_routes(bad, env={})
