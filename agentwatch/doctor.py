"""``agentwatch doctor``: which services send spans agentwatch cannot map, or maps poorly.

The first thing an app team runs after pointing its exporter at agentwatch. It reads the last
minutes of snapshots (model calls, tool calls, agent steps) and of the ``dead_letter`` topic and
lists, per service, each problem with its count, its share of the service's model calls, an
example trace and span id and a one-line fix.

The checks are pure functions over a DuckDB connection (:func:`snapshot_problems`) and over
dead-letter records already read (:func:`dead_letter_problems`); reading Kafka
(:func:`read_dead_letters`) and the command are thin layers around them.

Exit code: 0 when nothing is wrong in what was checked, 1 when a problem was found (notes, such
as a service with agent steps but no model calls, do not count). Dead letters that could not be
read are said so in the report; they do not change the exit code.
"""

from __future__ import annotations

import re
import socket
import sys
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import click
import orjson

DEAD_LETTER_TOPIC = "dead_letter"
_DLQ_REASON = "agentwatch.dlq.reason"  # agentwatch.streams.dataflow.DLQ_REASON_HEADER
_DLQ_TOPIC = "agentwatch.dlq.topic"
_EVENT_TOPICS = frozenset({"llm_calls", "tool_calls", "agent_steps", "llm_messages", "usage", "gpu_samples"})

PROBLEM = "problem"
NOTE = "note"

# kind -> (what it is, how to fix it). Kinds are listed in the order the report shows them.
KINDS: dict[str, tuple[str, str]] = {
    "nothing_received": ("no model calls, tool calls or agent steps",
                         "check the exporter endpoint and token, and that spans carry gen_ai.* attributes"),
    "unmapped_spans": ("spans received, none a model call, tool call or agent step agentwatch knows",
                       "describe your span shape in a mapping file (AGENTWATCH_MAPPING_PATH; start from "
                       "streams/mapping.example.yaml, try it with agentwatch mapping check)"),
    "no_service": ("model calls with no service.name", "set service.name on the resource (OTEL_SERVICE_NAME)"),
    "no_model": ("model calls with no model", "set gen_ai.request.model (and gen_ai.response.model)"),
    "no_tokens": ("model calls with no tokens",
                  "set gen_ai.usage.input_tokens and gen_ai.usage.output_tokens"),
    "unpriced_model": ("model has no price", "add the model to AGENTWATCH_PRICING_PATH (USD per 1M tokens)"),
    "no_operation": ("model calls with no operation", "set gen_ai.operation.name (chat, embeddings, ...)"),
    "invalid_values": ("implausible values (stored as null)",
                       "send counts as integers in their unit (tokens, not thousands); or widen "
                       "AGENTWATCH_VALUE_BOUNDS"),
    "no_project": ("model calls with no project", "set agentwatch.project on the resource"),
    "no_model_calls": ("agent steps or tool calls but no model calls",
                       "if this service calls models, set gen_ai.operation.name and gen_ai.request.model "
                       "on those spans"),
    "dead_lettered": ("dead-lettered", "see the agentwatch.dlq.reason header on topic dead_letter"),
}
_KIND_ORDER = {kind: i for i, kind in enumerate(KINDS)}

# Dead-letter reason (its first part) -> a fix hint; anything else gets the generic hint above.
_DEAD_LETTER_HINTS = (
    ("spans unmappable", "the normaliser failed on these spans: report the reason and the span to the agentwatch team"),
    ("undecodable otlp", "the collector wrote a record that is not OTLP: check its Kafka exporter encoding "
                         "(otlp_proto)"),
    ("undecodable", "a producer other than agentwatch wrote an event record that does not fit its schema "
                    "(the reason names the field)"),
    ("implausible values", "a row was dropped for an implausible timestamp: check the span's start and end times"),
    ("tombstone", "a producer wrote an empty record to an agentwatch topic"),
    ("empty record", "a producer wrote an empty record to an agentwatch topic"),
)


