"""Static checks: dashboards only query exported metrics, and the provisioned JSON is current."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from agentwatch.dashboards import grafana
from agentwatch.dashboards.metrics import exported_sample_names

DASHBOARDS = grafana.all_dashboards()
IDS = [d["uid"] for d in DASHBOARDS]


@pytest.mark.parametrize("dashboard", DASHBOARDS, ids=IDS)
def test_every_query_names_only_exported_metrics(dashboard):
    exported = exported_sample_names()
    queries = grafana.dashboard_queries(dashboard)
    assert len(queries) >= 5
    for expr in queries:
        names = grafana.metric_names(expr)
        assert names, f"no metric found in {expr!r}"
        assert names <= exported, f"{expr!r} names {sorted(names - exported)}, not exported"


def test_metric_name_lexer():
    expr = ('histogram_quantile(0.95, sum by (le, stage) (rate(agentwatch_processing_seconds_bucket'
            '{stage=~"$x", job!="a b"}[$__rate_interval]))) / on(stage) agentwatch_up * 1e3')
    assert grafana.metric_names(expr) == {"agentwatch_processing_seconds_bucket", "agentwatch_up"}
    assert grafana.metric_names("label_values(agentwatch_drift_score, key)") == {
        "agentwatch_drift_score"}
    assert grafana.metric_names("count(agentwatch_a > agentwatch_b) or vector(0)") == {
        "agentwatch_a", "agentwatch_b"}


def test_dashboards_cover_the_issue():
    titles = {d["uid"]: " ".join(p["title"] for p in d["panels"]) for d in DASHBOARDS}
    assert set(titles) == {"agentwatch-overview", "agentwatch-drift", "agentwatch-agents",
                           "agentwatch-gpu"}
    every_query = {uid: " ".join(grafana.dashboard_queries(d)) for uid, d in
                   zip(IDS, DASHBOARDS)}
    for metric in ("agentwatch_spans_total", "agentwatch_llm_tokens_total",
                   "agentwatch_llm_cost_usd_total", "agentwatch_llm_errors_total"):
        assert metric in every_query["agentwatch-overview"]
    assert "agentwatch_drift_threshold" in every_query["agentwatch-drift"]
    for needle in (grafana.LOOP_DETECTORS, grafana.HALLUCINATED_TOOL_DETECTORS,
                   "agentwatch_trace_steps_bucket"):
        assert needle in every_query["agentwatch-agents"]
    for metric in ("agentwatch_vram_used_bytes", "agentwatch_vram_slope_bytes_per_second",
                   "agentwatch_vram_seconds_to_threshold"):
        assert metric in every_query["agentwatch-gpu"]


@pytest.mark.parametrize("dashboard", DASHBOARDS, ids=IDS)
def test_dashboard_model_shape(dashboard):
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) and i > 0 for i in ids)
    assert "id" not in dashboard
    for panel in panels:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24 and grid["h"] > 0
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert ref_ids and len(ref_ids) == len(set(ref_ids))
    names = [v["name"] for v in dashboard["templating"]["list"]]
    assert names[0] == "datasource" and len(names) == len(set(names))
    for panel in panels:  # every $variable a panel uses is defined
        for target in panel.get("targets", []):
            for var in re.findall(r"\$(\w+)", target["expr"]):
                assert var.startswith("__") or var in names, (var, target["expr"])
    annotations = dashboard["annotations"]["list"]
    assert any(a["datasource"]["type"] == "grafana" and a["target"]["tags"] == [grafana.ALERT_TAG]
               for a in annotations)
    assert any("agentwatch_findings_total" in a.get("expr", "") for a in annotations)


def test_provisioned_json_matches_builders():
    files = sorted(grafana.DASHBOARD_JSON_DIR.glob("*.json"))
    assert [f.stem for f in files] == sorted(IDS), "run `agentwatch dashboards export`"
    for dashboard in DASHBOARDS:
        on_disk = json.loads((grafana.DASHBOARD_JSON_DIR / f"{dashboard['uid']}.json").read_text())
        assert on_disk == dashboard, (
            f"{dashboard['uid']}.json is stale: run `agentwatch dashboards export`")


def test_provisioning_files_point_at_each_other():
    prov = grafana.PROVISIONING_DIR
    datasources = yaml.safe_load((prov / "datasources" / "agentwatch.yaml").read_text())
    (ds,) = datasources["datasources"]
    assert ds["uid"] == grafana.DATASOURCE_UID and ds["type"] == "prometheus" and ds["isDefault"]
    assert ds["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((prov / "dashboards" / "agentwatch.yaml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["folderUid"] == grafana.FOLDER_UID
    # compose mounts dashboards/provisioning at /etc/grafana/provisioning
    mounted = provider["options"]["path"].replace("/etc/grafana/provisioning", str(prov), 1)
    assert sorted(p.name for p in Path(mounted).glob("*.json")) == sorted(
        f"{uid}.json" for uid in IDS)
