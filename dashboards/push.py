"""Provision agentwatch dashboards into a running Grafana over its HTTP API (grafana-client).

``agentwatch dashboards push --url URL --token TOKEN`` creates or renames the folder and
creates or updates every dashboard by uid. It is idempotent: a dashboard whose stored JSON
already equals the built one is left alone (no new Grafana version), so pushing twice writes
nothing the second time. ``agentwatch dashboards export --out DIR`` writes the JSON files the
compose stack's file provisioning reads.

The token comes from ``--token`` or the ``AGENTWATCH_GRAFANA_TOKEN`` environment variable
(a service-account token with the Editor role on the folder).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlparse, urlunparse

import click
import niquests
from grafana_client import GrafanaApi
from grafana_client.client import (
    GrafanaClientError,
    GrafanaException,
    GrafanaServerError,
    GrafanaTimeoutError,
    GrafanaUnauthorizedError,
)

from agentwatch.dashboards.grafana import (
    DASHBOARD_JSON_DIR,
    FOLDER_TITLE,
    FOLDER_UID,
    all_dashboards,
    write_provisioning,
)

PUSH_MESSAGE = "agentwatch dashboards push"
# Fields Grafana adds or owns on a stored dashboard; they do not make it differ from ours.
_VOLATILE_FIELDS = ("id", "version")


class GrafanaPushError(click.ClickException):
    """A push failed for a reason the user can act on; the message says which."""


@dataclass
class PushReport:
    folder: str = ""  # "created", "renamed" or "unchanged"
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"folder {self.folder}; dashboards created {len(self.created)}, "
                f"updated {len(self.updated)}, unchanged {len(self.unchanged)}")


def normalise_url(url: str) -> str:
    """Check ``url`` is an http(s) base URL and give its path the trailing slash
    grafana-client needs to put ``api`` under a sub-path (``/grafana/`` -> ``/grafana/api``)."""
    parsed = urlparse(url.strip())
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise GrafanaPushError(
            f"--url must be the Grafana base URL such as http://grafana:3000, got {url!r}")
    path = parsed.path.rstrip("/")
    if path.endswith("/api"):
        raise GrafanaPushError(f"--url must be the Grafana base URL without /api, got {url!r}")
    return urlunparse(parsed._replace(path=f"{path}/" if path else ""))


def connect(url: str, token: str, timeout: float = 10.0) -> GrafanaApi:
    """A client for ``url`` after checking that Grafana answers there."""
    if not token:
        raise GrafanaPushError("no Grafana token: pass --token or set AGENTWATCH_GRAFANA_TOKEN")
    base = normalise_url(url)
    api = GrafanaApi.from_url(base, credential=token, timeout=timeout)
    try:
        health = api.client.GET("/health")
    except niquests.exceptions.RequestException as exc:
        raise GrafanaPushError(f"cannot connect to Grafana at {url}: {exc}") from exc
    except GrafanaTimeoutError as exc:
        raise GrafanaPushError(f"Grafana at {url} did not answer within {timeout:g}s") from exc
    except GrafanaException as exc:
        raise GrafanaPushError(
            f"{url} does not look like Grafana: GET {base}api/health answered "
            f"HTTP {exc.status_code}; check --url") from exc
    if not isinstance(health, dict) or "database" not in health:
        raise GrafanaPushError(
            f"{url} does not look like Grafana: GET {base}api/health did not return Grafana's "
            "health document; check --url")
    if health.get("database") != "ok":
        raise GrafanaPushError(f"Grafana at {url} reports database {health.get('database')!r}")
    return api


def push_dashboards(api: GrafanaApi, dashboards: Sequence[dict[str, Any]], *,
                    folder_uid: str = FOLDER_UID, folder_title: str = FOLDER_TITLE) -> PushReport:
    """Create/rename the folder, then create or update each dashboard (by uid) inside it."""
    report = PushReport()
    try:
        report.folder = _ensure_folder(api, folder_uid, folder_title)
        for dashboard in dashboards:
            _push_one(api, dashboard, folder_uid, report)
    except GrafanaUnauthorizedError as exc:
        raise GrafanaPushError(
            "Grafana rejected the token (HTTP 401): check --token / AGENTWATCH_GRAFANA_TOKEN "
            "(a service-account token of this Grafana instance and organisation)") from exc
    except GrafanaClientError as exc:
        if exc.status_code == 403:
            raise GrafanaPushError(
                "the token may not write dashboards (HTTP 403): give its service account the "
                f"Editor role, or edit permission on folder {folder_uid!r}") from exc
        raise GrafanaPushError(f"Grafana refused the request: {exc.message}") from exc
    except GrafanaServerError as exc:
        raise GrafanaPushError(f"Grafana failed: {exc.message}") from exc
    except GrafanaException as exc:  # transport errors grafana-client wraps
        raise GrafanaPushError(f"talking to Grafana failed: {exc.message}") from exc
    except niquests.exceptions.RequestException as exc:
        raise GrafanaPushError(f"lost the connection to Grafana: {exc}") from exc
    return report


def _ensure_folder(api: GrafanaApi, uid: str, title: str) -> str:
    try:
        folder = api.folder.get_folder(uid)
    except GrafanaClientError as exc:
        if exc.status_code != 404:
            raise
        api.folder.create_folder(title, uid=uid)
        return "created"
    if folder.get("title") != title:
        api.folder.update_folder(uid, title=title, overwrite=True)
        return "renamed"
    return "unchanged"


def _push_one(api: GrafanaApi, dashboard: dict[str, Any], folder_uid: str,
              report: PushReport) -> None:
    uid = dashboard["uid"]
    try:
        stored = api.dashboard.get_dashboard(uid)
    except GrafanaClientError as exc:
        if exc.status_code != 404:
            raise
        stored = None
    if stored is not None:
        same_folder = stored.get("meta", {}).get("folderUid") == folder_uid
        if same_folder and _comparable(stored.get("dashboard", {})) == _comparable(dashboard):
            report.unchanged.append(uid)
            return
    api.dashboard.update_dashboard({
        "dashboard": {**_comparable(dashboard), "id": None},
        "folderUid": folder_uid,
        "overwrite": True,  # our uid owns this dashboard; UI edits are overwritten by design
        "message": PUSH_MESSAGE,
    })
    (report.created if stored is None else report.updated).append(uid)


def _comparable(dashboard: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in dashboard.items() if k not in _VOLATILE_FIELDS}


@click.group("dashboards")
def dashboards_group() -> None:
    """Grafana dashboards: push them over the API or export them for file provisioning."""


@dashboards_group.command("push")
@click.option("--url", required=True, envvar="AGENTWATCH_GRAFANA_URL", show_envvar=True,
              help="Grafana base URL, e.g. http://grafana:3000")
@click.option("--token", envvar="AGENTWATCH_GRAFANA_TOKEN", show_envvar=True,
              help="Grafana service-account token (Editor).")
@click.option("--folder-uid", default=FOLDER_UID, show_default=True)
@click.option("--folder-title", default=FOLDER_TITLE, show_default=True)
@click.option("--timeout", type=float, default=10.0, show_default=True,
              help="Seconds per HTTP request.")
def push_command(url: str, token: str | None, folder_uid: str, folder_title: str,
                 timeout: float) -> None:
    """Create or update the agentwatch folder and dashboards in Grafana (idempotent)."""
    api = connect(url, token or "", timeout)
    report = push_dashboards(api, all_dashboards(), folder_uid=folder_uid,
                             folder_title=folder_title)
    click.echo(report.summary())
    for verb, uids in (("created", report.created), ("updated", report.updated)):
        for uid in uids:
            click.echo(f"  {verb} {uid}")


@dashboards_group.command("export")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=DASHBOARD_JSON_DIR, show_default=True,
              help="Directory the Grafana file provider reads.")
def export_command(out_dir: Path) -> None:
    """Write every dashboard as JSON for Grafana file provisioning."""
    for path in write_provisioning(out_dir):
        click.echo(str(path))
