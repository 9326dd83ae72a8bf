"""Reference ("golden") prompt sets for drift skew: stored embeddings plus key bindings.

Layout under the data dir::

    <data_dir>/references/<name>.parquet   text, embedding (fixed-size float32 list);
                                           schema metadata ``agentwatch.reference`` (JSON:
                                           model, dim, rows, source, created_ts)
    <data_dir>/references/bindings.yaml    bindings: {<key>: <name>}

A key is what the drift sampler groups prompts by (``service=shop``, see
``agentwatch.streams.drift_sampler.key_of``). The worker loads every binding into the
``DriftDetector`` with :func:`load_bound_references`. pyarrow, duckdb and yaml are imported
inside the functions that need them, so importing this module stays cheap.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

METADATA_KEY = b"agentwatch.reference"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
TEXT_COLUMNS = ("text", "prompt", "query", "content", "input")


@dataclass(frozen=True, slots=True)
class ReferenceInfo:
    name: str
    rows: int
    dim: int
    model: str
    source: str
    created_ts: float
    keys: tuple[str, ...] = ()  # keys bound to it


@dataclass(frozen=True, slots=True, eq=False)
class ReferenceSet:
    info: ReferenceInfo
    texts: tuple[str, ...]
    vectors: np.ndarray  # (rows, dim) float32


class ReferenceStore:
    """Reference sets and key bindings under ``<data_dir>/references``."""

    def __init__(self, data_dir: str | Path) -> None:
        self.data_dir = Path(data_dir)
        self.root = self.data_dir / "references"
        self.bindings_path = self.root / "bindings.yaml"

    # -- sets -----------------------------------------------------------------------------------

    def path_of(self, name: str) -> Path:
        if not _NAME.match(name):
            raise ValueError(f"invalid reference name {name!r}: letters, digits, '_', '.', '-'")
        return self.root / f"{name}.parquet"

    def add(self, name: str, texts: Sequence[str], vectors: np.ndarray, *, model: str,
            source: str = "", key: str | None = None, replace: bool = False,
            now: float | None = None) -> ReferenceInfo:
        """Store a reference set (and bind it to ``key`` when given)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = self.path_of(name)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        texts = [str(t) for t in texts]
        if vectors.ndim != 2 or len(vectors) != len(texts) or not texts:
            raise ValueError("need a non-empty (len(texts), dim) vector array")
        if path.exists() and not replace:
            raise FileExistsError(f"reference {name!r} exists; remove it or pass replace")
        meta = {"name": name, "rows": len(texts), "dim": int(vectors.shape[1]), "model": model,
                "source": source, "created_ts": time.time() if now is None else float(now)}
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()),
                                                      int(vectors.shape[1]))
        table = pa.table({"text": pa.array(texts, pa.string()), "embedding": embedding})
        table = table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()})
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".parquet.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, path)  # readers never see a half-written set
        if key is not None:
            self.bind(key, name)
        return self.info(name)

    def info(self, name: str) -> ReferenceInfo:
        import pyarrow.parquet as pq

        path = self.path_of(name)
        if not path.exists():
            raise KeyError(f"no reference named {name!r}")
        meta = json.loads(pq.read_schema(path).metadata[METADATA_KEY])
        keys = tuple(sorted(k for k, v in self.bindings().items() if v == name))
        return ReferenceInfo(name, int(meta["rows"]), int(meta["dim"]), str(meta["model"]),
                             str(meta.get("source", "")), float(meta["created_ts"]), keys)

    def list(self) -> list[ReferenceInfo]:
        if not self.root.exists():
            return []
        return [self.info(p.stem) for p in sorted(self.root.glob("*.parquet"))]

    def load(self, name: str) -> ReferenceSet:
        import pyarrow.parquet as pq

        info = self.info(name)
        table = pq.read_table(self.path_of(name))
        flat = table.column("embedding").combine_chunks().flatten().to_numpy()
        vectors = np.asarray(flat, dtype=np.float32).reshape(info.rows, info.dim)
        return ReferenceSet(info, tuple(table.column("text").to_pylist()), vectors)

    def remove(self, name: str) -> None:
        """Delete a set and every binding to it."""
        path = self.path_of(name)
        if not path.exists():
            raise KeyError(f"no reference named {name!r}")
        bindings = {k: v for k, v in self.bindings().items() if v != name}
        self._write_bindings(bindings)
        path.unlink()

    # -- bindings -------------------------------------------------------------------------------

    def bindings(self) -> dict[str, str]:
        import yaml

        if not self.bindings_path.exists():
            return {}
        data = yaml.safe_load(self.bindings_path.read_text()) or {}
        return {str(k): str(v) for k, v in (data.get("bindings") or {}).items()}

    def bind(self, key: str, name: str) -> None:
        if not key:
            raise ValueError("key must not be empty")
        if not self.path_of(name).exists():
            raise KeyError(f"no reference named {name!r}")
        bindings = self.bindings()
        bindings[key] = name
        self._write_bindings(bindings)

    def unbind(self, key: str) -> None:
        bindings = self.bindings()
        bindings.pop(key, None)
        self._write_bindings(bindings)

    def reference_for_key(self, key: str) -> ReferenceSet | None:
        name = self.bindings().get(key)
        return self.load(name) if name else None

    def _write_bindings(self, bindings: Mapping[str, str]) -> None:
        import yaml

        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.bindings_path.with_suffix(".yaml.tmp")
        tmp.write_text(yaml.safe_dump({"bindings": dict(sorted(bindings.items()))},
                                      sort_keys=False))
        os.replace(tmp, self.bindings_path)