@dataclass(frozen=True, slots=True)
class Problem:
    """One kind of problem in one service's spans."""

    service: str  # "" when the spans carry no service.name
    kind: str  # a key of KINDS
    count: int  # model calls (snapshot checks) or spans/records (dead letters)
    share: float | None  # of the service's model calls in the window; None where it means nothing
    example_trace_id: str
    example_span_id: str
    hint: str
    detail: str = ""  # e.g. the unpriced models, the flagged fields, the dead-letter reason
    severity: str = PROBLEM  # PROBLEM or NOTE (a note does not fail the exit code)


@dataclass(frozen=True, slots=True)
class ServiceCounts:
    """Rows a service produced in the window."""

    service: str
    model_calls: int
    tool_calls: int
    agent_steps: int


@dataclass(frozen=True, slots=True)
class DeadLetterRecord:
    """One record of the dead_letter topic, as read."""

    value: bytes | None
    headers: Mapping[str, str]
    timestamp_ms: int = 0
    partition: int = 0
    offset: int = 0


@dataclass(frozen=True, slots=True)
class DeadLetterCheck:
    """Whether the dead letters were read, and if not, why."""

    checked: bool
    bootstrap_servers: str = ""
    records: int = 0  # dead letters in the window
    note: str = ""  # why not checked, or what limited the check


@dataclass(frozen=True)
class Report:
    since_ts: float
    until_ts: float
    services: tuple[ServiceCounts, ...]
    problems: tuple[Problem, ...]
    dead_letters: DeadLetterCheck
    notes: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not any(p.severity == PROBLEM for p in self.problems)

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1


# -- snapshots ------------------------------------------------------------------------------------

def _where(service: str | None) -> str:
    return "ts >= $since AND ts < $until" + ("" if service is None else " AND coalesce(service, '') = $service")


def _params(since_ts: float, until_ts: float, service: str | None) -> dict[str, Any]:
    params: dict[str, Any] = {"since": since_ts, "until": until_ts}
    if service is not None:
        params["service"] = service
    return params


def service_counts(con: Any, *, since_ts: float, until_ts: float, service: str | None = None
                   ) -> list[ServiceCounts]:
    """Model calls, tool calls and agent steps per service with ``since_ts <= ts < until_ts``."""
    where = _where(service)
    rows = con.execute(f"""
        WITH r AS (
            SELECT coalesce(service, '') AS service, 'llm' AS t FROM llm_calls_raw WHERE {where}
            UNION ALL SELECT coalesce(service, ''), 'tool' FROM tool_calls_raw WHERE {where}
            UNION ALL SELECT coalesce(service, ''), 'step' FROM agent_steps_raw WHERE {where})
        SELECT service, count(*) FILTER (WHERE t = 'llm'), count(*) FILTER (WHERE t = 'tool'),
               count(*) FILTER (WHERE t = 'step')
        FROM r GROUP BY service ORDER BY service""", _params(since_ts, until_ts, service)).fetchall()
    return [ServiceCounts(s, int(m), int(t), int(a)) for s, m, t, a in rows]


# Conditions on llm_calls_raw rows, one per snapshot problem kind.
_NO_TOKEN_FLAGS = "NOT regexp_matches(coalesce(invalid_fields, ''), '(^|,)(input|output)_tokens:')"
_CONDITIONS = {
    "no_service": "coalesce(service, '') = ''",
    "no_model": "coalesce(model, '') = ''",
    # A failed call has no usage to report; tokens nulled as implausible are counted as invalid_values.
    "no_tokens": f"coalesce(input_tokens, 0) = 0 AND coalesce(output_tokens, 0) = 0 "
                 f"AND coalesce(status, 'ok') <> 'error' AND {_NO_TOKEN_FLAGS}",
    "unpriced_model": "NOT coalesce(priced, false) AND coalesce(model, '') <> ''",
    "no_operation": "coalesce(operation, '') = ''",
    "invalid_values": "coalesce(invalid_fields, '') <> ''",
    "no_project": "coalesce(project, '') = ''",
}


