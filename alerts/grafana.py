"""Grafana annotations for alerts, through grafana-client.

A trigger adds a point annotation at the incident's first sighting; a resolve adds a region
annotation from first sighting to the resolve, so the dashboard shows how long it lasted.
``add_annotation`` is called with keyword arguments only (its positional order changed across
grafana-client releases).
"""

from __future__ import annotations

from grafana_client import GrafanaApi
from grafana_client.client import GrafanaException

from agentwatch.alerts.notifiers import TransientDeliveryError, classify_status
from agentwatch.alerts.policy import Action, Notification


class GrafanaAnnotationNotifier:
    def __init__(self, url: str, *, token: str = "", dashboard_uid: str | None = None,
                 panel_id: int | None = None, timeout_s: float = 5.0) -> None:
        self.api = GrafanaApi.from_url(url=url, credential=token or None, timeout=timeout_s)
        self.dashboard_uid = dashboard_uid
        self.panel_id = panel_id

    def send(self, notification: Notification) -> None:
        for item in notification.alerts:
            a = item.alert
            tags = ["agentwatch", f"detector:{a.detector}", f"kind:{a.kind}",
                    f"severity:{a.severity.value}", a.status.value]
            tags += [f"{k}:{v}" for k, v in sorted(a.labels.items()) if k in ("project", "service")]
            if notification.action is Action.RESOLVE:
                kwargs = {"time_from": int(item.first_seen * 1000), "time_to": int(a.ts * 1000),
                          "text": f"{a.summary} (count {item.count}, dedup {a.dedup_key})"}
            else:
                kwargs = {"time_from": int(item.first_seen * 1000),
                          "text": f"{a.summary} (dedup {a.dedup_key})"}
            try:
                self.api.annotations.add_annotation(
                    dashboard_uid=self.dashboard_uid, panel_id=self.panel_id, tags=tags, **kwargs)
            except GrafanaException as exc:
                status = int(getattr(exc, "status_code", 0) or 0)
                if status == 0:
                    raise TransientDeliveryError(f"grafana unreachable: {exc}") from exc
                classify_status(status, str(getattr(exc, "message", exc)))
            except OSError as exc:
                raise TransientDeliveryError(f"grafana unreachable: {exc}") from exc

    def close(self) -> None:
        session = getattr(self.api.client, "s", None)
        if session is not None and hasattr(session, "close"):
            session.close()
