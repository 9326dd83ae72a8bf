"""Who may send and read: the production compose stack and the embedded `up`.

Production: otelcol's OTLP receivers require a bearer token from the environment, only OTLP and
Grafana are published on the host, Grafana needs a login with a password from the environment.
Embedded: the receivers bind loopback unless asked; another address warns, and since rotel cannot
check a token the warning says so instead of taking a token as protection. What actually listens
where on a running embedded stack: tests/integration/test_access_listeners.py.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from agentwatch.cli import up
from agentwatch.collectors.rotel import RECEIVER_AUTH, RotelConfig, rotel_binary
from agentwatch.settings import Settings
from agentwatch.stack import Stack, StackError, is_loopback, otlp_exposure_warning, settings_env

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
COLLECTOR = yaml.safe_load((ROOT / "collectors" / "otelcol-contrib.yaml").read_text())

# Published on purpose: what apps send to (token required) and what people log in to.
PUBLISHED = {"otelcol": {4317, 4318}, "grafana": {3000}}
LOOPBACK_HOSTS = {"127.0.0.1", "::1", "[::1]", "localhost"}


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _interpolate_default(text: str) -> str:
    """What compose makes of ``${VAR:-default}`` when VAR is unset (the case that must be safe)."""
    return re.sub(r"\$\{\w+:?-([^}]*)\}", r"\1", text)


def _published(spec: str | int | dict) -> tuple[str | None, int]:
    """(host address or None for all interfaces, container port) of one `ports:` entry."""
    if isinstance(spec, dict):
        return spec.get("host_ip"), int(str(spec["target"]).split("/")[0])
    text = _interpolate_default(str(spec)).split("/")[0]
    if text.startswith("["):  # [::1]:9090:9090
        host, rest = text[1:].split("]:", 1)
        return host, int(rest.rsplit(":", 1)[-1])
    parts = text.split(":")
    host = parts[0] if len(parts) == 3 else None
    return host, int(parts[-1])


@pytest.mark.parametrize("spec, expected", [
    ("4317:4317", (None, 4317)), ("127.0.0.1:9090:9090", ("127.0.0.1", 9090)), ("9108", (None, 9108)),
    ("${P:-127.0.0.1:9090}:9090", ("127.0.0.1", 9090)), ("[::1]:9090:9090", ("::1", 9090)),
    ({"target": 3000, "published": 3000, "host_ip": "127.0.0.1"}, ("127.0.0.1", 3000)),
])
def test_port_spec_parsing(spec, expected):
    assert _published(spec) == expected


# --- production: otelcol-contrib and docker-compose.yml -----------------------------------------

def test_every_otlp_receiver_protocol_requires_the_bearer_token():
    extensions = COLLECTOR["extensions"]
    enabled = COLLECTOR["service"]["extensions"]
    receivers = {name for pipeline in COLLECTOR["service"]["pipelines"].values()
                 for name in pipeline["receivers"]}
    assert receivers == {"otlp"}, "a new network receiver needs an authenticator too"
    protocols = COLLECTOR["receivers"]["otlp"]["protocols"]
    assert set(protocols) == {"grpc", "http"}
    for name, protocol in protocols.items():
        authenticator = (protocol.get("auth") or {}).get("authenticator")
        assert authenticator, f"otlp {name} accepts unauthenticated requests"
        assert authenticator.split("/")[0] == "bearertokenauth"
        assert authenticator in extensions and authenticator in enabled, \
            f"{authenticator} must be declared and listed in service.extensions"


def test_the_token_comes_from_the_environment_and_compose_requires_it():
    (auth,) = [cfg for name, cfg in COLLECTOR["extensions"].items() if name.split("/")[0] == "bearertokenauth"]
    assert auth.get("scheme", "Bearer") == "Bearer"
    assert "filename" not in auth  # a token file would take precedence over the variable
    variable = re.fullmatch(r"\$\{env:(\w+)\}", auth["token"]).group(1)
    assert variable == "AGENTWATCH_OTLP_TOKEN"
    # ${VAR:?message}: compose refuses to start when it is unset or empty; no default token.
    assert re.fullmatch(rf"\$\{{{variable}:\?[^}}]+\}}", _env(SERVICES["otelcol"])[variable])


def test_only_otlp_and_grafana_are_published_beyond_loopback():
    for name, service in SERVICES.items():
        for spec in service.get("ports", []):
            host, port = _published(spec)
            if host in LOOPBACK_HOSTS:
                continue
            assert port in PUBLISHED.get(name, set()), \
                f"{name} publishes {spec!r} on every interface: keep it on the compose network"
    for name in ("kafka", "worker", "prometheus"):
        assert all(_published(spec)[0] in LOOPBACK_HOSTS for spec in SERVICES[name].get("ports", [])), name
    # Kafka's listeners stay on the compose network under the service's name.
    assert _env(SERVICES["kafka"])["KAFKA_ADVERTISED_LISTENERS"] == "PLAINTEXT://kafka:9092"


def test_grafana_needs_a_login_with_a_password_from_the_environment():
    env = _env(SERVICES["grafana"])
    assert re.fullmatch(r"\$\{GRAFANA_ADMIN_PASSWORD:\?[^}]+\}", env["GF_SECURITY_ADMIN_PASSWORD"]), \
        "required from the environment, with no default"
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert env["GF_USERS_ALLOW_SIGN_UP"] == "false"
    assert env.get("GF_AUTH_DISABLE_LOGIN_FORM", "false") == "false"
    assert env["GF_SNAPSHOTS_EXTERNAL_ENABLED"] == "false"


def test_no_secret_has_a_default_value():
    """A secret-named variable is required (``:?``) or empty by default (the feature is off)."""
    anchors = {k: v for k, v in COMPOSE.items() if k.startswith("x-")}
    envs = [("x-" + k, v) for k, v in anchors.items()] + [(n, _env(s)) for n, s in SERVICES.items()]
    for owner, env in envs:
        for key, value in env.items():
            if not re.search(r"PASSWORD|TOKEN|SECRET|ROUTING_KEY|WEBHOOK", key):
                continue
            for default in re.findall(r"\$\{\w+:?-([^}]*)\}", str(value)):
                assert default == "", f"{owner}.{key} defaults to a value: {value}"
            assert "${" in str(value), f"{owner}.{key} is a literal"


# --- embedded: rotel and `up` --------------------------------------------------------------------

def test_rotel_offers_no_receiver_authentication():
    """The evidence behind RECEIVER_AUTH = False: no receiver option takes a token, header or TLS.

    When this fails, rotel has grown receiver authentication: wire AGENTWATCH_OTLP_TOKEN into
    RotelConfig, set RECEIVER_AUTH and test an export without the header is refused.
    """
    help_text = subprocess.run([rotel_binary(), "start", "--help"], capture_output=True, text=True,
                               timeout=30, check=True).stdout
    options = set(re.findall(r"^\s+(--[a-z0-9-]+)", help_text, flags=re.M))
    assert "--otlp-grpc-endpoint" in options and "--otlp-exporter-authenticator" in options  # parsed
    receiver_auth = sorted(o for o in options if "exporter" not in o
                           and re.search(r"auth|token|bearer|header|tls|cert", o))
    assert receiver_auth == [], f"rotel now has {receiver_auth}"
    assert RECEIVER_AUTH is False


@pytest.mark.parametrize("bind_addr, endpoint", [
    ("127.0.0.1", "127.0.0.1:{}"), ("0.0.0.0", "0.0.0.0:{}"), ("::", "[::]:{}"), ("[::1]", "[::1]:{}"),
])
def test_rotel_binds_the_configured_address(bind_addr, endpoint):
    command = RotelConfig(brokers="127.0.0.1:9092", grpc_port=14317, http_port=14318,
                          bind_addr=bind_addr).command()
    assert command[command.index("--otlp-grpc-endpoint") + 1] == endpoint.format(14317)
    assert command[command.index("--otlp-http-endpoint") + 1] == endpoint.format(14318)


def test_rotel_binds_loopback_by_default():
    command = RotelConfig(brokers="127.0.0.1:9092").command()
    assert command[command.index("--otlp-grpc-endpoint") + 1] == "127.0.0.1:4317"
    assert command[command.index("--otlp-http-endpoint") + 1] == "127.0.0.1:4318"


def test_a_host_name_is_refused_before_anything_starts(tmp_path):
    with pytest.raises(ValueError, match="not an IP address"):
        RotelConfig(brokers="127.0.0.1:9092", bind_addr="example.com")
    said = []
    # An external Kafka, so that no broker port is checked before the address.
    stack = Stack(Settings(otlp_bind_addr="my-host", bootstrap_servers="127.0.0.1:1", data_dir=tmp_path),
                  say=said.append)
    with pytest.raises(StackError, match="not an IP address"):
        stack.start()
    assert stack.broker is None and not stack.children


def test_settings_read_bind_address_and_token_from_the_environment(monkeypatch):
    assert Settings().otlp_bind_addr == "127.0.0.1"
    assert Settings().otlp_token is None
    monkeypatch.setenv("AGENTWATCH_OTLP_BIND_ADDR", "0.0.0.0")
    monkeypatch.setenv("AGENTWATCH_OTLP_TOKEN", "s3cret-token")
    settings = Settings()
    assert settings.otlp_bind_addr == "0.0.0.0"
    assert settings.otlp_token.get_secret_value() == "s3cret-token"
    assert "s3cret-token" not in repr(settings)
    env = settings_env(settings)
    assert "AGENTWATCH_OTLP_TOKEN" not in env, "workers never get the token"
    assert env["AGENTWATCH_OTLP_BIND_ADDR"] == "0.0.0.0"


def test_up_has_an_otlp_bind_flag_for_the_setting():
    (option,) = [p for p in up.params if "--otlp-bind" in p.opts]
    assert option.name == "otlp_bind_addr" and option.name in Settings.model_fields
    assert not [p for p in up.params if "token" in p.name], "secrets come from the environment only"


@pytest.mark.parametrize("addr, loopback", [
    ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("[::1]", True),
    ("0.0.0.0", False), ("::", False), ("10.1.2.3", False), ("192.168.0.10", False), ("localhost", False),
])
def test_is_loopback(addr, loopback):
    assert is_loopback(addr) is loopback


@pytest.mark.parametrize("addr", ["127.0.0.1", "::1"])
@pytest.mark.parametrize("token_set", [False, True])
@pytest.mark.parametrize("checks_token", [False, True])
def test_loopback_never_warns(addr, token_set, checks_token):
    assert otlp_exposure_warning(addr, token_set, checks_token) is None


@pytest.mark.parametrize("addr", ["0.0.0.0", "::", "10.1.2.3"])
def test_non_loopback_without_a_token_warns(addr):
    for checks_token in (False, True):
        warning = otlp_exposure_warning(addr, False, checks_token)
        assert warning.startswith(f"warning: OTLP receivers bind {addr}, not loopback")
        assert "anyone who can reach" in warning
    assert "Set AGENTWATCH_OTLP_TOKEN" in otlp_exposure_warning(addr, False, True)
    assert "rotel) cannot require a token" in otlp_exposure_warning(addr, False, False)


@pytest.mark.parametrize("addr", ["0.0.0.0", "::", "10.1.2.3"])
def test_non_loopback_with_a_checked_token_does_not_warn(addr):
    assert otlp_exposure_warning(addr, True, True) is None


def test_a_token_rotel_cannot_check_is_not_taken_as_protection():
    warning = otlp_exposure_warning("0.0.0.0", True, RECEIVER_AUTH)
    assert warning is not None
    assert "AGENTWATCH_OTLP_TOKEN is set but NOT enforced" in warning
