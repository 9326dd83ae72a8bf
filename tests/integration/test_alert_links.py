"""Alert deep links on the real stack: a loop finding reaches the local Slack and PagerDuty
receivers with a link to the Agents dashboard's loop panel around the finding, filtered to the
looping service (``AGENTWATCH_GRAFANA_URL`` set, as the workers read it)."""

from __future__ import annotations

import random
import time
from urllib.parse import parse_qs, urlsplit

import pytest

from agentwatch.dashboards.grafana import dashboard_index
from agentwatch.stack import Stack
from bench.faults import loop_request, post_http, wait_for

from stack_helpers import stack_settings, write_routes

pytestmark = pytest.mark.slow

GRAFANA = "http://grafana.example:3000"


@pytest.fixture(scope="module")
def alerting_stack(tmp_path_factory, receivers):
    pagerduty, slack = receivers
    work = tmp_path_factory.mktemp("alert-links")
    routes = write_routes(work / "routes.yaml", pagerduty, slack, routing_key="links-key")
    settings = stack_settings(work / "data").model_copy(update={
        "alert_routes": routes, "alerts_state_dir": work / "alerts", "gpu_exporter": "off",
        "grafana_url": GRAFANA})
    stack = Stack(settings, say=lambda _m: None).start()
    try:
        yield stack
    finally:
        stack.stop()


def assert_loop_link(url: str, sent_at: float) -> None:
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}" == GRAFANA
    assert parts.path == "/d/agentwatch-agents"
    q = parse_qs(parts.query)
    assert q["viewPanel"] == [str(dashboard_index()["agentwatch-agents"]["panels"]["Loop findings / s by severity"])]
    assert int(q["from"][0]) < sent_at * 1000 < int(q["to"][0])
    assert q["var-service"] == ["faults-loop"]  # the trace's service (a loop is keyed by trace id)


def test_a_loop_alert_reaches_slack_and_pagerduty_with_its_grafana_link(alerting_stack, receivers):
    pagerduty, slack = receivers
    sent_at = time.time()
    body, _ids = loop_request(rng=random.Random(15))
    assert post_http(alerting_stack.settings.otlp_http_port, body) == 200

    triggers = wait_for(lambda: pagerduty.events("trigger"), 60)
    assert triggers, "no PagerDuty trigger arrived"
    links = triggers[0]["links"]
    assert [link["text"] for link in links] == ["Grafana: agentwatch / Agents"]
    assert_loop_link(links[0]["href"], sent_at)

    messages = wait_for(lambda: [r.body for r in slack.snapshot() if isinstance(r.body, dict)], 60)
    assert messages, "no Slack message arrived"
    buttons = [element for block in messages[0]["blocks"] if block["type"] == "actions"
               for element in block["elements"] if element["type"] == "button"]
    assert [b["text"]["text"] for b in buttons] == ["Grafana: agentwatch / Agents"]
    assert buttons[0]["url"] == links[0]["href"]
    assert_loop_link(buttons[0]["url"], sent_at)