def snapshot_problems(con: Any, *, since_ts: float, until_ts: float, service: str | None = None
                      ) -> list[Problem]:
    """Problems in the model calls (and services) of the snapshots with ``since_ts <= ts < until_ts``.

    ``con`` is a connection from :func:`agentwatch.streams.snapshots.connect`. The example of a
    problem is its latest call (ties broken by the larger span id, so the choice is stable).
    """
    params = _params(since_ts, until_ts, service)
    aggregates = ",\n".join(
        f"count(*) FILTER (WHERE {cond}) AS {kind}_n, "
        f"arg_max([trace_id, span_id], (ts, span_id)) FILTER (WHERE {cond}) AS {kind}_ex"
        for kind, cond in _CONDITIONS.items())
    cursor = con.execute(f"""
        SELECT coalesce(service, '') AS service, count(*) AS calls, {aggregates}
        FROM llm_calls_raw WHERE {_where(service)} GROUP BY 1 ORDER BY 1""", params)
    names = [d[0] for d in cursor.description]
    rows = cursor.fetchall()  # before the next query on this connection replaces the result
    details = {"unpriced_model": _unpriced_models(con, params, service),
               "invalid_values": _invalid_fields(con, params, service)}
    problems: list[Problem] = []
    for values in rows:
        row = dict(zip(names, values))
        svc, calls = row["service"], row["calls"]
        for kind in _CONDITIONS:
            n = row[f"{kind}_n"]
            if not n:
                continue
            trace_id, span_id = row[f"{kind}_ex"]
            problems.append(Problem(svc, kind, int(n), n / calls, trace_id or "", span_id or "", KINDS[kind][1],
                                    details.get(kind, {}).get(svc, "")))
    counts = service_counts(con, since_ts=since_ts, until_ts=until_ts, service=service)
    problems += _services_without_model_calls(con, counts, params, service)
    unmapped = _unmapped_services(con, params, service)
    problems += unmapped
    if not counts and not unmapped:
        problems.append(Problem(service or "", "nothing_received", 0, None, "", "", KINDS["nothing_received"][1]))
    return sorted(problems, key=_problem_order)


def _unmapped_services(con: Any, params: dict[str, Any], service: str | None) -> list[Problem]:
    """Services whose spans (``span_coverage``, written by the normaliser) all mapped to nothing:
    without this they leave no row anywhere. A service with some spans recognised (a web app's
    HTTP spans beside its model calls) is fine."""
    try:
        rows = con.execute(f"""
            SELECT coalesce(service, ''), sum(spans)::BIGINT, sum(mapped)::BIGINT,
                   arg_max([example_trace_id, example_span_id, example_name, example_attributes], ts)
            FROM span_coverage_raw WHERE {_where(service)} GROUP BY 1 ORDER BY 1""", params).fetchall()
    except Exception:  # no span_coverage file yet: nothing went unrecognised
        return []
    problems = []
    for svc, spans, recognised, (trace_id, span_id, name, names) in rows:
        if recognised:
            continue
        detail = f"e.g. span {name!r} with attributes {names.replace(',', ', ') or '(none)'}"
        problems.append(Problem(svc, "unmapped_spans", int(spans), None, trace_id or "", span_id or "",
                                KINDS["unmapped_spans"][1], detail))
    return problems


def _problem_order(p: Problem) -> tuple[Any, ...]:
    return (p.service, _KIND_ORDER[p.kind], p.detail)


def _top(pairs: Iterable[tuple[str, str, int]], limit: int = 3) -> dict[str, str]:
    """service -> "a (3), b (1), 2 more" from (service, name, count) rows sorted by count."""
    grouped: dict[str, list[tuple[str, int]]] = {}
    for svc, name, n in pairs:
        grouped.setdefault(svc, []).append((name, int(n)))
    out = {}
    for svc, items in grouped.items():
        shown = ", ".join(f"{name} ({n})" for name, n in items[:limit])
        out[svc] = shown + (f", {len(items) - limit} more" if len(items) > limit else "")
    return out