def load_bound_references(store: ReferenceStore, detector: Any,
                          wanted: Callable[[str], bool] | None = None) -> dict[str, str]:
    """Give ``detector.set_reference`` every bound set (or those whose key ``wanted`` accepts:
    a partition's detector loads only its own keys' sets); returns ``{key: name}`` loaded.

    Call at worker start (and after ``detector.restore``: snapshots exclude references).
    """
    loaded = {}
    cache: dict[str, ReferenceSet] = {}
    for key, name in store.bindings().items():
        if wanted is not None and not wanted(key):
            continue
        ref = cache.get(name) or store.load(name)
        cache[name] = ref
        detector.set_reference(key, ref.vectors, ref.texts, name=name)
        loaded[key] = name
    return loaded


# ---------------------------------------------------------------------------------------------
# Where reference texts come from


def read_texts(path: str | Path, column: str | None = None) -> list[str]:
    """Texts from a .jsonl/.ndjson, .json (a list), .csv or .parquet file.

    ``column`` defaults to the first of ``text, prompt, query, content, input`` present. JSON
    lines may also be bare strings, or lists whose first item is the text (CLINC rows).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        if suffix == ".json":
            rows = json.loads(path.read_text())
        else:
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [t for t in (_text_of(r, column) for r in rows) if t]
    if suffix in (".csv", ".tsv", ".parquet", ".pq"):
        if suffix == ".parquet" or suffix == ".pq":
            import pyarrow.parquet as pq
            table = pq.read_table(path)
        else:
            import pyarrow.csv as pacsv
            table = pacsv.read_csv(path, parse_options=pacsv.ParseOptions(
                delimiter="\t" if suffix == ".tsv" else ","))
        return _texts_from_table(table, column)
    raise ValueError(f"unsupported file type {suffix!r}: use jsonl, json, csv, tsv or parquet")


def _text_of(row: Any, column: str | None) -> str:
    if isinstance(row, str):
        return row
    if isinstance(row, list) and row:
        return str(row[0])
    if isinstance(row, dict):
        names = [column] if column else [c for c in TEXT_COLUMNS if c in row]
        if not names or names[0] not in row:
            raise ValueError(f"no text column ({column or ', '.join(TEXT_COLUMNS)}) in {row}")
        value = row[names[0]]
        return "" if value is None else str(value)
    raise ValueError(f"cannot read a text from {row!r}")


def _texts_from_table(table: Any, column: str | None) -> list[str]:
    names = table.column_names
    chosen = column if column else next((c for c in TEXT_COLUMNS if c in names), None)
    if chosen is None or chosen not in names:
        raise ValueError(f"no text column {column or TEXT_COLUMNS} among {names}")
    return [str(v) for v in table.column(chosen).to_pylist() if v not in (None, "")]


def query_snapshots(data_dir: str | Path, sql: str) -> Any:
    """Run SQL over the snapshots and return a ``pyarrow.Table``.

    Uses ``agentwatch.streams.snapshots.query_snapshots`` when that module exists; until then
    DuckDB directly, with one view per snapshot table folder (``llm_calls`` over
    ``<data_dir>/llm_calls/**/*.parquet``, hive partitions read as columns).
    """
    try:
        from agentwatch.streams.snapshots import query_snapshots as snapshots_query
    except ImportError:
        return _duckdb_query_snapshots(Path(data_dir), sql)
    return snapshots_query(data_dir, sql)


def _duckdb_query_snapshots(data_dir: Path, sql: str) -> Any:
    import duckdb

    con = duckdb.connect(":memory:")
    try:
        for folder in sorted(p for p in data_dir.iterdir() if p.is_dir()) if data_dir.exists() \
                else []:
            if folder.name == "references" or not any(folder.rglob("*.parquet")):
                continue
            pattern = str(folder / "**" / "*.parquet").replace("'", "''")
            con.execute(f'CREATE VIEW "{folder.name}" AS SELECT * FROM read_parquet('
                        f"'{pattern}', hive_partitioning = true, union_by_name = true)")
        return con.execute(sql).fetch_arrow_table()
    finally:
        con.close()


def texts_from_query(data_dir: str | Path, sql: str, column: str | None = None) -> list[str]:
    return _texts_from_table(query_snapshots(data_dir, sql), column)

# ---------------------------------------------------------------------------------------------
# CLINC150 scenario: a reference mix, held-out traffic of the same mix, and drifted traffic.

DEFAULT_REFERENCE_DOMAINS = ("banking", "credit_cards", "travel", "utility", "work")
DEFAULT_DRIFTED_DOMAINS = ("kitchen_and_dining", "home", "auto_and_commute", "small_talk", "meta")


@dataclass(frozen=True)
class ClincScenario:
    """Prompt pools drawn from CLINC150 (real user queries, CC BY 3.0).

    ``reference`` comes from the train split of ``reference_domains``; ``in_mix`` from the
    val+test splits of the same domains (held out: no prompt is in both); ``other_domains``
    from val+test of ``drifted_domains``; ``out_of_scope`` from the oos splits.
    """

    reference: tuple[str, ...]
    in_mix: tuple[str, ...]
    other_domains: tuple[str, ...]
    out_of_scope: tuple[str, ...]
    reference_domains: tuple[str, ...]
    drifted_domains: tuple[str, ...]


def clinc_scenario(data_dir: str | Path, *,
                   reference_domains: Sequence[str] = DEFAULT_REFERENCE_DOMAINS,
                   drifted_domains: Sequence[str] = DEFAULT_DRIFTED_DOMAINS,
                   reference_size: int = 2000, seed: int = 0) -> ClincScenario:
    """Build the pools from ``data_dir`` (holding ``data_full.json`` and ``domains.json``).

    This is the demo's knob: ``agentwatch demo --incident drift`` binds ``reference`` to a key,
    sends ``in_mix`` prompts as normal traffic, then switches to
    :func:`mixed_window` draws with ``other_share`` / ``oos_share`` above zero.
    """
    import random

    root = Path(data_dir)
    data = json.loads((root / "data_full.json").read_text())
    domains = json.loads((root / "domains.json").read_text())
    unknown = [d for d in (*reference_domains, *drifted_domains) if d not in domains]
    if unknown:
        raise ValueError(f"unknown CLINC domains {unknown}; known: {sorted(domains)}")

    def queries(splits: Sequence[str], chosen: Sequence[str]) -> list[str]:
        intents = {i for d in chosen for i in domains[d]}
        return [q for s in splits for q, intent in data[s] if intent in intents]

    rng = random.Random(seed)
    train = queries(["train"], reference_domains)
    reference = rng.sample(train, min(reference_size, len(train)))
    return ClincScenario(
        reference=tuple(reference),
        in_mix=tuple(queries(["val", "test"], reference_domains)),
        other_domains=tuple(queries(["val", "test"], drifted_domains)),
        out_of_scope=tuple(q for s in ("oos_val", "oos_test") for q, _ in data[s]),
        reference_domains=tuple(reference_domains),
        drifted_domains=tuple(drifted_domains))


def mixed_window(in_mix: Sequence[Any], size: int, rng: Any, *, other: Sequence[Any] = (),
                 other_share: float = 0.0, oos: Sequence[Any] = (), oos_share: float = 0.0
                 ) -> list[Any]:
    """``size`` items: ``other_share`` from ``other``, ``oos_share`` from ``oos``, the rest
    from ``in_mix``, each drawn without replacement, shuffled. ``rng`` is a
    ``random.Random`` or a numpy ``Generator``; items may be texts or row indexes.
    """
    if not 0.0 <= other_share + oos_share <= 1.0:
        raise ValueError("other_share + oos_share must be in [0, 1]")
    n_other = int(round(size * other_share))
    n_oos = int(round(size * oos_share))
    parts = [(in_mix, size - n_other - n_oos), (other, n_other), (oos, n_oos)]
    chosen: list[Any] = []
    for pool, count in parts:
        if count:
            picks = rng.choice(len(pool), count, replace=False) if hasattr(rng, "integers") \
                else rng.sample(range(len(pool)), count)
            chosen.extend(pool[int(i)] for i in picks)
    if hasattr(rng, "integers"):
        order = rng.permutation(len(chosen))
    else:
        order = list(range(len(chosen)))
        rng.shuffle(order)
    return [chosen[int(i)] for i in order]
