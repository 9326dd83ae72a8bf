"""Bounded per-key state for processes that run forever.

Detectors keep state per trace or per key; traffic brings an unbounded number of both, so every
such map is capped (least recently touched entry goes first) and entries idle for longer than a
TTL, measured in *event* time, expire (:class:`EventTimeLru`). No clock is read: the caller passes
each event's ``ts``.

Memos of work done on payload text (the normaliser's parsed prompts) hold whatever size senders
send, so :class:`BoundedMemo` caps them in approximate bytes as well as entries.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any, Callable, Generic, Hashable, Iterator, Protocol, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


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


# What one entry of an OrderedDict costs besides its key and value: its hash-table slot and its
# link node (~105 bytes measured with tracemalloc on CPython 3.11, 100k tuple-keyed entries).
ENTRY_OVERHEAD_BYTES = 100
_MISSING: Any = object()


def approx_size(obj: object) -> int:
    """Approximate bytes held by a str, bytes, small scalar, or tuple of those; O(1) for text.

    A str counts a byte per character when it is ASCII (``str.isascii`` is a flag read) and four
    otherwise: CPython stores 1, 2 or 4 bytes a character and may cache a UTF-8 copy beside
    them, so non-ASCII text takes 3 to 8, and four is the approximation.
    The result depends only on the value, so it is the same when an entry is evicted as when it
    was stored; ``sys.getsizeof`` of a str grows once its UTF-8 form is cached, and recursing
    through arbitrary containers on every insert costs more than the memo saves. Tuples are
    walked (the normaliser's keys are short tuples of str); anything else counts 32 bytes.

    >>> approx_size("abc"), approx_size("\u00e9t\u00e9"), approx_size(("ab", "cd"))
    (52, 61, 158)
    """
    kind = type(obj)
    if kind is str:
        return 49 + (len(obj) if obj.isascii() else 4 * len(obj))  # type: ignore[arg-type]
    if kind is bytes:
        return 33 + len(obj)  # type: ignore[arg-type]
    if kind is tuple:
        return 40 + 8 * len(obj) + sum(map(approx_size, obj))  # type: ignore[arg-type]
    return 32


def _key_value_size(key: object, value: object) -> int:
    return approx_size(key) + approx_size(value)


class BoundedMemo(Generic[K, T]):
    """An LRU memo capped by entry count and by approximate bytes, whichever is reached first.

    A value whose entry would take more than ``max_entry_bytes`` is not memoised at all: redoing
    the work for it costs about what reading it in did, while keeping it would evict a large
    share of the other entries.

    Parameters
    ----------
    max_entries : int
        Most entries held (0 memoises nothing); past it the least recently used entry goes.
    max_bytes : int
        Most bytes held, as ``size`` counts them plus :data:`ENTRY_OVERHEAD_BYTES` per entry.
    max_entry_bytes : int or None
        Largest single entry kept; ``max_bytes // 8`` when None.
    size : callable
        ``size(key, value)``: bytes an entry holds. It is called again when the entry leaves, so
        it must depend on the values only (lengths, not ``sys.getsizeof``). :func:`approx_size`
        of key plus value by default.

    Examples
    --------
    >>> memo = BoundedMemo(max_entries=3, max_bytes=800, max_entry_bytes=500)
    >>> memo.put("a", "x" * 10), memo.put("b", "y" * 10), memo.get("a"), memo.bytes
    (True, True, 'xxxxxxxxxx', 418)
    >>> memo.put("c", "z" * 300), list(memo.entries), memo.bytes  # "b", least recently used, went
    (True, ['a', 'c'], 708)
    >>> memo.put("d", "w" * 500), memo.get("d"), len(memo)  # over max_entry_bytes: not kept
    (False, None, 2)
    """

    __slots__ = ("entries", "max_entries", "max_bytes", "max_entry_bytes", "bytes", "_size")

    def __init__(self, max_entries: int, max_bytes: int, *, max_entry_bytes: int | None = None,
                 size: Callable[[Any, Any], int] = _key_value_size) -> None:
        check_at_least("max_entries", max_entries, 0)
        check_at_least("max_bytes", max_bytes, 0)
        if max_entry_bytes is None:
            max_entry_bytes = max_bytes // 8
        check_at_least("max_entry_bytes", max_entry_bytes, 0)
        if max_entry_bytes > max_bytes:
            raise ValueError(f"max_entry_bytes must be <= max_bytes ({max_bytes}), got {max_entry_bytes}")
        self.entries: OrderedDict[K, T] = OrderedDict()
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_entry_bytes
        self.bytes = 0  # what the entries held now account for
        self._size = size

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is held (without marking it used)."""
        return key in self.entries

    def get(self, key: K, default: Any = None) -> Any:
        """The value for ``key`` (marked most recently used), or ``default``."""
        value = self.entries.get(key, _MISSING)
        if value is _MISSING:
            return default
        self.entries.move_to_end(key)
        return value

    def put(self, key: K, value: T) -> bool:
        """Memoise ``value`` as most recently used; False when it is too large to keep.

        Least recently used entries go until both caps hold again.
        """
        entries, size = self.entries, self._size
        held = self.bytes
        if key in entries:
            held -= size(key, entries.pop(key)) + ENTRY_OVERHEAD_BYTES
        nbytes = size(key, value) + ENTRY_OVERHEAD_BYTES
        if nbytes > self.max_entry_bytes or not self.max_entries:
            self.bytes = held
            return False
        entries[key] = value
        held += nbytes
        # max_entry_bytes <= max_bytes, so the entry just stored is never the one evicted.
        if held > self.max_bytes or len(entries) > self.max_entries:
            max_entries, max_bytes = self.max_entries, self.max_bytes
            while held > max_bytes or len(entries) > max_entries:
                old_key, old_value = entries.popitem(last=False)
                held -= size(old_key, old_value) + ENTRY_OVERHEAD_BYTES
        self.bytes = held
        return True

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0


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