def _unpriced_models(con: Any, params: dict[str, Any], service: str | None) -> dict[str, str]:
    rows = con.execute(f"""
        SELECT coalesce(service, ''), model, count(*) AS n FROM llm_calls_raw
        WHERE {_where(service)} AND {_CONDITIONS['unpriced_model']}
        GROUP BY 1, 2 ORDER BY 1, n DESC, 2""", params).fetchall()
    return _top(rows)


def _invalid_fields(con: Any, params: dict[str, Any], service: str | None) -> dict[str, str]:
    rows = con.execute(f"""
        SELECT service, flag, count(*) AS n FROM (
            SELECT coalesce(service, '') AS service, unnest(string_split(invalid_fields, ',')) AS flag
            FROM llm_calls_raw WHERE {_where(service)} AND {_CONDITIONS['invalid_values']})
        WHERE flag <> '' GROUP BY 1, 2 ORDER BY 1, n DESC, 2""", params).fetchall()
    return _top(rows)


def _services_without_model_calls(con: Any, counts: Sequence[ServiceCounts], params: dict[str, Any],
                                  service: str | None) -> list[Problem]:
    problems = []
    for c in counts:
        if c.model_calls or not (c.tool_calls or c.agent_steps):
            continue
        example = con.execute(f"""
            SELECT trace_id, span_id FROM (
                SELECT ts, trace_id, span_id, service FROM tool_calls_raw WHERE {_where(service)}
                UNION ALL
                SELECT ts, trace_id, span_id, service FROM agent_steps_raw WHERE {_where(service)})
            WHERE coalesce(service, '') = $svc
            ORDER BY ts DESC, span_id DESC LIMIT 1""", {**params, "svc": c.service}).fetchone()
        problems.append(Problem(c.service, "no_model_calls", c.tool_calls + c.agent_steps, None,
                                example[0] or "", example[1] or "", KINDS["no_model_calls"][1],
                                f"{c.agent_steps} agent steps, {c.tool_calls} tool calls", severity=NOTE))
    return problems


# -- dead letters ---------------------------------------------------------------------------------

def reason_category(reason: str) -> str:
    """The stable part of a dead-letter reason (counts and span ids stripped)."""
    if re.match(r"^\d+ of \d+ spans unmappable", reason):
        return "spans unmappable"
    return reason.split(":", 1)[0].strip() or "no reason given"


def _dead_letter_hint(category: str) -> str:
    for prefix, hint in _DEAD_LETTER_HINTS:
        if category.startswith(prefix):
            return hint
    return KINDS["dead_lettered"][1]


def _otlp_items(topic: str, value: bytes, reason: str) -> list[tuple[str, str, str, int]]:
    """(service, trace id, span id, count) of a dead-lettered OTLP record, [] when undecodable."""
    from agentwatch.streams.otlp import UndecodableRecord, attributes, decode_logs, decode_traces

    try:
        request = decode_traces(value) if topic == "otlp_spans" else decode_logs(value)
    except UndecodableRecord:
        return []
    by_span: dict[str, tuple[str, str]] = {}
    per_resource: list[tuple[str, str, str, int]] = []
    resources = request.resource_spans if topic == "otlp_spans" else request.resource_logs
    for resource in resources:
        svc = str(attributes(resource.resource.attributes).get("service.name") or "")
        items = [item for scope in (resource.scope_spans if topic == "otlp_spans" else resource.scope_logs)
                 for item in (scope.spans if topic == "otlp_spans" else scope.log_records)]
        for item in items:
            by_span.setdefault(item.span_id.hex(), (svc, item.trace_id.hex()))
        if items:
            per_resource.append((svc, items[0].trace_id.hex(), items[0].span_id.hex(), len(items)))
    match = re.match(r"^(\d+) of \d+ spans unmappable", reason)
    if not match or topic != "otlp_spans":
        return per_resource
    # The record was dead-lettered whole, but only the spans the reason names failed to map.
    failed = int(match.group(1))
    shown = re.findall(r"span ([0-9a-f]+):", reason)
    out: list[tuple[str, str, str, int]] = []
    for span_id in shown:
        svc, trace_id = by_span.get(span_id, ("", ""))
        out.append((svc, trace_id, span_id, 1))
    if out and failed > len(out):  # the reason names at most five: the rest go with the first
        svc, trace_id, span_id, n = out[0]
        out[0] = (svc, trace_id, span_id, n + failed - len(out))
    return out or [("", "", "", failed)]


