"""Alert policy: routing, grouping, dedup while firing, rate limits, silences, resolve.

Pure and clock-free: every method that depends on time takes ``now`` (unix seconds) from the
caller, so tests move a fake clock and the notifier passes ``time.time()``. The policy turns
alerts into :class:`Notification` objects (what to send where); it never sends anything.

Semantics
---------
- An *incident* is the life of one ``dedup_key`` from its first firing alert to its resolve.
  Repeats while firing update ``count``/``last_seen`` and send nothing new (dedup).
- A new incident is routed: routes are tried in order, the first match wins unless it has
  ``continue: true``; no match falls back to ``default_destinations`` (route ``default``).
- Grouping: per route, incidents with equal ``group_by`` labels that start within
  ``group_wait_s`` of the group's first one go out together. ``0`` sends at once.
- Rate limit per route (token bucket): a ready group waits for a token; when several groups of
  a route are ready and tokens are short they are merged into one digest notification, so a
  storm becomes few messages and no alert is dropped.
- Resolve: destinations that got the trigger get a resolve notification at once (PagerDuty
  resolve event, Slack follow-up); an incident still waiting in a group is just withdrawn.
- Silences: a silenced incident is tracked (count, first/last seen) but not routed; if it is
  still firing when the silence ends, its next repeat routes it.
- Annotation destinations (Grafana) get every incident's trigger and resolve, unsilenced and
  ungrouped: they record history rather than page anyone.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Iterable, Mapping, Sequence

from agentwatch.alerts.config import RateLimit, Route, RoutesConfig
from agentwatch.alerts.model import Alert, AlertStatus, alert_from_dict

DEFAULT_ROUTE = "default"


class Action(StrEnum):
    TRIGGER = "trigger"
    RESOLVE = "resolve"


# --------------------------------------------------------------------------- silences

_MATCHER = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.\-]*)\s*(=~|!=|=)\s*(.*?)\s*$")


@dataclass(frozen=True, slots=True)
class Matcher:
    """``name=value``, ``name!=value`` or ``name=~regex`` (full match) on alert labels."""

    name: str
    op: str
    value: str

    def __post_init__(self) -> None:
        if self.op not in ("=", "!=", "=~"):
            raise ValueError(f"matcher operator {self.op!r} is not one of =, !=, =~")
        if self.op == "=~":
            try:
                re.compile(self.value)
            except re.error as exc:
                raise ValueError(f"bad regex in matcher {self}: {exc}") from None

    @classmethod
    def parse(cls, text: str) -> "Matcher":
        found = _MATCHER.match(text)
        if not found:
            raise ValueError(f"matcher {text!r} is not NAME=VALUE, NAME!=VALUE or NAME=~REGEX")
        return cls(found.group(1), found.group(2), found.group(3))

    def matches(self, labels: Mapping[str, str]) -> bool:
        actual = labels.get(self.name, "")
        if self.op == "=":
            return actual == self.value
        if self.op == "!=":
            return actual != self.value
        return re.fullmatch(self.value, actual) is not None

    def __str__(self) -> str:
        return f"{self.name}{self.op}{self.value}"


@dataclass(frozen=True, slots=True)
class Silence:
    id: str
    matchers: tuple[Matcher, ...]
    starts_at: float
    ends_at: float
    comment: str = ""
    created_by: str = ""

    def __post_init__(self) -> None:
        if not self.matchers:
            raise ValueError("a silence needs at least one matcher")
        if not self.ends_at > self.starts_at:
            raise ValueError("a silence must end after it starts")

    def active(self, now: float) -> bool:
        return self.starts_at <= now < self.ends_at

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(m.matches(labels) for m in self.matchers)


def parse_duration(text: str) -> float:
    """``90s``, ``15m``, ``2h``, ``1d``, ``1h30m`` -> seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhd])", text.strip().lower())
    if not parts or "".join(n + u for n, u in parts) != text.strip().lower():
        raise ValueError(f"duration {text!r} is not like 90s, 15m, 2h, 1d or 1h30m")
    seconds = sum(float(n) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError("duration must be positive")
    return seconds


# --------------------------------------------------------------------------- notifications

@dataclass(frozen=True, slots=True)
class IncidentAlert:
    """The latest alert of an incident with the incident's running figures."""

    alert: Alert
    first_seen: float
    last_seen: float
    count: int

    def to_dict(self) -> dict[str, Any]:
        return {"alert": self.alert.to_dict(), "first_seen": self.first_seen,
                "last_seen": self.last_seen, "count": self.count}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "IncidentAlert":
        return cls(alert_from_dict(dict(data["alert"])), float(data["first_seen"]),
                   float(data["last_seen"]), int(data["count"]))


@dataclass(frozen=True, slots=True)
class Notification:
    """One delivery to one destination: a trigger for a group of incidents, or a resolve.

    ``id`` is deterministic (destination, action, incidents and their episodes), so writing the
    same notification twice into the outbox is a no-op.
    """

    id: str
    destination: str
    route: str
    action: Action
    group_key: str
    alerts: tuple[IncidentAlert, ...]
    created_at: float

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "destination": self.destination, "route": self.route,
                "action": self.action.value, "group_key": self.group_key,
                "alerts": [a.to_dict() for a in self.alerts], "created_at": self.created_at}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Notification":
        return cls(data["id"], data["destination"], data["route"], Action(data["action"]),
                   data["group_key"], tuple(IncidentAlert.from_dict(a) for a in data["alerts"]),
                   float(data["created_at"]))


