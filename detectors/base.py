"""The detector contract.

A detector is a pure online object: ``update(event)`` per event returns the findings that
event caused (``()`` when none), state is bounded, and ``snapshot()``/``restore()`` move that
state through JSON so a worker can checkpoint it. Detectors import stdlib, numpy and scipy
only: no Kafka, no HTTP, no environment, no clock (every event carries its timestamp).
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, Sequence, TypeVar, runtime_checkable

from agentwatch.events import Finding

E_contra = TypeVar("E_contra", contravariant=True)


@runtime_checkable
class Detector(Protocol[E_contra]):
    name: ClassVar[str]
    # The event classes this detector consumes; the stream runner routes by them.
    accepts: ClassVar[tuple[type, ...]]
    # The event field every piece of one key's state depends on (``trace_id``, ``project``,
    # ``service``, ``host``): the stream routes events to the detector by it, so one key's events
    # meet in one partition's detector whatever the worker count. A class or instance attribute.
    partition_by: str
    # Optional, for a detector that accepts LlmCall and runs outside the trace stage: the
    # LlmCall fields ``update`` reads (a class or instance attribute). The stream forwards only
    # those (the prompt, response and tool texts make up most of a call's bytes), the others
    # arrive as their defaults; a detector without it gets whole calls.
    # llm_call_reads: frozenset[str]

    def update(self, event: E_contra) -> Sequence[Finding]: ...

    def snapshot(self) -> dict[str, Any]: ...

    def restore(self, snap: dict[str, Any]) -> None: ...
