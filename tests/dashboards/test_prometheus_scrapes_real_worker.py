"""A real Prometheus scrapes the real stack's worker and notifier; every dashboard query has data.

The traffic is the demo's, through the real path (OTel SDK -> rotel -> Tansu -> Faust worker),
with incidents so findings exist, a malformed record for the dead-letter series, a simulated
leaking GPU for the VRAM panels, a drifted service for the drift panels, and a local receiver
standing in for Slack so the notifier delivers.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.parse

import pytest
from test_prometheus_scrape import _get, _query, _stop, _substitute

from agentwatch.alerts.testing import SlackReceiver
from agentwatch.broker import free_port, wait_for_port
from agentwatch.collectors.gpu_sim import produce_simulated
from agentwatch.dashboards import grafana
from agentwatch.settings import Settings
from agentwatch.stack import Stack
from agentwatch.traffic import AgentTraffic, otlp_grpc_exporter_factory

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def scraped_stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("real-worker")
    receiver = SlackReceiver().up()
    routes = tmp / "routes.yaml"
    routes.write_text(f"destinations:\n  slack:\n    type: slack\n    webhook_url: {receiver.url}/hook\n"
                      "default_destinations: [slack]\n")
    metrics_port = free_port()  # the worker's; the notifier serves on the next port
    settings = Settings(broker_port=free_port(), otlp_grpc_port=free_port(), otlp_http_port=free_port(),
                        metrics_port=metrics_port, data_dir=tmp / "data", alert_routes=routes,
                        alerts_state_dir=tmp / "alerts", gpu_exporter="off", snapshot_flush_seconds=0.5,
                        drift_window_s=4.0, drift_sample_size=40,
                        detectors={"cost_anomaly": {"interval_s": 1.0, "min_history": 5},
                                   "slo": {"window_s": 10.0, "min_calls": 10, "error_rate_threshold": 0.1}})
    stack = Stack(settings, say=lambda _m: None).start()
    prom = None
    try:
        # Prometheus first, so it sees counters move (annotations use increase() over 1m).
        prom_port = free_port()
        config = tmp / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: agentwatch\n    static_configs:\n"
            f"      - targets: ['127.0.0.1:{metrics_port}', '127.0.0.1:{metrics_port + 1}']\n")
        binary = shutil.which("prometheus")
        assert binary, "Prometheus missing: make test installs Debian's prometheus"
        prom = subprocess.Popen([binary, f"--config.file={config}", f"--web.listen-address=127.0.0.1:{prom_port}",
                                 f"--storage.tsdb.path={tmp / 'tsdb'}"], stdout=open(tmp / "prometheus.log", "wb"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        wait_for_port(prom_port, 30, prom)
        base = f"http://127.0.0.1:{prom_port}"
        _wait_ready(base)
        from kafka import KafkaProducer

        producer = KafkaProducer(bootstrap_servers=stack.bootstrap_servers)
        producer.send("otlp_spans", b"\x00 not an export request")
        producer.flush()
        # 1,500 s of backfilled history ends just after the leak turns critical (~1,440 s), so
        # the VRAM gauges are fresh (they expire 300 s of event time after their last finding).
        produce_simulated(stack.bootstrap_servers, profile="leak", duration_s=1500.0)

        traffic = AgentTraffic(otlp_grpc_exporter_factory(settings.otlp_grpc_port), seed=3,
                               incidents=("loop", "unknown_tool", "errors", "cost_spike", "drift"),
                               schedule_delay_ms=100)
        runs, seconds = 600, 24.0
        started = time.monotonic()
        for i in range(runs):
            traffic.run(time.time_ns(), progress=i / runs)
            time.sleep(max(0.0, started + seconds * (i + 1) / runs - time.monotonic()))
        traffic.shutdown()
        # Then the incidents end: the drifted service's prompts return to normal, so drift resolves.
        calm = AgentTraffic(otlp_grpc_exporter_factory(settings.otlp_grpc_port), seed=4, schedule_delay_ms=100)
        started = time.monotonic()
        for i in range(300):
            calm.run(time.time_ns())
            time.sleep(max(0.0, started + 12.0 * (i + 1) / 300 - time.monotonic()))
        calm.shutdown()

        deadline = time.monotonic() + 90
        # Drift windows close a few seconds after traffic ends; wait until every target is up and
        # the late series (drift, notifier deliveries) have been scraped at least twice.
        while time.monotonic() < deadline:
            up = _query(base, "sum(up)")
            ready = (up and float(up[0]["value"][1]) == 2
                     and _query(base, "count_over_time(agentwatch_drift_score[1m]) >= 2")
                     and _query(base, 'agentwatch_findings_resolved_total{detector="drift"}')
                     and _query(base, "count_over_time(agentwatch_notifier_deliveries_total[1m]) >= 2"))
            if ready:
                break
            time.sleep(1.0)
        yield base, receiver
    finally:
        if prom is not None:
            _stop(prom)
        stack.stop()
        receiver.down()


def _wait_ready(base: str, timeout_s: float = 60.0) -> None:
    """Prometheus answers 503 on its API until it has loaded; /-/ready says when."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        assert time.monotonic() < deadline, "Prometheus never became ready"
        time.sleep(0.2)


@pytest.mark.parametrize("dashboard", grafana.all_dashboards(), ids=lambda d: d["uid"])
def test_every_dashboard_query_returns_series_from_the_real_worker(scraped_stack, dashboard):
    base, _ = scraped_stack
    empty = []
    for expr in grafana.dashboard_queries(dashboard):
        if expr.startswith("label_values("):
            metric, label = [part.strip() for part in expr[len("label_values("):-1].split(",")]
            if not _get(f"{base}/api/v1/label/{label}/values?{urllib.parse.urlencode({'match[]': metric})}"):
                empty.append(expr)
        elif not _query(base, _substitute(expr)):
            empty.append(expr)
    assert not empty, "queries without data from the real worker:\n" + "\n".join(empty)


def test_scraped_counts_match_what_the_pipeline_did(scraped_stack):
    base, receiver = scraped_stack
    loops = _query(base, 'sum(agentwatch_findings_total{detector="agent_loop"})')
    assert loops and float(loops[0]["value"][1]) >= 1
    dead = _query(base, 'sum(agentwatch_dead_letter_total{topic="otlp_spans"})')
    assert dead and float(dead[0]["value"][1]) == 1
    deadline = time.monotonic() + 20  # the last deliveries may not be scraped yet
    while True:
        delivered = _query(base, 'sum(agentwatch_notifier_deliveries_total{destination="slack"})')
        count = float(delivered[0]["value"][1]) if delivered else -1
        if count == len(receiver.requests) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert count == len(receiver.requests) > 0
