"""VRAM leak-trend detection per (host, GPU, process) from NVML/DCGM samples.

A leak is memory that is never given back, so what a leak raises is the *floor* of the usage
curve, not its peaks: allocator caches fill once and stay flat (a plateau), garbage-collected
workloads rise and fall back (a sawtooth), and servers such as vLLM reserve ~90% of the card up
front (a big flat level). The detector therefore

1. folds samples into fixed event-time buckets (``bucket_s``) keeping each bucket's min and max,
2. takes the floor at each closed bucket as the minimum over the trailing ``floor_span_s``
   (longer than the longest GC cycle, so a sawtooth's troughs define it),
3. fits a Theil-Sen line (scipy) to the floors of the last ``window_s`` and calls it a leak when
   the slope is material, the Mann-Kendall tau says most floor pairs rise, the line explains the
   floors (R^2), and the recent half of the window still rises (a cache that finished warming up
   does not),
4. projects the time until the recent *peak* (what crashes a node) reaches ``threshold_fraction``
   of the card, and grades it: warning under ``warning_eta_s``, critical under
   ``critical_eta_s`` or already above the threshold.

The leak rate divided by the rate of LLM calls served by the same host (``LlmCall.host``, or a
``service`` named like the process) in the same window gives the MiB leaked per inference.

State resets on a process restart: a new pid is a new key (the old one expires once its device
reports without it for ``process_stale_s``), and a fall of usage well below the floor (to near
zero on restart, or a real release) discards the history that no longer describes the process.
Open findings are resolved on restart, process exit, stale keys, or when the leak stops.

Device rows (``pid == 0``) raise findings only for devices without per-process rows (DCGM, or
NVML that cannot see the processes); otherwise the process key names the culprit and the
device's usage supplies the headroom.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Sequence

import numpy as np
from scipy.stats import theilslopes

from agentwatch.detectors.bounded import EventTimeLru, check_at_least, check_positive
from agentwatch.detectors.evidence import Evidence
from agentwatch.detectors.keys import key_string
from agentwatch.events import Finding, GpuSample, LlmCall, Severity

MIB = 1 << 20
GIB = 1 << 30

_RANK = {None: 0, Severity.WARNING: 1, Severity.CRITICAL: 2}
_SNAPSHOT_VERSION = 1


@dataclass(frozen=True, slots=True)
class SenTrend:
    """A Theil-Sen fit of a floor series and how well a rising line describes it.

    Attributes
    ----------
    slope : float
        Median pairwise slope (bytes per second).
    intercept : float
        Intercept of the Sen line at ``x = 0`` (bytes).
    kendall_tau : float
        Mann-Kendall tau-a: (rising pairs - falling pairs) / all pairs; ties count as neither.
    fit_r2 : float
        Share of the floors' variance the Sen line explains; 0 for a constant series.
    recent_slope : float
        Theil-Sen slope over the newest half of the points (still rising, or settled?).
    """

    slope: float
    intercept: float
    kendall_tau: float
    fit_r2: float
    recent_slope: float


@dataclass(frozen=True, slots=True, kw_only=True)
class VramLeakEvidence(Evidence):
    """A leaking device or process: the fitted trend of its usage floor and the time left.

    Memory in MiB, rates in MiB per minute (what people read); :attr:`floor_bytes` and
    :attr:`leak_bytes_per_s` give the byte units. ``mib_per_inference`` is ``None`` (and written
    as ``null``) when no LLM calls of the host or process were seen in the window.
    """

    host: str
    gpu: int
    gpu_uuid: str
    pid: int
    process_name: str
    simulated: bool
    leak_mib_per_min: float
    kendall_tau: float
    fit_r2: float
    recent_leak_mib_per_min: float
    floor_mib: float
    peak_mib: float
    threshold_mib: float
    total_mib: float
    eta_s: float
    above_threshold: bool
    window_s: float
    points: int
    inferences: int
    inferences_from: str
    mib_per_inference: float | None

    @property
    def floor_bytes(self) -> float:
        return self.floor_mib * MIB

    @property
    def leak_bytes_per_s(self) -> float:
        return self.leak_mib_per_min * (MIB / 60.0)


@dataclass(frozen=True, slots=True, kw_only=True)
class VramLeakResolvedEvidence(Evidence):
    """Why a leak finding of a device or process resolved (``reason``: ``leak_stopped``,
    ``restart``, ``process_exited``, ``stale``, ``gap``, ``evicted``)."""

    reason: str
    host: str
    gpu: int
    pid: int
    process_name: str
    simulated: bool


def trailing_floors(buckets: Iterable[Sequence[float]], *, floor_buckets: int, first_idx: int,
                    bucket_s: float, window_buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """Floor points ``(x, y)`` of closed buckets ``[idx, low, high]`` (ascending idx).

    The floor at bucket ``i`` is the minimum of the bucket lows in ``[i - floor_buckets + 1, i]``;
    it exists once the series' history covers that whole span (a partial span would hold the
    oldest low flat and hide a trend). ``x`` is the bucket's end time. Only the newest
    ``window_buckets`` floors are returned.
    """
    rows = list(buckets)
    xs: list[float] = []
    ys: list[float] = []
    lows: deque[tuple[int, float]] = deque()  # monotonic queue of (idx, low) for a sliding min
    for idx, low, _high in rows:
        idx = int(idx)
        while lows and lows[-1][1] >= low:
            lows.pop()
        lows.append((idx, low))
        while lows[0][0] <= idx - floor_buckets:
            lows.popleft()
        if idx - first_idx + 1 >= floor_buckets:
            xs.append((idx + 1) * bucket_s)
            ys.append(lows[0][1])
    if len(xs) > window_buckets:
        xs, ys = xs[-window_buckets:], ys[-window_buckets:]
    last_idx = int(rows[-1][0]) if rows else 0
    # Floors older than the window (gaps in the series) do not describe the present.
    keep = [i for i, x in enumerate(xs) if x > (last_idx + 1 - window_buckets) * bucket_s]
    return np.asarray([xs[i] for i in keep], float), np.asarray([ys[i] for i in keep], float)


def sen_trend(xs: np.ndarray, ys: np.ndarray) -> SenTrend:
    """Theil-Sen slope, Mann-Kendall tau and R^2 of ``ys`` over ``xs`` (at least 3 points)."""
    x = xs - xs[0]  # relative times keep the intercept well conditioned
    slope, intercept, _lo, _hi = theilslopes(ys, x)
    n = len(ys)
    iu = np.triu_indices(n, 1)
    signs = np.sign(ys[iu[1]] - ys[iu[0]])
    tau = float(signs.sum()) / (n * (n - 1) / 2)
    resid = ys - (intercept + slope * x)
    ss_tot = float(((ys - ys.mean()) ** 2).sum())
    r2 = 1.0 - float((resid ** 2).sum()) / ss_tot if ss_tot > 0 else 0.0
    half = max(3, (n + 1) // 2)
    recent = float(theilslopes(ys[-half:], x[-half:])[0])
    return SenTrend(float(slope), float(intercept), tau, r2, recent)


class _Series:
    """Bucketed usage history of one device or one process on it."""

    __slots__ = ("key", "host", "gpu", "pid", "process_name", "gpu_uuid", "simulated",
                 "total_bytes", "buckets", "first_idx", "cur_idx", "cur_low", "cur_high",
                 "last_ts", "level", "calm_evals", "pids")

    def __init__(self, key: str, sample: GpuSample, idx: int, maxlen: int) -> None:
        self.key = key
        self.host = sample.host
        self.gpu = int(sample.gpu)
        self.pid = int(sample.pid)
        self.process_name = sample.process_name
        self.gpu_uuid = sample.gpu_uuid
        self.simulated = bool(sample.simulated)
        self.total_bytes = int(sample.memory_total_bytes)
        self.buckets: deque[list[float]] = deque(maxlen=maxlen)  # [idx, low, high]
        self.first_idx = idx
        self.cur_idx = idx
        self.cur_low = math.inf
        self.cur_high = -math.inf
        self.last_ts = float(sample.ts)
        self.level: Severity | None = None
        self.calm_evals = 0
        # Device series only: pid -> key of the process series seen on this device.
        self.pids: dict[int, str] = {}

    def reset(self, idx: int) -> None:
        self.buckets.clear()
        self.first_idx = idx
        self.cur_idx = idx
        self.cur_low = math.inf
        self.cur_high = -math.inf

    def recent_floor(self, floor_buckets: int) -> float:
        """Lowest usage over the trailing floor span including the open bucket."""
        low = self.cur_low
        for idx, b_low, _ in reversed(self.buckets):
            if idx <= self.cur_idx - floor_buckets:
                break
            low = min(low, b_low)
        return low

    def recent_peak(self, floor_buckets: int) -> float:
        """Highest usage over the trailing floor span of closed buckets."""
        if not self.buckets:
            return self.cur_high
        last = self.buckets[-1][0]
        peak = -math.inf
        for idx, _, b_high in reversed(self.buckets):
            if idx <= last - floor_buckets:
                break
            peak = max(peak, b_high)
        return peak

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key, "host": self.host, "gpu": self.gpu, "pid": self.pid,
            "process_name": self.process_name, "gpu_uuid": self.gpu_uuid,
            "simulated": self.simulated, "total_bytes": self.total_bytes,
            "buckets": [list(b) for b in self.buckets], "first_idx": self.first_idx,
            "cur_idx": self.cur_idx,
            "cur_low": None if self.cur_low == math.inf else self.cur_low,
            "cur_high": None if self.cur_high == -math.inf else self.cur_high,
            "last_ts": self.last_ts, "level": None if self.level is None else str(self.level),
            "calm_evals": self.calm_evals, "pids": [[p, k] for p, k in self.pids.items()],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], maxlen: int) -> "_Series":
        self = cls.__new__(cls)
        self.key = data["key"]
        self.host = data["host"]
        self.gpu = int(data["gpu"])
        self.pid = int(data["pid"])
        self.process_name = data["process_name"]
        self.gpu_uuid = data["gpu_uuid"]
        self.simulated = bool(data["simulated"])
        self.total_bytes = int(data["total_bytes"])
        self.buckets = deque(([int(b[0]), float(b[1]), float(b[2])] for b in data["buckets"]),
                             maxlen=maxlen)
        self.first_idx = int(data["first_idx"])
        self.cur_idx = int(data["cur_idx"])
        self.cur_low = math.inf if data["cur_low"] is None else float(data["cur_low"])
        self.cur_high = -math.inf if data["cur_high"] is None else float(data["cur_high"])
        self.last_ts = float(data["last_ts"])
        self.level = None if data["level"] is None else Severity(data["level"])
        self.calm_evals = int(data["calm_evals"])
        self.pids = {int(p): str(k) for p, k in data["pids"]}
        return self


class _CallCounts:
    """LLM calls per event-time bucket for one host or service: deque of [idx, count]."""

    __slots__ = ("counts", "last_ts")

    def __init__(self, maxlen: int, last_ts: float) -> None:
        self.counts: deque[list[int]] = deque(maxlen=maxlen)
        self.last_ts = last_ts

    def add(self, idx: int) -> None:
        counts = self.counts
        if not counts or idx > counts[-1][0]:
            counts.append([idx, 1])
            return
        # A late call (topics are consumed independently): find its bucket while still held.
        for pos in range(len(counts) - 1, -1, -1):
            if counts[pos][0] == idx:
                counts[pos][1] += 1
                return
            if counts[pos][0] < idx:
                if len(counts) < (counts.maxlen or 0):  # deque.insert refuses a full deque
                    counts.insert(pos + 1, [idx, 1])
                return

    def total(self, first_idx: int, last_idx: int) -> int:
        return sum(c for i, c in self.counts if first_idx <= i <= last_idx)


def _series_key(host: str, gpu: int, pid: int) -> str:
    if pid == 0:
        return key_string(("host", "gpu"), (host, gpu))
    return key_string(("host", "gpu", "pid"), (host, gpu, pid))


class VramLeakDetector:
    """Detect GPU memory leaks (a rising usage floor) and project time to exhaustion.

    Parameters
    ----------
    bucket_s : float
        Event-time bucket; samples fold into per-bucket min/max and the trend is evaluated once
        per closed bucket (cheap: a sampler sends one row per device every few seconds).
    floor_span_s : float
        Trailing span whose minimum is the floor; must exceed the longest GC/sawtooth period.
        A multiple of ``bucket_s``.
    window_s : float
        Span of floors fitted (a multiple of ``bucket_s``).
    min_points : int
        Floors needed before any claim (>= 3); the warm-up is ``floor_span_s`` plus
        ``min_points`` buckets.
    threshold_fraction : float
        Share of the card's total memory that counts as exhausted (nodes crash near 90%).
    warning_eta_s, critical_eta_s : float
        Projected time to the threshold under which a leak is a warning / critical.
    min_leak_rate_bytes_per_s : float
        Slopes below this are not leaks (fragmentation noise).
    min_rise_bytes : int
        The floor must rise at least this much over the fitted span; keeps jitter on a card
        that sits above the threshold by design (a vLLM pool) from reading as a leak.
    min_trend_tau : float
        Least Mann-Kendall tau of the floors (most pairs must rise).
    min_fit_r2 : float
        Least R^2 of the Theil-Sen line over the floors.
    min_recent_slope_ratio : float
        The newest half's slope must be at least this share of the window's slope; a cache that
        warmed up and settled fails it.
    restart_drop_fraction : float
        A sample this far (share of total memory) below the floor means a restart or a real
        release: the history is discarded. Also when it falls below half the floor.
    restart_min_drop_bytes : int
        Smaller falls never count as a restart (noise around small processes).
    process_stale_s : float
        A process missing from its device's reports for this long has exited.
    clear_after_evaluations : int
        Consecutive calmer evaluations before a finding is downgraded or resolved.
    max_keys : int
        Most series (devices + processes) and most call counters held (LRU).
    idle_expiry_s : float
        Series without samples for this long (event time) are dropped; generous, because hosts'
        clocks differ.

    Examples
    --------
    >>> from agentwatch.events import GpuSample
    >>> det = VramLeakDetector()
    >>> gib, t0 = 1 << 30, 1_700_000_040.0
    >>> found = []
    >>> for k in range(0, 1200 // 5 + 1):  # 3 MiB/s leak on an 8 GiB card, a sample per 5 s
    ...     used = gib + 3 * (1 << 20) * 5 * k
    ...     found += det.update(GpuSample(ts=t0 + 5 * k, host="n1", gpu=0, memory_used_bytes=used,
    ...                                   memory_total_bytes=8 * gib))
    >>> [(f.ts - t0, str(f.severity)) for f in found]
    [(600.0, 'warning')]
    """

    name: ClassVar[str] = "vram_leak"
    partition_by: ClassVar[str] = "host"
    # Constructor arguments that bound the state: split over the partitions of its stage.
    state_caps: ClassVar[tuple[str, ...]] = ("max_keys",)
    accepts: ClassVar[tuple[type, ...]] = (GpuSample, LlmCall)
    llm_call_reads: ClassVar[frozenset[str]] = frozenset({"ts", "host", "service"})
    kind: ClassVar[str] = "vram_leak"

    def __init__(self, *, bucket_s: float = 60.0, floor_span_s: float = 300.0,
                 window_s: float = 1800.0, min_points: int = 6, threshold_fraction: float = 0.9,
                 warning_eta_s: float = 3600.0, critical_eta_s: float = 600.0,
                 min_leak_rate_bytes_per_s: float = 16384.0, min_rise_bytes: int = 128 * MIB,
                 min_trend_tau: float = 0.6,
                 min_fit_r2: float = 0.8, min_recent_slope_ratio: float = 0.5,
                 restart_drop_fraction: float = 0.1, restart_min_drop_bytes: int = 256 * MIB,
                 process_stale_s: float = 30.0, clear_after_evaluations: int = 3,
                 max_keys: int = 1024, idle_expiry_s: float = 3600.0) -> None:
        check_positive("bucket_s", bucket_s)
        check_positive("floor_span_s", floor_span_s)
        check_positive("window_s", window_s)
        floor_buckets = floor_span_s / bucket_s
        window_buckets = window_s / bucket_s
        for name, value in (("floor_span_s", floor_buckets), ("window_s", window_buckets)):
            if abs(value - round(value)) > 1e-9:
                raise ValueError(f"{name} must be a multiple of bucket_s ({bucket_s}), "
                                 f"got {value * bucket_s}")
        check_at_least("min_points", min_points, 3)
        if min_points > round(window_buckets):
            raise ValueError(f"min_points ({min_points}) exceeds the floors in window_s "
                             f"({round(window_buckets)})")
        if not 0 < threshold_fraction <= 1:
            raise ValueError(f"threshold_fraction must be in (0, 1], got {threshold_fraction}")
        check_positive("critical_eta_s", critical_eta_s)
        if warning_eta_s < critical_eta_s:
            raise ValueError(f"warning_eta_s ({warning_eta_s}) must be >= critical_eta_s "
                             f"({critical_eta_s})")
        check_positive("min_leak_rate_bytes_per_s", min_leak_rate_bytes_per_s)
        check_positive("min_rise_bytes", min_rise_bytes, allow_zero=True)
        if not -1 <= min_trend_tau <= 1:
            raise ValueError(f"min_trend_tau must be in [-1, 1], got {min_trend_tau}")
        if not min_fit_r2 <= 1:
            raise ValueError(f"min_fit_r2 must be <= 1, got {min_fit_r2}")
        check_positive("min_recent_slope_ratio", min_recent_slope_ratio, allow_zero=True)
        if not 0 < restart_drop_fraction <= 1:
            raise ValueError(
                f"restart_drop_fraction must be in (0, 1], got {restart_drop_fraction}")
        check_positive("restart_min_drop_bytes", restart_min_drop_bytes, allow_zero=True)
        check_positive("process_stale_s", process_stale_s)
        check_at_least("clear_after_evaluations", clear_after_evaluations, 1)
        check_at_least("max_keys", max_keys, 1)
        check_positive("idle_expiry_s", idle_expiry_s)

        self.bucket_s = float(bucket_s)
        self.floor_span_s = float(floor_span_s)
        self.window_s = float(window_s)
        self.min_points = int(min_points)
        self.threshold_fraction = float(threshold_fraction)
        self.warning_eta_s = float(warning_eta_s)
        self.critical_eta_s = float(critical_eta_s)
        self.min_leak_rate_bytes_per_s = float(min_leak_rate_bytes_per_s)
        self.min_rise_bytes = int(min_rise_bytes)
        self.min_trend_tau = float(min_trend_tau)
        self.min_fit_r2 = float(min_fit_r2)
        self.min_recent_slope_ratio = float(min_recent_slope_ratio)
        self.restart_drop_fraction = float(restart_drop_fraction)
        self.restart_min_drop_bytes = int(restart_min_drop_bytes)
        self.process_stale_s = float(process_stale_s)
        self.clear_after_evaluations = int(clear_after_evaluations)
        self.max_keys = int(max_keys)
        self.idle_expiry_s = float(idle_expiry_s)

        self._floor_buckets = int(round(floor_buckets))
        self._window_buckets = int(round(window_buckets))
        self._maxlen = self._window_buckets + self._floor_buckets - 1
        self._series: EventTimeLru[str, _Series] = EventTimeLru(max_keys, idle_expiry_s)
        # Calls per host and per service, bucketed like the samples; keys "h:<host>", "s:<svc>".
        self._calls: EventTimeLru[str, _CallCounts] = EventTimeLru(max_keys, idle_expiry_s)

    # ------------------------------------------------------------------ public API

    def update(self, event: GpuSample | LlmCall) -> Sequence[Finding]:
        """Feed one event; returns the findings it caused (``()`` when none)."""
        if isinstance(event, GpuSample):
            return self._on_sample(event)
        self._on_call(event)  # an LlmCall, or the stream's view of one (same fields)
        return ()

    def state_size(self) -> int:
        """Entries held: series (devices + processes) and call counters."""
        return len(self._series) + len(self._calls)

    def snapshot(self) -> dict[str, Any]:
        return {
            "version": _SNAPSHOT_VERSION,
            "series": [s.to_json() for _, s in self._series.items()],
            "series_meta": self._series.snapshot_meta(),
            "calls": [[k, c.last_ts, [list(e) for e in c.counts]] for k, c in self._calls.items()],
            "calls_meta": self._calls.snapshot_meta(),
        }

    def restore(self, snap: dict[str, Any]) -> None:
        if snap.get("version") != _SNAPSHOT_VERSION:
            raise ValueError(
                f"unsupported VramLeakDetector snapshot version {snap.get('version')!r}")
        self._series.clear()
        for data in snap["series"]:
            series = _Series.from_json(data, self._maxlen)
            self._series.insert(series.key, series)
        self._series.restore_meta(snap["series_meta"])
        self._calls.clear()
        for key, last_ts, counts in snap["calls"]:
            counter = _CallCounts(self._maxlen + 2, float(last_ts))
            counter.counts.extend([int(i), int(c)] for i, c in counts)
            self._calls.insert(key, counter)
        self._calls.restore_meta(snap["calls_meta"])

    # ------------------------------------------------------------------ events

    def _on_call(self, call: LlmCall) -> None:
        idx = int(call.ts // self.bucket_s)
        for key in (f"h:{call.host}" if call.host else None,
                    f"s:{call.service}" if call.service else None):
            if key is None:
                continue
            counter = self._calls.get(key)
            if counter is None:
                counter = _CallCounts(self._maxlen + 2, call.ts)
                self._calls.insert(key, counter)
            counter.last_ts = max(counter.last_ts, call.ts)
            counter.add(idx)
        self._calls.expire(call.ts)

    def _on_sample(self, sample: GpuSample) -> Sequence[Finding]:
        findings: list[Finding] = []
        ts = float(sample.ts)
        pid = int(sample.pid)
        idx = int(ts // self.bucket_s)
        key = _series_key(sample.host, int(sample.gpu), pid)
        device_key = _series_key(sample.host, int(sample.gpu), 0)
        series = self._series.get(key)
        if series is None:
            series = _Series(key, sample, idx, self._maxlen)
            for old_key, old in self._series.insert(key, series):
                findings += self._close(old, ts, "evicted")
        elif pid != 0 and sample.process_name and series.process_name != sample.process_name:
            # The pid was reused by another program: a different process, fresh history.
            findings += self._close(series, ts, "restart")
            series.process_name = sample.process_name
            series.reset(idx)
        series.simulated = bool(sample.simulated)
        if sample.memory_total_bytes > 0:
            series.total_bytes = int(sample.memory_total_bytes)
        if sample.gpu_uuid:
            series.gpu_uuid = sample.gpu_uuid

        if pid == 0:
            findings += self._expire_processes(series, ts)
        else:
            device = self._series.entries.get(device_key)  # peek: no LRU touch
            if device is not None:
                device.pids[pid] = key

        findings += self._fold(series, sample, ts, idx)
        for old_key, old in self._series.expire(ts):
            findings += self._close(old, ts, "stale")
        return findings or ()

    def _fold(self, series: _Series, sample: GpuSample, ts: float, idx: int) -> list[Finding]:
        findings: list[Finding] = []
        used = float(sample.memory_used_bytes)
        if idx < series.cur_idx:
            return findings  # older than the open bucket: its bucket was already judged
        series.last_ts = max(series.last_ts, ts)
        has_history = bool(series.buckets) or series.cur_low != math.inf
        if has_history and self._is_restart(series, used):
            findings += self._close(series, ts, "restart")
            series.reset(idx)
        elif idx > series.cur_idx:
            if series.cur_low != math.inf:
                series.buckets.append([series.cur_idx, series.cur_low, series.cur_high])
            if idx - series.cur_idx > self._window_buckets:
                # A gap longer than the window: the history no longer describes the present.
                findings += self._close(series, ts, "gap")
                series.reset(idx)
            else:
                findings += self._evaluate(series, ts)
            series.cur_idx = idx
            series.cur_low = math.inf
            series.cur_high = -math.inf
        series.cur_low = min(series.cur_low, used)
        series.cur_high = max(series.cur_high, used)
        return findings

    def _is_restart(self, series: _Series, used: float) -> bool:
        floor = series.recent_floor(self._floor_buckets)
        drop = floor - used
        if drop <= 0 or drop < self.restart_min_drop_bytes:
            return False
        total = series.total_bytes
        by_total = self.restart_drop_fraction * total if total > 0 else math.inf
        return drop >= min(by_total, 0.5 * floor)

    def _expire_processes(self, device: _Series, ts: float) -> list[Finding]:
        findings: list[Finding] = []
        gone = []
        for pid, key in device.pids.items():
            proc = self._series.entries.get(key)
            if proc is None:
                gone.append(pid)
            elif ts - proc.last_ts > self.process_stale_s:
                gone.append(pid)
                self._series.pop(key)
                findings += self._close(proc, ts, "process_exited")
        for pid in gone:
            del device.pids[pid]
        return findings

    # ------------------------------------------------------------------ decisions

    def _evaluate(self, series: _Series, ts: float) -> list[Finding]:
        xs, ys = trailing_floors(series.buckets, floor_buckets=self._floor_buckets,
                                 first_idx=series.first_idx, bucket_s=self.bucket_s,
                                 window_buckets=self._window_buckets)
        if len(xs) < self.min_points:
            return []
        device = None
        if series.pid == 0:
            if series.pids:
                return []  # the processes on this device carry the findings
        else:
            device = self._series.entries.get(_series_key(series.host, series.gpu, 0))
        total = series.total_bytes or (device.total_bytes if device is not None else 0)
        if total <= 0:
            return []
        leak = self._leak_trend(xs, ys)
        target: Severity | None = None
        eta_s = math.inf
        threshold_bytes = self.threshold_fraction * total
        # What crashes a node is the device's peak, consumed at this series' leak rate.
        peak_src = device if device is not None and device.buckets else series
        peak = peak_src.recent_peak(self._floor_buckets)
        trend = None
        if leak is not None:
            trend, xs, ys = leak
            eta_s = max(0.0, (threshold_bytes - peak) / trend.slope)
            if eta_s < self.critical_eta_s or peak >= threshold_bytes:
                target = Severity.CRITICAL
            elif eta_s < self.warning_eta_s:
                target = Severity.WARNING
        return self._transition(series, target, ts, lambda sev: self._finding(
            series, sev, ts, eta_s, trend, xs, ys, peak, threshold_bytes, total))

    def _leak_trend(self, xs: np.ndarray, ys: np.ndarray
                    ) -> tuple[SenTrend, np.ndarray, np.ndarray] | None:
        """The longest of the newest (all, half, ``min_points``) floors that shows a leak, or None.

        Shorter spans catch a leak that began after a long flat stretch (the full window would
        read as a hockey stick with a poor fit) without giving up the full window's evidence for
        slow, steady leaks.
        """
        n = len(xs)
        for size in sorted({n, max(self.min_points, n // 2), self.min_points}, reverse=True):
            cx, cy = xs[-size:], ys[-size:]
            trend = sen_trend(cx, cy)
            if (trend.slope >= self.min_leak_rate_bytes_per_s
                    and trend.slope * (cx[-1] - cx[0]) >= self.min_rise_bytes
                    and trend.kendall_tau >= self.min_trend_tau
                    and trend.fit_r2 >= self.min_fit_r2
                    and trend.recent_slope >= self.min_recent_slope_ratio * trend.slope):
                return trend, cx, cy
        return None

    def _transition(self, series: _Series, target: Severity | None, ts: float,
                    make) -> list[Finding]:
        current = series.level
        if _RANK[target] > _RANK[current]:
            series.level = target
            series.calm_evals = 0
            return [make(target)]
        if _RANK[target] == _RANK[current]:
            series.calm_evals = 0
            return []
        series.calm_evals += 1
        if series.calm_evals < self.clear_after_evaluations:
            return []
        series.calm_evals = 0
        if target is None:
            return self._close(series, ts, "leak_stopped")
        series.level = target
        return [make(target)]

    def _finding(self, series: _Series, severity: Severity, ts: float, eta_s: float,
                 trend: SenTrend, xs: np.ndarray, ys: np.ndarray, peak: float,
                 threshold_bytes: float, total: int) -> Finding:
        last_idx = int(series.buckets[-1][0])
        first_idx = int(round(xs[0] / self.bucket_s)) - self._floor_buckets
        inferences, source = self._inferences(series, first_idx, last_idx)
        span_s = (last_idx - first_idx + 1) * self.bucket_s
        per_inference = None
        if inferences:
            per_inference = trend.slope / (inferences / span_s) / MIB
        evidence = VramLeakEvidence(
            host=series.host, gpu=series.gpu, gpu_uuid=series.gpu_uuid, pid=series.pid,
            process_name=series.process_name, simulated=series.simulated,
            leak_mib_per_min=trend.slope * 60.0 / MIB,
            kendall_tau=trend.kendall_tau, fit_r2=trend.fit_r2,
            recent_leak_mib_per_min=trend.recent_slope * 60.0 / MIB,
            floor_mib=float(ys[-1]) / MIB, peak_mib=peak / MIB,
            threshold_mib=threshold_bytes / MIB, total_mib=total / MIB,
            eta_s=eta_s, above_threshold=peak >= threshold_bytes,
            window_s=float(xs[-1] - xs[0]), points=int(len(xs)),
            inferences=inferences, inferences_from=source, mib_per_inference=per_inference)
        threshold = self.critical_eta_s if severity is Severity.CRITICAL else self.warning_eta_s
        return Finding(detector=self.name, key=series.key, kind=self.kind, severity=severity,
                       ts=ts, value=eta_s, threshold=threshold, evidence=evidence.to_mapping())

    def _inferences(self, series: _Series, first_idx: int, last_idx: int) -> tuple[int, str]:
        for key in (f"h:{series.host}", f"s:{series.process_name}" if series.process_name else ""):
            counter = self._calls.entries.get(key) if key else None
            if counter is not None:
                n = counter.total(first_idx, last_idx)
                if n:
                    return n, key[2:] if key[0] == "s" else f"host {series.host}"
        return 0, ""

    def _close(self, series: _Series, ts: float, reason: str) -> list[Finding]:
        """Resolve an open finding of ``series`` (restart, exit, stale, or leak stopped)."""
        level = series.level
        series.level = None
        series.calm_evals = 0
        if level is None:
            return []
        evidence = VramLeakResolvedEvidence(
            reason=reason, host=series.host, gpu=series.gpu, pid=series.pid,
            process_name=series.process_name, simulated=series.simulated)
        return [Finding(detector=self.name, key=series.key, kind=self.kind, severity=level,
                        ts=ts, value=0.0, threshold=self.warning_eta_s,
                        evidence=evidence.to_mapping(), resolved=True)]
