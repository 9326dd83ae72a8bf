"""The alert record: what a :class:`~agentwatch.events.Finding` becomes on topic ``alerts``.

The detector agent calls :func:`alert_record_from_finding` and sends the bytes keyed by
``dedup_key`` (so every record of one incident lands on one partition, in order). The
notifier turns records back into :class:`Alert` with :func:`alert_from_record`, which raises
:class:`MalformedAlertError` with a reason the notifier puts on the dead-letter topic.

First/last seen and the repeat count are not in the record: they describe an incident across
records, so the notifier's policy state keeps them (see :mod:`agentwatch.alerts.policy`).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Mapping
from urllib.parse import quote, urlencode

import orjson

from agentwatch.detectors.keys import parse_key
from agentwatch.events import Finding, Severity

RECORD_VERSION = 1

# The Grafana link opens this much time around the finding: enough history to see the build-up.
LINK_WINDOW_BEFORE_S = 30 * 60
LINK_WINDOW_AFTER_S = 10 * 60
# The `agentwatch query` link selects finding rows of this incident within this window.
QUERY_WINDOW_BEFORE_S = 60 * 60
QUERY_WINDOW_AFTER_S = 5 * 60

# Evidence keys whose string values become routing labels (routes match on project/service).
LABEL_EVIDENCE_KEYS = ("project", "service", "agent", "host", "model", "user", "session", "tool")


class AlertStatus(StrEnum):
    FIRING = "firing"
    RESOLVED = "resolved"


class MalformedAlertError(ValueError):
    """An ``alerts`` record that cannot be an :class:`Alert`; the message is the reason."""


@dataclass(frozen=True, slots=True)
class Link:
    title: str
    url: str


@dataclass(frozen=True, slots=True)
class Alert:
    """One alert record as the notifier reads it back from topic ``alerts``."""

    id: str
    dedup_key: str
    detector: str
    kind: str
    key: str
    severity: Severity
    summary: str
    status: AlertStatus
    ts: float
    value: float
    threshold: float
    details: Mapping[str, Any] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    links: tuple[Link, ...] = ()
    query: str = ""

    @property
    def resolved(self) -> bool:
        return self.status is AlertStatus.RESOLVED

    def match_labels(self) -> dict[str, str]:
        """Everything a route or silence matcher can name: identity fields plus labels."""
        return {**self.labels, "detector": self.detector, "kind": self.kind, "key": self.key,
                "severity": self.severity.value, "status": self.status.value,
                "dedup_key": self.dedup_key}

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": RECORD_VERSION, "id": self.id, "dedup_key": self.dedup_key,
            "detector": self.detector, "kind": self.kind, "key": self.key,
            "severity": self.severity.value, "summary": self.summary, "status": self.status.value,
            "ts": self.ts, "value": self.value, "threshold": self.threshold,
            "details": dict(self.details), "labels": dict(self.labels),
            "links": [{"title": link.title, "url": link.url} for link in self.links],
            "query": self.query,
        }


def labels_from_key(key: str, evidence: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Routing labels of a finding: ``a=b/c=d`` segments of its key, then string evidence.

    The key wins over evidence: it is the identity the detector chose for the monitored thing.
    """
    labels: dict[str, str] = {}
    for name in LABEL_EVIDENCE_KEYS:
        value = (evidence or {}).get(name)
        if isinstance(value, str) and value:
            labels[name] = value
    labels.update(parse_key(key))
    return labels


def alert_id(dedup_key: str, ts: float, status: str) -> str:
    """Deterministic, so a finding re-sent after a worker restart yields the same alert id."""
    digest = hashlib.sha256(f"{dedup_key}|{ts!r}|{status}".encode()).hexdigest()
    return digest[:24]


