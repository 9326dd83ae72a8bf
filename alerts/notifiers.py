"""The notifier seam: ``send(notification)`` then ``close()``, exporter-shaped.

A notifier does one HTTP exchange (or a few, one per alert for PagerDuty) and classifies the
outcome: it returns on success, raises :class:`TransientDeliveryError` when trying again can
help (network errors, 429, 5xx) and :class:`PermanentDeliveryError` when it cannot (a 4xx
other than 408/429: a bad routing key, a deleted webhook). Retries, backoff and the circuit
breaker live in :mod:`agentwatch.alerts.delivery`, never inside a notifier, so every client
here is built with its own retries switched off.
"""

from __future__ import annotations

from typing import Protocol

from agentwatch.alerts.config import (Destination, GrafanaDestination, PagerDutyDestination,
                                      SlackDestination)
from agentwatch.alerts.policy import Notification


class DeliveryError(Exception):
    pass


class TransientDeliveryError(DeliveryError):
    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PermanentDeliveryError(DeliveryError):
    pass


class Notifier(Protocol):
    def send(self, notification: Notification) -> None: ...

    def close(self) -> None: ...


def classify_status(status: int, body: str, *, retry_after: str | None = None) -> None:
    """Raise the delivery error an HTTP status means; return for 2xx."""
    if 200 <= status < 300:
        return
    detail = f"HTTP {status}: {body[:300]}"
    if status in (408, 429) or status >= 500 or status == 0:
        retry_after_s = None
        if retry_after:
            try:
                retry_after_s = max(0.0, float(retry_after))
            except ValueError:
                retry_after_s = None
        raise TransientDeliveryError(detail, retry_after_s=retry_after_s)
    raise PermanentDeliveryError(detail)


def build_notifier(destination: Destination) -> Notifier:
    if isinstance(destination, SlackDestination):
        from agentwatch.alerts.slack import SlackNotifier

        return SlackNotifier(destination.webhook_url, timeout_s=destination.timeout_s)
    if isinstance(destination, PagerDutyDestination):
        from agentwatch.alerts.pagerduty import PagerDutyNotifier

        return PagerDutyNotifier(destination.routing_key, base_url=destination.base_url,
                                 timeout_s=destination.timeout_s,
                                 ca_bundle=destination.ca_bundle)
    if isinstance(destination, GrafanaDestination):
        from agentwatch.alerts.grafana import GrafanaAnnotationNotifier

        return GrafanaAnnotationNotifier(destination.url, token=destination.token,
                                         dashboard_uid=destination.dashboard_uid,
                                         panel_id=destination.panel_id,
                                         timeout_s=destination.timeout_s)
    raise TypeError(f"unknown destination type {type(destination).__name__}")
