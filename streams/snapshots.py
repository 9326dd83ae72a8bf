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
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from agentwatch.events import EVENT_TYPES, LlmCall

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
    rows: list[dict[str, Any]]
    since: float


class SnapshotSink:
    """Buffers rows per table and writes them as Parquet by row count or age.

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
        self.rows_written: dict[str, int] = {}
        self.rows_rejected = 0
        self._known_tables: set[str] = set()
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def add_events(self, events: Sequence[Any]) -> None:
        """Buffer dataclass events (all of one type)."""
        if not events:
            return
        table = type(events[0]).table
        names = [f.name for f in dataclasses.fields(events[0])]
        if table == "findings":
            rows = [{n: _jsonable(getattr(e, n)) for n in names} for e in events]
        else:
            rows = [{n: getattr(e, n) for n in names} for e in events]
        self.add_rows(table, rows)

    def add_rows(self, table: str, rows: Iterable[Mapping[str, Any]]) -> None:
        rows = list(rows)
        if not rows:
            return
        with self._lock:
            buffer = self._buffers.get(table)
            if buffer is None:
                buffer = self._buffers[table] = _Buffer([], self._clock())
            buffer.rows.extend(rows)

    def take_due(self, force: bool = False) -> dict[str, list[dict[str, Any]]]:
        """Remove and return the buffers that are due (all when ``force``)."""
        now = self._clock()
        with self._lock:
            due = [t for t, b in self._buffers.items()
                   if force or len(b.rows) >= self.flush_rows or now - b.since >= self.flush_seconds]
            return {t: self._buffers.pop(t).rows for t in due}

    def write(self, batches: Mapping[str, list[dict[str, Any]]]) -> int:
        """Write taken buffers as Parquet files; returns the number of files written."""
        files = 0
        for table, rows in batches.items():
            by_hour: dict[str, list[dict[str, Any]]] = {}
            for row in rows:
                by_hour.setdefault(_hour(float(row.get("ts") or 0.0)), []).append(row)
            for hour, hour_rows in by_hour.items():
                self._write_file(table, hour, hour_rows)
                files += 1
            self.rows_written[table] = self.rows_written.get(table, 0) + len(rows)
            if table not in self._known_tables:
                self._known_tables.add(table)
                refresh_catalog(self.data_dir)
        return files

    def flush(self, force: bool = False) -> int:
        return self.write(self.take_due(force))

    def _write_file(self, table: str, hour: str, rows: list[dict[str, Any]]) -> None:
        try:
            arrow = _to_arrow(table, rows)
        except (pa.ArrowException, TypeError, ValueError) as exc:
            # Rows that do not fit the table's schema are kept, not dropped, and never stop the worker.
            self._quarantine(table, rows, exc)
            return
        folder = self.data_dir / table / f"hour={hour}"
        folder.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._seq += 1
            seq = self._seq
        name = f"part-{self.writer_id}-{int(time.time() * 1000)}-{seq:06d}.parquet"
        tmp = folder / f".{name}.tmp"
        pq.write_table(arrow, tmp, compression="zstd")
        os.replace(tmp, folder / name)


    def _quarantine(self, table: str, rows: list[dict[str, Any]], exc: Exception) -> None:
        folder = self.data_dir / "_rejected"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{table}-{self.writer_id}-{int(time.time() * 1000)}.jsonl"
        with open(path, "wb") as out:
            for row in rows:
                out.write(orjson.dumps(row, default=str) + b"\n")
        self.rows_rejected += len(rows)
        log.error("%d %s rows did not fit the snapshot schema (%s); kept in %s", len(rows), table, exc, path)


def _to_arrow(table: str, rows: list[dict[str, Any]]) -> pa.Table:
    schema = SCHEMAS.get(table)
    if schema is None:
        return pa.Table.from_pylist([{k: _jsonable(v) for k, v in row.items()} for row in rows])
    # Structured values (finding evidence, nested JSON from other producers) are stored as JSON text.
    if any(isinstance(v, (dict, list, tuple)) for row in rows[:1] for v in row.values()) or table == "findings":
        rows = [{k: _jsonable(v) for k, v in row.items()} for row in rows]
    return pa.Table.from_pylist(rows, schema=schema)


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