def alert_identity(alert: Alert) -> str:
    """What makes two alert records one occurrence: dedup key, status and the finding's ts.

    The notifier absorbs a record whose identity it has routed already (a record read again
    after a crash, or a producer's retry), whatever offset or broker it came from. A repeat of
    a firing incident, a resolve, and a new firing after a resolve each carry their own finding
    time, so each is a new identity and reaches the policy. Computed from the fields rather
    than taken from the record's ``id``, so a producer's ids cannot merge distinct alerts.

    Examples
    --------
    >>> def loop_at(ts, resolved=False):
    ...     return Finding(detector="agent_loop", key="trace=ab12", kind="loop",
    ...                    severity=Severity.CRITICAL, ts=ts, value=7, threshold=5,
    ...                    resolved=resolved)
    >>> first = alert_identity(alert_from_record(alert_record_from_finding(loop_at(1e9))))
    >>> first == alert_identity(alert_from_record(alert_record_from_finding(loop_at(1e9))))
    True
    >>> first in {alert_identity(alert_from_finding(loop_at(1e9, resolved=True))),
    ...           alert_identity(alert_from_finding(loop_at(1e9 + 60)))}
    False
    """
    return alert_id(alert.dedup_key, float(alert.ts), alert.status.value)


def summary_of(finding: Finding) -> str:
    evidence = finding.evidence or {}
    for name in ("summary", "message", "reason"):
        text = evidence.get(name)
        if isinstance(text, str) and text.strip():
            described = text.strip()
            break
    else:
        described = (f"{finding.kind} on {finding.key}: value {finding.value:.4g} "
                     f"(threshold {finding.threshold:.4g})")
    prefix = "RESOLVED " if finding.resolved else ""
    return f"{prefix}[{finding.severity.value.upper()}] {finding.detector}: {described}"[:1000]


def grafana_link(dashboard_url: str, ts: float) -> str:
    """The dashboard URL with a ``from``/``to`` time range (epoch ms) around ``ts``."""
    params = urlencode({"from": int((ts - LINK_WINDOW_BEFORE_S) * 1000),
                        "to": int((ts + LINK_WINDOW_AFTER_S) * 1000)})
    return f"{dashboard_url}{'&' if '?' in dashboard_url else '?'}{params}"


# Dashboard uids of dashboards/grafana.py (its tests check every uid and panel title named here).
OVERVIEW_DASHBOARD = "agentwatch-overview"
DRIFT_DASHBOARD = "agentwatch-drift"
AGENTS_DASHBOARD = "agentwatch-agents"
GPU_DASHBOARD = "agentwatch-gpu"


def dashboard_for(detector: str, kind: str = "") -> tuple[str, str | None]:
    """The dashboard uid and panel title that show a finding of ``detector`` (and ``kind``).

    Detectors not named here (``evaluation_drop``: no panel of its own yet) get the overview's
    findings panel, so every finding has a link.

    >>> dashboard_for("vram_leak")
    ('agentwatch-gpu', 'VRAM slope by gpu/process')
    """
    if detector == "drift":
        return DRIFT_DASHBOARD, "Drift: $key"
    if detector == "vram_leak":
        return GPU_DASHBOARD, "VRAM slope by gpu/process"
    if detector == "agent_loop":
        return AGENTS_DASHBOARD, "Loop findings / s by severity"
    if detector == "hallucinated_tool":
        return AGENTS_DASHBOARD, "Hallucinated tool findings / s by severity"
    if detector in ("cost_anomaly", "budget"):
        return OVERVIEW_DASHBOARD, "Cost USD / hour by project"
    if detector == "retry_storm":
        return OVERVIEW_DASHBOARD, "LLM calls / s by model"
    if detector == "pii_exposure":
        return OVERVIEW_DASHBOARD, "PII redacted / s by type and service"
    if detector == "prompt_version_regression":
        return OVERVIEW_DASHBOARD, "Cost per call by prompt and version"
    if detector == "slo":
        # No per-model LLM latency panel: a latency finding opens the whole overview.
        return OVERVIEW_DASHBOARD, "LLM error ratio by service and model" if kind == "error_rate" else None
    return OVERVIEW_DASHBOARD, "Findings / s by detector and severity"


