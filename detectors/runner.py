"""Route events to the detectors that accept them, and checkpoint all of them together.

The runner is what a stream worker holds per partition: ``process(batch)`` for each decoded
batch of events, ``snapshot()`` at checkpoint intervals, ``restore()`` on start-up. Routing is a
dict lookup on the event's exact type (precomputed, subclasses resolved once on first sight), so
the per-event overhead is one lookup plus one call per interested detector.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

from agentwatch.detectors.base import Detector
from agentwatch.events import Finding

Update = Callable[[Any], Sequence[Finding]]


class DetectorRunner:
    """Feeds events to detectors by their ``accepts`` types and collects the findings.

    Parameters
    ----------
    detectors : Iterable[Detector]
        Detector instances; their ``name`` values must be distinct (they key the snapshot).

    Examples
    --------
    >>> from agentwatch.detectors.loops import LoopDetector
    >>> from agentwatch.events import ToolCall
    >>> runner = DetectorRunner([LoopDetector()])
    >>> calls = [ToolCall(ts=float(i), trace_id="t", span_id=str(i), tool_name="search",
    ...                   arguments='{"q": 1}') for i in range(3)]
    >>> [f.kind for f in runner.process(calls)]
    ['repeated_tool_call']
    >>> sorted(runner.snapshot())
    ['agent_loop']
    """

    def __init__(self, detectors: Iterable[Detector]) -> None:
        self.detectors: dict[str, Detector] = {}
        for det in detectors:
            name = type(det).name
            if name in self.detectors:
                raise ValueError(f"two detectors named {name!r}; names key the snapshot")
            if not getattr(type(det), "accepts", ()):
                raise ValueError(f"detector {name!r} accepts no event types")
            self.detectors[name] = det
        self._routes: dict[type, tuple[Update, ...]] = {}
        for det in self.detectors.values():
            for event_type in type(det).accepts:
                self._routes[event_type] = self._routes.get(event_type, ()) + (det.update,)

    def routes_for(self, event_type: type) -> tuple[Update, ...]:
        """The update methods an event of ``event_type`` goes to (cached per type)."""
        routes = self._routes.get(event_type)
        if routes is None:
            # First event of an unregistered type (a subclass, or something no detector wants):
            # resolve by isinstance once, then it is a plain lookup like the rest.
            routes = tuple(det.update for det in self.detectors.values()
                           if issubclass(event_type, type(det).accepts))
            self._routes[event_type] = routes
        return routes

    def route_as(self, view_type: type, event_type: type) -> None:
        """Route events of ``view_type`` (a view of ``event_type`` with the same field names) to
        the detectors of ``event_type``."""
        self._routes[view_type] = self.routes_for(event_type)

    def update(self, event: Any) -> list[Finding]:
        findings: list[Finding] = []
        for update in self.routes_for(type(event)):
            found = update(event)
            if found:
                findings.extend(found)
        return findings

    def process(self, events: Iterable[Any]) -> list[Finding]:
        """Every finding the events cause, in event order (then detector order)."""
        findings: list[Finding] = []
        extend = findings.extend
        routes = self._routes
        routes_for = self.routes_for
        for event in events:
            updates = routes.get(type(event))
            if updates is None:
                updates = routes_for(type(event))
            for update in updates:
                found = update(event)
                if found:
                    extend(found)
        return findings

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """JSON-able state of every detector, by detector name."""
        return {name: det.snapshot() for name, det in self.detectors.items()}

    def restore(self, snap: dict[str, dict[str, Any]]) -> None:
        """Restore detectors from :meth:`snapshot` output.

        A detector missing from ``snap`` (added since the checkpoint) keeps its fresh state; a
        name in ``snap`` without a detector (removed since) is ignored.
        """
        for name, det in self.detectors.items():
            if name in snap:
                det.restore(snap[name])

    def state_sizes(self) -> dict[str, int]:
        """Entries held per detector (those that report ``state_size()``)."""
        return {name: det.state_size() for name, det in self.detectors.items()
                if callable(getattr(det, "state_size", None))}