def _event_items(value: bytes) -> list[tuple[str, str, str, int]]:
    """(service, trace id, span id, 1) of each row of a dead-lettered event record."""
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError:
        return []
    if isinstance(doc, dict) and doc.get("kind") == "value_rejections":
        items = []
        # A rejection whose row was kept is in the snapshots, flagged in invalid_fields, and is
        # reported there; only rows dropped whole (an implausible ts) are missing from them.
        for rejection in doc.get("rejections") or ():
            row = rejection.get("row") if isinstance(rejection, dict) else None
            if not row:
                continue
            try:
                row = orjson.loads(row) if isinstance(row, str) else row
            except orjson.JSONDecodeError:
                row = {}
            svc = str(row.get("service") or "") if isinstance(row, dict) else ""
            items.append((svc, str(rejection.get("trace_id") or ""), str(rejection.get("span_id") or ""), 1))
        return items
    rows = doc if isinstance(doc, list) else [doc]
    return [(str(r.get("service") or ""), str(r.get("trace_id") or ""), str(r.get("span_id") or ""), 1)
            for r in rows if isinstance(r, dict)]


def dead_letter_items(letter: DeadLetterRecord) -> list[tuple[str, str, str, int]]:
    """(service, trace id, span id, count) a dead letter stands for; a record that cannot be read
    counts once, with no service."""
    reason = letter.headers.get(_DLQ_REASON, "")
    topic = letter.headers.get(_DLQ_TOPIC, "")
    value = letter.value or b""
    if reason.startswith("implausible values"):
        return _event_items(value)  # [] when every rejected row was kept
    if value and topic in ("otlp_spans", "otlp_logs"):
        items = _otlp_items(topic, value, reason)
    elif value and topic in _EVENT_TOPICS:
        items = _event_items(value)
    else:
        items = []
    return items or [("", "", "", 1)]


def dead_letter_problems(letters: Iterable[DeadLetterRecord]) -> list[Problem]:
    """One problem per service and reason category; the example is the first dead letter met."""
    counts: Counter[tuple[str, str]] = Counter()
    examples: dict[tuple[str, str], tuple[str, str, str]] = {}
    for letter in letters:
        reason = letter.headers.get(_DLQ_REASON, "")
        category = reason_category(reason)
        for svc, trace_id, span_id, n in dead_letter_items(letter):
            key = (svc, category)
            counts[key] += n
            examples.setdefault(key, (trace_id, span_id, reason))
    problems = []
    for (svc, category), n in counts.items():
        trace_id, span_id, reason = examples[(svc, category)]
        detail = reason if len(reason) <= 200 else reason[:199] + "…"
        problems.append(Problem(svc, "dead_lettered", n, None, trace_id, span_id, _dead_letter_hint(category),
                                detail or category))
    return sorted(problems, key=_problem_order)


@dataclass(frozen=True, slots=True)
class DeadLetterRead:
    letters: list[DeadLetterRecord]
    topic_exists: bool = True
    truncated: bool = False  # max_records reached before the end of the window


