"""Reference store (Parquet + bindings), text readers, snapshot SQL, and the CLI commands."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from agentwatch.detectors.drift import DriftDetector
from agentwatch.events import LlmCall
from agentwatch.reference import (ReferenceStore, load_bound_references, mixed_window,
                                  query_snapshots, read_texts, texts_from_query)
from agentwatch.reference_cli import drift_group, parse_window, reference_group

TEXTS = [f"how do i {v} my {t}" for v in ("freeze", "pay", "cancel", "renew")
         for t in ("card", "account", "bill")]


def test_add_load_list_bind_remove(tmp_path):
    store = ReferenceStore(tmp_path)
    vectors = np.arange(len(TEXTS) * 4, dtype=np.float32).reshape(len(TEXTS), 4)
    info = store.add("bank", TEXTS, vectors, model="m", source="file:x", key="service=bank",
                     now=1000.0)
    assert (info.rows, info.dim, info.model, info.keys, info.created_ts) == \
        (12, 4, "m", ("service=bank",), 1000.0)
    loaded = store.load("bank")
    assert loaded.texts == tuple(TEXTS) and np.array_equal(loaded.vectors, vectors)
    assert (tmp_path / "references" / "bank.parquet").is_file()
    with pytest.raises(FileExistsError):
        store.add("bank", TEXTS, vectors, model="m")
    store.add("bank2", TEXTS[:10], vectors[:10], model="m")
    store.bind("service=other", "bank2")
    assert store.bindings() == {"service=bank": "bank", "service=other": "bank2"}
    assert [i.name for i in store.list()] == ["bank", "bank2"]
    assert store.reference_for_key("service=other").info.rows == 10
    store.remove("bank2")
    assert store.bindings() == {"service=bank": "bank"} and store.reference_for_key("x") is None
    with pytest.raises(KeyError):
        store.bind("k", "missing")
    with pytest.raises(ValueError):
        store.path_of("../evil")


def test_load_bound_references_sets_detector_references(tmp_path):
    store = ReferenceStore(tmp_path)
    rng = np.random.default_rng(0)
    store.add("a", TEXTS, rng.normal(size=(12, 8)), model="m", key="service=x")
    store.bind("service=y", "a")
    detector = DriftDetector()
    assert load_bound_references(store, detector) == {"service=x": "a", "service=y": "a"}
    assert set(detector.reference_keys) == {"service=x", "service=y"}


def test_read_texts_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "one"}\n\n{"prompt": "two"}\n')
    (tmp_path / "b.json").write_text(json.dumps([["q1", "intent"], ["q2", "intent"]]))
    (tmp_path / "c.csv").write_text("id,text\n1,alpha\n2,\"beta, gamma\"\n")
    pq.write_table(pa.table({"query": ["x", None, "y"]}), tmp_path / "d.parquet")
    assert read_texts(tmp_path / "a.jsonl") == ["one", "two"]
    assert read_texts(tmp_path / "b.json") == ["q1", "q2"]
    assert read_texts(tmp_path / "c.csv") == ["alpha", "beta, gamma"]
    assert read_texts(tmp_path / "d.parquet") == ["x", "y"]
    with pytest.raises(ValueError):
        read_texts(tmp_path / "c.csv", column="nope")


def _write_llm_calls(data_dir: Path, rows):
    """Snapshot layout of agentwatch.streams.snapshots: <table>/hour=.../part-*.parquet."""
    folder = data_dir / "llm_calls" / "hour=2026-01-01T00"
    folder.mkdir(parents=True)
    calls = [dataclasses.asdict(LlmCall(ts=ts, trace_id=f"t{i}", span_id=f"s{i}",
                                        service=service, prompt=prompt))
             for i, (ts, service, prompt) in enumerate(rows)]
    pq.write_table(pa.Table.from_pylist(calls), folder / "part-0.parquet")


def test_query_snapshots_over_llm_calls_parquet(tmp_path):
    _write_llm_calls(tmp_path, [(1.0, "a", "p1"), (2.0, "b", "p2"), (3.0, "a", "p3")])
    table = query_snapshots(tmp_path, "SELECT prompt FROM llm_calls WHERE service = 'a' "
                                      "ORDER BY ts")
    assert table.column("prompt").to_pylist() == ["p1", "p3"]
    assert texts_from_query(tmp_path, "SELECT prompt FROM llm_calls ORDER BY ts") == \
        ["p1", "p2", "p3"]


def test_parse_window():
    assert parse_window("100..160", 0.0) == (100.0, 160.0)
    assert parse_window("1970-01-01T00:01:40Z..1970-01-01T00:02:40", 0.0) == (100.0, 160.0)
    start, end = parse_window("1h", 7200.0)
    assert end > 7200.0 and end - start == pytest.approx(3600.0)


def test_mixed_window_shares():
    rng = np.random.default_rng(0)
    window = mixed_window(list(range(100)), 20, rng, other=["o"] * 10, other_share=0.25,
                          oos=["x"] * 10, oos_share=0.1)
    assert len(window) == 20 and window.count("o") == 5 and window.count("x") == 2
    assert len(set(w for w in window if isinstance(w, int))) == 13


def test_cli_add_list_show_remove_and_report(tmp_path):
    runner = CliRunner()
    src = tmp_path / "golden.jsonl"
    src.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS))
    data = ["--data-dir", str(tmp_path / "data")]
    result = runner.invoke(reference_group, ["add", "golden", "--from", str(src), "--key",
                                             "service=bank", *data])
    assert result.exit_code == 0, result.output
    assert "12 texts x 384 dims" in result.output
    result = runner.invoke(reference_group, ["list", *data])
    assert "golden" in result.output and "service=bank" in result.output
    result = runner.invoke(reference_group, ["show", "golden", "--examples", "2", *data])
    assert "rows:    12" in result.output and TEXTS[0] in result.output
    assert runner.invoke(reference_group, ["add", "x", *data]).exit_code != 0  # no source

    _write_llm_calls(tmp_path / "data", [(1000.0 + i, "bank", f"play song number {i}")
                                         for i in range(30)])
    out = tmp_path / "report.html"
    result = runner.invoke(drift_group, ["report", "--key", "service=bank", "--window", "1h",
                                         "-o", str(out), *data])
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 10_000 and "mmd=" in result.output
    result = runner.invoke(reference_group, ["remove", "golden", *data])
    assert result.exit_code == 0 and ReferenceStore(tmp_path / "data").list() == []


class _CountingEmbedder:
    """Deterministic vectors per text; counts how often a model was loaded."""

    loads = 0
    model_name = "fake-model"

    def __init__(self) -> None:
        type(self).loads += 1

    def encode(self, texts):
        return np.array([[len(t), sum(map(ord, t)) % 97, 1.0] for t in texts], dtype=np.float32)


def test_cli_add_several_sets_loads_the_model_once(tmp_path, monkeypatch):
    monkeypatch.setattr("agentwatch.reference_cli._embedder",
                        lambda model, threads: _CountingEmbedder())
    _CountingEmbedder.loads = 0
    files = {}
    for name, verb in (("a", "freeze"), ("b", "pay"), ("c", "renew")):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("\n".join(json.dumps({"text": f"{verb} {t}"}) for t in TEXTS))
    data = ["--data-dir", str(tmp_path / "data")]
    result = CliRunner().invoke(reference_group, [
        "add", "a", "--from", str(files["a"]), "--key", "service=a",
        "--set", "b", str(files["b"]), "--set", "c", str(files["c"]), *data])
    assert result.exit_code == 0, result.output
    assert _CountingEmbedder.loads == 1
    store = ReferenceStore(tmp_path / "data")
    assert [i.name for i in store.list()] == ["a", "b", "c"]
    assert store.bindings() == {"service=a": "a"}
    loaded = store.load("b")
    assert loaded.texts[0] == f"pay {TEXTS[0]}"
    np.testing.assert_array_equal(loaded.vectors, _CountingEmbedder().encode(loaded.texts))


def test_cli_add_checks_every_set_before_loading_the_model(tmp_path, monkeypatch):
    monkeypatch.setattr("agentwatch.reference_cli._embedder",
                        lambda model, threads: _CountingEmbedder())
    _CountingEmbedder.loads = 0
    good, short = tmp_path / "good.jsonl", tmp_path / "short.jsonl"
    good.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS))
    short.write_text(json.dumps({"text": "only one"}))
    result = CliRunner().invoke(reference_group, [
        "add", "--set", "good", str(good), "--set", "short", str(short),
        "--data-dir", str(tmp_path / "data")])
    assert result.exit_code != 0 and "short: need at least 10" in result.output
    assert _CountingEmbedder.loads == 0 and ReferenceStore(tmp_path / "data").list() == []
    result = CliRunner().invoke(reference_group, ["add", "--key", "service=x", "--set", "good",
                                                  str(good), "--data-dir", str(tmp_path / "d")])
    assert result.exit_code != 0 and "need NAME" in result.output


def test_progress_on_a_terminal_gives_the_same_vectors(monkeypatch):
    import io
    import sys

    from agentwatch.reference_cli import PROGRESS_CHUNK, encode_with_progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    texts = [f"text {i}" for i in range(PROGRESS_CHUNK * 2 + 7)]
    embedder = _CountingEmbedder()
    vectors = encode_with_progress(embedder, texts, "embedding x")
    np.testing.assert_array_equal(vectors, embedder.encode(texts))
    assert "embedding x" in terminal.getvalue()