def _notification_id(destination: str, action: Action, route: str,
                     episodes: Sequence[tuple[str, float]]) -> str:
    text = "|".join([destination, action.value, route,
                     *(f"{dk}@{first!r}" for dk, first in sorted(episodes))])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# --------------------------------------------------------------------------- state

@dataclass(slots=True)
class Incident:
    dedup_key: str
    status: AlertStatus
    first_seen: float
    last_seen: float
    count: int
    latest: Alert
    silenced: bool = False
    # (route, destination) pairs that were sent a trigger: exactly these get the resolve.
    notified: list[tuple[str, str]] = field(default_factory=list)
    # Routes whose group still holds this incident (not yet sent).
    pending_routes: list[str] = field(default_factory=list)

    def view(self) -> IncidentAlert:
        return IncidentAlert(self.latest, self.first_seen, self.last_seen, self.count)

    def to_dict(self) -> dict[str, Any]:
        return {"dedup_key": self.dedup_key, "status": self.status.value,
                "first_seen": self.first_seen, "last_seen": self.last_seen, "count": self.count,
                "latest": self.latest.to_dict(), "silenced": self.silenced,
                "notified": [list(p) for p in self.notified],
                "pending_routes": list(self.pending_routes)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Incident":
        return cls(data["dedup_key"], AlertStatus(data["status"]), float(data["first_seen"]),
                   float(data["last_seen"]), int(data["count"]),
                   alert_from_dict(dict(data["latest"])), bool(data["silenced"]),
                   [(r, d) for r, d in data["notified"]], list(data["pending_routes"]))


@dataclass(slots=True)
class PendingGroup:
    route: str
    group_key: str
    ready_at: float
    dedup_keys: list[str] = field(default_factory=list)


class TokenBucket:
    """Rate limit with an explicit clock: ``max_notifications`` burst, refilled over ``per_s``."""

    def __init__(self, limit: RateLimit, tokens: float | None = None,
                 updated_at: float | None = None) -> None:
        self.limit = limit
        self.tokens = float(limit.max_notifications) if tokens is None else tokens
        self.updated_at = updated_at

    @property
    def refill_per_s(self) -> float:
        return self.limit.max_notifications / self.limit.per_s

    def _refill(self, now: float) -> None:
        if self.updated_at is not None and now > self.updated_at:
            self.tokens = min(float(self.limit.max_notifications),
                              self.tokens + (now - self.updated_at) * self.refill_per_s)
        if self.updated_at is None or now > self.updated_at:
            self.updated_at = now

    def available(self, now: float) -> int:
        self._refill(now)
        # The epsilon absorbs float error so a bucket refilled for exactly 1/rate has a token.
        return int(math.floor(self.tokens + 1e-9))

    def consume(self, now: float, n: int = 1) -> None:
        self._refill(now)
        self.tokens -= n

    def next_token_at(self, now: float) -> float:
        self._refill(now)
        missing = 1.0 - self.tokens
        return now if missing <= 1e-9 else now + missing / self.refill_per_s

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "updated_at": self.updated_at}


