"""What can be checked of the production stack without a Docker engine.

The compose file parses and every file it references exists; services wire together by name;
`promtool check config` accepts deploy/prometheus.yml; the collector config writes the topics,
encoding and keys the workers consume.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from agentwatch.broker import DEFAULT_TOPICS, MAX_MESSAGE_BYTES
from agentwatch.dashboards import grafana

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
COLLECTOR = yaml.safe_load((ROOT / "collectors" / "otelcol-contrib.yaml").read_text())
PROMETHEUS = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
WORKER_METRICS_PORT = 9108


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def test_services_present_and_images_pinned():
    assert {"kafka", "kafka-init", "otelcol", "worker", "prometheus", "grafana",
            "dcgm-exporter"} <= set(SERVICES)
    assert "zookeeper" not in SERVICES
    for name, service in SERVICES.items():
        if "image" in service and "build" not in service:
            image = service["image"]
            assert ":" in image and not image.endswith(":latest"), f"{name}: pin {image}"
    assert SERVICES["dcgm-exporter"]["profiles"] == ["gpu"]
    assert all("profiles" not in s for n, s in SERVICES.items() if n != "dcgm-exporter")


def test_referenced_files_exist():
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in COMPOSE["volumes"], f"{name} uses undeclared volume {source}"
        build = service.get("build")
        if build:
            context = ROOT / build["context"]
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            assert dockerfile.is_file()
            for line in dockerfile.read_text().splitlines():
                if line.startswith(("COPY", "ADD")) and "--from" not in line:
                    for source in line.split()[1:-1]:
                        assert (context / source).exists(), f"Dockerfile copies missing {source}"
    dockerignore = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in dockerignore and ".git" in dockerignore


def test_depends_on_names_services():
    for name, service in SERVICES.items():
        for dependency in service.get("depends_on", []):
            assert dependency in SERVICES, f"{name} depends on unknown {dependency}"


def test_workers_scale_and_run_the_worker_command():
    worker = SERVICES["worker"]
    assert "container_name" not in worker and "ports" not in worker, "breaks --scale"
    assert worker["command"] == ["worker", "--bootstrap-servers", "kafka:9092",
                                 "--metrics-port", str(WORKER_METRICS_PORT)]
    env = _env(worker)
    assert env and all(key.startswith("AGENTWATCH_") for key in env)
    assert env["AGENTWATCH_METRICS_ADDR"] == "0.0.0.0", "Prometheus scrapes from another container"
    assert str(WORKER_METRICS_PORT) in [str(p) for p in worker["expose"]]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["agentwatch"]' in dockerfile


def test_kafka_is_kraft_and_topics_match_the_embedded_broker():
    env = _env(SERVICES["kafka"])
    assert "controller" in env["KAFKA_PROCESS_ROLES"] and "broker" in env["KAFKA_PROCESS_ROLES"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].endswith("@kafka:9093")
    assert int(env["KAFKA_MESSAGE_MAX_BYTES"]) == MAX_MESSAGE_BYTES
    script = SERVICES["kafka-init"]["command"][0]
    specs = dict(spec.split(":") for spec in re.search(r"for spec in ([^;]+);", script)
                 .group(1).split())
    assert {topic: int(n) for topic, n in specs.items()} == dict(DEFAULT_TOPICS)
    assert f"max.message.bytes={MAX_MESSAGE_BYTES}" in script


def test_collector_writes_what_the_workers_read():
    kafka = COLLECTOR["exporters"]["kafka"]
    assert kafka["traces"] == {"topic": "otlp_spans", "encoding": "otlp_proto"}
    assert kafka["logs"] == {"topic": "otlp_logs", "encoding": "otlp_proto"}
    assert kafka["partition_traces_by_id"] is True
    assert kafka["producer"]["max_message_bytes"] <= MAX_MESSAGE_BYTES
    assert kafka["traces"]["topic"] in DEFAULT_TOPICS and kafka["logs"]["topic"] in DEFAULT_TOPICS
    # ${env:KAFKA_BROKERS} resolves from the compose service environment to the kafka service.
    (broker,) = kafka["brokers"]
    variable = re.fullmatch(r"\$\{env:(\w+)\}", broker).group(1)
    assert _env(SERVICES["otelcol"])[variable] == "kafka:9092"
    pipelines = COLLECTOR["service"]["pipelines"]
    for signal in ("traces", "logs"):
        assert pipelines[signal]["exporters"] == ["kafka"]
        assert pipelines[signal]["receivers"] == ["otlp"]
        for processor in pipelines[signal]["processors"]:
            assert processor in COLLECTOR["processors"]
    grpc = COLLECTOR["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    assert grpc.endswith(":4317") and "4317:4317" in SERVICES["otelcol"]["ports"]
    mount = next(v for v in SERVICES["otelcol"]["volumes"] if "otelcol-contrib.yaml" in v)
    assert mount.split(":")[1] in " ".join(SERVICES["otelcol"]["command"])
    assert COLLECTOR["processors"]["batch"]["send_batch_max_size"] <= 1000


def test_prometheus_config_is_valid_and_scrapes_the_workers():
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: apt-get install -y prometheus"
    done = subprocess.run([promtool, "check", "config", str(ROOT / "deploy" / "prometheus.yml")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    jobs = {job["job_name"]: job for job in PROMETHEUS["scrape_configs"]}
    (workers,) = jobs["agentwatch-worker"]["dns_sd_configs"]
    assert workers["names"] == ["worker"] and workers["port"] == WORKER_METRICS_PORT
    assert jobs["otelcol"]["static_configs"][0]["targets"] == ["otelcol:8888"]
    mount = next(v for v in SERVICES["prometheus"]["volumes"] if v.startswith("./deploy/"))
    assert mount.split(":")[1] in " ".join(SERVICES["prometheus"]["command"])


def test_grafana_is_provisioned_from_the_repository():
    volumes = SERVICES["grafana"]["volumes"]
    assert "./dashboards/provisioning:/etc/grafana/provisioning:ro" in volumes
    env = _env(SERVICES["grafana"])
    assert env["GF_SECURITY_ADMIN_PASSWORD"].startswith("${"), "secrets come from the environment"
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    local = Path(home.replace("/etc/grafana/provisioning", str(grafana.PROVISIONING_DIR), 1))
    assert local.is_file()
    datasource = yaml.safe_load(
        (grafana.PROVISIONING_DIR / "datasources" / "agentwatch.yaml").read_text())
    host = datasource["datasources"][0]["url"].split("//")[1].split(":")[0]
    assert host in SERVICES


@pytest.mark.parametrize("path", ["docker-compose.yml", "deploy/prometheus.yml",
                                  "collectors/otelcol-contrib.yaml"])
def test_no_literal_secrets(path):
    text = (ROOT / path).read_text().lower()
    for word in ("password:", "token:", "webhook_url:", "routing_key:"):
        for line in text.splitlines():
            if word in line and not line.strip().startswith("#"):
                assert "${" in line, f"{path}: {line.strip()}"
