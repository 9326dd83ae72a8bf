"""Snapshots: Parquet files partitioned by table and hour, plus DuckDB views over them.

Layout under the data dir::

    <table>/hour=2026-11-21T09/part-<writer>-<seq>.parquet
    catalog.duckdb        views for analysts (``duckdb agentwatch-data/catalog.duckdb``)

Files are written under a dot-name and renamed into place, so readers (``agentwatch query``,
the catalog views) only ever see whole files while the pipeline is writing. Each writer (worker)
names its own files, so several workers share a data dir without coordination.

A row that does not fit its table's schema (a count beyond BIGINT, text where a number belongs,
a timestamp out of range) is quarantined alone: when a buffer fails to write, the rows that
certainly cannot be cast are set aside, the rest are bisected with trial writes until only the
rows that fail alone remain, and every other row is written. The bad ones go to
``_rejected/<table>-<writer>-<ms>-<seq>.json`` with a ``.reasons.json`` beside it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
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
from agentwatch.streams.pipeline import dumps_lenient, join_json_arrays

log = logging.getLogger(__name__)

_ARROW_TYPES = {str: pa.string(), "str": pa.string(), float: pa.float64(), "float": pa.float64(),
                int: pa.int64(), "int": pa.int64(), bool: pa.bool_(), "bool": pa.bool_(),
                "float | None": pa.float64(), "int | None": pa.int64()}  # nullable columns
_DUCK_TYPES = {pa.string(): "VARCHAR", pa.float64(): "DOUBLE", pa.int64(): "BIGINT", pa.bool_(): "BOOLEAN"}

# zstd at level 1: on span rows its files are as small as at the default level 3 (repetitive
# columns compress either way) and the Parquet writes take about a fifth less CPU.
ZSTD_LEVEL = 1

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
        # Trial writes one failed buffer may cost to isolate its bad rows (~3 ms each); past it,
        # the rows not yet isolated are quarantined together rather than stall the worker.
        self.max_trial_writes = 512
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
                written, rows = self._write_table(table, buffer)
                files += written
                if written:
                    self.rows_written[table] = self.rows_written.get(table, 0) + rows
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

    def _write_table(self, table: str, buffer: _Buffer) -> tuple[int, int]:
        """(files, rows) written for one taken buffer."""
        import duckdb

        seq = self._next_seq()
        staging = self.data_dir / ".staging" / f"{self.writer_id}-{seq}"
        staging.mkdir(parents=True, exist_ok=True)
        try:
            if table not in SCHEMAS:
                return self._write_free_form(table, buffer, staging, seq), buffer.rows
            source = staging / "rows.json"
            source.write_bytes(join_json_arrays(buffer.payloads))
            out = staging / "out"
            try:
                self._copy(table, source, out, seq)
            except duckdb.Error as exc:
                _raise_if_storage(exc)
                # Rows that do not fit the table's schema are kept, not dropped, and never stop
                # the worker; nor do they take the rows that fit with them.
                return self._write_salvaging(table, buffer, staging, seq, exc)
            return _publish(out, self.data_dir / table), buffer.rows
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _copy(self, table: str, source: Path, out: Path, seq: int) -> None:
        name = f"part-{self.writer_id}-{int(time.time() * 1000)}-{seq:06d}-{{i}}"
        self._duckdb().execute(
            f"COPY (SELECT *, strftime(make_timestamp(CAST(ts * 1000000 AS BIGINT)), '%Y-%m-%dT%H') AS hour "
            f"FROM read_json('{_sql_path(source)}', format = 'array', columns = {_duck_columns(table)})) "
            f"TO '{_sql_path(out)}' (FORMAT parquet, COMPRESSION zstd, COMPRESSION_LEVEL {ZSTD_LEVEL}, "
            f"PARTITION_BY (hour), "
            f"FILENAME_PATTERN '{name}')")

    def _write_salvaging(self, table: str, buffer: _Buffer, staging: Path, seq: int,
                         first_error: Exception) -> tuple[int, int]:
        """Write every row of a failed buffer that can be written; quarantine the others alone."""
        import duckdb

        rows, bad = _parse_rows(buffer.payloads)
        candidates = []
        for row in rows:
            reason = _certain_cast_failure(table, row)
            if reason is None:
                candidates.append(row)
            else:
                bad.append((row, reason))
        trial = 0

        def failure(chunk: list[Any]) -> str | None:
            nonlocal trial
            trial += 1
            probe = staging / f"probe-{trial}"
            try:
                (staging / "probe.json").write_bytes(dumps_lenient(chunk))
                self._copy(table, staging / "probe.json", probe, seq)
                return None
            except duckdb.Error as exc:
                _raise_if_storage(exc)
                return _first_line(exc)
            finally:
                shutil.rmtree(probe, ignore_errors=True)

        # With no certain failure set aside, the whole buffer is known to fail: no need to try it again.
        good, isolated = _isolate(candidates, failure, self.max_trial_writes,
                                  known_failure=None if bad else _first_line(first_error))
        bad += isolated
        files = 0
        if good:
            source = staging / "good.json"
            source.write_bytes(dumps_lenient(good))
            out = staging / "out"
            try:
                self._copy(table, source, out, seq)
            except duckdb.Error as exc:  # every part fitted alone: not expected, but kept either way
                _raise_if_storage(exc)
                bad += [(row, f"fitted alone, not together: {_first_line(exc)}") for row in good]
                good = []
            else:
                files = _publish(out, self.data_dir / table)
        self._quarantine_rows(table, bad, seq)
        return files, len(good)

    def _write_free_form(self, table: str, buffer: _Buffer, staging: Path, seq: int) -> int:
        rows, bad = _parse_rows(buffer.payloads)
        by_hour: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            try:
                hour = _hour(float(row.get("ts") or 0.0))
            except (AttributeError, TypeError, ValueError, OverflowError, OSError) as exc:
                bad.append((row, f"no usable ts: {type(exc).__name__}: {exc}"))
                continue
            by_hour.setdefault(hour, []).append({k: _jsonable(v) for k, v in row.items()})
        out = staging / "out"
        for hour, hour_rows in by_hour.items():
            try:
                arrow = pa.Table.from_pylist(hour_rows)
            except (pa.ArrowException, TypeError, ValueError, OverflowError):
                hour_rows, isolated = _isolate(hour_rows, _arrow_failure, self.max_trial_writes)
                bad += isolated
                if not hour_rows:
                    continue
                arrow = pa.Table.from_pylist(hour_rows)
            folder = out / f"hour={hour}"
            folder.mkdir(parents=True, exist_ok=True)
            pq.write_table(arrow, folder / f"part-{self.writer_id}-{int(time.time() * 1000)}-{seq:06d}.parquet",
                           compression="zstd", compression_level=ZSTD_LEVEL)
        self._quarantine_rows(table, bad, seq)
        return _publish(out, self.data_dir / table)

    def _duckdb(self):
        import duckdb

        if self._duck is None:
            self._duck = duckdb.connect(":memory:")
            self._duck.execute("SET threads = 1")  # leave the other core to the consumer loop
        return self._duck

    def _quarantine_rows(self, table: str, bad: list[tuple[Any, str]], seq: int) -> None:
        """Keep the rows that cannot be written, each with its reason, in ``_rejected/``."""
        if not bad:
            return
        folder = self.data_dir / "_rejected"
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{table}-{self.writer_id}-{int(time.time() * 1000)}-{seq:06d}"
        (folder / f"{stem}.json").write_bytes(dumps_lenient([row for row, _ in bad]))
        (folder / f"{stem}.reasons.json").write_bytes(orjson.dumps(
            [{"index": i, "reason": reason} for i, (_, reason) in enumerate(bad)], option=orjson.OPT_INDENT_2))
        self.rows_rejected += len(bad)
        log.error("%d %s rows did not fit the snapshot schema (first: %s); kept in %s/%s.json, the "
                  "other rows of their buffer were written", len(bad), table, bad[0][1], folder, stem)


_BIGINT_LIMIT = 2**63
_NUMBER_TYPES = {"BIGINT", "DOUBLE"}


def _parse_rows(payloads: Sequence[bytes]) -> tuple[list[Any], list[tuple[Any, str]]]:
    """(rows, payloads that are not JSON with their reason) of a buffer."""
    rows: list[Any] = []
    bad: list[tuple[Any, str]] = []
    for payload in payloads:
        try:
            doc = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:  # not rows at all: kept whole, as text
            bad.append((payload.decode("utf-8", "replace"), f"not JSON: {exc}"))
            continue
        rows.extend(doc if isinstance(doc, list) else [doc])
    return rows, bad


def _isolate(rows: list[Any], failure: Callable[[list[Any]], str | None], max_trials: int,
             known_failure: str | None = None) -> tuple[list[Any], list[tuple[Any, str]]]:
    """(rows that fit, [(row, reason)] that fail alone), by bisection with trial writes.

    ``failure(chunk)`` tries a chunk: None when it fits, else why not. ``known_failure`` says the
    whole of ``rows`` is already known to fail (so it is not tried again). k bad rows among n
    cost about 2k*log2(n) trials; past ``max_trials`` the rows not yet placed are set aside
    together, so a buffer of nothing but bad rows cannot hold the worker for minutes.
    Order is kept among the rows that fit.
    """
    good: list[Any] = []
    bad: list[tuple[Any, str]] = []
    trials = 0
    pending: list[tuple[list[Any], str | None]] = [(rows, known_failure)] if rows else []
    while pending:
        chunk, why = pending.pop()
        if why is None:
            if trials >= max_trials:
                bad += [(row, f"not isolated within {max_trials} trial writes") for row in chunk]
                continue
            trials += 1
            why = failure(chunk)
            if why is None:
                good += chunk
                continue
        if len(chunk) == 1:
            bad.append((chunk[0], why))
        else:
            half = len(chunk) // 2
            pending += [(chunk[half:], None), (chunk[:half], None)]  # the first half goes first
    return good, bad


def _arrow_failure(chunk: list[Any]) -> str | None:
    try:
        pa.Table.from_pylist(chunk)
    except (pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
        return f"{type(exc).__name__}: {_first_line(exc)}"
    return None


def _certain_cast_failure(table: str, row: Any) -> str | None:
    """Why DuckDB cannot cast ``row`` into ``table``'s columns, for what fails for certain.

    Cheap and one-sided: what it names always fails the write (an integer beyond BIGINT, an
    object where a number belongs, a ``ts`` beyond the timestamp range); anything else is
    left to trial writes, which follow DuckDB's own casting rules.
    """
    if not isinstance(row, dict):
        return f"not a JSON object: {type(row).__name__}"
    for column in SCHEMAS[table]:
        value = row.get(column.name)
        duck = _DUCK_TYPES.get(column.type, "VARCHAR")
        if value is None or isinstance(value, bool) or duck not in _NUMBER_TYPES:
            continue
        if isinstance(value, (list, dict)):
            return f"{column.name}: a JSON {type(value).__name__} where {duck} belongs"
        if isinstance(value, str):
            try:
                float(value)
            except ValueError:
                return f"{column.name}: text {value[:40]!r} where {duck} belongs"
            continue
        if duck == "BIGINT" and not -_BIGINT_LIMIT <= value < _BIGINT_LIMIT:
            return f"{column.name}: {value} is beyond BIGINT"
        if column.name == "ts" and not (math.isfinite(value) and abs(value) * 1e6 < _BIGINT_LIMIT):
            return f"ts: {value} is beyond the timestamp range"
    return None


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0][:500] if str(exc).strip() else type(exc).__name__


def _raise_if_storage(exc: Exception) -> None:
    """A write that failed for the disk, not the rows: the caller keeps the rows and retries."""
    import duckdb

    if isinstance(exc, (duckdb.IOException, duckdb.OutOfMemoryException)):
        raise OSError(f"snapshot write failed: {exc}") from exc


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


# Delivery is at least once: a record processed again (its worker killed, or stalled past the
# session timeout, between writing its rows and committing it) writes its rows again. The analyst
# views hold one row per identity: a span is one row of its table; any other row is itself (a
# copy is equal in every column). The ``<table>_raw`` views keep every stored copy.
SPAN_TABLES = ("llm_calls", "tool_calls", "agent_steps")


def _one_row_per_identity(table: str) -> str:
    if table in SPAN_TABLES:
        return f"SELECT DISTINCT ON (trace_id, span_id) * FROM {table}_raw"
    if table in FREE_FORM_TABLES:  # the notifier's own records: it absorbs repeats by alert identity
        return f"SELECT * FROM {table}_raw"
    return f"SELECT DISTINCT * FROM {table}_raw"


def view_statements(data_dir: str | Path) -> list[str]:
    """DDL of the analyst views: one row per identity (see above); ``llm_calls`` fills
    prompt/response from log-record messages."""
    data_dir = Path(data_dir)
    statements = [f"CREATE OR REPLACE VIEW {name}_raw AS {_table_source(data_dir, name)}"
                  for name in list(SCHEMAS) + list(FREE_FORM_TABLES)]
    for name in list(SCHEMAS) + list(FREE_FORM_TABLES):
        if name != LlmCall.table:
            statements.append(f"CREATE OR REPLACE VIEW {name} AS {_one_row_per_identity(name)}")
    # Prompt text may arrive as log records (openai-v2): joined by trace and span id; the last
    # user message is the prompt, as it is when taken from span attributes.
    statements.append(f"""
        CREATE OR REPLACE VIEW llm_calls AS
        SELECT c.* REPLACE (
                 coalesce(nullif(c.prompt, ''), m.prompt, '') AS prompt,
                 coalesce(nullif(c.response, ''), m.response, '') AS response)
        FROM ({_one_row_per_identity(LlmCall.table)}) c
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
