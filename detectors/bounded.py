"""Bounded per-key state for detectors that run forever: an LRU map that also expires by event time.

Detectors keep state per trace or per key; traffic brings an unbounded number of both, so every
such map is capped (least recently touched entry goes first) and entries idle for longer than a
TTL, measured in *event* time, expire. No clock is read: the caller passes each event's ``ts``.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any, Generic, Hashable, Iterator, Protocol, TypeVar

K = TypeVar("K", bound=Hashable)


class HasLastTs(Protocol):
    last_ts: float


V = TypeVar("V", bound=HasLastTs)

# How often (as a fraction of the TTL, in event time) the expiry sweep runs: sweeping on every
# event would cost a dict peek per event for nothing, and expiry only needs TTL-ish precision.
_SWEEP_FRACTION = 1.0 / 16.0
_NO_ENTRIES: tuple = ()


class EventTimeLru(Generic[K, V]):
    """An insertion/touch-ordered map capped at ``max_entries``, expiring idle entries by event time.

    Values carry a ``last_ts`` attribute (the newest event time seen for them) which the owning
    detector keeps up to date.

    Parameters
    ----------
    max_entries : int
        Most entries held; inserting past it evicts the least recently touched one.
    ttl_s : float
        Entries whose ``last_ts`` is older than ``ts - ttl_s`` expire at the next sweep.

    Examples
    --------
    >>> class Entry:
    ...     def __init__(self, ts): self.last_ts = ts
    >>> lru = EventTimeLru(max_entries=2, ttl_s=60.0)
    >>> lru.insert("a", Entry(0.0)), len(lru.insert("b", Entry(1.0)))
    ([], 0)
    >>> [k for k, _ in lru.insert("c", Entry(2.0))]
    ['a']
    >>> [k for k, _ in lru.expire(100.0)]
    ['b', 'c']
    """

    __slots__ = ("entries", "max_entries", "ttl_s", "next_sweep_ts")

    def __init__(self, max_entries: int, ttl_s: float) -> None:
        check_at_least("max_entries", max_entries, 1)
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self.entries: OrderedDict[K, V] = OrderedDict()
        self.max_entries = max_entries
        self.ttl_s = float(ttl_s)
        self.next_sweep_ts = float("-inf")

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: object) -> bool:
        return key in self.entries

    def get(self, key: K) -> V | None:
        """The entry for ``key`` (marked most recently used), or None."""
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
        return entry

    def insert(self, key: K, value: V) -> list[tuple[K, V]]:
        """Add or replace ``key``; returns the entries evicted to stay within ``max_entries``."""
        entries = self.entries
        entries[key] = value
        entries.move_to_end(key)
        if len(entries) <= self.max_entries:
            return []
        evicted = []
        while len(entries) > self.max_entries:
            evicted.append(entries.popitem(last=False))
        return evicted

    def pop(self, key: K) -> V | None:
        return self.entries.pop(key, None)

    def expire(self, ts: float) -> list[tuple[K, V]] | tuple:
        """Remove and return entries idle since before ``ts - ttl_s`` (sweeps at most every TTL/16)."""
        if ts < self.next_sweep_ts:
            return _NO_ENTRIES
        self.next_sweep_ts = ts + self.ttl_s * _SWEEP_FRACTION
        cutoff = ts - self.ttl_s
        entries = self.entries
        expired = []
        # Touch order approximates event-time order; stop at the first live entry rather than
        # scanning everything (an out-of-order straggler expires a little late, never early).
        while entries:
            key = next(iter(entries))
            if entries[key].last_ts >= cutoff:
                break
            expired.append((key, entries.pop(key)))
        return expired

    def items(self) -> Iterator[tuple[K, V]]:
        return iter(self.entries.items())

    def clear(self) -> None:
        self.entries.clear()
        self.next_sweep_ts = float("-inf")

    def snapshot_meta(self) -> dict[str, Any]:
        # -inf is not JSON; None stands for "never swept".
        nxt = self.next_sweep_ts
        return {"next_sweep_ts": None if nxt == float("-inf") else nxt}

    def restore_meta(self, meta: dict[str, Any]) -> None:
        nxt = meta.get("next_sweep_ts")
        self.next_sweep_ts = float("-inf") if nxt is None else float(nxt)


def stable_hash(data: str | bytes) -> str:
    """A short hex digest that is the same in every process (unlike ``hash()``), for snapshots."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def check_at_least(name: str, value: float, minimum: float) -> None:
    """Raise ValueError unless ``value >= minimum``."""
    if not value >= minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    """Raise ValueError unless ``value`` is > 0 (or >= 0 with ``allow_zero``)."""
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
