"""`agentwatch pii scan` / `pii redact-snapshots`, and `reference add` storing redacted texts.

No command may print a detected value, whatever the policy; redacting snapshots rewrites only
the files that change, atomically, and a second run changes nothing.
"""

from __future__ import annotations

import json
import random

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from agentwatch.cli import main
from agentwatch.events import LlmCall, ToolCall
from agentwatch.streams.pii import PiiPolicy, Redactor
from agentwatch.streams.snapshots import SnapshotSink, query_snapshots
from bench.pii import kr_rrn

EMAIL = "minji.kim@example.co.kr"
PHONE = "010-4821-7736"
CARD = "4111 1111 1111 1111"
RRN = kr_rrn(random.Random(3))
API_KEY = "ghp_" + "Z3kq9PxT2mWv7Ls4Rb8Nc1Hd6Fj0Yg5Ue3Ao"
RAW = {"EMAIL": EMAIL, "PHONE": PHONE, "CREDIT_CARD": CARD, "KR_RRN": RRN, "SECRET": API_KEY}
# The pieces a leak would show even if a separator changed.
FRAGMENTS = (EMAIL, "minji.kim", PHONE, "4821-7736", CARD, "1111 1111", RRN, RRN.split("-")[1],
             API_KEY, API_KEY[4:20])

PROMPTS = [
    f"my card is {CARD}, can you check the charge",
    f"please send the invoice to {EMAIL}",
    f"call me back on {PHONE} about my transfer",
    f"my resident registration number is {RRN}",
    f"here is my api key {API_KEY} for the integration",
    f"update my contact to {EMAIL} and {PHONE}",
    "what is my checking account balance",
    "how do i freeze my debit card",
]
EXPECTED = {"CREDIT_CARD": 1, "EMAIL": 2, "PHONE": 2, "KR_RRN": 1, "SECRET": 1}


@pytest.fixture(autouse=True)
def default_policy(monkeypatch):
    for name in ("AGENTWATCH_PII_MODE", "AGENTWATCH_PII", "AGENTWATCH_PII_HASH_KEY"):
        monkeypatch.delenv(name, raising=False)


def test_the_planted_values_are_what_the_recognisers_find():
    redactor = Redactor(PiiPolicy())
    for entity, value in RAW.items():
        assert redactor.redact(f"value {value} here") == (f"value <{entity}> here", (entity,))


def _run(*args, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, **kw)


def _no_raw_value(text: str) -> None:
    leaked = [f for f in FRAGMENTS if f in text]
    assert not leaked, (leaked, text)


# -- pii scan -------------------------------------------------------------------------------


def test_scan_text_file_counts_per_type_and_shows_only_placeholders(tmp_path):
    src = tmp_path / "prompts.txt"
    src.write_text("\n".join(PROMPTS) + "\n\n")
    out = _run("pii", "scan", src)
    assert out.exit_code == 0, out.output
    _no_raw_value(out.output)
    assert out.stdout.splitlines()[0] == "8 texts scanned, 7 values would be redacted"
    rows = {(entity, field): int(n) for entity, field, n in
            (line.split() for line in out.stdout.splitlines() if len(line.split()) == 3)
            if entity in EXPECTED}
    assert rows == {(entity, "prompts.txt"): n for entity, n in EXPECTED.items()}
    assert "CREDIT_CARD (redacted):\n  my card is <CREDIT_CARD>, can you check the charge" in out.stdout
    assert "<KR_RRN>" in out.stdout and "<SECRET>" in out.stdout


def test_scan_jsonl_column_as_json(tmp_path):
    src = tmp_path / "calls.jsonl"
    # The note column holds an address too: with --column prompt it is not scanned.
    src.write_text("\n".join(json.dumps({"prompt": p, "note": f"from {EMAIL}"}) for p in PROMPTS))
    out = _run("pii", "scan", src, "--column", "prompt", "--format", "json", "--examples", "1")
    assert out.exit_code == 0, out.output
    _no_raw_value(out.output)
    report = json.loads(out.stdout)
    assert set(report) == {"texts", "detections", "examples"}
    assert report["texts"] == len(PROMPTS)
    assert sorted((d["entity_type"], d["field"], d["count"]) for d in report["detections"]) == \
        sorted((entity, "prompt", n) for entity, n in EXPECTED.items())
    assert set(report["examples"]) == set(EXPECTED)
    assert all(len(lines) == 1 and f"<{entity}>" in lines[0]
               for entity, lines in report["examples"].items())
    # Without --column a jsonl file is text: every line, the note included.
    whole = json.loads(_run("pii", "scan", src, "--format", "json").stdout)
    assert {(d["entity_type"], d["count"]) for d in whole["detections"]} >= {("EMAIL", 2 + len(PROMPTS))}


