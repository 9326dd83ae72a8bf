"""Per-key windows of sampled prompts for the drift detector.

The Faust worker calls, per batch of ``LlmCall`` events::

    sampler.offer(llm_calls)                       # cheap: a reservoir update per prompt
    windows = sampler.due_windows(now_ts)          # closed windows, oldest first
    if windows:
        embedded = await loop.run_in_executor(pool, embed_windows, windows, embedder)
        for window in embedded:
            findings = detector.update(window)     # DriftDetector

Only the sampled prompts are ever embedded (``sample_size`` per key and window), and the
embedder is rate-limited, so drift costs a bounded, configurable share of the CPU however much
traffic arrives.

Windows are keyed by :func:`key_of` (``service=shop`` by default). A window is either
event-time tumbling (``window_s``, aligned to multiples of it) or count based
(``window_count`` prompts offered), or both, whichever closes first. A time window that holds
fewer than ``min_window_size`` sampled prompts when it ends stays open into the next period
(up to ``max_window_span_s``), so quiet keys are still checked, just less often.

Examples
--------
>>> from agentwatch.events import LlmCall
>>> sampler = DriftSampler(window_s=60.0, sample_size=3, min_window_size=2, grace_s=0.0)
>>> sampler.offer(LlmCall(ts=float(t), trace_id="t", span_id=str(t), service="shop",
...                       prompt=f"prompt {t}") for t in range(10))
>>> [(w.key, w.start_ts, w.end_ts, len(w.texts), w.seen) for w in sampler.due_windows(60.0)]
[('service=shop', 0.0, 60.0, 3, 10)]
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from agentwatch.detectors.drift import EmbeddedWindow
from agentwatch.events import LlmCall


def key_of(call: LlmCall, fields: Sequence[str] = ("service",)) -> str:
    """The drift key of a call: ``field=value`` pairs joined by ``/`` (``service=shop``).

    The same string is what ``agentwatch reference add --key`` binds a reference to.
    """
    return "/".join(f"{name}={getattr(call, name)}" for name in fields)


@dataclass(frozen=True, slots=True)
class SampledWindow:
    """A closed window: up to ``sample_size`` prompts sampled uniformly from ``seen``."""

    key: str
    start_ts: float
    end_ts: float
    texts: tuple[str, ...]
    seen: int


@dataclass(slots=True)
class _OpenWindow:
    start_ts: float
    end_ts: float  # time windows: the current period boundary; count windows: last event ts
    seen: int = 0
    reservoir: list = field(default_factory=list)
    distinct: set = field(default_factory=set)  # the prompts now in the reservoir


@dataclass(slots=True)
class SamplerCounters:
    """What the sampler had to give up; exported as metrics by the worker."""

    offered: int = 0
    empty_prompts: int = 0
    late: int = 0  # folded into the key's current window
    windows_closed: int = 0
    small_windows_dropped: int = 0
    pending_dropped: int = 0  # closed windows dropped because embedding fell behind
    keys_evicted: int = 0
    duplicates: int = 0  # prompts already in their window's sample (agents repeat them per step)


class DriftSampler:
    """Reservoir-samples prompts per key and window.

    Parameters
    ----------
    key_fields : tuple of str
        ``LlmCall`` fields that make the key (``("service",)``, ``("service", "agent")``...).
    window_s : float or None
        Event-time tumbling window length; ``None`` for count windows only.
    window_count : int or None
        Close a window after this many prompts were offered to it; ``None`` for time only.
    sample_size : int
        Reservoir capacity: the most prompts embedded per window.
    min_window_size : int
        Fewer sampled prompts than this and a time window stays open (see module doc).
    max_window_span_s : float or None
        A window still too small after this long is dropped (default: 12 ``window_s``).
    grace_s : float
        ``due_windows(now_ts)`` closes a time window once ``now_ts >= end + grace_s``, so
        stragglers from other partitions still land in it.
    max_keys : int
        Open windows kept; the least recently offered key is closed (or dropped) beyond it.
    max_pending_windows : int
        Closed windows waiting to be taken; the oldest is dropped beyond it (counted).
    max_prompt_chars : int
        Prompts are cut to this before sampling (embedding models read ~256 tokens anyway).
    seed : int
        Seeds the reservoir sampling.
    """

    def __init__(self, *, key_fields: Sequence[str] = ("service",),
                 window_s: float | None = 300.0, window_count: int | None = None,
                 sample_size: int = 200, min_window_size: int = 30,
                 max_window_span_s: float | None = None, grace_s: float = 30.0,
                 max_keys: int = 1000, max_pending_windows: int = 64,
                 max_prompt_chars: int = 2000, seed: int = 0) -> None:
        key_fields = tuple(key_fields)
        valid = set(LlmCall.__dataclass_fields__)
        if not key_fields or any(f not in valid for f in key_fields):
            raise ValueError(f"key_fields must be LlmCall fields, got {key_fields}")
        if window_s is None and window_count is None:
            raise ValueError("set window_s, window_count or both")
        if window_s is not None and not (window_s > 0 and math.isfinite(window_s)):
            raise ValueError(f"window_s must be > 0, got {window_s}")
        if window_count is not None and window_count < 1:
            raise ValueError(f"window_count must be >= 1, got {window_count}")
        if sample_size < 1:
            raise ValueError(f"sample_size must be >= 1, got {sample_size}")
        if not 1 <= min_window_size <= sample_size:
            raise ValueError(f"min_window_size must be in [1, sample_size], got {min_window_size}")
        if max_window_span_s is not None and max_window_span_s <= 0:
            raise ValueError(f"max_window_span_s must be > 0, got {max_window_span_s}")
        if grace_s < 0:
            raise ValueError(f"grace_s must be >= 0, got {grace_s}")
        if max_keys < 1 or max_pending_windows < 1 or max_prompt_chars < 1:
            raise ValueError("max_keys, max_pending_windows and max_prompt_chars must be >= 1")
        self.key_fields = key_fields
        self.window_s = window_s
        self.window_count = window_count
        self.sample_size = sample_size
        self.min_window_size = min_window_size
        self.max_window_span_s = max_window_span_s
        self.grace_s = grace_s
        self.max_keys = max_keys
        self.max_pending_windows = max_pending_windows
        self.max_prompt_chars = max_prompt_chars
        self.seed = seed
        self.counters = SamplerCounters()
        self._rng = random.Random(seed)
        self._open: OrderedDict[str, _OpenWindow] = OrderedDict()
        self._pending: deque[SampledWindow] = deque()

    @property
    def _span_limit(self) -> float:
        if self.max_window_span_s is not None:
            return self.max_window_span_s
        return 12.0 * self.window_s if self.window_s is not None else math.inf

    def offer(self, calls: Iterable[LlmCall]) -> None:
        """Sample the prompts of a batch of calls. O(1) per call; never embeds."""
        for call in calls:
            self.counters.offered += 1
            prompt = call.prompt
            if not prompt or not prompt.strip():
                self.counters.empty_prompts += 1
                continue
            key = key_of(call, self.key_fields)
            ts = float(call.ts)
            window = self._open.get(key)
            if window is not None and self.window_s is not None and ts >= window.end_ts:
                window = self._roll(key, window, ts)
            if window is None:
                window = self._new_window(ts)
                self._open[key] = window
                self._evict_over_cap()
            else:
                self._open.move_to_end(key)
                if ts < window.start_ts:
                    self.counters.late += 1
            self._sample(window, prompt[:self.max_prompt_chars])
            if self.window_s is None:
                window.end_ts = max(window.end_ts, ts)
            if self.window_count is not None and window.seen >= self.window_count:
                self._close(key, window, window.end_ts if self.window_s is None else
                            max(ts, window.start_ts))

    def due_windows(self, now_ts: float) -> list[SampledWindow]:
        """Every closed window, oldest first; time windows ended before ``now_ts - grace_s``
        are closed here too (pass the wall clock, or the event-time watermark)."""
        if self.window_s is not None:
            for key, window in list(self._open.items()):
                if now_ts >= window.end_ts + self.grace_s:
                    self._roll(key, window, now_ts)
        taken = list(self._pending)
        self._pending.clear()
        return taken

    def flush(self) -> list[SampledWindow]:
        """Close every open window with enough prompts (shutdown), and take all closed ones."""
        for key, window in list(self._open.items()):
            self._close(key, window, window.end_ts)
        return self.due_windows(-math.inf)

    @property
    def open_keys(self) -> tuple[str, ...]:
        return tuple(self._open)

    # -- state ----------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        version, internal, gauss = self._rng.getstate()
        return {
            "rng": [version, list(internal), gauss],
            "open": {k: {"start_ts": w.start_ts, "end_ts": w.end_ts, "seen": w.seen,
                         "reservoir": list(w.reservoir)} for k, w in self._open.items()},
            "pending": [{"key": w.key, "start_ts": w.start_ts, "end_ts": w.end_ts,
                         "texts": list(w.texts), "seen": w.seen} for w in self._pending],
        }

    def restore(self, snap: dict[str, Any]) -> None:
        version, internal, gauss = snap["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
        self._open = OrderedDict(
            (k, _restored_window(w, self.sample_size)) for k, w in list(snap.get("open", {}).items())[-self.max_keys:])
        self._pending = deque(SampledWindow(w["key"], float(w["start_ts"]), float(w["end_ts"]),
                                            tuple(w["texts"]), int(w["seen"]))
                              for w in snap.get("pending", ())[-self.max_pending_windows:])

    # -- internals ------------------------------------------------------------------------------

    def _new_window(self, ts: float) -> _OpenWindow:
        if self.window_s is None:
            return _OpenWindow(ts, ts)
        start = math.floor(ts / self.window_s) * self.window_s
        return _OpenWindow(start, start + self.window_s)

    def _sample(self, window: _OpenWindow, prompt: str) -> None:
        # An agent re-sends the user's prompt at every step of a run: duplicates in one window
        # break the permutation test's independence and raise false drift. A prompt already in the
        # reservoir is not offered again (bounded: the check is against the reservoir only).
        if prompt in window.distinct:
            self.counters.duplicates += 1
            return
        # Algorithm R: after n offers every prompt is in the reservoir with chance k/n.
        window.seen += 1
        if len(window.reservoir) < self.sample_size:
            window.reservoir.append(prompt)
            window.distinct.add(prompt)
        else:
            slot = self._rng.randrange(window.seen)
            if slot < self.sample_size:
                window.distinct.discard(window.reservoir[slot])
                window.reservoir[slot] = prompt
                window.distinct.add(prompt)

    def _roll(self, key: str, window: _OpenWindow, ts: float) -> _OpenWindow | None:
        """The time window's period has ended at ``ts``: close it, or extend it when small."""
        if len(window.reservoir) >= self.min_window_size:
            self._close(key, window, window.end_ts)
            return None
        boundary = math.floor(ts / self.window_s) * self.window_s + self.window_s
        if boundary - window.start_ts > self._span_limit:
            self.counters.small_windows_dropped += 1
            del self._open[key]
            return None
        window.end_ts = boundary
        return window

    def _close(self, key: str, window: _OpenWindow, end_ts: float) -> None:
        del self._open[key]
        if len(window.reservoir) < self.min_window_size:
            self.counters.small_windows_dropped += 1
            return
        self.counters.windows_closed += 1
        if len(self._pending) >= self.max_pending_windows:
            self._pending.popleft()
            self.counters.pending_dropped += 1
        self._pending.append(SampledWindow(key, window.start_ts, end_ts,
                                           tuple(window.reservoir), window.seen))

    def _evict_over_cap(self) -> None:
        while len(self._open) > self.max_keys:
            key, window = next(iter(self._open.items()))
            self.counters.keys_evicted += 1
            self._close(key, window, window.end_ts)


def _restored_window(w: dict[str, Any], sample_size: int) -> _OpenWindow:
    reservoir = list(w["reservoir"])[:sample_size]
    return _OpenWindow(float(w["start_ts"]), float(w["end_ts"]), int(w["seen"]), reservoir, set(reservoir))


def embed_windows(windows: Sequence[SampledWindow], embedder: Any) -> list[EmbeddedWindow]:
    """Embed the windows' prompts in one batched call (run it in an executor thread).

    ``embedder`` is an ``agentwatch.streams.embeddings.Embedder`` (anything with
    ``encode(texts) -> (n, dim) array``); its rate limiter blocks this thread, not the loop.
    """
    texts = [t for w in windows for t in w.texts]
    if not texts:
        return []
    vectors = embedder.encode(texts)
    out, start = [], 0
    for w in windows:
        stop = start + len(w.texts)
        out.append(EmbeddedWindow(w.key, w.end_ts, w.texts, vectors[start:stop],
                                  start_ts=w.start_ts, seen=w.seen))
        start = stop
    return out