@dataclass(slots=True)
class PolicyChanges:
    """What changed since the last :meth:`AlertPolicy.drain_changes` (for incremental saves)."""

    upserted: dict[str, dict[str, Any]]
    deleted: list[str]
    meta: dict[str, Any]


@dataclass(slots=True)
class PolicyStats:
    alerts: int = 0
    deduplicated: int = 0
    silenced: int = 0
    orphan_resolves: int = 0
    rate_limited_digests: int = 0
    evicted_incidents: int = 0


class AlertPolicy:
    """Decides which notifications an alert stream causes. Pure; ``now`` comes from the caller.

    Parameters
    ----------
    config : RoutesConfig
        Destinations, routes, grouping windows and rate limits.
    max_incidents : int
        Cap on remembered incidents; least recently updated ones (not waiting in a group) are
        forgotten first, so memory stays bounded however many dedup keys appear.

    Examples
    --------
    >>> from agentwatch.alerts.config import parse_routes
    >>> cfg = parse_routes({"destinations": {"s": {"type": "slack", "webhook_url": "http://x"}},
    ...                     "default_destinations": ["s"]})
    >>> policy = AlertPolicy(cfg)
    """

    def __init__(self, config: RoutesConfig, *, max_incidents: int = 50_000) -> None:
        if max_incidents <= 0:
            raise ValueError("max_incidents must be positive")
        self.config = config
        self.max_incidents = max_incidents
        self.silences: tuple[Silence, ...] = ()
        self.stats = PolicyStats()
        self._incidents: OrderedDict[str, Incident] = OrderedDict()
        self._groups: dict[tuple[str, str], PendingGroup] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self._routes: dict[str, Route] = {r.name: r for r in config.routes}
        self._dirty: set[str] = set()
        self._deleted: set[str] = set()

    # -- inputs

    def set_silences(self, silences: Iterable[Silence]) -> None:
        self.silences = tuple(silences)

    def observe(self, alert: Alert, now: float) -> list[Notification]:
        """Account for one alert; return the notifications due now (including flushed groups)."""
        self.stats.alerts += 1
        out: list[Notification] = []
        incident = self._incidents.get(alert.dedup_key)
        labels = alert.match_labels()
        if alert.status is AlertStatus.FIRING:
            if incident is not None and incident.status is AlertStatus.FIRING:
                self.stats.deduplicated += 1
                incident.count += 1
                if alert.ts >= incident.latest.ts:
                    incident.latest = alert
                incident.last_seen = max(incident.last_seen, alert.ts)
                if incident.silenced and not self._silenced(labels, now):
                    incident.silenced = False
                    self._route(incident, labels, now)
            else:
                incident = Incident(alert.dedup_key, AlertStatus.FIRING, alert.ts, alert.ts, 1,
                                    alert)
                self._incidents[alert.dedup_key] = incident
                self._deleted.discard(alert.dedup_key)
                out += self._annotations(incident, Action.TRIGGER, now)
                if self._silenced(labels, now):
                    self.stats.silenced += 1
                    incident.silenced = True
                else:
                    self._route(incident, labels, now)
        else:
            if incident is None or incident.status is AlertStatus.RESOLVED:
                self.stats.orphan_resolves += 1
                return self.flush(now)
            incident.status = AlertStatus.RESOLVED
            incident.latest = alert
            incident.last_seen = max(incident.last_seen, alert.ts)
            self._withdraw(incident)
            view = incident.view()
            for route, destination in incident.notified:
                out.append(self._make(destination, route, Action.RESOLVE, incident.dedup_key,
                                      (view,), now))
            out += self._annotations(incident, Action.RESOLVE, now)
        self._touch(alert.dedup_key)
        out += self.flush(now)
        self._evict()
        return out

    def flush(self, now: float) -> list[Notification]:
        """Groups whose window has closed and whose route has rate-limit budget, as notifications."""
        out: list[Notification] = []
        by_route: dict[str, list[PendingGroup]] = {}
        for group in self._groups.values():
            if group.ready_at <= now:
                by_route.setdefault(group.route, []).append(group)
        for route_name, ready in by_route.items():
            ready.sort(key=lambda g: (g.ready_at, g.group_key))
            bucket = self._bucket(route_name)
            if bucket is None or bucket.available(now) >= len(ready):
                for group in ready:
                    out += self._send_group(route_name, group.group_key, group.dedup_keys, now)
                    if bucket is not None:
                        bucket.consume(now)
                    del self._groups[(route_name, group.group_key)]
            elif bucket.available(now) >= 1:
                self.stats.rate_limited_digests += 1
                merged = [dk for group in ready for dk in group.dedup_keys]
                out += self._send_group(route_name, "rate-limited digest", merged, now)
                bucket.consume(now)
                for group in ready:
                    del self._groups[(route_name, group.group_key)]
        return out

    def next_deadline(self, now: float) -> float | None:
        """When :meth:`flush` could next return something (None: nothing is waiting)."""
        deadline: float | None = None
        for group in self._groups.values():
            at = group.ready_at
            bucket = self._bucket(group.route)
            if bucket is not None and at <= now:
                at = bucket.next_token_at(now)
            deadline = at if deadline is None else min(deadline, at)
        return deadline

    # -- reading state

    def incident(self, dedup_key: str) -> Incident | None:
        return self._incidents.get(dedup_key)

    def pending_groups(self) -> list[PendingGroup]:
        return list(self._groups.values())

    # -- persistence

    def drain_changes(self) -> PolicyChanges:
        changes = PolicyChanges(
            upserted={dk: self._incidents[dk].to_dict() for dk in self._dirty
                      if dk in self._incidents},
            deleted=sorted(self._deleted), meta=self._meta())
        self._dirty.clear()
        self._deleted.clear()
        return changes

    def snapshot(self) -> dict[str, Any]:
        """The whole state as JSON-able data (tests, small deployments)."""
        return {"incidents": [i.to_dict() for i in self._incidents.values()], **self._meta()}

    def restore(self, snap: Mapping[str, Any]) -> None:
        self.restore_parts(snap.get("incidents", []), snap)

    def restore_parts(self, incidents: Iterable[Mapping[str, Any]], meta: Mapping[str, Any]) -> None:
        self._incidents = OrderedDict()
        # Least recently updated first, as the LRU order was before the restart.
        for data in sorted(incidents, key=lambda d: d.get("last_seen", 0.0)):
            incident = Incident.from_dict(data)
            self._incidents[incident.dedup_key] = incident
        self._groups = {}
        for g in meta.get("groups", []):
            if g["route"] in self._routes or g["route"] == DEFAULT_ROUTE:
                keys = [dk for dk in g["dedup_keys"] if dk in self._incidents]
                if keys:
                    self._groups[(g["route"], g["group_key"])] = PendingGroup(
                        g["route"], g["group_key"], float(g["ready_at"]), keys)
        self._buckets = {}
        for name, b in meta.get("buckets", {}).items():
            limit = self.config.rate_limit_for(self._routes.get(name))
            if limit is not None:
                self._buckets[name] = TokenBucket(limit, float(b["tokens"]), b["updated_at"])
        self._dirty.clear()
        self._deleted.clear()

    # -- internals

    def _meta(self) -> dict[str, Any]:
        return {"groups": [{"route": g.route, "group_key": g.group_key, "ready_at": g.ready_at,
                            "dedup_keys": list(g.dedup_keys)} for g in self._groups.values()],
                "buckets": {name: b.to_dict() for name, b in self._buckets.items()}}

    def _touch(self, dedup_key: str) -> None:
        if dedup_key in self._incidents:
            self._incidents.move_to_end(dedup_key)
            self._dirty.add(dedup_key)

    def _evict(self) -> None:
        if len(self._incidents) <= self.max_incidents:
            return
        for dedup_key in list(self._incidents):
            if len(self._incidents) <= self.max_incidents:
                break
            if self._incidents[dedup_key].pending_routes:
                continue  # still waiting to be sent: forgetting it would lose the alert
            del self._incidents[dedup_key]
            self._dirty.discard(dedup_key)
            self._deleted.add(dedup_key)
            self.stats.evicted_incidents += 1

    def _silenced(self, labels: Mapping[str, str], now: float) -> bool:
        return any(s.active(now) and s.matches(labels) for s in self.silences)

    def _matching_routes(self, labels: Mapping[str, str]) -> list[tuple[str, Route | None]]:
        matched: list[tuple[str, Route | None]] = []
        for route in self.config.routes:
            if route.matches(labels):
                matched.append((route.name, route))
                if not route.continue_:
                    break
        if not matched and self.config.default_destinations:
            matched.append((DEFAULT_ROUTE, None))
        return matched

    def _route(self, incident: Incident, labels: Mapping[str, str], now: float) -> None:
        for name, route in self._matching_routes(labels):
            if name in incident.pending_routes or any(r == name for r, _ in incident.notified):
                continue
            group_by = route.group_by if route is not None else ["dedup_key"]
            group_key = ",".join(f"{k}={labels.get(k, '')}" for k in group_by)
            group = self._groups.get((name, group_key))
            if group is None:
                group = PendingGroup(name, group_key, now + self.config.group_wait_for(route))
                self._groups[(name, group_key)] = group
            group.dedup_keys.append(incident.dedup_key)
            incident.pending_routes.append(name)

    def _withdraw(self, incident: Incident) -> None:
        for (route, key), group in list(self._groups.items()):
            if incident.dedup_key in group.dedup_keys:
                group.dedup_keys.remove(incident.dedup_key)
                if not group.dedup_keys:
                    del self._groups[(route, key)]
        incident.pending_routes.clear()

    def _bucket(self, route_name: str) -> TokenBucket | None:
        bucket = self._buckets.get(route_name)
        if bucket is None:
            limit = self.config.rate_limit_for(self._routes.get(route_name))
            if limit is None:
                return None
            bucket = self._buckets[route_name] = TokenBucket(limit)
        return bucket

    def _destinations(self, route_name: str) -> list[str]:
        route = self._routes.get(route_name)
        return list(route.destinations) if route is not None else list(
            self.config.default_destinations)

    def _send_group(self, route_name: str, group_key: str, dedup_keys: Sequence[str],
                    now: float) -> list[Notification]:
        incidents = [self._incidents[dk] for dk in dict.fromkeys(dedup_keys)
                     if dk in self._incidents]
        incidents = [i for i in incidents if i.status is AlertStatus.FIRING]
        if not incidents:
            return []
        views = tuple(i.view() for i in incidents)
        out = []
        for destination in self._destinations(route_name):
            out.append(self._make(destination, route_name, Action.TRIGGER, group_key, views, now))
            for incident in incidents:
                incident.notified.append((route_name, destination))
        for incident in incidents:
            if route_name in incident.pending_routes:
                incident.pending_routes.remove(route_name)
            self._dirty.add(incident.dedup_key)
        return out

    def _annotations(self, incident: Incident, action: Action, now: float) -> list[Notification]:
        view = incident.view()
        return [self._make(dest, "annotations", action, incident.dedup_key, (view,), now)
                for dest in self.config.annotations]

    @staticmethod
    def _make(destination: str, route: str, action: Action, group_key: str,
              views: tuple[IncidentAlert, ...], now: float) -> Notification:
        episodes = [(v.alert.dedup_key, v.first_seen) for v in views]
        return Notification(_notification_id(destination, action, route, episodes), destination,
                            route, action, group_key, views, now)