def read_dead_letters(bootstrap_servers: str, *, since_ts: float, until_ts: float,
                      topic: str = DEAD_LETTER_TOPIC, max_records: int = 100_000, timeout_s: float = 10.0,
                      consumer_factory: Callable[..., Any] | None = None,
                      monotonic: Callable[[], float] | None = None) -> DeadLetterRead:
    """The dead letters written in ``[since_ts, until_ts)``, read outside any consumer group.

    Reading starts at the offsets of ``since_ts`` where the broker answers that (else at the
    beginning, filtering by timestamp) and stops at the first empty poll, ``max_records`` or
    ``timeout_s``. Raises ``kafka.errors.KafkaError`` when no broker answers.
    """
    import time

    from kafka import KafkaConsumer, TopicPartition
    from kafka.errors import KafkaError

    factory = consumer_factory or KafkaConsumer
    clock = monotonic or time.monotonic
    consumer = factory(bootstrap_servers=bootstrap_servers, enable_auto_commit=False, client_id="agentwatch-doctor",
                       auto_offset_reset="earliest", consumer_timeout_ms=1000,
                       request_timeout_ms=int(timeout_s * 1000) + 1000,
                       bootstrap_timeout_ms=int(timeout_s * 1000))
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not partitions:
            return DeadLetterRead([], topic_exists=False)
        consumer.assign(partitions)
        since_ms, until_ms = int(since_ts * 1000), int(until_ts * 1000)
        try:
            starts = consumer.offsets_for_times({tp: since_ms for tp in partitions})
        except (KafkaError, ValueError):  # a broker without timestamp lookups: read from the start
            starts = {tp: None for tp in partitions}
            consumer.seek_to_beginning(*partitions)
        else:
            for tp in partitions:
                found = starts.get(tp)
                if found is None:  # nothing at or after since_ts in this partition
                    consumer.seek_to_end(tp)
                else:
                    consumer.seek(tp, found.offset)
        letters: list[DeadLetterRecord] = []
        deadline = clock() + timeout_s
        while clock() < deadline:
            batch = consumer.poll(timeout_ms=500)
            if not batch:
                break
            for records in batch.values():
                for record in records:
                    if not since_ms <= record.timestamp < until_ms:
                        continue
                    headers = {k: (v or b"").decode("utf-8", "replace") for k, v in record.headers or ()}
                    letters.append(DeadLetterRecord(record.value, headers, record.timestamp,
                                                    record.partition, record.offset))
                    if len(letters) >= max_records:
                        return DeadLetterRead(letters, truncated=True)
        return DeadLetterRead(letters)
    finally:
        consumer.close()


