"""The routes file: destinations, routing rules, grouping windows and rate limits.

Secrets stay out of the file: any string may be a ``${ENV_VAR}`` (or ``${ENV_VAR:-default}``)
reference, resolved from the environment once, when the notifier starts. See
``alerts/routes.example.yaml`` for a commented example.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agentwatch.events import Severity

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

SEVERITY_RANK = {Severity.INFO: 0, Severity.WARNING: 1, Severity.CRITICAL: 2}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RateLimit(_Strict):
    """At most ``max_notifications`` per ``per_s`` seconds (token bucket, burst = max)."""

    max_notifications: int = Field(gt=0)
    per_s: float = Field(gt=0)


class SlackDestination(_Strict):
    type: Literal["slack"]
    webhook_url: str
    timeout_s: float = Field(default=5.0, gt=0)


class PagerDutyDestination(_Strict):
    type: Literal["pagerduty"]
    routing_key: str
    # Events API v2 base; tests point it at a local receiver (path /v2/enqueue is appended).
    base_url: str = "https://events.pagerduty.com"
    # The pagerduty client accepts https only; a CA file lets it trust a private endpoint
    # (a TLS-intercepting proxy, or the tests' local receiver with its self-signed cert).
    ca_bundle: str | None = None
    timeout_s: float = Field(default=5.0, gt=0)


class GrafanaDestination(_Strict):
    type: Literal["grafana"]
    url: str
    token: str = ""
    dashboard_uid: str | None = None
    panel_id: int | None = None
    timeout_s: float = Field(default=5.0, gt=0)


Destination = Annotated[Union[SlackDestination, PagerDutyDestination, GrafanaDestination],
                        Field(discriminator="type")]


class Route(_Strict):
    """Alerts whose labels match every entry of ``match`` go to ``destinations``.

    ``match`` values are a string or a list of strings (any of them); ``min_severity`` keeps
    alerts at or above a severity. Routes are tried in order; the first match wins unless it
    says ``continue: true``.
    """

    name: str
    match: Mapping[str, str | list[str]] = Field(default_factory=dict)
    min_severity: Severity | None = None
    destinations: list[str] = Field(min_length=1)
    group_by: list[str] = Field(default_factory=lambda: ["dedup_key"])
    group_wait_s: float | None = Field(default=None, ge=0)
    rate_limit: RateLimit | None = None
    continue_: bool = Field(default=False, alias="continue")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.min_severity is not None:
            severity = labels.get("severity")
            if severity not in Severity.__members__.values() or (
                    SEVERITY_RANK[Severity(severity)] < SEVERITY_RANK[self.min_severity]):
                return False
        for name, wanted in self.match.items():
            allowed = [wanted] if isinstance(wanted, str) else wanted
            if labels.get(name) not in allowed:
                return False
        return True


class Defaults(_Strict):
    # 0 sends at once: the latency budget (p99 <= 2 s span -> webhook) has no room for a window.
    group_wait_s: float = Field(default=0.0, ge=0)
    rate_limit: RateLimit | None = None


class DeliveryConfig(_Strict):
    """Retry and circuit-breaker settings shared by every destination."""

    initial_backoff_s: float = Field(default=0.2, gt=0)
    max_backoff_s: float = Field(default=5.0, gt=0)
    breaker_failure_threshold: int = Field(default=5, gt=0)
    breaker_reset_timeout_s: float = Field(default=5.0, gt=0)


class RoutesConfig(_Strict):
    destinations: Mapping[str, Destination]
    routes: list[Route] = Field(default_factory=list)
    default_destinations: list[str] = Field(default_factory=list)
    # Destinations (Grafana) that annotate every firing and resolved alert, silenced or not,
    # without grouping or rate limits: annotations are history, not pages.
    annotations: list[str] = Field(default_factory=list)
    defaults: Defaults = Field(default_factory=Defaults)
    delivery: DeliveryConfig = Field(default_factory=DeliveryConfig)

    @model_validator(mode="after")
    def _destinations_exist(self) -> "RoutesConfig":
        named = [(f"route {r.name!r}", d) for r in self.routes for d in r.destinations]
        named += [("default_destinations", d) for d in self.default_destinations]
        named += [("annotations", d) for d in self.annotations]
        for where, dest in named:
            if dest not in self.destinations:
                raise ValueError(f"{where} names unknown destination {dest!r}")
        names = [r.name for r in self.routes]
        if len(names) != len(set(names)):
            raise ValueError("route names must be unique")
        if "default" in names:
            raise ValueError("route name 'default' is reserved for default_destinations")
        return self

    @field_validator("destinations")
    @classmethod
    def _some_destination(cls, value: Mapping[str, Any]) -> Mapping[str, Any]:
        if not value:
            raise ValueError("at least one destination is required")
        return value

    def group_wait_for(self, route: Route | None) -> float:
        if route is not None and route.group_wait_s is not None:
            return route.group_wait_s
        return self.defaults.group_wait_s

    def rate_limit_for(self, route: Route | None) -> RateLimit | None:
        if route is not None and route.rate_limit is not None:
            return route.rate_limit
        return self.defaults.rate_limit


def resolve_env(value: Any, env: Mapping[str, str]) -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string of a parsed YAML tree."""
    if isinstance(value, str):
        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise ValueError(f"environment variable {name} is not set (referenced in routes file)")
        return _ENV_REF.sub(substitute, value)
    if isinstance(value, list):
        return [resolve_env(item, env) for item in value]
    if isinstance(value, dict):
        return {key: resolve_env(item, env) for key, item in value.items()}
    return value


def parse_routes(data: Mapping[str, Any], env: Mapping[str, str] | None = None) -> RoutesConfig:
    return RoutesConfig.model_validate(resolve_env(dict(data), os.environ if env is None else env))


def load_routes(path: str | Path, env: Mapping[str, str] | None = None) -> RoutesConfig:
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the routes file must be a YAML mapping")
    return parse_routes(data, env)
