"""Slack incoming-webhook notifier: Block Kit messages through slack_sdk's ``WebhookClient``.

A trigger is one message per group (the group's alerts listed, newest figures); a resolve is a
follow-up message per incident (incoming webhooks cannot thread or edit, they return no ``ts``).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from slack_sdk.webhook import WebhookClient

from agentwatch.alerts.notifiers import TransientDeliveryError, classify_status
from agentwatch.alerts.policy import Action, IncidentAlert, Notification
from agentwatch.events import Severity

# Slack Block Kit limits (api.slack.com/reference/block-kit): 50 blocks, header 150 chars,
# section text 3000, 10 fields per section, button text 75.
MAX_ALERTS_LISTED = 10
_SEVERITY_ICON = {Severity.CRITICAL: ":red_circle:", Severity.WARNING: ":large_orange_circle:",
                  Severity.INFO: ":large_blue_circle:"}


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _when(ts: float) -> str:
    # Slack renders <!date^...> in the reader's time zone; the fallback is UTC.
    fallback = datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"<!date^{int(ts)}^{{date_short_pretty}} {{time_secs}}|{fallback}>"


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _fields(item: IncidentAlert) -> list[dict[str, str]]:
    a = item.alert
    pairs = [("Severity", a.severity.value), ("Key", f"`{a.key}`"),
             ("Value / threshold", f"{a.value:.4g} / {a.threshold:.4g}"),
             ("Count", str(item.count)), ("First seen", _when(item.first_seen)),
             ("Last seen", _when(item.last_seen))]
    return [{"type": "mrkdwn", "text": _clip(f"*{k}*\n{v}", 2000)} for k, v in pairs]


def _link_buttons(item: IncidentAlert) -> dict[str, Any] | None:
    buttons = [{"type": "button", "text": {"type": "plain_text", "text": _clip(link.title, 75)},
                "url": link.url} for link in item.alert.links[:5] if len(link.url) <= 3000]
    return {"type": "actions", "elements": buttons} if buttons else None


def trigger_blocks(notification: Notification) -> tuple[str, list[dict[str, Any]]]:
    """Fallback text and Block Kit blocks for a firing group."""
    items = notification.alerts
    top = max((i.alert.severity for i in items),
              key=lambda s: [Severity.INFO, Severity.WARNING, Severity.CRITICAL].index(s))
    icon = _SEVERITY_ICON[top]
    if len(items) == 1:
        a = items[0].alert
        title = f"{icon} FIRING {a.severity.value.upper()} · {a.detector} · {a.kind}"
    else:
        title = f"{icon} {len(items)} alerts FIRING · {notification.route}"
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": _clip(title, 150), "emoji": True}}]
    for item in items[:MAX_ALERTS_LISTED]:
        a = item.alert
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": _clip(a.summary, 3000)},
                       "fields": _fields(item)})
        if len(items) == 1 and a.details:
            evidence = json.dumps(a.details, indent=1, sort_keys=True, default=str)
            blocks.append({"type": "section", "text": {
                "type": "mrkdwn", "text": _clip(f"*Evidence*\n```{_clip(evidence, 2800)}```", 3000)}})
        if a.query:
            blocks.append({"type": "section", "text": {
                "type": "mrkdwn", "text": _clip(f"*Rows:* `{a.query}`", 3000)}})
        buttons = _link_buttons(item)
        if buttons:
            blocks.append(buttons)
        blocks.append({"type": "context", "elements": [
            {"type": "mrkdwn", "text": _clip(f"dedup `{a.dedup_key}` · alert `{a.id}` · "
                                             f"route `{notification.route}`", 3000)}]})
    if len(items) > MAX_ALERTS_LISTED:
        blocks.append({"type": "context", "elements": [
            {"type": "mrkdwn", "text": f"…and {len(items) - MAX_ALERTS_LISTED} more alerts"}]})
    text = " | ".join(i.alert.summary for i in items[:3])
    if len(items) > 3:
        text += f" | +{len(items) - 3} more"
    return _clip(text, 3000), blocks


def resolve_blocks(notification: Notification) -> tuple[str, list[dict[str, Any]]]:
    """Fallback text and blocks for the resolved follow-up of one incident."""
    item = notification.alerts[0]
    a = item.alert
    title = f":white_check_mark: RESOLVED · {a.detector} · {a.kind}"
    fields = [("Key", f"`{a.key}`"), ("Was", a.severity.value),
              ("Firing for", _duration(a.ts - item.first_seen)), ("Count", str(item.count)),
              ("First seen", _when(item.first_seen)), ("Resolved", _when(a.ts))]
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": _clip(title, 150), "emoji": True}},
        {"type": "section", "text": {"type": "mrkdwn", "text": _clip(a.summary, 3000)},
         "fields": [{"type": "mrkdwn", "text": f"*{k}*\n{v}"} for k, v in fields]},
        {"type": "context", "elements": [
            {"type": "mrkdwn", "text": _clip(f"dedup `{a.dedup_key}` · alert `{a.id}`", 3000)}]},
    ]
    buttons = _link_buttons(item)
    if buttons:
        blocks.insert(2, buttons)
    return _clip(a.summary, 3000), blocks


class SlackNotifier:
    """Posts Block Kit messages to one incoming webhook."""

    def __init__(self, webhook_url: str, *, timeout_s: float = 5.0) -> None:
        # retry_handlers=[]: backoff and the circuit breaker are the delivery loop's job.
        self.client = WebhookClient(webhook_url, timeout=timeout_s, retry_handlers=[])

    def send(self, notification: Notification) -> None:
        if notification.action is Action.RESOLVE:
            text, blocks = resolve_blocks(notification)
        else:
            text, blocks = trigger_blocks(notification)
        try:
            response = self.client.send(text=text, blocks=blocks)
        except OSError as exc:  # URLError, connection refused/reset, timeouts
            raise TransientDeliveryError(f"slack webhook unreachable: {exc}") from exc
        classify_status(response.status_code, str(response.body),
                        retry_after=response.headers.get("Retry-After")
                        or response.headers.get("retry-after"))

    def close(self) -> None:
        pass
