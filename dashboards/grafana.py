"""Grafana dashboards as code, built with ``grafana-foundation-sdk``.

Four dashboards read the metrics of :mod:`agentwatch.dashboards.metrics`: Overview
(throughput, tokens, cost, errors, lag, dead letters, managed prompts by version), Drift (score vs threshold per key),
Agents (loops, hallucinated tools, steps per trace) and GPU (VRAM per device/process, slope,
time to OOM). Each carries two alert annotation sources: the annotations agentwatch's Grafana
notifier posts (tag :data:`ALERT_TAG`) and critical findings straight from Prometheus.

Panels query a ``$datasource`` variable of type prometheus rather than a fixed datasource, so
the same JSON works when provisioned next to compose's Prometheus (uid
:data:`DATASOURCE_UID`, the default datasource there) and when pushed to an existing Grafana.

:func:`all_dashboards` returns plain JSON-able dicts (the dashboard model Grafana stores);
:func:`write_provisioning` writes them where the compose stack's file provider reads them.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any, Callable, Iterator

from grafana_foundation_sdk.builders.common import (
    ReduceDataOptions,
    StackingConfig,
    VizLegendOptions,
)
from grafana_foundation_sdk.builders.dashboard import (
    AnnotationQuery,
    AnnotationTarget,
    Dashboard,
    DatasourceVariable,
    QueryVariable,
    Row,
    ThresholdsConfig,
)
from grafana_foundation_sdk.builders.prometheus import Dataquery as PromQuery
from grafana_foundation_sdk.builders.stat import Panel as StatPanel
from grafana_foundation_sdk.builders.timeseries import Panel as TimeseriesPanel
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import (
    BigValueColorMode,
    BigValueGraphMode,
    LegendDisplayMode,
    LegendPlacement,
    StackingMode,
)
from grafana_foundation_sdk.models.dashboard import (
    DataSourceRef,
    DynamicConfigValue,
    Threshold,
    ThresholdsMode,
    VariableRefresh,
)

DATASOURCE_UID = "agentwatch-prometheus"
FOLDER_UID = "agentwatch"
FOLDER_TITLE = "agentwatch"
# Tag on every annotation the alerts notifier posts to Grafana; the dashboards filter on it.
ALERT_TAG = "agentwatch"
DASHBOARD_TAGS = ["agentwatch"]
# Detector names by family (Finding.detector); the panels select findings with these regexes.
LOOP_DETECTORS = ".*loop.*"  # agent_loop
HALLUCINATED_TOOL_DETECTORS = "hallucinat.*"  # hallucinated_tool
DRIFT_DETECTORS = "drift.*"  # drift
VRAM_DETECTORS = "vram.*"  # vram_leak

PROVISIONING_DIR = Path(__file__).resolve().parent / "provisioning"
DASHBOARD_JSON_DIR = PROVISIONING_DIR / "dashboards" / "agentwatch"

_DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
_GRAFANA_DS = DataSourceRef(type_val="grafana", uid="-- Grafana --")
_RATE = "$__rate_interval"
_LLM_FILTER = 'service=~"$service",project=~"$project"'
_PROMPT_FILTER = 'service=~"$service",prompt=~"$prompt"'
_BY_PROMPT = "sum by (service, prompt, version)"
_PROMPT_LEGEND = "{{service}} {{prompt}} {{version}}"


# -- small typed helpers over the SDK builders ---------------------------------------------

def _q(expr: str, legend: str = "__auto", ref_id: str = "A", *, instant: bool = False) -> PromQuery:
    query = PromQuery().expr(expr).legend_format(legend).ref_id(ref_id).datasource(_DS)
    return query.instant() if instant else query.range()


def _targets(panel: Any, queries: list[PromQuery]) -> Any:
    for index, query in enumerate(queries):
        panel = panel.with_target(query.ref_id(chr(ord("A") + index)))
    return panel


def _timeseries(title: str, unit: str, queries: list[PromQuery], *, description: str = "",
                span: int = 12, height: int = 8, stacked: bool = False,
                thresholds: list[tuple[float | None, str]] | None = None) -> TimeseriesPanel:
    panel = (TimeseriesPanel().title(title).description(description).datasource(_DS).unit(unit)
             .span(span).height(height).line_width(1).fill_opacity(10)
             .legend(VizLegendOptions().display_mode(LegendDisplayMode.TABLE)
                     .placement(LegendPlacement.BOTTOM).show_legend(True)
                     .calcs(["lastNotNull", "max"])))
    if stacked:
        panel = panel.stacking(StackingConfig().mode(StackingMode.NORMAL)).fill_opacity(40)
    if thresholds:
        panel = panel.thresholds(_thresholds(thresholds))
    return _targets(panel, queries)


def _stat(title: str, unit: str, queries: list[PromQuery], *, description: str = "",
          span: int = 6, height: int = 4,
          thresholds: list[tuple[float | None, str]] | None = None) -> StatPanel:
    panel = (StatPanel().title(title).description(description).datasource(_DS).unit(unit)
             .span(span).height(height).color_mode(BigValueColorMode.VALUE)
             .graph_mode(BigValueGraphMode.AREA)
             .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).values(False)))
    if thresholds:
        panel = panel.thresholds(_thresholds(thresholds))
    return _targets(panel, queries)


def _thresholds(steps: list[tuple[float | None, str]]) -> ThresholdsConfig:
    return ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps(
        [Threshold(value=value, color=color) for value, color in steps])


def _label_variable(name: str, metric: str, label: str | None = None) -> QueryVariable:
    return (QueryVariable(name).label(name).datasource(_DS)
            .query(f"label_values({metric}, {label or name})")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .multi(True).include_all(True).all_value(".*"))


def _base(title: str, uid: str, description: str) -> Dashboard:
    return (Dashboard(title).uid(uid).description(description).tags(DASHBOARD_TAGS)
            .refresh("30s").time("now-6h", "now").timezone("browser").editable()
            .with_variable(DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
            .annotation(AnnotationQuery().name("agentwatch alerts").datasource(_GRAFANA_DS)
                        .enable(True).icon_color("red")
                        .target(AnnotationTarget().type("tags").tags([ALERT_TAG])
                                .match_any(True).limit(200)))
            .annotation(AnnotationQuery().name("Critical findings").datasource(_DS)
                        .enable(True).icon_color("orange")
                        .expr('sum by (detector) (increase(agentwatch_findings_total'
                              '{severity="critical"}[1m])) > 0')))


# -- the dashboards ----------------------------------------------------------------------

def overview_dashboard() -> dict[str, Any]:
    """Throughput, tokens, cost by model/project, errors, lag, dead letters, notifications;
    cost per call, latency and error ratio by prompt name and version."""
    d = (_base("agentwatch / Overview", "agentwatch-overview",
               "Pipeline throughput and LLM usage, cost and errors.")
         .with_variable(_label_variable("service", "agentwatch_llm_calls_total"))
         .with_variable(_label_variable("project", "agentwatch_llm_calls_total"))
         .with_variable(_label_variable("prompt", "agentwatch_prompt_calls_total"))
         .with_row(Row("Throughput"))
         .with_panel(_stat("Spans / s", "ops", [_q(
             f'sum(rate(agentwatch_spans_total{{topic="otlp_spans"}}[{_RATE}]))', "spans/s")]))
         .with_panel(_stat("LLM calls / s", "ops", [_q(
             f"sum(rate(agentwatch_llm_calls_total{{{_LLM_FILTER}}}[{_RATE}]))", "calls/s")]))
         .with_panel(_stat("Cost in range", "currencyUSD", [_q(
             f"sum(increase(agentwatch_llm_cost_usd_total{{{_LLM_FILTER}}}[$__range]))",
             "USD", instant=True)]))
         .with_panel(_stat("LLM error ratio", "percentunit", [_q(
             f"sum(rate(agentwatch_llm_errors_total{{{_LLM_FILTER}}}[{_RATE}])) / "
             f"sum(rate(agentwatch_llm_calls_total{{{_LLM_FILTER}}}[{_RATE}]))", "errors")],
             thresholds=[(None, "green"), (0.01, "orange"), (0.05, "red")]))
         .with_panel(_timeseries("Items processed / s by topic", "ops", [_q(
             f"sum by (topic) (rate(agentwatch_spans_total[{_RATE}]))", "{{topic}}")]))
         .with_panel(_timeseries("Batch latency p50 / p95 by stage", "s", [
             _q("histogram_quantile(0.95, sum by (le, stage) "
                f"(rate(agentwatch_processing_seconds_bucket[{_RATE}])))", "p95 {{stage}}"),
             _q("histogram_quantile(0.5, sum by (le, stage) "
                f"(rate(agentwatch_processing_seconds_bucket[{_RATE}])))", "p50 {{stage}}")]))
         .with_row(Row("LLM usage"))
         .with_panel(_timeseries("LLM calls / s by model", "ops", [_q(
             f"sum by (model) (rate(agentwatch_llm_calls_total{{{_LLM_FILTER}}}[{_RATE}]))",
             "{{model}}")], stacked=True))
         .with_panel(_timeseries("Tokens / s by direction", "short", [_q(
             "sum by (direction) (rate(agentwatch_llm_tokens_total"
             f"{{{_LLM_FILTER}}}[{_RATE}]))", "{{direction}}")], stacked=True))
         .with_panel(_timeseries("Cost USD / hour by model", "currencyUSD", [_q(
             "sum by (model) (rate(agentwatch_llm_cost_usd_total"
             f"{{{_LLM_FILTER}}}[{_RATE}])) * 3600", "{{model}}")], stacked=True))
         .with_panel(_timeseries("Cost USD / hour by project", "currencyUSD", [_q(
             "sum by (project) (rate(agentwatch_llm_cost_usd_total"
             f"{{{_LLM_FILTER}}}[{_RATE}])) * 3600", "{{project}}")], stacked=True))
         .with_panel(_timeseries("Tokens / s by model (input vs output)", "short", [
             _q("sum by (model) (rate(agentwatch_llm_tokens_total"
                f'{{{_LLM_FILTER},direction="input"}}[{_RATE}]))', "in {{model}}"),
             _q("sum by (model) (rate(agentwatch_llm_tokens_total"
                f'{{{_LLM_FILTER},direction="output"}}[{_RATE}]))', "out {{model}}")]))
         .with_panel(_timeseries("Unpriced LLM calls / s by model", "ops", [_q(
             "sum by (model) (rate(agentwatch_llm_unpriced_calls_total"
             f"{{{_LLM_FILTER}}}[{_RATE}]))", "{{model}}")],
             description="Calls whose model is missing from the pricing table: cost "
                         "panels under-report while this is above zero."))
         .with_row(Row("Errors"))
         .with_panel(_timeseries("LLM error ratio by service and model", "percentunit", [_q(
             f"sum by (service, model) (rate(agentwatch_llm_errors_total{{{_LLM_FILTER}}}"
             f"[{_RATE}])) / sum by (service, model) (rate(agentwatch_llm_calls_total"
             f"{{{_LLM_FILTER}}}[{_RATE}]))", "{{service}} {{model}}")]))
         .with_panel(_timeseries("Tool errors / s by tool", "ops", [_q(
             "sum by (service, tool) (rate(agentwatch_tool_calls_total"
             f'{{service=~"$service",status="error"}}[{_RATE}]))', "{{service}} {{tool}}")]))
         .with_panel(_timeseries("Dead-lettered records / s", "ops", [_q(
             f"sum by (topic, reason) (rate(agentwatch_dead_letter_total[{_RATE}]))",
             "{{topic}}: {{reason}}")]))
         .with_panel(_timeseries("Findings / s by detector and severity", "ops", [_q(
             f"sum by (detector, severity) (rate(agentwatch_findings_total[{_RATE}]))",
             "{{detector}} {{severity}}")], stacked=True))
         .with_panel(_timeseries("PII redacted / s by type and service", "ops", [_q(
             f'sum by (entity_type, service) (rate(agentwatch_pii_detections_total{{service=~"$service"}}[{_RATE}]))',
             "{{service}} {{entity_type}}")], stacked=True,
             description="Personal data and secrets found in span and log texts and redacted before "
                         "storage (AGENTWATCH_PII_MODE); the pii_detections table has them per trace."))
         .with_panel(_timeseries("Duplicates dropped / s", "ops", [
             _q(f"sum by (kind) (rate(agentwatch_duplicates_dropped_total[{_RATE}]))", "dropped {{kind}}"),
             _q(f"sum(rate(agentwatch_dedup_evicted_early_total[{_RATE}]))", "span ids forgotten early", "B")],
             description="Spans and usage records already applied (re-sent after a crash or by an "
                         "exporter's retry). Ids forgotten early mean the dedup memory's cap "
                         "(AGENTWATCH_DEDUP_SPANS) is too small for the rate."))
         .with_row(Row("Kafka and notifications"))
         .with_panel(_timeseries("Consumer lag by topic", "short", [
             _q("sum by (topic) (agentwatch_consumer_lag)", "{{topic}}"),
             _q("sum(increase(agentwatch_offset_gaps_total[1h]))", "records the Kafka client skipped (last hour)")],
             description="Lag: records on the broker a worker has not been handed yet. Skipped: "
                         "offsets a worker's Kafka client jumped over within an assignment; the "
                         "worker read them from the log and processed them, but anything above "
                         "zero is a client fault (the worker log names the range)."))
         .with_panel(_timeseries("Notifier deliveries and failures / s", "ops", [
             _q(f"sum by (destination) (rate(agentwatch_notifier_deliveries_total[{_RATE}]))",
                "delivered {{destination}}"),
             _q(f"sum by (destination) (rate(agentwatch_notifier_failures_total[{_RATE}]))",
                "failed {{destination}}")]))
         .with_panel(_timeseries("Label sets folded into \"other\" / s", "ops", [_q(
             f"sum by (metric) (rate(agentwatch_metric_label_sets_folded_total[{_RATE}]))",
             "{{metric}}")], description="Non-zero means a family hit its cardinality cap; "
                                         "raise max_label_sets or fix the label source."))
         # Last, so the panel ids alert links point at stay where they were.
         .with_row(Row("Prompts"))
         .with_panel(_timeseries("LLM calls / s by prompt and version", "ops", [_q(
             f"{_BY_PROMPT} (rate(agentwatch_prompt_calls_total{{{_PROMPT_FILTER}}}[{_RATE}]))",
             _PROMPT_LEGEND)], stacked=True,
             description="Calls of managed prompts (gen_ai.prompt.name / gen_ai.prompt.version, "
                         "Langfuse, OpenLLMetry): a rollout shows as one version replacing another."))
         .with_panel(_timeseries("Cost per call by prompt and version", "currencyUSD", [_q(
             f"{_BY_PROMPT} (rate(agentwatch_prompt_cost_usd_total{{{_PROMPT_FILTER}}}[{_RATE}])) / "
             f"{_BY_PROMPT} (rate(agentwatch_prompt_calls_total{{{_PROMPT_FILTER}}}[{_RATE}]))",
             _PROMPT_LEGEND)]))
         .with_panel(_timeseries("LLM latency p95 by prompt and version", "s", [_q(
             "histogram_quantile(0.95, sum by (le, service, prompt, version) (rate("
             f"agentwatch_prompt_latency_seconds_bucket{{{_PROMPT_FILTER}}}[{_RATE}])))",
             _PROMPT_LEGEND)]))
         .with_panel(_timeseries("LLM error ratio by prompt and version", "percentunit", [_q(
             f"{_BY_PROMPT} (rate(agentwatch_prompt_errors_total{{{_PROMPT_FILTER}}}[{_RATE}])) / "
             f"{_BY_PROMPT} (rate(agentwatch_prompt_calls_total{{{_PROMPT_FILTER}}}[{_RATE}]))",
             _PROMPT_LEGEND)],
             description="The prompt_version_regression detector compares these (and evaluation "
                         "scores) between a prompt's versions.")))
    return to_json(d)


def drift_dashboard() -> dict[str, Any]:
    """Latest drift score against its threshold, per monitored key, check (skew against the
    reference, drift against previous windows) and deciding statistic, over time. Every check
    sets them, calm or not, so a calm key shows how far it is from alarming."""
    d = (_base("agentwatch / Drift", "agentwatch-drift",
               "Embedding and distribution drift scores against their thresholds.")
         .with_variable(_label_variable("key", "agentwatch_drift_score"))
         .with_panel(_stat("Keys over threshold", "short", [_q(
             'count(count by (key) (agentwatch_drift_score{key=~"$key"} > '
             'agentwatch_drift_threshold)) or vector(0)', "keys", instant=True)],
             thresholds=[(None, "green"), (1, "red")]))
         .with_panel(_stat("Drift findings in range", "short", [_q(
             f'sum(increase(agentwatch_findings_total{{detector=~"{DRIFT_DETECTORS}"}}'
             "[$__range]))", "findings", instant=True)]))
         .with_panel(_stat("Highest score / threshold", "percentunit", [_q(
             'max(agentwatch_drift_score{key=~"$key"} / agentwatch_drift_threshold)',
             "ratio", instant=True)], thresholds=[(None, "green"), (0.8, "orange"), (1, "red")],
             span=12))
         .with_row(Row("Score vs threshold per key"))
         .with_panel(_timeseries("Drift: $key", "short", [
             _q('agentwatch_drift_score{key=~"$key"}', "score {{check}} {{statistic}}"),
             _q('agentwatch_drift_threshold{key=~"$key"}',
                "threshold {{check}} {{statistic}}")],
             span=12, height=8)
             .repeat("key").repeat_direction("v")
             .override_by_regexp("threshold.*", [
                 DynamicConfigValue(id_val="custom.lineStyle",
                                    value={"fill": "dash", "dash": [10, 10]}),
                 DynamicConfigValue(id_val="color", value={"mode": "fixed",
                                                           "fixedColor": "red"})]))
         .with_row(Row("Findings"))
         .with_panel(_timeseries("Drift findings / s by detector and severity", "ops", [_q(
             f'sum by (detector, severity) (rate(agentwatch_findings_total{{detector=~'
             f'"{DRIFT_DETECTORS}"}}[{_RATE}]))', "{{detector}} {{severity}}")]))
         .with_panel(_timeseries("Drift resolutions / s", "ops", [_q(
             f'sum by (detector) (rate(agentwatch_findings_resolved_total{{detector=~'
             f'"{DRIFT_DETECTORS}"}}[{_RATE}]))', "{{detector}}")]))
         .with_row(Row("Sampling and embedding"))
         # Windows dropped because embedding fell behind mean keys go unchecked: raise the cap.
         .with_panel(_timeseries("Prompts sampled and embedded / s", "ops", [
             _q(f"sum(rate(agentwatch_drift_prompts_offered_total[{_RATE}]))", "offered"),
             _q(f"sum(rate(agentwatch_embeddings_total[{_RATE}]))", "embedded", ref_id="B"),
             _q(f"sum(rate(agentwatch_embedding_throttled_seconds_total[{_RATE}]))",
                "throttled s/s", ref_id="C")]))
         .with_panel(_timeseries("Windows checked and dropped / s", "ops", [
             _q(f"sum(rate(agentwatch_drift_windows_closed_total[{_RATE}]))", "closed"),
             _q(f"sum by (reason) (rate(agentwatch_drift_windows_dropped_total[{_RATE}]))",
                "dropped {{reason}}", ref_id="B")]))
         .with_panel(_timeseries("Drift checks / s by key and check", "ops", [_q(
             f'sum by (key, check) (rate(agentwatch_drift_checks_total{{key=~"$key"}}[{_RATE}]))',
             "{{key}} {{check}}")], span=12)))
    return to_json(d)


def agents_dashboard() -> dict[str, Any]:
    """Agent loops, hallucinated tool calls, tool outcomes and steps per trace."""
    svc = 'service=~"$service"'
    d = (_base("agentwatch / Agents", "agentwatch-agents",
               "Agent behaviour: loops, hallucinated tools, tool outcomes, steps per trace.")
         .with_variable(_label_variable("service", "agentwatch_tool_calls_total"))
         .with_panel(_stat("Loop findings in range", "short", [_q(
             f'sum(increase(agentwatch_findings_total{{detector=~"{LOOP_DETECTORS}"}}'
             "[$__range]))", "loops", instant=True)], thresholds=[(None, "green"), (1, "red")]))
         .with_panel(_stat("Hallucinated tool findings in range", "short", [_q(
             "sum(increase(agentwatch_findings_total"
             f'{{detector=~"{HALLUCINATED_TOOL_DETECTORS}"}}[$__range]))', "hallucinated",
             instant=True)], thresholds=[(None, "green"), (1, "red")]))
         .with_panel(_stat("Median steps per trace", "short", [_q(
             "histogram_quantile(0.5, sum by (le) (rate(agentwatch_trace_steps_bucket"
             f"{{{svc}}}[$__range])))", "p50", instant=True)]))
         .with_panel(_stat("Tool error ratio", "percentunit", [_q(
             f'sum(rate(agentwatch_tool_calls_total{{{svc},status="error"}}[{_RATE}])) / '
             f"sum(rate(agentwatch_tool_calls_total{{{svc}}}[{_RATE}]))", "errors")],
             thresholds=[(None, "green"), (0.05, "orange"), (0.2, "red")]))
         .with_row(Row("Loops and hallucinated tools"))
         .with_panel(_timeseries("Loop findings / s by severity", "ops", [_q(
             f'sum by (severity) (rate(agentwatch_findings_total{{detector=~"{LOOP_DETECTORS}"}}'
             f"[{_RATE}]))", "{{severity}}")], stacked=True))
         .with_panel(_timeseries("Hallucinated tool findings / s by severity", "ops", [_q(
             "sum by (severity) (rate(agentwatch_findings_total"
             f'{{detector=~"{HALLUCINATED_TOOL_DETECTORS}"}}[{_RATE}]))', "{{severity}}")],
             stacked=True))
         .with_row(Row("Tools and steps"))
         .with_panel(_timeseries("Tool calls / s by tool and status", "ops", [_q(
             f"sum by (tool, status) (rate(agentwatch_tool_calls_total{{{svc}}}[{_RATE}]))",
             "{{tool}} {{status}}")], stacked=True))
         .with_panel(_timeseries("Steps per trace p50 / p95 / mean", "short", [
             _q("histogram_quantile(0.95, sum by (le) (rate(agentwatch_trace_steps_bucket"
                f"{{{svc}}}[{_RATE}])))", "p95"),
             _q("histogram_quantile(0.5, sum by (le) (rate(agentwatch_trace_steps_bucket"
                f"{{{svc}}}[{_RATE}])))", "p50"),
             _q(f"sum(rate(agentwatch_trace_steps_sum{{{svc}}}[{_RATE}])) / "
                f"sum(rate(agentwatch_trace_steps_count{{{svc}}}[{_RATE}]))", "mean")]))
         .with_panel(_timeseries("Finished traces / s by service", "ops", [_q(
             f"sum by (service) (rate(agentwatch_trace_steps_count{{{svc}}}[{_RATE}]))",
             "{{service}}")])))
    return to_json(d)


def gpu_dashboard() -> dict[str, Any]:
    """VRAM per device and process, its growth rate and the projected time to OOM."""
    hosts = 'host=~"$host"'
    d = (_base("agentwatch / GPU", "agentwatch-gpu",
               "VRAM per device and process, leak slope and projected time to threshold.")
         .with_variable(_label_variable("host", "agentwatch_vram_used_bytes"))
         .with_panel(_stat("Soonest time to VRAM threshold", "s", [_q(
             f"min(agentwatch_vram_seconds_to_threshold{{{hosts}}})", "seconds",
             instant=True)], thresholds=[(None, "red"), (900, "orange"), (3600, "green")]))
         .with_panel(_stat("Steepest VRAM slope", "Bps", [_q(
             f"max(agentwatch_vram_slope_bytes_per_second{{{hosts}}})", "slope",
             instant=True)]))
         .with_panel(_stat("Fullest device", "percentunit", [_q(
             f'max(sum by (host, gpu) (agentwatch_vram_used_bytes{{{hosts},pid="0"}}) / '
             f"sum by (host, gpu) (agentwatch_vram_total_bytes{{{hosts}}}))", "used",
             instant=True)], thresholds=[(None, "green"), (0.8, "orange"), (0.95, "red")]))
         .with_panel(_stat("VRAM findings in range", "short", [_q(
             f'sum(increase(agentwatch_findings_total{{detector=~"{VRAM_DETECTORS}"}}'
             "[$__range]))", "findings", instant=True)]))
         .with_row(Row("Devices"))
         .with_panel(_timeseries("VRAM used per device", "bytes", [
             _q(f'agentwatch_vram_used_bytes{{{hosts},pid="0"}}', "{{host}} gpu{{gpu}}"),
             _q(f"agentwatch_vram_total_bytes{{{hosts}}}", "total {{host}} gpu{{gpu}}")]))
         .with_panel(_timeseries("VRAM used per process", "bytes", [_q(
             f'agentwatch_vram_used_bytes{{{hosts},pid!="0"}}',
             "{{host}} gpu{{gpu}} {{process}} ({{pid}})")], stacked=True))
         .with_row(Row("Leak trend"))
         .with_panel(_timeseries("VRAM slope by gpu/process", "Bps", [_q(
             f"agentwatch_vram_slope_bytes_per_second{{{hosts}}}",
             "{{host}} gpu{{gpu}} {{process}} ({{pid}})")]))
         .with_panel(_timeseries("Projected time to VRAM threshold", "s", [_q(
             f"agentwatch_vram_seconds_to_threshold{{{hosts}}}",
             "{{host}} gpu{{gpu}} {{process}} ({{pid}})")],
             thresholds=[(None, "red"), (900, "orange"), (3600, "green")])))
    return to_json(d)


DASHBOARD_BUILDERS: dict[str, Callable[[], dict[str, Any]]] = {
    "overview": overview_dashboard,
    "drift": drift_dashboard,
    "agents": agents_dashboard,
    "gpu": gpu_dashboard,
}


def all_dashboards() -> list[dict[str, Any]]:
    """Every agentwatch dashboard as Grafana dashboard JSON."""
    return [build() for build in DASHBOARD_BUILDERS.values()]


@functools.cache
def dashboard_index() -> dict[str, dict[str, Any]]:
    """Per dashboard uid: its ``title``, ``panels`` (panel title -> panel id, as ``viewPanel``
    takes it) and ``variables`` (template variable names); what alert deep links point at."""
    return {d["uid"]: {"title": d["title"],
                       "panels": {p["title"]: p["id"] for p in _walk_panels(d)
                                  if p.get("type") != "row" and p.get("title")},
                       "variables": tuple(v["name"] for v in d.get("templating", {}).get("list", []))}
            for d in all_dashboards()}


def to_json(dashboard: Dashboard) -> dict[str, Any]:
    """The SDK model as plain JSON data, with panel ids Grafana needs for links and repeats."""
    data = json.loads(json.dumps(dashboard.build(), cls=JSONEncoder))
    data.pop("id", None)  # Grafana assigns database ids; a fixed one would clash on import
    for panel_id, panel in enumerate(_walk_panels(data), start=1):
        panel["id"] = panel_id
        if panel.get("options") is None and panel.get("type") != "row":
            panel["options"] = {}  # Grafana merges the plugin's defaults into an object
    for variable in data.get("templating", {}).get("list", []):
        # The SDK fills a placeholder UUID; Grafana keys variables by name.
        variable.pop("id", None)
    return data


def _walk_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # collapsed rows nest their panels


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression a dashboard runs: panel targets, variables and annotations."""
    queries = [target["expr"] for panel in _walk_panels(dashboard)
               for target in panel.get("targets", []) if target.get("expr")]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query" and isinstance(variable.get("query"), str):
            queries.append(variable["query"])
    for annotation in dashboard.get("annotations", {}).get("list", []):
        if annotation.get("expr"):
            queries.append(annotation["expr"])
    return queries


