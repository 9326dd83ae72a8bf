"""Partition state checkpoints: one file per (stage, partition), written atomically.

``<data_dir>/state/<app_id>/<stage>-<partition>.json`` holds the state of one input partition
(:class:`~agentwatch.streams.dataflow.PartitionState`) and the offsets it reflects::

    {"format": "agentwatch.partition-state", "version": 1, "stage": "trace", "partition": 3,
     "offsets": {"llm_calls": 1042, "tool_calls": 988, "agent_steps": 311}, "state": {...}}

Files belong to partitions, not workers: whichever worker is assigned a partition restores its
file, with any worker count. A save is atomic (temp file in the same directory, fsync,
``os.replace``): a crash mid-save leaves the previous file. A file that cannot be read is moved
aside as ``<name>.corrupt-<unix ms>`` and the partition starts empty; temp files left by a save
that was killed are removed when the partition's file is next loaded.

The consistency rule (kept by :class:`PartitionCheckpointer`, which the runtime drives):
a file is written only once the group's committed offsets have reached the offsets it names.
Then after any crash the committed offset is at or past the checkpoint, and the records between
the two are replayed into the state alone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping

import orjson

log = logging.getLogger(__name__)

_INT_MIN, _UINT_MAX = -(2**63), 2**64 - 1  # the integers orjson encodes


class PartitionCheckpointStore:
    """Reads and writes partition checkpoint files under ``<data_dir>/state/<app_id>/``."""

    def __init__(self, data_dir: str | Path, app_id: str) -> None:
        self.directory = Path(data_dir) / "state" / app_id
        self.saves = 0
        self.failures = 0
        self.last_save_bytes = 0
        self.last_save_s = 0.0
        self.last_blocking_s = 0.0
        self.wide_int_encodes = 0  # encodes that wrote an integer beyond 64 bits as a float

    def path(self, stage: str, partition: int) -> Path:
        return self.directory / f"{stage}-{int(partition)}.json"

    def load(self, stage: str, partition: int) -> dict[str, Any] | None:
        path = self.path(stage, partition)
        self._remove_temp_files(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("partition checkpoint %s unreadable (%s); starting empty", path, exc)
            self.failures += 1
            return None
        try:
            doc = orjson.loads(data)
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
            return doc
        except ValueError as exc:
            log.warning("partition checkpoint %s corrupt (%s); moved aside, starting empty", path, exc)
            self.failures += 1
            self.set_aside(stage, partition)
            return None

    def set_aside(self, stage: str, partition: int) -> None:
        path = self.path(stage, partition)
        try:
            path.replace(path.with_name(f"{path.name}.corrupt-{int(time.time() * 1000)}"))
        except OSError:
            pass

    def _remove_temp_files(self, path: Path) -> None:
        # Left by a save that was killed mid-write; the partition's owner is the only writer.
        try:
            for stale in self.directory.glob(f".{path.name}.*.tmp"):
                stale.unlink(missing_ok=True)
        except OSError:
            pass

    def encode(self, doc: Mapping[str, Any]) -> bytes:
        try:
            return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
        except orjson.JSONEncodeError:
            # One integer beyond 64 bits anywhere in a state (a sum of implausible token counts
            # from an event built without the value bounds) would fail every save of the
            # partition from then on. Such an integer is written as the nearest float (what
            # orjson reads back for it anyway); anything else that cannot be encoded still fails.
            data = orjson.dumps(_wide_ints_as_floats(doc), option=orjson.OPT_SERIALIZE_NUMPY)
            self.wide_int_encodes += 1
            return data

    def save(self, stage: str, partition: int, data: bytes) -> None:
        """Write one partition's encoded checkpoint atomically."""
        started = time.perf_counter()
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(stage, partition)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            self.failures += 1
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        self.saves += 1
        self.last_save_bytes = len(data)
        self.last_save_s = time.perf_counter() - started

    def stored(self) -> list[tuple[str, int]]:
        """(stage, partition) of every checkpoint file present."""
        out = []
        for path in sorted(self.directory.glob("*-*.json")):
            stage, _, partition = path.stem.rpartition("-")
            if partition.isdigit():
                out.append((stage, int(partition)))
        return out



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


