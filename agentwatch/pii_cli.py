"""``agentwatch pii``: what the PII policy would redact, and redacting snapshots written before it.

Both commands use the policy of the environment (``AGENTWATCH_PII_MODE``, ``AGENTWATCH_PII``,
``AGENTWATCH_PII_HASH_KEY``), as the workers do. Neither ever prints a detected value.
"""

from __future__ import annotations

import collections
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

import click
import orjson

DATA_DIR_OPTION = click.option(
    "--data-dir", type=click.Path(file_okay=False, path_type=Path), envvar="AGENTWATCH_DATA_DIR",
    default=Path("agentwatch-data"), show_default=True, help="Snapshot directory.")


def _redactor(*, keep_nothing: bool = False) -> Any:
    from agentwatch.settings import Settings
    from agentwatch.streams.pii import PiiConfigError, Redactor

    try:
        policy = Settings().pii_policy()
    except PiiConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if not policy.enabled and keep_nothing:
        raise click.ClickException("AGENTWATCH_PII_MODE is off: nothing would be redacted")
    return Redactor(policy)


@click.group("pii")
def pii_group() -> None:
    """Personal data and secrets: scan texts, redact old snapshots."""


@pii_group.command("scan")
@click.argument("file", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--from-query", "sql", help="SQL over the snapshots; every text column of the result is scanned.")
@click.option("--column", default=None, help="Scan only this column (query or tabular file).")
@click.option("--examples", type=int, default=3, show_default=True,
              help="Redacted examples shown per entity type (placeholders only, never the value).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@DATA_DIR_OPTION
def scan_command(file: Path | None, sql: str | None, column: str | None, examples: int, fmt: str,
                 data_dir: Path) -> None:
    """Report what the PII policy would redact in FILE or in the rows of a query.

    FILE is jsonl/json/csv/tsv/parquet (text columns, or --column) or any other text file
    (scanned line by line).
    """
    if (file is None) == (sql is None):
        raise click.UsageError("give exactly one of FILE or --from-query SQL")
    redactor = _redactor()
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    shown: dict[str, list[str]] = collections.defaultdict(list)
    texts = 0
    for where, text in (_query_texts(data_dir, sql, column) if sql else _file_texts(file, column)):
        texts += 1
        detections = redactor.scan(text)
        if not detections:
            continue
        for d in detections:
            counts[(d.entity, where)] += 1
        # Placeholders from the detections, not the policy's output: under `keep`, `hash` for
        # some types or AGENTWATCH_PII_MODE=off that output still holds the value.
        masked = _masked(text, detections)
        for entity in sorted({d.entity for d in detections}):
            if len(shown[entity]) < examples:
                shown[entity].append(_excerpt(masked, entity))
    if fmt == "json":
        sys.stdout.buffer.write(orjson.dumps({
            "texts": texts,
            "detections": [{"entity_type": e, "field": w, "count": n} for (e, w), n in counts.most_common()],
            "examples": shown}, option=orjson.OPT_INDENT_2) + b"\n")
        return
    click.echo(f"{texts} texts scanned, {sum(counts.values())} values would be redacted")
    if counts:
        click.echo(f"{'entity type':16} {'field':32} {'count':>8}")
        for (entity, where), n in counts.most_common():
            click.echo(f"{entity:16} {where:32} {n:>8}")
        for entity, lines in shown.items():
            click.echo(f"\n{entity} (redacted):")
            for line in lines:
                click.echo(f"  {line}")


def _masked(text: str, detections: Iterable[Any]) -> str:
    """``text`` with every detection replaced by ``<ENTITY>`` (detections do not overlap)."""
    pieces, position = [], 0
    for d in sorted(detections, key=lambda d: d.start):
        if d.start < position:
            continue
        pieces += [text[position:d.start], f"<{d.entity}>"]
        position = d.end
    pieces.append(text[position:])
    return "".join(pieces)


def _excerpt(redacted: str, entity: str, width: int = 120) -> str:
    at = redacted.find(f"<{entity}")
    start = max(0, at - width // 2)
    text = redacted[start:start + width].replace("\n", " ")
    return ("…" if start else "") + text + ("…" if start + width < len(redacted) else "")


def _query_texts(data_dir: Path, sql: str, column: str | None) -> Iterator[tuple[str, str]]:
    from agentwatch.reference import query_snapshots

    try:
        table = query_snapshots(data_dir, sql)
    except Exception as exc:  # DuckDB's errors name the problem in the query
        raise click.ClickException(f"query failed: {_safe_error(exc)}") from None
    yield from _table_texts(table, column)


def _safe_error(exc: Exception) -> str:
    """An error message with any PII in it redacted (DuckDB's cast errors quote the value)."""
    from agentwatch.streams.pii import PiiPolicy, Redactor

    return Redactor(PiiPolicy()).redact(str(exc))[0]


def _table_texts(table: Any, column: str | None) -> Iterator[tuple[str, str]]:
    import pyarrow as pa

    names = [column] if column else [f.name for f in table.schema if pa.types.is_string(f.type)
                                     or pa.types.is_large_string(f.type)]
    for name in names:
        if name not in table.column_names:
            raise click.ClickException(f"no column {name!r} among {table.column_names}")
        for value in table.column(name).to_pylist():
            if isinstance(value, str) and value:
                yield name, value


def _file_texts(path: Path, column: str | None) -> Iterator[tuple[str, str]]:
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq", ".csv", ".tsv"):
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq

        table = pq.read_table(path) if suffix in (".parquet", ".pq") else pacsv.read_csv(
            path, parse_options=pacsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ","))
        yield from _table_texts(table, column)
        return
    if suffix in (".jsonl", ".ndjson", ".json") and column:
        from agentwatch.reference import read_texts

        try:
            texts = read_texts(path, column)
        except ValueError as exc:  # its message quotes the whole row, raw values and all
            raise click.ClickException(f"{path.name}: cannot read column {column!r} from every row "
                                       f"({type(exc).__name__}: {_safe_error(exc)})") from None
        for text in texts:
            yield column, text
        return
    with path.open(encoding="utf-8", errors="replace") as lines:
        for line in lines:
            if line.strip():
                yield path.name, line.rstrip("\n")


@pii_group.command("redact-snapshots")
@DATA_DIR_OPTION
@click.option("--dry-run", is_flag=True, help="Count what would change; write nothing.")
def redact_snapshots_command(data_dir: Path, dry_run: bool) -> None:
    """Redact Parquet snapshots (and quarantined rows, and reference sets) written before redaction
    was on, or under a narrower policy.

    Every text column of every file is redacted; a file that changes is written beside itself and
    renamed over the original, so readers (queries, a running pipeline) only ever see whole
    files. Files with nothing to redact are left untouched, so a second run changes nothing.
    """
    redactor = _redactor(keep_nothing=True)
    if not data_dir.is_dir():
        raise click.ClickException(f"no data directory {data_dir}")
    files = sorted(_snapshot_files(data_dir))
    totals: collections.Counter[str] = collections.Counter()
    changed = 0
    unreadable: list[str] = []
    with click.progressbar(files, label="redacting snapshots", file=sys.stderr,
                           show_pos=True, item_show_func=lambda p: p.name if p else None) as bar:
        for path in bar:
            try:
                found = _redact_file(path, redactor, dry_run=dry_run)
            except click.ClickException as exc:  # the other files are still redacted
                unreadable.append(exc.message)
                continue
            if found:
                changed += 1
                totals.update(found)
    verb = "would change" if dry_run else "rewrote"
    click.echo(f"{len(files)} files scanned, {verb} {changed}; "
               + (", ".join(f"{n} {entity}" for entity, n in totals.most_common()) or "nothing to redact"))
    if unreadable:
        raise click.ClickException("; ".join(unreadable))


def _snapshot_files(data_dir: Path) -> Iterable[Path]:
    for path in data_dir.rglob("*"):
        if not path.is_file() or path.name.startswith("."):
            continue
        relative = path.relative_to(data_dir).parts
        if relative[0] in ("state", "logs"):
            continue  # detector checkpoints hold no text; logs are the processes' own
        if path.suffix == ".parquet" or (relative[0] == "_rejected" and path.suffix == ".json"):
            yield path


def _redact_file(path: Path, redactor: Any, *, dry_run: bool) -> collections.Counter[str]:
    """Entity counts of what redacting ``path`` replaces (values kept by the policy not counted);
    the file is rewritten only when a value changes, so a second run leaves it alone."""
    found: collections.Counter[str] = collections.Counter()
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        # Per-project overrides apply row by row, as the normaliser applied them.
        projects = (table.column("project").to_pylist() if "project" in table.column_names
                    else [""] * table.num_rows)
        columns, changed = [], False
        for i, schema_field in enumerate(table.schema):
            column = table.column(i)
            if pa.types.is_string(schema_field.type) or pa.types.is_large_string(schema_field.type):
                values = column.to_pylist()
                redacted = [_redact_value(v, redactor, found, project or "")
                            for v, project in zip(values, projects)]
                if redacted != values:
                    column = pa.chunked_array([pa.array(redacted, schema_field.type)])
                    changed = True
            columns.append(column)
        if changed and not dry_run:
            _replace(path, lambda tmp: pq.write_table(pa.Table.from_arrays(columns, schema=table.schema), tmp))
        return found
    raw = path.read_bytes()
    try:
        data, dumps = orjson.loads(raw), orjson.dumps
    except orjson.JSONDecodeError:
        # Written by Python's json where orjson refused (NaN, integers beyond 64 bits, a lone
        # surrogate): read and written back the same way, so those values survive.
        import json

        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise click.ClickException(f"{path}: not JSON ({exc}); nothing in it was redacted") from None
        dumps = lambda value: json.dumps(value).encode()  # noqa: E731
    redacted = _redact_json(data, redactor, found, "")
    if redacted != data and not dry_run:
        _replace(path, lambda tmp: Path(tmp).write_bytes(dumps(redacted)))
    return found


def _redact_value(value: Any, redactor: Any, found: collections.Counter[str], project: str) -> Any:
    if not isinstance(value, str) or not value:
        return value
    out, detected = redactor.redact(value, project=project)
    if out != value:
        modes = redactor.policy.modes_for(project)
        found.update(e for e in detected if modes.get(e, "redact") != "keep")
    return out


def _redact_json(value: Any, redactor: Any, found: collections.Counter[str], project: str) -> Any:
    if isinstance(value, str):
        return _redact_value(value, redactor, found, project)
    if isinstance(value, list):
        return [_redact_json(v, redactor, found, project) for v in value]
    if isinstance(value, dict):
        if isinstance(value.get("project"), str):
            project = value["project"]  # a quarantined row: its own project's overrides
        return {k: _redact_json(v, redactor, found, project) for k, v in value.items()}
    return value


def _replace(path: Path, write: Any) -> None:
    """Write with ``write(tmp_path)`` beside ``path`` and rename over it (atomic on one file system)."""
    tmp = path.with_name(f".{path.name}.redacting")
    try:
        write(str(tmp))
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