_PROMQL_KEYWORDS = frozenset({
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset", "atan2", "inf", "nan"})
_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_BRACES = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or ``label_values(metric, label)``) selects.

    A light lexer, enough for the dashboards' queries: strings, label matchers, ranges and
    grouping clauses are removed, then every identifier not followed by ``(`` and not a
    keyword is a metric name.
    """
    text = _STRING.sub('""', expr)
    text = _BRACES.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = re.sub(r"\$\w+", " ", text)  # Grafana variables such as $__range
    label_values = re.match(r"\s*label_values\s*\(\s*([A-Za-z_:][A-Za-z0-9_:]*)", text)
    if label_values:
        return {label_values.group(1)}
    names: set[str] = set()
    for match in _IDENT.finditer(text):
        rest = text[match.end():].lstrip()
        word = match.group(0)
        if rest.startswith("(") or word.lower() in _PROMQL_KEYWORDS:
            continue
        before = text[match.start() - 1] if match.start() else " "
        if before.isdigit() or before == ".":
            continue  # exponent or unit suffix of a number literal such as 1e3
        names.add(word)
    return names


def write_provisioning(directory: Path = DASHBOARD_JSON_DIR) -> list[Path]:
    """Write every dashboard as ``<uid>.json`` under ``directory`` (the file provider's path)."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for dashboard in all_dashboards():
        path = directory / f"{dashboard['uid']}.json"
        path.write_text(json.dumps(dashboard, indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written
