"""``agentwatch notify`` and ``agentwatch silence add|list|remove``.

The lead registers :data:`notify` and :data:`silence` on the top-level click group. Run this
module directly (``python -m agentwatch.alerts.cli notify ...``) for the same commands without
the rest of the CLI (the kill -9 test does).
"""

from __future__ import annotations

import getpass
import logging
import os
import signal
import threading
import time
import uuid
from datetime import datetime, timezone

import click

DEFAULT_STATE_DIR = ".agentwatch/alerts"
_state_dir_option = click.option(
    "--state-dir", envvar="AGENTWATCH_ALERTS_STATE_DIR", default=DEFAULT_STATE_DIR,
    show_default=True, type=click.Path(file_okay=False),
    help="Notifier state: outbox, offsets, dedup state and silences (notifier.sqlite3).")


@click.command("notify")
@click.option("--bootstrap-servers", envvar="AGENTWATCH_BOOTSTRAP_SERVERS",
              default="127.0.0.1:9092", show_default=True)
@click.option("--routes", "routes_path", envvar="AGENTWATCH_ALERT_ROUTES", required=True,
              type=click.Path(exists=True, dir_okay=False),
              help="Routes YAML (see alerts/routes.example.yaml); ${ENV} references allowed.")
@_state_dir_option
@click.option("--topic", default="alerts", show_default=True)
@click.option("--dead-letter-topic", default="dead_letter", show_default=True)
@click.option("--group-id", default="agentwatch-notifier", show_default=True)
@click.option("--log-level", default="INFO", show_default=True)
@click.option("--metrics-port", type=int, default=0, envvar="AGENTWATCH_NOTIFIER_METRICS_PORT",
              help="Serve Prometheus /metrics (deliveries, failures by destination) here; 0 = off.")
def notify(bootstrap_servers: str, routes_path: str, state_dir: str, topic: str,
           dead_letter_topic: str, group_id: str, log_level: str, metrics_port: int) -> None:
    """Deliver alerts from the `alerts` topic to Slack, PagerDuty and Grafana."""
    from agentwatch.alerts.service import run_notifier

    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One INFO line per HTTP request / Kafka connection drowns the notifier's own messages.
    for chatty in ("httpx2", "kafka"):
        logging.getLogger(chatty).setLevel(max(logging.WARNING, logging.getLogger().level))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stats = run_notifier(bootstrap_servers, routes_path, state_dir, stop_event=stop, topic=topic,
                         dead_letter_topic=dead_letter_topic, group_id=group_id, metrics_port=metrics_port)
    click.echo(f"notifier stopped: {stats}")


@click.group("silence")
def silence() -> None:
    """Silence alerts matching labels for a while (stored in the notifier state dir)."""


@silence.command("add")
@click.option("--match", "matchers", multiple=True, required=True,
              help="NAME=VALUE, NAME!=VALUE or NAME=~REGEX on alert labels "
                   "(detector, kind, key, severity, project, service, ...). Repeat to AND.")
@click.option("--for", "duration", required=True, help="How long: 90s, 15m, 2h, 1d, 1h30m.")
@click.option("--comment", default="", help="Why (shown in `silence list`).")
@click.option("--author", default=None, help="Who; defaults to the login name.")
@_state_dir_option
def silence_add(matchers: tuple[str, ...], duration: str, comment: str, author: str | None,
                state_dir: str) -> None:
    from agentwatch.alerts.outbox import NotifierStore
    from agentwatch.alerts.policy import Matcher, Silence, parse_duration

    try:
        parsed = tuple(Matcher.parse(m) for m in matchers)
        seconds = parse_duration(duration)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    now = time.time()
    created = Silence(uuid.uuid4().hex[:12], parsed, now, now + seconds, comment,
                      author or _login())
    store = NotifierStore(state_dir)
    try:
        store.add_silence(created)
    finally:
        store.close()
    click.echo(f"{created.id}  until {_fmt(created.ends_at)}  "
               f"{' '.join(str(m) for m in created.matchers)}")


@silence.command("list")
@click.option("--all", "show_all", is_flag=True, help="Include expired silences.")
@_state_dir_option
def silence_list(show_all: bool, state_dir: str) -> None:
    from agentwatch.alerts.outbox import NotifierStore

    store = NotifierStore(state_dir)
    try:
        silences = store.silences(active_at=None if show_all else time.time())
    finally:
        store.close()
    if not silences:
        click.echo("no silences")
        return
    now = time.time()
    for s in silences:
        state = "active" if s.active(now) else ("expired" if now >= s.ends_at else "pending")
        click.echo(f"{s.id}  {state:7}  until {_fmt(s.ends_at)}  "
                   f"{' '.join(str(m) for m in s.matchers)}  by {s.created_by}"
                   + (f"  # {s.comment}" if s.comment else ""))


@silence.command("remove")
@click.argument("silence_id")
@_state_dir_option
def silence_remove(silence_id: str, state_dir: str) -> None:
    from agentwatch.alerts.outbox import NotifierStore

    store = NotifierStore(state_dir)
    try:
        removed = store.remove_silence(silence_id)
    finally:
        store.close()
    if not removed:
        raise click.ClickException(f"no silence with id {silence_id}")
    click.echo(f"removed {silence_id}")


def _fmt(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _login() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return os.environ.get("USER", "unknown")


@click.group()
def _standalone() -> None:
    pass


_standalone.add_command(notify)
_standalone.add_command(silence)

if __name__ == "__main__":
    _standalone()