def grafana_deep_link(grafana_url: str, finding: Finding) -> Link:
    """The Grafana link of a finding: its detector's dashboard (:func:`dashboard_for`), the
    panel (``viewPanel``) where there is one, ``from``/``to`` (epoch ms) around the finding and
    the dashboard's template variables set from the finding's key (``var-service``,
    ``var-project``, ``var-host``; evidence fills names the key lacks, e.g. a loop keyed by
    trace id). The drift dashboard's ``key`` variable is the finding key itself.

    >>> f = Finding(detector="budget", key="project=shop", kind="daily", severity=Severity.WARNING,
    ...             ts=1_700_000_000.0, value=60, threshold=50)
    >>> grafana_deep_link("http://localhost:3000/", f).url
    'http://localhost:3000/d/agentwatch-overview?viewPanel=12&from=1699998200000&to=1700000600000&var-project=shop'
    """
    from agentwatch.dashboards.grafana import dashboard_index

    uid, panel_title = dashboard_for(finding.detector, finding.kind)
    dashboard = dashboard_index()[uid]
    params: list[tuple[str, str]] = []
    panel_id = dashboard["panels"].get(panel_title) if panel_title else None
    if panel_id is not None:
        params.append(("viewPanel", str(panel_id)))
    params += [("from", str(int((finding.ts - LINK_WINDOW_BEFORE_S) * 1000))),
               ("to", str(int((finding.ts + LINK_WINDOW_AFTER_S) * 1000)))]
    values = labels_from_key(finding.key, finding.evidence)
    if uid == DRIFT_DASHBOARD:
        values = {"key": finding.key}
    params += [(f"var-{name}", values[name]) for name in dashboard["variables"] if values.get(name)]
    url = f"{grafana_url.rstrip('/')}/d/{quote(uid)}?{urlencode(params, quote_via=quote)}"
    return Link(f"Grafana: {dashboard['title']}", url)


def _sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _shell_double_quoted(text: str) -> str:
    escaped = "".join("\\" + ch if ch in '"\\$`' else ch for ch in text)
    return f'"{escaped}"'


def findings_query(finding: Finding) -> str:
    """The ``agentwatch query`` command that lists this incident's finding rows."""
    lo = math.floor(finding.ts - QUERY_WINDOW_BEFORE_S)
    hi = math.ceil(finding.ts + QUERY_WINDOW_AFTER_S)
    sql = (f"SELECT * FROM findings WHERE detector = {_sql_literal(finding.detector)} "
           f"AND kind = {_sql_literal(finding.kind)} AND key = {_sql_literal(finding.key)} "
           f"AND ts BETWEEN {lo} AND {hi} ORDER BY ts")
    return f"agentwatch query {_shell_double_quoted(sql)}"


def _json_safe(value: Any) -> Any:
    # Evidence is meant to be JSON-able; a stray non-JSON value must not make the record unsendable.
    return orjson.loads(orjson.dumps(value, default=str,
                                     option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY))


def alert_from_finding(finding: Finding, *, dashboard_url: str | None = None,
                       grafana_url: str | None = None) -> Alert:
    """``grafana_url`` (the Grafana base URL) adds :func:`grafana_deep_link`; ``dashboard_url``
    adds a link to that one dashboard with the time range around the finding."""
    status = AlertStatus.RESOLVED if finding.resolved else AlertStatus.FIRING
    links: list[Link] = []
    if grafana_url:
        links.append(grafana_deep_link(grafana_url, finding))
    if dashboard_url:
        links.append(Link("Grafana dashboard", grafana_link(dashboard_url, finding.ts)))
    return Alert(
        id=alert_id(finding.dedup_key, finding.ts, status.value),
        dedup_key=finding.dedup_key, detector=finding.detector, kind=finding.kind,
        key=finding.key, severity=Severity(finding.severity), summary=summary_of(finding),
        status=status, ts=float(finding.ts), value=float(finding.value),
        threshold=float(finding.threshold), details=_json_safe(dict(finding.evidence or {})),
        labels=labels_from_key(finding.key, finding.evidence), links=tuple(links),
        query=findings_query(finding),
    )