def test_scan_jsonl_with_a_missing_column_is_an_error_that_quotes_no_value(tmp_path):
    # reference.read_texts' message quotes the whole row; the command redacts it.
    src = tmp_path / "calls.jsonl"
    src.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS))
    out = _run("pii", "scan", src, "--column", "text")
    assert out.exit_code != 0 and "cannot read column 'text'" in out.output
    _no_raw_value(out.output)


@pytest.mark.parametrize("env", [{"AGENTWATCH_PII_MODE": "off"},
                                 {"AGENTWATCH_PII": json.dumps({"entities": {e: "keep" for e in RAW}})},
                                 {"AGENTWATCH_PII_MODE": "hash", "AGENTWATCH_PII_HASH_KEY": "k" * 32}])
def test_scan_shows_no_value_whatever_the_policy_keeps(tmp_path, monkeypatch, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    src = tmp_path / "prompts.txt"
    src.write_text("\n".join(PROMPTS))
    for fmt in ("table", "json"):
        out = _run("pii", "scan", src, "--format", fmt)
        assert out.exit_code == 0, out.output
        _no_raw_value(out.output)
        assert "<CREDIT_CARD>" in out.output


def _snapshots(data_dir):
    sink = SnapshotSink(data_dir, writer_id="t")
    sink.add_events([LlmCall(ts=1_800_000_000.0 + i, trace_id=f"t{i}", span_id=f"s{i}", service="bank",
                             project="retail", model="gpt-4o", prompt=p,
                             response="done" if i % 2 else f"noted, we will write to {EMAIL}")
                     for i, p in enumerate(PROMPTS)])
    sink.flush(force=True)
    return data_dir


def test_scan_from_query_over_snapshots(tmp_path):
    data = _snapshots(tmp_path / "data")
    out = _run("pii", "scan", "--from-query", "SELECT prompt, response, model FROM llm_calls",
               "--format", "json", "--data-dir", data)
    assert out.exit_code == 0, out.output
    _no_raw_value(out.output)
    report = json.loads(out.stdout)
    assert report["texts"] == 3 * len(PROMPTS)  # prompt, response and model of every row
    counts = {(d["entity_type"], d["field"]): d["count"] for d in report["detections"]}
    assert counts == {**{(e, "prompt"): n for e, n in EXPECTED.items()}, ("EMAIL", "response"): 4}
    only = json.loads(_run("pii", "scan", "--from-query", "SELECT * FROM llm_calls", "--column",
                           "response", "--format", "json", "--data-dir", data).stdout)
    assert only["detections"] == [{"entity_type": "EMAIL", "field": "response", "count": 4}]


def test_scan_usage_and_query_errors(tmp_path):
    data = _snapshots(tmp_path / "data")
    assert _run("pii", "scan").exit_code == 2
    bad = _run("pii", "scan", "--from-query", "SELECT nope FROM llm_calls", "--data-dir", data)
    assert bad.exit_code != 0 and "query failed" in bad.output
    # A cast error quotes the value that failed: redacted too.
    cast = _run("pii", "scan", "--from-query", "SELECT CAST(prompt AS INTEGER) AS n FROM llm_calls "
                "WHERE prompt LIKE 'please send%'", "--data-dir", data)
    assert cast.exit_code != 0 and "query failed" in cast.output
    _no_raw_value(cast.output)


# -- pii redact-snapshots -------------------------------------------------------------------


def _data_dir_with_raw_values(root):
    data = _snapshots(root)
    clean = SnapshotSink(data, writer_id="clean")
    clean.add_events([ToolCall(ts=1_800_000_000.0, trace_id="t9", span_id="s9", service="bank",
                               tool_name="balance", arguments='{"account": "checking"}')])
    clean.flush(force=True)
    rejected = data / "_rejected"
    rejected.mkdir()
    rows = [{"ts": 1_800_000_000.0, "trace_id": "t1", "input_tokens": 2**63,
             "prompt": PROMPTS[0], "tool_definitions": [{"name": "mail", "to": EMAIL}]}]
    (rejected / "llm_calls-t-1-000001.json").write_bytes(orjson.dumps(rows))
    (rejected / "llm_calls-t-1-000001.reasons.json").write_bytes(
        orjson.dumps([{"index": 0, "reason": "input_tokens: 9223372036854775808 is beyond BIGINT"}]))
    return data


def _files(data):
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(data.rglob("*")) if p.is_file()
            and p.name != "catalog.duckdb"}


