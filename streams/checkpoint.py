"""Detector state checkpoints: one file per worker, written atomically at intervals.

DESIGN.md: detector state lives in memory, bounded, "checkpointed ... at intervals, not on every
span". A :class:`DetectorCheckpoint` writes ``runner.snapshot()`` (every detector's JSON-able
state, by name) to ``<data_dir>/state/detectors-<app_id>-w<i>.json`` every ``every_s`` seconds and
on clean shutdown, and restores it when the worker starts, so a restarted worker keeps its cost
baselines, budgets spent, loops in progress and drift history.

File format (JSON, orjson-encoded)::

    {"format": "agentwatch.detector-checkpoint", "version": 1, "worker_id": "agentwatch-w0",
     "saved_at": 1718000000.123, "detectors": ["agent_loop", ...], "state": {name: snapshot}}

A save is atomic (temp file in the same directory, fsync, ``os.replace``): a crash mid-save
leaves the previous checkpoint. Periodic saves in the worker run in a forked child (as Redis's
BGSAVE does): the child holds a copy-on-write image of the detectors as they were between two
events and snapshots, encodes and writes it, while the event loop goes on after the fork alone
(10–25 ms, where an in-process save of per-trace maps at their cap holds it 0.3–0.6 s). The
price is memory: the child's private pages while it runs (``last_child_private_bytes``).

A file that cannot be read or restored never stops the worker: it is moved aside as
``<name>.corrupt-<unix ms>`` and the detectors start empty.

What this does not give: exactly-once state. The checkpoint is not aligned with committed
consumer offsets, so after a crash (SIGKILL) the detectors miss the events between the last
checkpoint and the last commit, and a crash within a few seconds of a save can replay a few
events the checkpoint already counted. A clean shutdown saves after the consumer has drained.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, Callable, Mapping, NoReturn

import orjson

log = logging.getLogger(__name__)

FORMAT = "agentwatch.detector-checkpoint"
FORMAT_VERSION = 1
# numpy scalars that slip into a snapshot are written as plain numbers. NaN/Infinity would be
# written as null by orjson: the detector contract suite (allow_nan=False) keeps them out.
_DUMPS_OPTIONS = orjson.OPT_SERIALIZE_NUMPY
_INT_MIN, _UINT_MAX = -(2**63), 2**64 - 1  # the integers orjson encodes


def checkpoint_path(data_dir: Path, app_id: str, worker_index: int) -> Path:
    """Where worker ``worker_index`` of group ``app_id`` keeps its detector checkpoint."""
    return Path(data_dir) / "state" / f"detectors-{app_id}-w{worker_index}.json"


class CheckpointFormatError(ValueError):
    """The file is JSON but not a detector checkpoint this version can restore."""


class DetectorCheckpoint:
    """Saves and restores a :class:`~agentwatch.detectors.runner.DetectorRunner`'s state.

    Parameters
    ----------
    path : Path
        The checkpoint file (its directory is created on the first save).
    runner : DetectorRunner
        Anything with ``detectors`` (name -> detector), ``snapshot()`` and ``restore(snap)``.
    every_s : float
        Seconds between periodic saves (:meth:`due`).
    clock : callable
        Monotonic seconds, for the interval (tests move it by hand).
    wall_clock : callable
        Unix seconds, for ``saved_at`` and the ``.corrupt-<ms>`` suffix.
    worker_id : str
        Written in the header, to tell files apart when one is inspected.
    snapshot_executors : Mapping[str, Executor], optional
        Detectors updated on a thread other than the caller's, with the single-thread executor
        that updates them: their ``snapshot()`` runs in that executor, so it never interleaves
        with an update (the drift detector is updated in the embedding thread).
    fork_saves : bool
        Whether :meth:`maybe_save_async` may save in a forked child (``background=True``). Off
        where ``os.fork`` is missing; a fork that fails falls back to saving in-process.

    Attributes
    ----------
    last_save_bytes : int
        Size of the last file written.
    last_encode_s : float
        Seconds the last save spent snapshotting and encoding (in the child, for a forked save).
    last_save_s : float
        Seconds of the last save in all (encode + write + fsync).
    last_blocking_s : float
        Seconds the last save held the caller's thread (the event loop, in the worker): snapshot
        and encoding in-process, the fork alone for a forked save.
    last_child_private_bytes : int
        Memory the last forked save's child had to copy or allocate (private dirty pages at its
        end): the extra memory a background save costs. 0 for in-process saves.
    forked_saves : int
        Saves written by a forked child.
    last_restore_s : float
        Seconds the last successful restore took (read, decode, restore).
    saves, failures : int
        Saves written, and saves or restores that failed.
    wide_int_encodes : int
        In-process encodes that wrote an integer beyond 64 bits as a float.

    Examples
    --------
    >>> import tempfile
    >>> from agentwatch.detectors.loops import LoopDetector
    >>> from agentwatch.detectors.runner import DetectorRunner
    >>> path = Path(tempfile.mkdtemp()) / "detectors.json"
    >>> checkpoint = DetectorCheckpoint(path, DetectorRunner([LoopDetector()]), every_s=30.0)
    >>> checkpoint.restore()  # nothing saved yet: start empty
    False
    >>> checkpoint.maybe_save(), checkpoint.maybe_save(force=True)
    (False, True)
    >>> DetectorCheckpoint(path, DetectorRunner([LoopDetector()])).restore()
    True
    """

    def __init__(self, path: Path, runner: Any, *, every_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time, worker_id: str = "",
                 snapshot_executors: Mapping[str, Executor] | None = None,
                 fork_saves: bool = hasattr(os, "fork")) -> None:
        if not every_s > 0:
            raise ValueError(f"every_s must be > 0, got {every_s}")
        self.path = Path(path)
        self.runner = runner
        self.every_s = float(every_s)
        self.clock = clock
        self.wall_clock = wall_clock
        self.worker_id = worker_id
        self.snapshot_executors = dict(snapshot_executors or {})
        self.fork_saves = bool(fork_saves) and hasattr(os, "fork")
        self.last_save_at = clock()  # the first periodic save comes every_s after start-up
        self.last_save_bytes = 0
        self.last_encode_s = 0.0
        self.last_save_s = 0.0
        self.last_restore_s = 0.0
        self.last_blocking_s = 0.0
        self.last_child_private_bytes = 0
        self.saves = 0
        self.forked_saves = 0
        self.failures = 0
        self.wide_int_encodes = 0
        self._write_lock = threading.Lock()  # a shutdown save and a timer save may both write
        self._save_lock: asyncio.Lock | None = None

    # -- restore ----------------------------------------------------------------------------

    def restore(self) -> bool:
        """Load the checkpoint into the runner; False when there is none or it is unusable.

        An unreadable, corrupt or unrestorable file is logged, moved aside as
        ``<name>.corrupt-<unix ms>``, and every detector is left empty (a restore that failed
        half-way would otherwise leave some detectors restored and others not).
        """
        self._remove_temp_files()
        started = time.perf_counter()
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return False
        except OSError as exc:
            self._reject(f"unreadable: {exc}")
            return False
        empty = self.runner.snapshot()  # the fresh state, to go back to if the restore fails
        try:
            self.runner.restore(self._state_from(raw))
        except Exception as exc:  # any detector's restore may choke on a bad file
            self.runner.restore(empty)
            self._reject(f"{type(exc).__name__}: {exc}")
            return False
        self.last_restore_s = time.perf_counter() - started
        log.info("detector state restored from %s (%d bytes, %.3f s)", self.path, len(raw),
                 self.last_restore_s)
        return True

    @staticmethod
    def _state_from(raw: bytes) -> dict[str, dict[str, Any]]:
        doc = orjson.loads(raw)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise CheckpointFormatError("not a detector checkpoint")
        if doc.get("version") != FORMAT_VERSION:
            raise CheckpointFormatError(f"checkpoint version {doc.get('version')!r}, "
                                        f"this worker reads {FORMAT_VERSION}")
        state = doc.get("state")
        if not isinstance(state, dict) or not all(isinstance(s, dict) for s in state.values()):
            raise CheckpointFormatError("state is not a mapping of detector snapshots")
        return state

    def _reject(self, reason: str) -> None:
        self.failures += 1
        aside = self.path.with_name(f"{self.path.name}.corrupt-{int(self.wall_clock() * 1000)}")
        try:
            os.replace(self.path, aside)
        except OSError as exc:
            log.warning("detector checkpoint %s not restored (%s) and not moved aside (%s); "
                        "detectors start empty", self.path, reason, exc)
            return
        log.warning("detector checkpoint %s not restored (%s); moved to %s, detectors start empty",
                    self.path, reason, aside.name)

    def _remove_temp_files(self) -> None:
        # Left by a worker killed mid-save; the name is this worker's, so nobody else writes them.
        try:
            for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):
                stale.unlink(missing_ok=True)
        except OSError:
            pass

    # -- save -------------------------------------------------------------------------------

    def due(self) -> bool:
        """Whether ``every_s`` has passed since the last save (or attempt, or start-up)."""
        return self.clock() - self.last_save_at >= self.every_s

    def encode(self, taken: Mapping[str, dict[str, Any]] | None = None) -> bytes:
        """The checkpoint file's bytes for the runner's state now.

        ``taken`` holds snapshots already taken elsewhere, by detector name; the other detectors
        are snapshotted here. Call this on the thread that updates the detectors.
        """
        started = time.perf_counter()
        if taken:
            state = {name: taken[name] if name in taken else det.snapshot()
                     for name, det in self.runner.detectors.items()}
        else:
            state = self.runner.snapshot()
        doc = {"format": FORMAT, "version": FORMAT_VERSION, "worker_id": self.worker_id,
               "saved_at": self.wall_clock(), "detectors": list(state), "state": state}
        try:
            data = orjson.dumps(doc, option=_DUMPS_OPTIONS)
        except orjson.JSONEncodeError:
            # One integer beyond 64 bits anywhere in any detector's state (a sum of implausible
            # token counts) would fail every save from then on. Such an integer is written as
            # the nearest float instead (what orjson reads back for it anyway); anything else
            # that cannot be encoded still fails the save.
            data = orjson.dumps(_wide_ints_as_floats(doc), option=_DUMPS_OPTIONS)
            self.wide_int_encodes += 1
        self.last_encode_s = time.perf_counter() - started
        # Done here, this is an in-process save: all of it held the caller's thread, no child.
        self.last_blocking_s = self.last_encode_s
        self.last_child_private_bytes = 0
        return data

    def write(self, data: bytes) -> None:
        """Replace the checkpoint file with ``data`` atomically (safe from any thread)."""
        started = time.perf_counter()
        with self._write_lock:
            self._replace_file(data)
        self.last_save_bytes = len(data)
        self.last_save_s = self.last_encode_s + (time.perf_counter() - started)
        self.saves += 1

    def _replace_file(self, data: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.",
                                    suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp, self.path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        _fsync_dir(self.path.parent)  # the rename itself survives a power cut

    def maybe_save(self, force: bool = False) -> bool:
        """Save when :meth:`due` (or ``force``), on this thread; True when a file was written.

        A failed save is logged and leaves the previous file in place; it is tried again after
        another ``every_s``, not on every call.
        """
        if not force and not self.due():
            return False
        self.last_save_at = self.clock()
        try:
            self.write(self.encode(self._taken_in_executors()))
        except Exception:
            self.failures += 1
            log.exception("detector checkpoint not saved to %s; the previous one is kept", self.path)
            return False
        return True

    async def maybe_save_async(self, force: bool = False, background: bool = True) -> bool:
        """:meth:`maybe_save` for an event loop whose thread updates the detectors.

        With ``background`` (and ``fork_saves``), the loop forks between two events and a child
        process snapshots, encodes and writes the state as it was at the fork; the loop waits
        for the child in a thread. Otherwise snapshot and encoding run here and the file write
        in the loop's default executor (the shutdown save: nothing else is waiting then).
        Detectors in ``snapshot_executors`` are snapshotted on their own thread first, either
        way. Saves are serialised, so a shutdown save that starts during a timer save waits for
        it and then writes the newer state.
        """
        if not force and not self.due():
            return False
        self.last_save_at = self.clock()
        if self._save_lock is None:
            self._save_lock = asyncio.Lock()
        loop = asyncio.get_running_loop()
        async with self._save_lock:
            try:
                taken = {}
                for name, executor in self.snapshot_executors.items():
                    det = self.runner.detectors.get(name)
                    if det is not None:
                        taken[name] = await _run_in(loop, executor, det.snapshot)
                if not (background and self.fork_saves and await self._save_in_child(loop, taken)):
                    data = self.encode(taken)
                    await loop.run_in_executor(None, self.write, data)
            except Exception:
                self.failures += 1
                log.exception("detector checkpoint not saved to %s; the previous one is kept",
                              self.path)
                return False
        log.info("detector checkpoint saved: %d bytes, %.3f s (%.3f s on the event loop%s)",
                 self.last_save_bytes, self.last_save_s, self.last_blocking_s,
                 f"; forked child copied {self.last_child_private_bytes / 2**20:.0f} MiB"
                 if self.last_child_private_bytes else "")
        return True

    async def _save_in_child(self, loop: asyncio.AbstractEventLoop,
                             taken: Mapping[str, dict[str, Any]]) -> bool:
        """Save from a forked child; False when no child could be forked (save in-process).

        Raises when the child failed, with the child's reason.
        """
        read_fd, write_fd = os.pipe()
        started = time.perf_counter()
        try:
            with warnings.catch_warnings():
                # Python >= 3.12 warns about forking with threads alive: a child that takes a
                # lock another thread held at the fork would hang. This child takes none (no
                # logging, no _write_lock, no executor) and leaves by os._exit.
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
        except OSError as exc:  # ENOMEM/EAGAIN: the save still happens, on the loop
            os.close(read_fd)
            os.close(write_fd)
            log.warning("detector checkpoint: fork failed (%s); saving in-process", exc)
            return False
        if pid == 0:  # pragma: no cover - the child; coverage does not follow a fork
            os.close(read_fd)
            self._child_save(taken, write_fd)
        self.last_blocking_s = time.perf_counter() - started
        os.close(write_fd)
        report = await loop.run_in_executor(None, _reap_child, pid, read_fd)
        if not report.get("ok"):
            raise RuntimeError(f"checkpoint child failed: {report.get('error', 'no report')}")
        self.last_encode_s = float(report["encode_s"])
        self.last_save_s = float(report["save_s"])
        self.last_save_bytes = int(report["bytes"])
        self.last_child_private_bytes = int(report["private_bytes"])
        self.saves += 1
        self.forked_saves += 1
        return True

    def _child_save(self, taken: Mapping[str, dict[str, Any]], report_fd: int) -> NoReturn:
        """The forked child's whole life: save, report on ``report_fd``, ``os._exit``."""
        status = 1
        report: dict[str, Any]
        try:
            # The parent's signal handlers (asyncio writes signals to a wakeup fd the parent
            # reads) must not fire here: a stop signal simply ends the child.
            try:
                signal.set_wakeup_fd(-1)
                for signum in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(signum, signal.SIG_DFL)
            except ValueError:  # forked from a thread other than the main one: none installed
                pass
            gc.disable()  # a collection would touch (and so copy) every tracked object's page
            started = time.perf_counter()
            data = self.encode(taken)
            self._replace_file(data)
            report = {"ok": True, "bytes": len(data), "encode_s": self.last_encode_s,
                      "save_s": time.perf_counter() - started, "private_bytes": _private_bytes()}
            status = 0
        except BaseException as exc:
            report = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        try:
            os.write(report_fd, orjson.dumps(report))
        finally:
            os._exit(status)

    def _taken_in_executors(self) -> dict[str, dict[str, Any]]:
        taken = {}
        for name, executor in self.snapshot_executors.items():
            det = self.runner.detectors.get(name)
            if det is None:
                continue
            try:
                future = executor.submit(det.snapshot)
            except RuntimeError:  # executor shut down: nothing updates the detector any more
                taken[name] = det.snapshot()
            else:
                taken[name] = future.result()
        return taken


