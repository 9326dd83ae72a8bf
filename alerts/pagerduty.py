"""PagerDuty Events API v2 notifier, through the official ``pagerduty`` package.

Why this client: ``pdpyras`` is deprecated by PagerDuty in favour of ``pagerduty`` (its
successor, same authors, maintained); ``pagerduty.EventsApiV2Client`` implements Events API v2
(trigger / acknowledge / resolve with ``dedup_key``) and takes ``base_url``. It insists on an
``https://`` base URL, so tests run the local receiver with TLS (a throwaway self-signed cert)
and pass its CA file as ``ca_bundle``; the client is otherwise used unmodified.

Every event carries the alert's ``dedup_key``: PagerDuty folds a repeated trigger into the open
incident, so a trigger re-sent after a crash (at-least-once delivery) makes no second incident.
The client's own retry loop is switched off (it sleeps inside ``request`` and retries 429
without limit), so backoff and the circuit breaker stay in one place: the delivery loop.
"""

from __future__ import annotations

import ssl
from datetime import datetime, timezone
from typing import Any

import pagerduty
from httpx2 import Response, TransportError

from agentwatch.alerts.notifiers import (PermanentDeliveryError, TransientDeliveryError,
                                         classify_status)
from agentwatch.alerts.policy import Action, IncidentAlert, Notification
from agentwatch.events import Severity

_PD_SEVERITY = {Severity.CRITICAL: "critical", Severity.WARNING: "warning", Severity.INFO: "info"}


class _RateLimited(Exception):
    def __init__(self, response: Response) -> None:
        super().__init__(f"HTTP {response.status_code}")
        self.response = response


class _EventsClient(pagerduty.EventsApiV2Client):
    """``EventsApiV2Client`` that reports 429 instead of sleeping on it forever."""

    def postprocess(self, response: Response) -> None:
        if response.status_code == 429:
            raise _RateLimited(response)


def trigger_payload(item: IncidentAlert) -> dict[str, Any]:
    """The ``payload`` object of an Events API v2 trigger for one incident."""
    a = item.alert
    details: dict[str, Any] = {
        "detector": a.detector, "kind": a.kind, "key": a.key, "value": a.value,
        "threshold": a.threshold, "count": item.count,
        "first_seen": datetime.fromtimestamp(item.first_seen, tz=timezone.utc).isoformat(),
        "last_seen": datetime.fromtimestamp(item.last_seen, tz=timezone.utc).isoformat(),
        "labels": dict(a.labels), "evidence": dict(a.details), "query": a.query,
        "alert_id": a.id,
    }
    source = a.labels.get("service") or a.labels.get("project") or a.labels.get("host") or "agentwatch"
    payload: dict[str, Any] = {
        "summary": a.summary[:1024], "source": source, "severity": _PD_SEVERITY[a.severity],
        "timestamp": datetime.fromtimestamp(a.ts, tz=timezone.utc).isoformat(),
        "component": a.detector, "class": a.kind, "custom_details": details,
    }
    if a.labels.get("project"):
        payload["group"] = a.labels["project"]
    return payload


class PagerDutyNotifier:
    """Sends Events API v2 events for one routing key (integration key)."""

    def __init__(self, routing_key: str, *, base_url: str = "https://events.pagerduty.com",
                 timeout_s: float = 5.0, ca_bundle: str | None = None) -> None:
        if not routing_key:
            raise ValueError("routing_key is empty (set the ${ENV_VAR} it references)")
        if not base_url.startswith("https://"):
            raise ValueError(f"PagerDuty base_url must be https:// (got {base_url!r})")
        kwargs: dict[str, Any] = {}
        if ca_bundle:
            kwargs["verify"] = ssl.create_default_context(cafile=ca_bundle)
        self.client = _EventsClient(routing_key, base_url=base_url.rstrip("/"), **kwargs)
        self.client.retry = {}
        self.client.max_network_attempts = 0
        self.client.timeout = timeout_s

    def send(self, notification: Notification) -> None:
        # One event per incident: PagerDuty's unit is the dedup_key, not our group.
        for item in notification.alerts:
            if notification.action is Action.RESOLVE:
                self._call(lambda: self.client.resolve(item.alert.dedup_key))
            else:
                self._call(lambda: self.client.trigger(
                    item.alert.summary[:1024], trigger_payload(item)["source"],
                    dedup_key=item.alert.dedup_key, payload=trigger_payload(item),
                    links=[{"href": link.url, "text": link.title} for link in item.alert.links]))

    def acknowledge(self, dedup_key: str) -> None:
        self._call(lambda: self.client.acknowledge(dedup_key))

    @staticmethod
    def _call(fn: Any) -> None:
        try:
            fn()
        except _RateLimited as exc:
            classify_status(429, exc.response.text,
                            retry_after=exc.response.headers.get("Retry-After"))
        except pagerduty.HttpError as exc:
            status = exc.response.status_code
            if 200 <= status < 300:
                return  # accepted; only the response body was not what the client expected
            classify_status(status, exc.response.text)
        except pagerduty.Error as exc:  # network failure (max_network_attempts exhausted)
            raise TransientDeliveryError(f"pagerduty unreachable: {exc}") from exc
        except TransportError as exc:
            raise TransientDeliveryError(f"pagerduty unreachable: {exc}") from exc
        except ValueError as exc:
            raise PermanentDeliveryError(str(exc)) from exc

    def close(self) -> None:
        self.client.close()