def broker_listening(host: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _addresses(bootstrap_servers: str) -> list[tuple[str, int]]:
    """(host, port) of each ``host:port`` in a bootstrap list; Kafka's port where none is given."""
    out = []
    for item in bootstrap_servers.split(","):
        item = item.strip().split("://")[-1]
        if not item:
            continue
        host, _, port = item.rpartition(":") if item.rpartition(":")[2].isdigit() else (item, "", "9092")
        out.append((host.strip("[]"), int(port)))
    return out


def check_dead_letters(bootstrap_servers: str | None, *, broker_port: int, since_ts: float, until_ts: float,
                       read: Callable[..., DeadLetterRead] = read_dead_letters
                       ) -> tuple[DeadLetterCheck, list[Problem]]:
    """Read and judge the dead letters, or say why they were not checked."""
    from kafka.errors import KafkaError

    if not bootstrap_servers:
        if not broker_listening("127.0.0.1", broker_port):
            return DeadLetterCheck(False, note=(
                f"no --bootstrap-servers / AGENTWATCH_BOOTSTRAP_SERVERS given and no embedded broker "
                f"listening on 127.0.0.1:{broker_port} (is `agentwatch up` running?)")), []
        bootstrap_servers = f"127.0.0.1:{broker_port}"
    elif not any(broker_listening(host, port) for host, port in _addresses(bootstrap_servers)):
        return DeadLetterCheck(False, bootstrap_servers, note=(
            f"nothing is listening at {bootstrap_servers} (--bootstrap-servers / AGENTWATCH_BOOTSTRAP_SERVERS)")), []
    try:
        read_result = read(bootstrap_servers, since_ts=since_ts, until_ts=until_ts)
    except (KafkaError, OSError) as exc:
        return DeadLetterCheck(False, bootstrap_servers, note=(
            f"Kafka at {bootstrap_servers} did not answer: {type(exc).__name__}: {exc}")), []
    if not read_result.topic_exists:
        return DeadLetterCheck(True, bootstrap_servers, note=f"no {DEAD_LETTER_TOPIC} topic on {bootstrap_servers} "
                                                             "(nothing was ever dead-lettered)"), []
    note = (f"stopped after {len(read_result.letters)} dead letters; later ones were not read"
            if read_result.truncated else "")
    return (DeadLetterCheck(True, bootstrap_servers, len(read_result.letters), note),
            dead_letter_problems(read_result.letters))


# -- the report -----------------------------------------------------------------------------------

FOOTNOTES = (
    "Spans with no GenAI attributes agentwatch knows never become rows; the normaliser counts them "
    "per service (span_coverage), so a service whose spans all map to nothing is listed with an "
    "example. One that also sends recognised spans (HTTP spans beside its model calls) is not.",
    "The normaliser records a model call with no gen_ai.operation.name as 'chat', so 'no operation' "
    "only shows rows written by other producers.",
    "Implausible values nulled in a kept row are reported under 'implausible values', not again "
    "under dead letters (their originals are dead-lettered too).",
)


def build_report(con: Any, *, since_ts: float, until_ts: float, service: str | None = None,
                 dead_letters: tuple[DeadLetterCheck, list[Problem]] | None = None) -> Report:
    problems = snapshot_problems(con, since_ts=since_ts, until_ts=until_ts, service=service)
    check, letters = dead_letters or (DeadLetterCheck(False, note="not requested"), [])
    if service is not None:
        letters = [p for p in letters if p.service == service]
    return Report(since_ts, until_ts,
                  tuple(service_counts(con, since_ts=since_ts, until_ts=until_ts, service=service)),
                  tuple(sorted([*problems, *letters], key=_problem_order)), check, FOOTNOTES)


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _service_label(service: str) -> str:
    return service or "(no service.name)"


def _share(share: float | None) -> str:
    if share is None:
        return "-"
    return f"{share * 100:.1f}%"


def render_text(report: Report) -> str:
    """The report as plain text: one table per service, then dead letters and footnotes."""
    lines = [f"agentwatch doctor: snapshots from {_utc(report.since_ts)} to {_utc(report.until_ts)}", ""]
    counts = {c.service: c for c in report.services}
    services = sorted({*counts, *(p.service for p in report.problems)})
    header = ["PROBLEM", "COUNT", "SHARE", "EXAMPLE TRACE ID", "EXAMPLE SPAN ID", "FIX"]
    for svc in services:
        c = counts.get(svc, ServiceCounts(svc, 0, 0, 0))
        mine = [p for p in report.problems if p.service == svc]
        title = (f"{_service_label(svc)}: {c.model_calls} model calls, {c.tool_calls} tool calls, "
                 f"{c.agent_steps} agent steps")
        if not mine:
            lines += [f"{title}: OK", ""]
            continue
        lines.append(title)
        cells = [header] + [[KINDS[p.kind][0] + (" (note)" if p.severity == NOTE else ""), str(p.count),
                             _share(p.share), p.example_trace_id or "-", p.example_span_id or "-", p.hint]
                            for p in mine]
        widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
        details = [""] + [p.detail for p in mine]
        for row, detail in zip(cells, details):
            lines.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
            if detail:  # under its problem, outside the columns so a long reason does not widen them
                lines.append(f"      {detail}")
        lines.append("")
    dl = report.dead_letters
    if not dl.checked:
        lines.append(f"Dead letters: not checked: {dl.note}")
    else:
        lines.append(f"Dead letters: {dl.records} in the window on {dl.bootstrap_servers}"
                     + (f" ({dl.note})" if dl.note else ""))
    lines.append("")
    problems = sum(1 for p in report.problems if p.severity == PROBLEM)
    lines.append("Result: no problems found" if report.ok else f"Result: {problems} problems found (exit code 1)")
    lines.append("")
    lines += [f"* {note}" for note in report.notes]
    return "\n".join(lines) + "\n"


def report_to_json(report: Report) -> dict[str, Any]:
    return {
        "since_ts": report.since_ts, "until_ts": report.until_ts, "ok": report.ok,
        "services": [{"service": c.service, "model_calls": c.model_calls, "tool_calls": c.tool_calls,
                      "agent_steps": c.agent_steps} for c in report.services],
        "problems": [{"service": p.service, "kind": p.kind, "severity": p.severity, "what": KINDS[p.kind][0],
                      "count": p.count, "share": p.share, "example_trace_id": p.example_trace_id,
                      "example_span_id": p.example_span_id, "hint": p.hint, "detail": p.detail}
                     for p in report.problems],
        "dead_letters": {"checked": report.dead_letters.checked,
                         "bootstrap_servers": report.dead_letters.bootstrap_servers,
                         "records": report.dead_letters.records, "note": report.dead_letters.note},
        "notes": list(report.notes),
    }


# -- the command ----------------------------------------------------------------------------------

@click.command("doctor")
@click.option("--since", default="15m", show_default=True, help="Look at the last 15m, 1h, 2d, ...")
@click.option("--service", help="Only this service (service.name).")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--data-dir", type=click.Path(path_type=Path), help="Snapshot directory [./agentwatch-data].")
@click.option("--bootstrap-servers", help="Kafka to read dead letters from [the embedded broker, if running].")
@click.option("--broker-port", type=int, help="Embedded broker port [9092].")
@click.option("--skip-dead-letters", is_flag=True, help="Do not read the dead_letter topic.")
@click.pass_context
def doctor(ctx: click.Context, since: str, service: str | None, fmt: str, data_dir: Path | None,
           bootstrap_servers: str | None, broker_port: int | None, skip_dead_letters: bool) -> None:
    """Which services send spans agentwatch cannot map, or maps poorly: model calls with no model,
    no tokens, an unpriced model, no operation, implausible values or no project, and spans that
    were dead-lettered, each with a count, its share, an example trace/span id and a fix.

    Run it after pointing an exporter at agentwatch. Exit code 0 when nothing is wrong, 1 when a
    problem was found.
    """
    import time

    import duckdb

    from agentwatch.cli import Duration, _settings
    from agentwatch.streams.snapshots import connect

    seconds = Duration().convert(since, None, ctx)
    settings = _settings(data_dir=data_dir, bootstrap_servers=bootstrap_servers, broker_port=broker_port)
    until_ts = time.time()
    since_ts = until_ts - seconds
    if skip_dead_letters:
        letters = (DeadLetterCheck(False, note="--skip-dead-letters"), [])
    else:
        letters = check_dead_letters(settings.bootstrap_servers, broker_port=settings.broker_port,
                                     since_ts=since_ts, until_ts=until_ts)
    con = connect(settings.data_dir)
    try:
        report = build_report(con, since_ts=since_ts, until_ts=until_ts, service=service, dead_letters=letters)
    except duckdb.Error as exc:
        raise click.ClickException(f"reading the snapshots failed: {exc}") from exc
    finally:
        con.close()
    if fmt == "json":
        sys.stdout.buffer.write(orjson.dumps(report_to_json(report), option=orjson.OPT_INDENT_2) + b"\n")
        sys.stdout.buffer.flush()
    else:
        click.echo(render_text(report), nl=False)
    ctx.exit(report.exit_code)
