"""Snapshots: Parquet files partitioned by table and hour, plus DuckDB views over them.

Layout under the data dir::

    <table>/hour=2026-11-21T09/part-<writer>-<seq>.parquet
    catalog.duckdb        views for analysts (``duckdb agentwatch-data/catalog.duckdb``)

Files are written under a dot-name and renamed into place, so readers (``agentwatch query``,
the catalog views) only ever see whole files while the pipeline is writing. Each writer (worker)
names its own files, so several workers share a data dir without coordination.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from agentwatch.events import EVENT_TYPES, LlmCall
from agentwatch.streams.pipeline import join_json_arrays

log = logging.getLogger(__name__)

_ARROW_TYPES = {str: pa.string(), "str": pa.string(), float: pa.float64(), "float": pa.float64(),
                int: pa.int64(), "int": pa.int64(), bool: pa.bool_(), "bool": pa.bool_()}
_DUCK_TYPES = {pa.string(): "VARCHAR", pa.float64(): "DOUBLE", pa.int64(): "BIGINT", pa.bool_(): "BOOLEAN"}

# Tables that hold free-form records (alerts come from the alerting package, whose fields may grow).
FREE_FORM_TABLES = ("alerts",)


def schema_for(event_type: type) -> pa.Schema:
    """Arrow schema of an event dataclass; anything not a scalar is stored as JSON text."""
    return pa.schema([(f.name, _ARROW_TYPES.get(f.type, pa.string())) for f in dataclasses.fields(event_type)])


SCHEMAS: dict[str, pa.Schema] = {t.table: schema_for(t) for t in EVENT_TYPES}


def _hour(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H")


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return orjson.dumps(value, default=str).decode()


@dataclass
class _Buffer:
    payloads: list[bytes]  # JSON arrays of row objects (or single objects), as they came off Kafka
    rows: int
    since: float
    # Opaque tokens of the records these rows came from (Faust events): acknowledged by the
    # caller only once the rows are in a Parquet file, so offsets are committed after the write.
    tokens: list = field(default_factory=list)


class SnapshotSink:
    """Buffers rows per table and writes them as Parquet by row count or age.

    Rows are buffered as the JSON the workers already have (the event records off Kafka) and turned
    into hour-partitioned Parquet by DuckDB's JSON reader, so no Python code runs per row.

    Parameters
    ----------
    data_dir
        Root of the snapshot tree.
    writer_id
        Unique per writing process; part of every file name.
    flush_rows, flush_seconds
        A table's buffer is written once it holds ``flush_rows`` rows or its oldest row is
        ``flush_seconds`` old.
    clock
        Monotonic seconds; tests pass their own.
    """

    def __init__(self, data_dir: str | Path, *, writer_id: str, flush_rows: int = 50_000,
                 flush_seconds: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        if flush_rows < 1:
            raise ValueError("flush_rows must be >= 1")
        if flush_seconds <= 0:
            raise ValueError("flush_seconds must be > 0")
        self.data_dir = Path(data_dir)
        self.writer_id = writer_id
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self._clock = clock
        self._buffers: dict[str, _Buffer] = {}
        self._seq = 0
        self._lock = threading.Lock()  # buffers are swapped on the event loop, written in a thread
        self._write_lock = threading.Lock()
        self._duck = None
        self.rows_written: dict[str, int] = {}
        self.rows_rejected = 0
        self._known_tables: set[str] = set()
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def add_events(self, events: Sequence[Any]) -> None:
        """Buffer dataclass events (all of one type)."""
        if events:
            self.add_payload(type(events[0]).table, orjson.dumps(list(events), default=str), len(events))

    def add_rows(self, table: str, rows: Iterable[Mapping[str, Any]]) -> None:
        rows = list(rows)
        if rows:
            self.add_payload(table, orjson.dumps(rows, default=str), len(rows))

    def add_payload(self, table: str, payload: bytes, rows: int, token: Any = None) -> None:
        """Buffer a JSON array of row objects (or one object) holding ``rows`` rows.

        ``token`` (e.g. the Kafka record's event) comes back with the buffer from :meth:`take_due`.
        """
        if not rows:
            return
        with self._lock:
            buffer = self._buffers.get(table)
            if buffer is None:
                buffer = self._buffers[table] = _Buffer([], 0, self._clock())
            buffer.payloads.append(payload)
            buffer.rows += rows
            if token is not None:
                buffer.tokens.append(token)

    def requeue(self, batches: Mapping[str, _Buffer]) -> None:
        """Put taken buffers back (their write failed) ahead of newer rows, to be retried."""
        with self._lock:
            for table, old in batches.items():
                newer = self._buffers.get(table)
                if newer is not None:
                    old.payloads += newer.payloads
                    old.rows += newer.rows
                    old.tokens += newer.tokens
                self._buffers[table] = old

    def take_due(self, force: bool = False) -> dict[str, _Buffer]:
        """Remove and return the buffers that are due (all when ``force``)."""
        now = self._clock()
        with self._lock:
            due = [t for t, b in self._buffers.items()
                   if force or b.rows >= self.flush_rows or now - b.since >= self.flush_seconds]
            return {t: self._buffers.pop(t) for t in due}

    def write(self, batches: Mapping[str, _Buffer]) -> int:
        """Write taken buffers as Parquet files; returns the number of files written."""
        files = 0
        with self._write_lock:
            for table, buffer in batches.items():
                written = self._write_table(table, buffer)
                files += written
                if written:
                    self.rows_written[table] = self.rows_written.get(table, 0) + buffer.rows
                if written and table not in self._known_tables:
                    self._known_tables.add(table)
                    refresh_catalog(self.data_dir)
        return files

    def flush(self, force: bool = False) -> int:
        return self.write(self.take_due(force))

    def _next_seq(self) -> int:
        with self._lock:
            self._seq += 1
            return self._seq

    def _write_table(self, table: str, buffer: _Buffer) -> int:
        import duckdb

        seq = self._next_seq()
        staging = self.data_dir / ".staging" / f"{self.writer_id}-{seq}"
        staging.mkdir(parents=True, exist_ok=True)
        try:
            if table not in SCHEMAS:
                return self._write_free_form(table, buffer, staging, seq)
            source = staging / "rows.json"
            source.write_bytes(join_json_arrays(buffer.payloads))
            out = staging / "out"
            name = f"part-{self.writer_id}-{int(time.time() * 1000)}-{seq:06d}-{{i}}"
            try:
                self._duckdb().execute(
                    f"COPY (SELECT *, strftime(make_timestamp(CAST(ts * 1000000 AS BIGINT)), '%Y-%m-%dT%H') AS hour "
                    f"FROM read_json('{_sql_path(source)}', format = 'array', columns = {_duck_columns(table)})) "
                    f"TO '{_sql_path(out)}' (FORMAT parquet, COMPRESSION zstd, PARTITION_BY (hour), "
                    f"FILENAME_PATTERN '{name}')")
            except duckdb.Error as exc:
                # Rows that do not fit the table's schema are kept, not dropped, and never stop the worker.
                self._quarantine(table, buffer, exc)
                return 0
            return _publish(out, self.data_dir / table)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _write_free_form(self, table: str, buffer: _Buffer, staging: Path, seq: int) -> int:
        rows = []
        for payload in buffer.payloads:
            doc = orjson.loads(payload)
            rows.extend(doc if isinstance(doc, list) else [doc])
        by_hour: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_hour.setdefault(_hour(float(row.get("ts") or 0.0)), []).append(
                {k: _jsonable(v) for k, v in row.items()})
        out = staging / "out"
        for hour, hour_rows in by_hour.items():
            folder = out / f"hour={hour}"
            folder.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(hour_rows), folder / f"part-{self.writer_id}-{int(time.time() * 1000)}-{seq:06d}.parquet",
                           compression="zstd")
        return _publish(out, self.data_dir / table)

    def _duckdb(self):
        import duckdb

        if self._duck is None:
            self._duck = duckdb.connect(":memory:")
            self._duck.execute("SET threads = 1")  # leave the other core to the consumer loop
        return self._duck

    def _quarantine(self, table: str, buffer: _Buffer, exc: Exception) -> None:
        folder = self.data_dir / "_rejected"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{table}-{self.writer_id}-{int(time.time() * 1000)}.json"
        path.write_bytes(join_json_arrays(buffer.payloads))
        self.rows_rejected += buffer.rows
        log.error("%d %s rows did not fit the snapshot schema (%s); kept in %s", buffer.rows, table, exc, path)


def _publish(staged: Path, table_dir: Path) -> int:
    """Move staged ``hour=*/part-*.parquet`` files into place: readers only ever see whole files."""
    moved = 0
    for path in sorted(staged.glob("hour=*/*.parquet")):
        target = table_dir / path.parent.name
        target.mkdir(parents=True, exist_ok=True)
        os.replace(path, target / path.name)
        moved += 1
    return moved


def _sql_path(path: Path) -> str:
    return str(path.resolve()).replace("'", "''")


def _duck_columns(table: str) -> str:
    fields = ", ".join(f"'{f.name}': '{_DUCK_TYPES.get(f.type, 'VARCHAR')}'" for f in SCHEMAS[table])
    return "{" + fields + "}"


# -- reading --------------------------------------------------------------------------------

def _empty_select(schema: pa.Schema) -> str:
    cols = ", ".join(f"CAST(NULL AS {_DUCK_TYPES.get(f.type, 'VARCHAR')}) AS {f.name}" for f in schema)
    return f"SELECT {cols}, CAST(NULL AS VARCHAR) AS hour WHERE false"


def _table_source(data_dir: Path, table: str) -> str:
    folder = data_dir.resolve() / table
    if folder.is_dir() and any(folder.glob("hour=*/*.parquet")):
        glob = str(folder / "hour=*" / "*.parquet").replace("'", "''")
        return f"SELECT * FROM read_parquet('{glob}', hive_partitioning = true, union_by_name = true)"
    schema = SCHEMAS.get(table)
    if schema is None:
        return "SELECT CAST(NULL AS VARCHAR) AS id, CAST(NULL AS DOUBLE) AS ts WHERE false"
    return _empty_select(schema)


def view_statements(data_dir: str | Path) -> list[str]:
    """DDL of the analyst views. ``llm_calls`` fills prompt/response from log-record messages."""
    data_dir = Path(data_dir)
    statements = [f"CREATE OR REPLACE VIEW {name}_raw AS {_table_source(data_dir, name)}"
                  for name in list(SCHEMAS) + list(FREE_FORM_TABLES)]
    for name in list(SCHEMAS) + list(FREE_FORM_TABLES):
        if name != LlmCall.table:
            statements.append(f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM {name}_raw")
    # Prompt text may arrive as log records (openai-v2): joined by trace and span id; the last
    # user message is the prompt, as it is when taken from span attributes.
    statements.append("""
        CREATE OR REPLACE VIEW llm_calls AS
        SELECT c.* REPLACE (
                 coalesce(nullif(c.prompt, ''), m.prompt, '') AS prompt,
                 coalesce(nullif(c.response, ''), m.response, '') AS response)
        FROM llm_calls_raw c
        LEFT JOIN (
            SELECT trace_id, span_id,
                   last(content ORDER BY ts) FILTER (WHERE role = 'user') AS prompt,
                   last(content ORDER BY ts) FILTER (WHERE role = 'assistant') AS response
            FROM llm_messages_raw GROUP BY trace_id, span_id
        ) m ON c.trace_id = m.trace_id AND c.span_id = m.span_id""")
    return statements


def connect(data_dir: str | Path):
    """An in-memory DuckDB connection with every snapshot view defined."""
    import duckdb

    con = duckdb.connect(":memory:")
    for statement in view_statements(data_dir):
        con.execute(statement)
    return con


def query_snapshots(data_dir: str | Path, sql: str) -> pa.Table:
    con = connect(data_dir)
    try:
        return con.sql(sql).to_arrow_table()
    finally:
        con.close()


def refresh_catalog(data_dir: str | Path) -> bool:
    """(Re)write ``catalog.duckdb``; False when another process holds it (retried next time)."""
    import duckdb

    path = Path(data_dir) / "catalog.duckdb"
    try:
        con = duckdb.connect(str(path))
    except duckdb.Error as exc:  # an analyst has it open: the views are refreshed on a later flush
        log.info("catalog busy, not refreshed: %s", exc)
        return False
    try:
        for statement in view_statements(data_dir):
            con.execute(statement)
    finally:
        con.close()
    return True
