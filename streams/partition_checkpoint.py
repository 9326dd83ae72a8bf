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

The consistency rule (kept by the runtime, :class:`~agentwatch.streams.app.PartitionCheckpointer`):
a file is written only once the group's committed offsets have reached the offsets it names.
Then after any crash the committed offset is at or past the checkpoint, and the records between
the two are replayed into the state alone.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

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
