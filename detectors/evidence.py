"""Typed finding evidence: a frozen, slotted dataclass per detector, a plain mapping on the wire.

Each detector describes what it saw in a dataclass defined next to it and derived from
:class:`Evidence` (``CostSpikeEvidence`` in ``detectors/cost.py``, ``VramLeakEvidence`` in
``detectors/vram.py``, ...), and puts :meth:`Evidence.to_mapping` of it in
:attr:`agentwatch.events.Finding.evidence`. So the wire (orjson), the worker's decoder (msgspec,
which gives a plain dict back), the Parquet snapshots and the alert details keep the JSON keys
they always had; consumers read the evidence back typed with
:func:`agentwatch.detectors.findings.evidence_of`.

The field names are the mapping's keys. A field whose default is ``None`` is optional: it is
left out of the mapping while unset (a resolution carries no trigger, a skew check no history
window). A required field is always written, ``None`` included (JSON ``null``). Tuples are
written as lists (JSON arrays) and read back as tuples, so
``type(ev).from_mapping(ev.to_mapping()) == ev`` for evidence whose values are JSON-able.

Examples
--------
>>> from dataclasses import dataclass
>>> @dataclass(frozen=True, slots=True, kw_only=True)
... class Seen(Evidence):
...     trace_id: str
...     calls: tuple[str, ...]
...     reason: str | None = None
>>> Seen(trace_id="t1", calls=("a", "b")).to_mapping()
{'trace_id': 't1', 'calls': ['a', 'b']}
>>> Seen.from_mapping({"trace_id": "t1", "calls": ["a", "b"], "added_later": 1})
Seen(trace_id='t1', calls=('a', 'b'), reason=None)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Self

# Evidence class -> ((field name, optional), ...), worked out once per class.
_LAYOUTS: dict[type, tuple[tuple[str, bool], ...]] = {}


def _layout(cls: type) -> tuple[tuple[str, bool], ...]:
    layout = _LAYOUTS.get(cls)
    if layout is None:
        layout = _LAYOUTS[cls] = tuple((f.name, f.default is None)
                                       for f in dataclasses.fields(cls))
    return layout


class Evidence:
    """Base of the evidence dataclasses (declare them ``frozen=True, slots=True, kw_only=True``)."""

    __slots__ = ()

    def to_mapping(self) -> dict[str, Any]:
        """The JSON-able mapping a :class:`~agentwatch.events.Finding` carries."""
        out: dict[str, Any] = {}
        for name, optional in _layout(type(self)):
            value = getattr(self, name)
            if value is None and optional:
                continue
            out[name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Self:
        """The evidence ``data`` describes; keys that are not fields are ignored (a newer
        producer may add some). Raises ``TypeError`` when a required field is missing."""
        kwargs: dict[str, Any] = {}
        for name, _ in _layout(cls):
            if name in data:
                value = data[name]
                kwargs[name] = tuple(value) if isinstance(value, list) else value
        return cls(**kwargs)