def _string_values(path):
    table = pq.read_table(path)
    return [v for f in table.schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)
            for v in table.column(f.name).to_pylist() if isinstance(v, str)]


def test_redact_snapshots_rewrites_what_holds_values_once_and_leaves_the_rest(tmp_path):
    data = _data_dir_with_raw_values(tmp_path / "data")
    before = _files(data)
    llm_file, = data.glob("llm_calls/hour=*/*.parquet")
    tool_file, = data.glob("tool_calls/hour=*/*.parquet")
    assert any(CARD in v for v in _string_values(llm_file))
    schema = pq.read_schema(llm_file)

    dry = _run("pii", "redact-snapshots", "--data-dir", data, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "4 files scanned, would change 2;" in dry.stdout
    assert _files(data) == before  # nothing written

    out = _run("pii", "redact-snapshots", "--data-dir", data)
    assert out.exit_code == 0, out.output
    _no_raw_value(out.output)
    summary = out.stdout.strip().splitlines()[-1]
    # llm_calls: 7 values in prompts, 4 addresses in responses; the quarantined row: a card and
    # an address.
    assert summary == "4 files scanned, rewrote 2; 7 EMAIL, 2 CREDIT_CARD, 2 PHONE, 1 KR_RRN, 1 SECRET"
    after = _files(data)
    assert set(after) == set(before)  # no temp file left, none lost
    assert not list(data.rglob("*.redacting"))
    assert after[tool_file] == before[tool_file]  # nothing to redact: not touched
    reasons = data / "_rejected" / "llm_calls-t-1-000001.reasons.json"
    assert after[reasons] == before[reasons]
    for path in data.rglob("*.parquet"):
        _no_raw_value("\n".join(_string_values(path)))
    values = _string_values(llm_file)
    for entity in RAW:
        assert any(f"<{entity}>" in v for v in values), entity
    assert "what is my checking account balance" in values  # text around values is kept
    # Queries see the redacted rows; schema and every other column are as written.
    rows = query_snapshots(data, "SELECT prompt, model, project FROM llm_calls ORDER BY ts").to_pylist()
    assert rows[0] == {"prompt": "my card is <CREDIT_CARD>, can you check the charge", "model": "gpt-4o",
                       "project": "retail"}
    assert pq.read_schema(llm_file).equals(schema, check_metadata=True)
    quarantined = orjson.loads((data / "_rejected" / "llm_calls-t-1-000001.json").read_bytes())
    assert quarantined == [{"ts": 1_800_000_000.0, "trace_id": "t1", "input_tokens": 2**63,
                            "prompt": "my card is <CREDIT_CARD>, can you check the charge",
                            "tool_definitions": [{"name": "mail", "to": "<EMAIL>"}]}]

    again = _run("pii", "redact-snapshots", "--data-dir", data)
    assert again.exit_code == 0, again.output
    assert again.stdout.strip().splitlines()[-1] == "4 files scanned, rewrote 0; nothing to redact"
    assert _files(data) == after


def test_redact_snapshots_applies_keep_and_per_project_modes_and_settles(tmp_path, monkeypatch):
    # Phone numbers are kept everywhere, e-mail addresses kept except for project retail.
    monkeypatch.setenv("AGENTWATCH_PII", json.dumps(
        {"entities": {"PHONE": "keep", "EMAIL": "keep"}, "projects": {"retail": {"EMAIL": "redact"}}}))
    data = _snapshots(tmp_path / "data")
    other = SnapshotSink(data, writer_id="other")
    other.add_events([LlmCall(ts=1_800_000_000.0, trace_id="o", span_id="o", project="lab",
                              prompt=f"mail {EMAIL} or call {PHONE}")])
    other.flush(force=True)
    retail_file, = data.glob("llm_calls/hour=*/part-t-*.parquet")
    lab_file, = data.glob("llm_calls/hour=*/part-other-*.parquet")
    lab_before = lab_file.read_bytes()
    out = _run("pii", "redact-snapshots", "--data-dir", data)
    assert out.exit_code == 0, out.output
    assert "rewrote 1;" in out.stdout and "PHONE" not in out.stdout
    retail = "\n".join(_string_values(retail_file))
    assert EMAIL not in retail and CARD not in retail and PHONE in retail
    assert lab_file.read_bytes() == lab_before  # only kept values: nothing to rewrite
    kept = _files(data)
    again = _run("pii", "redact-snapshots", "--data-dir", data)
    assert "rewrote 0; nothing to redact" in again.stdout and _files(data) == kept


def test_redact_snapshots_reads_a_quarantine_file_python_json_wrote(tmp_path):
    # dumps_lenient falls back to Python's json (NaN, a lone surrogate), which orjson cannot read.
    data = tmp_path / "data"
    (data / "_rejected").mkdir(parents=True)
    path = data / "_rejected" / "llm_calls-t-1-000002.json"
    path.write_text(json.dumps([{"ts": float("nan"), "prompt": f"mail {EMAIL}", "odd": "\ud800"}]))
    out = _run("pii", "redact-snapshots", "--data-dir", data)
    assert out.exit_code == 0, out.output
    assert "rewrote 1; 1 EMAIL" in out.stdout
    row, = json.loads(path.read_text())
    assert row["prompt"] == "mail <EMAIL>" and row["odd"] == "\ud800" and row["ts"] != row["ts"]
    garbage = data / "_rejected" / "llm_calls-t-1-000003.json"
    garbage.write_text("{not json")
    broken = _run("pii", "redact-snapshots", "--data-dir", data)
    assert broken.exit_code != 0 and "llm_calls-t-1-000003.json: not JSON" in broken.output


def test_redact_snapshots_refuses_when_redaction_is_off(tmp_path, monkeypatch):
    data = _data_dir_with_raw_values(tmp_path / "data")
    before = _files(data)
    missing = _run("pii", "redact-snapshots", "--data-dir", tmp_path / "none")
    assert missing.exit_code == 1 and "no data directory" in missing.output
    monkeypatch.setenv("AGENTWATCH_PII_MODE", "off")
    for args in ([], ["--dry-run"]):
        out = _run("pii", "redact-snapshots", "--data-dir", data, *args)
        assert out.exit_code == 1
        assert "AGENTWATCH_PII_MODE is off: nothing would be redacted" in out.output
    assert _files(data) == before


@pytest.mark.parametrize("env,message", [
    ({"AGENTWATCH_PII": "{not json"}, "AGENTWATCH_PII is not valid JSON"),
    ({"AGENTWATCH_PII": '{"entities": {"EMAIL": "shred"}}'}, "AGENTWATCH_PII entities.EMAIL: mode must be one of"),
    ({"AGENTWATCH_PII": '{"entities": {"NAME": "redact"}}'}, "unknown entity type 'NAME'"),
    ({"AGENTWATCH_PII": '{"colour": 1}'}, "AGENTWATCH_PII: unknown keys ['colour']"),
    ({"AGENTWATCH_PII_MODE": "mask"}, "AGENTWATCH_PII_MODE must be one of"),
    ({"AGENTWATCH_PII_MODE": "hash"}, "AGENTWATCH_PII_HASH_KEY"),
])
def test_an_invalid_policy_is_a_clear_error(tmp_path, monkeypatch, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    data = _snapshots(tmp_path / "data")
    before = _files(data)
    src = tmp_path / "prompts.txt"
    src.write_text("\n".join(PROMPTS))
    for args in (["pii", "scan", src], ["pii", "redact-snapshots", "--data-dir", data]):
        out = _run(*args)
        assert out.exit_code == 1 and message in out.output, out.output
        assert "Traceback" not in out.output
    assert _files(data) == before


# -- reference add --------------------------------------------------------------------------


def test_reference_add_stores_redacted_texts(tmp_path):
    """The real, offline model (as tests/test_reference_store.py runs it)."""
    from agentwatch.reference import ReferenceStore

    src = tmp_path / "golden.jsonl"
    src.write_text("\n".join(json.dumps({"text": t}) for t in PROMPTS
                             + ["how do i pay my credit card bill", "when is my rent due",
                                f"wire 200 dollars to the account of {EMAIL}", "book a flight to seoul"]))
    data = tmp_path / "data"
    out = _run("reference", "add", "golden", "--from", src, "--key", "service=bank", "--data-dir", data)
    assert out.exit_code == 0, out.output
    _no_raw_value(out.output)
    assert "golden: redacted before storing: 3 EMAIL" in out.stdout and "12 texts x 384 dims" in out.stdout
    stored = pq.read_table(data / "references" / "golden.parquet")
    texts = stored.column("text").to_pylist()
    _no_raw_value("\n".join(texts))
    assert texts[:2] == ["my card is <CREDIT_CARD>, can you check the charge",
                         "please send the invoice to <EMAIL>"]
    assert sum("<" in t for t in texts) == 7
    loaded = ReferenceStore(data).load("golden")
    assert loaded.texts == tuple(texts) and loaded.vectors.shape == (12, 384)