async def _run_in(loop: asyncio.AbstractEventLoop, executor: Executor, fun: Callable[[], Any]) -> Any:
    try:
        future = loop.run_in_executor(executor, fun)
    except RuntimeError:  # executor shut down: nothing updates the detector any more
        return fun()
    return await future


def _reap_child(pid: int, report_fd: int) -> dict[str, Any]:
    """Read a save child's report to EOF, then reap it (runs in a thread: both block)."""
    chunks = []
    try:
        while chunk := os.read(report_fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(report_fd)
    _, status = os.waitpid(pid, 0)
    try:
        report = orjson.loads(b"".join(chunks)) if chunks else {}
    except orjson.JSONDecodeError:
        report = {}
    if not chunks or os.waitstatus_to_exitcode(status) != 0:
        code = os.waitstatus_to_exitcode(status)
        died = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        return {"ok": False, "error": report.get("error", died)}
    return report


def _wide_ints_as_floats(value: Any) -> Any:
    """``value`` with every integer orjson cannot encode (beyond int64/uint64) made a float."""
    if isinstance(value, dict):
        return {k: _wide_ints_as_floats(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_wide_ints_as_floats(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and not _INT_MIN <= value <= _UINT_MAX:
        try:
            return float(value)
        except OverflowError:  # beyond 1.8e308: the largest float keeps the sign and the size
            return sys.float_info.max if value > 0 else -sys.float_info.max
    return value


def _private_bytes() -> int:
    """This process's private dirty memory (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/smaps_rollup", "rb") as rollup:
            for line in rollup:
                if line.startswith(b"Private_Dirty:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


__all__ = ["DetectorCheckpoint", "CheckpointFormatError", "checkpoint_path", "FORMAT",
           "FORMAT_VERSION"]