def alert_record_from_finding(finding: Finding, *, dashboard_url: str | None = None,
                              grafana_url: str | None = None) -> bytes:
    """The JSON record for topic ``alerts``; send it keyed by ``finding.dedup_key``.

    Examples
    --------
    >>> from agentwatch.events import Finding, Severity
    >>> f = Finding(detector="agent_loop", key="project=shop/trace=ab12", kind="loop",
    ...             severity=Severity.CRITICAL, ts=1_700_000_000.0, value=7, threshold=5)
    >>> rec = orjson.loads(alert_record_from_finding(f, dashboard_url="http://g/d/aw"))
    >>> rec["dedup_key"], rec["status"], rec["labels"]["project"]
    ('agent_loop:loop:project=shop/trace=ab12', 'firing', 'shop')
    >>> rec["links"][0]["url"]
    'http://g/d/aw?from=1699998200000&to=1700000600000'
    """
    return orjson.dumps(alert_from_finding(finding, dashboard_url=dashboard_url,
                                           grafana_url=grafana_url).to_dict())


_REQUIRED_STR = ("id", "dedup_key", "detector", "kind", "key", "summary")


def alert_from_dict(data: Any) -> Alert:
    """Validate a decoded record; raise :class:`MalformedAlertError` saying what is wrong."""
    if not isinstance(data, dict):
        raise MalformedAlertError(f"record is a JSON {type(data).__name__}, not an object")
    for name in _REQUIRED_STR:
        if not isinstance(data.get(name), str) or not data[name]:
            raise MalformedAlertError(f"field {name!r} missing or not a non-empty string")
    try:
        severity = Severity(data.get("severity"))
    except ValueError:
        raise MalformedAlertError(f"severity {data.get('severity')!r} is not one of "
                                  f"{[s.value for s in Severity]}") from None
    try:
        status = AlertStatus(data.get("status", "firing"))
    except ValueError:
        raise MalformedAlertError(f"status {data.get('status')!r} is not firing/resolved") from None
    numbers = {}
    for name in ("ts", "value", "threshold"):
        raw = data.get(name, 0.0 if name != "ts" else None)
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise MalformedAlertError(f"field {name!r} missing or not a number")
        numbers[name] = float(raw)
    if not math.isfinite(numbers["ts"]) or numbers["ts"] <= 0:
        raise MalformedAlertError("field 'ts' is not a positive finite unix time")
    details = data.get("details", {})
    labels = data.get("labels", {})
    if not isinstance(details, dict):
        raise MalformedAlertError("field 'details' is not an object")
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        raise MalformedAlertError("field 'labels' is not an object of strings")
    links_raw = data.get("links", [])
    if not isinstance(links_raw, list) or not all(
            isinstance(item, dict) and isinstance(item.get("url"), str) for item in links_raw):
        raise MalformedAlertError("field 'links' is not a list of {title, url}")
    return Alert(
        id=data["id"], dedup_key=data["dedup_key"], detector=data["detector"], kind=data["kind"],
        key=data["key"], severity=severity, summary=data["summary"], status=status,
        ts=numbers["ts"], value=numbers["value"], threshold=numbers["threshold"],
        details=details, labels=labels,
        links=tuple(Link(str(item.get("title") or item["url"]), item["url"]) for item in links_raw),
        query=str(data.get("query", "")),
    )


def alert_from_record(payload: bytes | None) -> Alert:
    """Decode one ``alerts`` record value (JSON bytes)."""
    if payload is None:
        raise MalformedAlertError("record has no value (tombstone)")
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise MalformedAlertError(f"value is not JSON: {exc}") from None
    return alert_from_dict(data)
