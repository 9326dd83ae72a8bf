"""``agentwatch mapping check``: how each span of a capture would map under a mapping file.

The capture goes through the normaliser the workers run (with the pricing file, value bounds
and PII policy of the environment), so what is printed is what the rows would hold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import click

# Row fields shown per kind, in this order.
_SHOWN = {
    "llm_call": ("model", "provider", "input_tokens", "output_tokens", "cost_usd", "latency_ms", "user", "project",
                 "session", "prompt", "response", "status"),
    "tool_call": ("tool_name", "arguments", "result", "latency_ms", "user", "project", "session", "status"),
    "agent_step": ("agent", "operation", "latency_ms", "user", "project", "session", "status"),
}
_TEXT_CHARS = 80


@click.group("mapping")
def mapping_group() -> None:
    """The user-declared span mapping (AGENTWATCH_MAPPING_PATH)."""


@mapping_group.command("check")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--capture", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Spans to try: OTLP/JSON (as the OTLP file exporter writes it, one request per line "
                   "or one document) or an OTLP protobuf export request (.otlp.bin).")
def check_command(file: Path, capture: Path) -> None:
    """Validate mapping FILE and print how each span of the capture would map."""
    from agentwatch.settings import Settings
    from agentwatch.streams.mapping import MappingError, MappingRules
    from agentwatch.streams.normalize import Normalizer
    from agentwatch.streams.pii import PiiConfigError, Redactor
    from agentwatch.streams.pricing import PricingTable

    try:
        rules = MappingRules.load(file)
    except MappingError as exc:
        raise click.ClickException(str(exc)) from None
    settings = Settings()
    try:
        redactor = Redactor(settings.pii_policy())
    except PiiConfigError as exc:
        raise click.ClickException(str(exc)) from None
    normalizer = Normalizer(PricingTable.load(settings.pricing_path), max_text_chars=settings.max_text_chars,
                            value_bounds=settings.value_bounds, redactor=redactor, mapping=rules)
    click.echo(f"{file}: {len(rules.rules)} rule(s), valid")
    counts = {"mapped": 0, "native": 0, "unmapped": 0}
    for request in _requests(capture):
        for line, outcome in _report(request, rules, normalizer):
            if outcome is not None:
                counts[outcome] += 1
            click.echo(line)
    total = sum(counts.values())
    click.echo(f"{total} span(s): {counts['mapped']} mapped by a rule, {counts['native']} read by the built-in "
               f"conventions, {counts['unmapped']} not mapped")


def _requests(capture: Path) -> Iterator[Any]:
    from agentwatch.streams.otlp import UndecodableRecord, decode_traces

    payload = capture.read_bytes()
    if not payload.strip():
        raise click.ClickException(f"{capture}: empty capture")
    try:
        yield decode_traces(payload)
        return
    except UndecodableRecord as exc:
        if payload.lstrip()[:1] != b"{":
            raise click.ClickException(f"{capture}: {exc}") from None
        whole = exc
    # The OTLP file exporter writes one export request per line (JSON Lines).
    lines = [line for line in payload.splitlines() if line.strip()]
    if len(lines) < 2:
        raise click.ClickException(f"{capture}: {whole}")
    for number, line in enumerate(lines, 1):
        try:
            yield decode_traces(line)
        except UndecodableRecord as exc:
            raise click.ClickException(f"{capture} line {number}: {exc}") from None


def _report(request: Any, rules: Any, normalizer: Any) -> Iterator[tuple[str, str | None]]:
    """(text line, outcome of a span or None) for each span of ``request``."""
    from agentwatch.streams.otlp import attributes

    batch = normalizer.normalize_traces(request)
    rows: dict[str, tuple[str, dict[str, Any]]] = {}
    for kind, found in (("llm_call", batch.llm_call_rows), ("tool_call", batch.tool_call_rows),
                        ("agent_step", batch.agent_step_rows)):
        for row in found:
            rows[row["span_id"]] = (kind, row)
    failures = dict(batch.failures)
    for resource_spans in request.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            scope = scope_spans.scope.name
            for span in scope_spans.spans:
                span_id = span.span_id.hex()
                attrs = attributes(span.attributes)
                rule = rules.match(span.name, scope, attrs)
                yield f"span {span.name!r} (scope {scope!r}, span id {span_id})", None
                kind, row = rows.get(span_id, (None, None))
                if span_id in failures:
                    yield f"  not mapped: the normaliser failed on it ({failures[span_id]})", "unmapped"
                    continue
                if rule is not None:
                    yield f"  {rule.label} -> {kind or 'no row'}", "mapped"
                    for field_map in rule.fields:
                        if field_map.value(attrs) is None:
                            problem = "absent or not a number" if field_map.scale is not None else "absent"
                            yield f"    {field_map.field}: not set ({field_map.describe()} {problem})", None
                elif row is not None:
                    yield f"  no rule matches; read by the built-in conventions -> {kind}", "native"
                else:
                    yield f"  not mapped: {_why_not(rules, span.name, scope, attrs)}", "unmapped"
                    continue
                if row is not None:
                    for name in _SHOWN[kind]:
                        yield f"    {name} = {_shown(row.get(name))}", None
                    if row.get("invalid_fields"):
                        yield f"    invalid (nulled): {row['invalid_fields']}", None


def _why_not(rules: Any, span_name: str, scope: str, attrs: dict[str, Any]) -> str:
    reasons = [f"{rule.label}: {rule.why_not(span_name, scope, attrs)}" for rule in rules.rules]
    return "no rule matches and no GenAI attributes (" + "; ".join(reasons) + ")"


def _shown(value: Any) -> str:
    if isinstance(value, str):
        text = value if len(value) <= _TEXT_CHARS else value[:_TEXT_CHARS] + "..."
        return repr(text)
    return repr(value)
