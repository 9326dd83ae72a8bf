"""A real Prometheus (Debian package) scrapes a running worker; the dashboards' PromQL returns data.

``METRICS_PROCESS_COMMAND`` is the process scraped: today the metrics fixture, which feeds
PipelineMetrics real events; switch it to ``agentwatch worker --metrics-port {port} ...`` (or
set AGENTWATCH_TEST_METRICS_CMD) once the worker is fed by the embedded stack.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections import defaultdict
from pathlib import Path

import pytest

from agentwatch.broker import free_port, wait_for_port
from agentwatch.dashboards import grafana

METRICS_PROCESS_COMMAND = os.environ.get(
    "AGENTWATCH_TEST_METRICS_CMD",
    f"{shlex.quote(sys.executable)} -m tests.support.metrics_fixture --port {{port}}")
USES_FIXTURE = "tests.support.metrics_fixture" in METRICS_PROCESS_COMMAND
SCRAPES_BEFORE_QUERYING = 6
# What Grafana would substitute: one value per template variable ("All" is ".*").
GRAFANA_VARIABLES = {"$__rate_interval": "10s", "$__range": "1m", "$service": ".*",
                     "$project": ".*", "$prompt": ".*", "$key": ".*", "$host": ".*"}

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    binary = shutil.which("prometheus")
    assert binary, "Prometheus missing: apt-get install -y --no-install-recommends prometheus"
    tmp = tmp_path_factory.mktemp("prometheus")
    worker_port, prom_port = free_port(), free_port()
    worker = subprocess.Popen(shlex.split(METRICS_PROCESS_COMMAND.format(port=worker_port)),
                              stdout=open(tmp / "worker.log", "wb"), stderr=subprocess.STDOUT,
                              start_new_session=True, cwd=ROOT)  # -m tests.support... from the checkout
    config = tmp / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: agentwatch-worker\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{worker_port}']\n")
    prom = subprocess.Popen(
        [binary, f"--config.file={config}", f"--web.listen-address=127.0.0.1:{prom_port}",
         f"--storage.tsdb.path={tmp / 'data'}", "--storage.tsdb.retention.time=1h"],
        stdout=open(tmp / "prometheus.log", "wb"), stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        wait_for_port(worker_port, 30, worker)
        wait_for_port(prom_port, 30, prom)
        base = f"http://127.0.0.1:{prom_port}"
        deadline = time.monotonic() + 60
        while True:
            scrapes = _query(base, 'count_over_time(up{job="agentwatch-worker"}[1m])')
            if scrapes and float(scrapes[0]["value"][1]) >= SCRAPES_BEFORE_QUERYING:
                break
            assert time.monotonic() < deadline, (tmp / "prometheus.log").read_text()[-2000:]
            time.sleep(0.5)
        up = _query(base, 'up{job="agentwatch-worker"}')
        assert up and up[0]["value"][1] == "1", (tmp / "worker.log").read_text()[-2000:]
        yield base
    finally:
        _stop(prom)
        _stop(worker)


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]


def _query(base: str, expr: str) -> list[dict]:
    data = _get(f"{base}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")
    return data["result"] if data["resultType"] == "vector" else [data["result"]]


def _query_range(base: str, expr: str, start: float, end: float, step_s: float = 1.0) -> list[dict]:
    """The series ``expr`` has at any step from ``start`` to ``end``: what a panel over that range shows."""
    params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step_s:g}"}
    return _get(f"{base}/api/v1/query_range?{urllib.parse.urlencode(params)}")["result"]


def _substitute(expr: str) -> str:
    for variable, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unsubstituted variable in {expr!r}"
    return expr


@pytest.mark.parametrize("dashboard", grafana.all_dashboards(), ids=lambda d: d["uid"])
def test_every_dashboard_query_returns_series(prometheus, dashboard):
    empty = []
    for expr in grafana.dashboard_queries(dashboard):
        if expr.startswith("label_values("):
            metric, label = [part.strip() for part in expr[len("label_values("):-1].split(",")]
            values = _get(f"{prometheus}/api/v1/label/{label}/values?"
                          f"{urllib.parse.urlencode({'match[]': metric})}")
            if not values:
                empty.append(expr)
            continue
        if not _query(prometheus, _substitute(expr)):
            empty.append(expr)
    assert not empty, "queries without data:\n" + "\n".join(empty)


@pytest.mark.skipif(not USES_FIXTURE, reason="exact values are known for the metrics fixture only")
def test_scraped_values_match_the_fed_events(prometheus):
    from tests.support.metrics_fixture import deterministic_batches

    batches = deterministic_batches()
    input_by_model: dict[str, int] = defaultdict(int)
    errors_by_model: dict[str, int] = defaultdict(int)
    for call in batches.llm_calls:
        input_by_model[call.model] += call.input_tokens
        errors_by_model[call.model] += call.status == "error"
    got = {r["metric"]["model"]: float(r["value"][1]) for r in _query(
        prometheus,
        'sum by (model) (agentwatch_llm_tokens_total{service="checkout",direction="input"})')}
    assert got == {model: float(n) for model, n in input_by_model.items()}
    got = {r["metric"]["model"]: float(r["value"][1]) for r in _query(
        prometheus, 'sum by (model) (agentwatch_llm_errors_total{service="checkout"})')}
    assert got == {model: float(n) for model, n in errors_by_model.items()}

    calls_by_version: dict[str, int] = defaultdict(int)
    cost_by_version: dict[str, float] = defaultdict(float)
    for call in batches.llm_calls:
        if call.prompt_name:
            calls_by_version[call.prompt_version] += 1
            cost_by_version[call.prompt_version] += call.cost_usd
    assert len(calls_by_version) == 2
    prompt = '{service="checkout",prompt="checkout-assistant"}'
    got = {r["metric"]["version"]: float(r["value"][1]) for r in _query(
        prometheus, f"sum by (version) (agentwatch_prompt_calls_total{prompt})")}
    assert got == {version: float(n) for version, n in calls_by_version.items()}
    got = {r["metric"]["version"]: float(r["value"][1]) for r in _query(
        prometheus, f"sum by (version) (agentwatch_prompt_cost_usd_total{prompt})")}
    assert got == pytest.approx(cost_by_version)
    got = {r["metric"]["version"]: float(r["value"][1]) for r in _query(
        prometheus, f"sum by (version) (agentwatch_prompt_latency_seconds_count{prompt})")}
    assert got == {version: float(n) for version, n in calls_by_version.items()}

    last_device = [s for s in batches.gpu_samples if s.pid == 0][-1]
    (device,) = _query(prometheus, 'agentwatch_vram_used_bytes{host="gpu-a",pid="0"}')
    assert float(device["value"][1]) == last_device.memory_used_bytes
    (total,) = _query(prometheus, 'agentwatch_vram_total_bytes{host="gpu-a"}')
    assert float(total["value"][1]) == last_device.memory_total_bytes

    vram = next(f for f in batches.findings if f.detector.startswith("vram"))
    (slope,) = _query(prometheus, "agentwatch_vram_slope_bytes_per_second")
    assert slope["metric"]["pid"] == str(vram.evidence["pid"])
    assert slope["metric"]["process"] == vram.evidence["process_name"]
    # MiB per minute -> bytes per second
    assert float(slope["value"][1]) == vram.evidence["leak_mib_per_min"] * 1024 * 1024 / 60
    (eta,) = _query(prometheus, "agentwatch_vram_seconds_to_threshold")
    assert float(eta["value"][1]) == vram.evidence["eta_s"]

    # The latest check of each key and check kind, one series per deciding statistic.
    latest = {(c.key, c.kind): c for c in batches.drift_checks}
    expected = {(key, kind, name): (verdict["score"], verdict["threshold"])
                for (key, kind), check in latest.items()
                for name, verdict in check.evidence.scores.items()}
    scraped = {}
    for name in ("agentwatch_drift_score", "agentwatch_drift_threshold"):
        for r in _query(prometheus, f'{name}{{key!~"project=live.*"}}'):
            m = r["metric"]
            scraped.setdefault((m["key"], m["check"], m["statistic"]), {})[name] = float(
                r["value"][1])
    assert {k: (v["agentwatch_drift_score"], v["agentwatch_drift_threshold"])
            for k, v in scraped.items()} == expected
    over = _query(prometheus, "agentwatch_drift_score > agentwatch_drift_threshold")
    assert {(r["metric"]["key"], r["metric"]["check"], r["metric"]["statistic"])
            for r in over} == {k for k, (score, threshold) in expected.items()
                               if score > threshold}
    (checks,) = _query(prometheus, 'agentwatch_drift_checks_total{key="project=support/'
                                   'model=claude-sonnet-4",check="drift"}')
    assert float(checks["value"][1]) == 2

    (folded,) = _query(prometheus, "sum(agentwatch_metric_label_sets_folded_total)")
    assert float(folded["value"][1]) > 0, "the fixture's fuzz tools must hit the cardinality cap"
