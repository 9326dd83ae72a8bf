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
from test_prometheus_scrape import _get, _query, _query_range, _stop, _substitute

from agentwatch.broker import free_port, wait_for_port
from agentwatch.collectors.gpu_sim import produce_simulated
from agentwatch.dashboards import grafana
from agentwatch.settings import Settings
from agentwatch.stack import Stack
from agentwatch.traffic import AgentTraffic, otlp_grpc_exporter_factory
from tests.support.receivers import SlackReceiver

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

        traffic_started_at = time.time()
        traffic = AgentTraffic(otlp_grpc_exporter_factory(settings.otlp_grpc_port), seed=3,
                               incidents=("loop", "unknown_tool", "errors", "cost_spike", "drift"),
                               schedule_delay_ms=100)
        runs, seconds = 600, 24.0
        started = time.monotonic()
        for i in range(runs):
            traffic.run(time.time_ns(), progress=i / runs)
            time.sleep(max(0.0, started + seconds * (i + 1) / runs - time.monotonic()))
        traffic.shutdown()
        # Then the incidents end and the drifted service's prompts return to normal. Drift compares
        # each window with the previous ones, so it resolves only once calm windows have filled
        # that history; how many calm seconds that takes depends on how busy the machine is, so
        # calm traffic goes on (at least 12 s) until Prometheus has seen the resolve.
        calm = AgentTraffic(otlp_grpc_exporter_factory(settings.otlp_grpc_port), seed=4, schedule_delay_ms=100)
        runs_per_s, min_runs = 25, 300
        started = time.monotonic()
        calm_deadline = started + 120
        runs = 0
        while True:
            calm.run(time.time_ns())
            runs += 1
            time.sleep(max(0.0, started + runs / runs_per_s - time.monotonic()))
            if runs >= min_runs and runs % runs_per_s == 0:
                if _query(base, 'agentwatch_findings_resolved_total{detector="drift"}'):
                    break
                assert time.monotonic() < calm_deadline, (
                    f"drift had not resolved after {runs} calm runs ({runs / runs_per_s:.0f} s)")
        calm.shutdown()

        # Wait until every target is up and the late series (the drift resolve, notifier
        # deliveries) have been scraped at least twice, so rate() has two points.
        late = {"both targets up": "sum(up) == 2",
                "drift scores scraped twice": "count_over_time(agentwatch_drift_score[1m]) >= 2",
                "drift resolve scraped twice":
                    'count_over_time(agentwatch_findings_resolved_total{detector="drift"}[1m]) >= 2',
                "deliveries scraped twice": "count_over_time(agentwatch_notifier_deliveries_total[1m]) >= 2"}
        deadline = time.monotonic() + 60
        while missing := [what for what, expr in late.items() if not _query(base, expr)]:
            assert time.monotonic() < deadline, f"never ready: {missing}"
            time.sleep(1.0)
        yield base, receiver, traffic_started_at
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
    """Over the run, as a panel showing that time range would: the annotation queries (findings
    over the last minute) have data while incidents happen, not necessarily at the end."""
    base, _, traffic_started_at = scraped_stack
    now = time.time()
    empty = []
    for expr in grafana.dashboard_queries(dashboard):
        if expr.startswith("label_values("):
            metric, label = [part.strip() for part in expr[len("label_values("):-1].split(",")]
            if not _get(f"{base}/api/v1/label/{label}/values?{urllib.parse.urlencode({'match[]': metric})}"):
                empty.append(expr)
        elif not _query_range(base, _substitute(expr), traffic_started_at, now):
            empty.append(expr)
    assert not empty, "queries without data from the real worker:\n" + "\n".join(empty)


def test_scraped_counts_match_what_the_pipeline_did(scraped_stack):
    base, receiver, _ = scraped_stack
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