class Unacked:
    """Offsets handed out and not yet acknowledged, per (topic, partition): a checkpoint may be
    written once none below its offsets is left."""

    def __init__(self) -> None:
        self._offsets: dict[tuple[str, int], set[int]] = {}

    def add(self, record: Any) -> None:
        self._offsets.setdefault((record.topic, record.partition), set()).add(record.offset)

    def done(self, record: Any) -> None:
        self._offsets.get((record.topic, record.partition), set()).discard(record.offset)

    def clear_below(self, state: Any, offsets: dict[str, int]) -> bool:
        for topic, offset in offsets.items():
            pending = self._offsets.get((topic, state.partition))
            if pending and min(pending) < offset:
                return False
        return True


class PartitionCheckpointer:
    """Saves partition states with the offsets they reflect, never ahead of the group's commit.

    A save snapshots every owned state between two records (each with its offsets), waits until
    every record below those offsets is acknowledged (its rows written), then calls ``commit``:
    the runtime flushes its producer, commits, and returns the group's committed offsets. A file
    is written only where they reached its offsets. So the committed offset is at or past every
    file after any crash, and the records in between are replayed into the state alone
    (:meth:`Dataflow.replay`).
    """

    def __init__(self, dataflow: Any, unacked: Unacked, flush: Callable[[bool], Awaitable[None]],
                 commit: Callable[[list[tuple[str, int]]], Awaitable[Mapping[tuple[str, int], int | None]]],
                 every_s: float) -> None:
        self.dataflow = dataflow
        self.commit = commit
        self.unacked = unacked
        self.flush = flush
        self.every_s = every_s
        self.store = dataflow.checkpoints
        self._last = time.monotonic()
        self._lock = asyncio.Lock()

    async def maybe_save(self, *, force: bool = False) -> None:
        if not force and time.monotonic() - self._last < self.every_s:
            return
        self._last = time.monotonic()
        await self.save(self.dataflow.owned_states())

    async def save(self, states: list[Any], wait_s: float = 2.0) -> int:
        if self.store is None or not states:
            return 0
        async with self._lock:
            # One partition at a time, records flowing in between: each document is consistent
            # with its own offsets, and the loop stops for one partition's snapshot at most.
            docs = []
            for state in states:
                started = time.perf_counter()
                docs += self.dataflow.snapshot_states([state])
                self.store.last_blocking_s = time.perf_counter() - started
                await asyncio.sleep(0)
            deadline = time.monotonic() + wait_s
            waiting = list(docs)
            ready: list[tuple[Any, dict[str, Any]]] = []
            while waiting:
                await self.flush(True)
                still = []
                for state, doc in waiting:
                    (ready if self.unacked.clear_below(state, doc["offsets"]) else still).append((state, doc))
                waiting = still
                if not waiting or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            for state, _ in waiting:
                log.warning("partition %s/%s: records still unwritten; checkpoint skipped this round",
                            state.stage, state.partition)
            if not ready:
                return 0
            topics = sorted({(topic, state.partition) for state, doc in ready for topic in doc["offsets"]})
            try:
                committed = await self.commit(topics)
            except Exception:
                log.exception("commit before checkpoint failed; checkpoint skipped")
                return 0
            behind = [(state, doc) for state, doc in ready
                      if any((committed.get((topic, state.partition)) or 0) < offset
                             for topic, offset in doc["offsets"].items())]
            for state, doc in behind:
                # The group's commit did not reach what this state reflects (another commit in
                # flight, a rebalance discarding acks): a file now could run ahead of the commit.
                log.warning("partition %s/%s: commit behind its state; checkpoint skipped this round",
                            state.stage, state.partition)
            ready = [item for item in ready if item not in behind]
            loop = asyncio.get_running_loop()
            saved = 0
            for state, doc in ready:
                try:
                    data = await loop.run_in_executor(None, self.store.encode, doc)
                    await loop.run_in_executor(None, self.store.save, state.stage, state.partition, data)
                    saved += 1
                except Exception:
                    log.exception("partition %s/%s: checkpoint save failed", state.stage, state.partition)
            return saved
