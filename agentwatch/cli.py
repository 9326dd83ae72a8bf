"""The ``agentwatch`` command line. Configuration is read once here and passed down."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Any

import click

from agentwatch.settings import Settings

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _settings(**overrides: Any) -> Settings:
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def _pipeline_settings(**overrides: Any) -> Settings:
    """Settings of a command that runs the pipeline: its PII policy and mapping file are checked
    before anything starts."""
    from agentwatch.streams.mapping import MappingError, MappingRules
    from agentwatch.streams.pii import PiiConfigError

    settings = _settings(**overrides)
    try:
        settings.pii_policy()
    except PiiConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if settings.mapping_path:
        try:
            MappingRules.load(settings.mapping_path)
        except MappingError as exc:
            raise click.ClickException(str(exc)) from None
    return settings


def stack_options(func):
    """Flags shared by ``up`` and ``demo``; each overrides its AGENTWATCH_* variable."""
    options = [
        click.option("--bootstrap-servers", help="Use this Kafka instead of the embedded Tansu broker."),
        click.option("--broker-port", type=int, help="Embedded broker port [9092]."),
        click.option("--otlp-grpc-port", type=int, help="Collector OTLP/gRPC port [4317]."),
        click.option("--otlp-http-port", type=int, help="Collector OTLP/HTTP port [4318]."),
        click.option("--workers", type=int, help="Faust worker processes [1]."),
        click.option("--metrics-port", type=int, help="First worker's /metrics port, +1 per worker; 0 = off [9108]."),
        click.option("--data-dir", type=click.Path(path_type=Path), help="Snapshot directory [./agentwatch-data]."),
        click.option("--alert-routes", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="Routes YAML: start the Slack/PagerDuty/Grafana notifier (see alerts/routes.example.yaml)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="agentwatch")
def main() -> None:
    """agentwatch: observability and drift detection for LLM agents (OTLP -> Kafka -> Faust)."""


@main.command()
@stack_options
@click.option("--otlp-bind", "otlp_bind_addr", metavar="IP",
              help="Address the OTLP receivers bind [127.0.0.1]. Any other address is reachable by "
                   "anyone who can reach this host: rotel cannot require a token (a warning says so).")
def up(**flags: Any) -> None:
    """Run the stack in the foreground until Ctrl-C/SIGTERM.

    Starts the embedded Tansu broker (or uses --bootstrap-servers), creates the topics, starts
    the rotel collector and the Faust workers, and supervises them: a child that dies is
    restarted with backoff (restarts are printed and counted on the supervisor's /metrics);
    one that keeps dying, or the death of the embedded broker, stops everything with exit code 1.
    """
    from agentwatch.broker import PortInUseError
    from agentwatch.stack import Stack, StackError

    settings = _pipeline_settings(**flags)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stack = Stack(settings)
    try:
        stack.start()
        click.echo("press Ctrl-C to stop")
        stack.supervise(stop.is_set)
    except PortInUseError as exc:
        raise click.ClickException(str(exc)) from exc
    except StackError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    finally:
        stack.stop()
        click.echo("stopped")


@main.command()
@stack_options
@click.option("--duration", type=float, default=60.0, show_default=True, help="Seconds of demo traffic.")
@click.option("--rate", type=float, default=20.0, show_default=True, help="Agent runs (traces) per second.")
@click.option("--incident", "incidents", multiple=True,
              type=click.Choice(["cost_spike", "retry_storm", "loop", "unknown_tool", "errors", "drift", "vram_leak",
                                 "none"]),
              help="Inject an incident from half-way through the real OTel SDK path (repeatable). Default: loop, "
                   "unknown_tool, retry_storm, cost_spike and drift; 'none' for a clean run.")
@click.option("--seed", type=int, default=7, show_default=True)
def demo(duration: float, rate: float, incidents: tuple[str, ...], seed: int, **flags: Any) -> None:
    """Start the stack, send simulated agent traffic, print a summary.

    Traffic is a simulated agent application on the real OpenTelemetry SDK, exporting OTLP to
    the collector: several services, projects, users and models, tool-calling agents, prompts
    from the CLINC150 data set. A clean baseline runs for the first half, incidents are injected
    in the second, and the summary ends with a table of each incident against the finding it
    raised and how long that took (and the alert's delivery with --alert-routes). Snapshots
    stay in the data dir afterwards.
    """
    from agentwatch.broker import PortInUseError
    from agentwatch.demo import run_demo
    from agentwatch.stack import StackError

    settings = _pipeline_settings(**flags)
    try:
        if "none" in incidents and len(incidents) > 1:
            raise click.BadParameter("'none' cannot be combined with other incidents", param_hint="--incident")
        chosen = None if not incidents else () if incidents == ("none",) else incidents
        run_demo(settings, duration_s=duration, rate=rate, incidents=chosen, seed=seed, say=click.echo)
    except PortInUseError as exc:
        raise click.ClickException(str(exc)) from exc
    except StackError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


def write_json_rows(rows: list[dict[str, Any]], *, lines: bool) -> None:
    """``rows`` to stdout as one JSON array, or (``lines``) one JSON object per line."""
    import orjson

    out = sys.stdout.buffer
    if lines:
        for row in rows:
            out.write(orjson.dumps(row, default=str) + b"\n")
    else:
        out.write(orjson.dumps(rows, default=str) + b"\n")
    out.flush()


@main.command()
@click.argument("sql")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json", "jsonl"]), default="table",
              show_default=True, help="json: one array; jsonl: one object per line.")
@click.option("--data-dir", type=click.Path(path_type=Path), help="Snapshot directory [./agentwatch-data].")
@click.option("--max-rows", type=int, default=100, show_default=True, help="Rows shown in table format.")
def query(sql: str, fmt: str, data_dir: Path | None, max_rows: int) -> None:
    """Run SQL over the snapshots (works while the pipeline runs).

    Views: llm_calls, tool_calls, agent_steps, llm_messages, gpu_samples, findings, alerts.
    Example: agentwatch query "SELECT model, sum(cost_usd) FROM llm_calls GROUP BY 1"
    """
    import duckdb

    from agentwatch.streams.snapshots import connect

    settings = _settings(data_dir=data_dir)
    con = connect(settings.data_dir)
    try:
        relation = con.sql(sql)
        if relation is None:
            return
        if fmt == "table":
            relation.show(max_rows=max_rows, max_width=200)
        elif fmt == "csv":
            import pyarrow.csv as pacsv

            pacsv.write_csv(relation.to_arrow_table(), sys.stdout.buffer)
        else:
            write_json_rows(relation.to_arrow_table().to_pylist(), lines=fmt == "jsonl")
    except duckdb.Error as exc:
        raise click.ClickException(f"query failed: {exc}") from exc
    finally:
        con.close()


class Duration(click.ParamType):
    """``30m``, ``1h``, ``2d`` (also ``s`` and ``w``) as seconds."""

    name = "duration"
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        if isinstance(value, (int, float)):
            return float(value)
        text = str(value).strip().lower()
        try:
            amount, unit = float(text[:-1]), self.units[text[-1:]]
        except (ValueError, KeyError):
            self.fail(f"{value!r} is not a duration like 30m, 1h or 2d", param, ctx)
        if amount <= 0:
            self.fail(f"{value!r} is not a positive duration", param, ctx)
        return amount * unit


# One row per (detector, kind, key): its latest finding says whether it is open (at equal
# timestamps a firing outranks a resolution, so a live condition is never hidden); severity,
# value and threshold are those of its latest firing. A row delivered twice counts once.
FINDINGS_STATE_SQL = """
WITH f AS (
    SELECT DISTINCT detector, kind, key, severity, ts, value, threshold, coalesce(resolved, false) AS resolved
    FROM findings WHERE ts IS NOT NULL),
g AS (
    SELECT detector, kind, key,
           arg_max(resolved, (ts, NOT resolved)) AS resolved,
           coalesce(min(ts) FILTER (WHERE NOT resolved), min(ts)) AS first_seen,
           coalesce(max(ts) FILTER (WHERE NOT resolved), max(ts)) AS last_seen,
           max(ts) AS latest_ts,
           coalesce(arg_max(severity, ts) FILTER (WHERE NOT resolved), arg_max(severity, ts)) AS severity,
           arg_max(value, ts) FILTER (WHERE NOT resolved) AS value,
           arg_max(threshold, ts) FILTER (WHERE NOT resolved) AS threshold,
           count(*) FILTER (WHERE NOT resolved) AS firings
    FROM f GROUP BY detector, kind, key)
SELECT CASE WHEN resolved THEN 'resolved' ELSE 'open' END AS state, severity, detector, kind, key,
       value, threshold, first_seen, last_seen, CASE WHEN resolved THEN latest_ts END AS resolved_at, firings
FROM g
WHERE latest_ts >= $since AND (len($detectors) = 0 OR list_contains($detectors, detector))
      AND NOT ($open_only AND resolved)
ORDER BY resolved, CASE severity WHEN 'critical' THEN 0 WHEN 'warning' THEN 1 ELSE 2 END,
         last_seen DESC, detector, kind, key
"""


def findings_state(con: Any, *, since_ts: float = float("-inf"), detectors: tuple[str, ...] = (),
                   open_only: bool = False) -> list[dict[str, Any]]:
    """Each (detector, kind, key) seen (fired or resolved) at or after ``since_ts``, with its state."""
    cursor = con.execute(FINDINGS_STATE_SQL, {"since": since_ts, "detectors": list(detectors),
                                              "open_only": open_only})
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, values)) for values in cursor.fetchall()]


def _utc(ts: float | None) -> str:
    from datetime import datetime, timezone

    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def findings_table(rows: list[dict[str, Any]]) -> str:
    header = ["STATE", "SEVERITY", "DETECTOR", "KIND", "KEY", "VALUE", "THRESHOLD", "FIRST SEEN", "LAST SEEN",
              "RESOLVED AT", "FIRINGS"]
    cells = [header] + [[r["state"], r["severity"], r["detector"], r["kind"], r["key"],
                         "-" if r["value"] is None else f"{r['value']:g}",
                         "-" if r["threshold"] is None else f"{r['threshold']:g}",
                         _utc(r["first_seen"]), _utc(r["last_seen"]), _utc(r["resolved_at"]), str(r["firings"])]
                        for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() + "\n" for row in cells)


@main.command()
@click.option("--since", type=Duration(), help="Only findings seen (fired or resolved) in the last 30m, 1h, 2d, ...")
@click.option("--detector", "detectors", multiple=True, help="Only this detector (repeatable), e.g. agent_loop.")
@click.option("--open", "open_only", is_flag=True, help="Only open (not resolved) findings.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "jsonl"]), default="table", show_default=True,
              help="json: one array; jsonl: one object per line (timestamps in unix seconds).")
@click.option("--data-dir", type=click.Path(path_type=Path), help="Snapshot directory [./agentwatch-data].")
def findings(since: float | None, detectors: tuple[str, ...], open_only: bool, fmt: str,
             data_dir: Path | None) -> None:
    """List findings with their state: for each detector, kind and key, the latest finding says
    whether it is open or resolved. Open ones first, most severe first, latest first."""
    import time

    import duckdb

    from agentwatch.streams.snapshots import connect

    con = connect(_settings(data_dir=data_dir).data_dir)
    try:
        rows = findings_state(con, since_ts=time.time() - since if since else float("-inf"),
                              detectors=detectors, open_only=open_only)
    except duckdb.Error as exc:
        raise click.ClickException(f"reading the snapshots failed: {exc}") from exc
    finally:
        con.close()
    if fmt != "table":
        write_json_rows(rows, lines=fmt == "jsonl")
    elif rows:
        click.echo(findings_table(rows), nl=False)
    else:
        click.echo("no findings")


@main.command()
@click.argument("trace_id")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="json: the same tree as nested JSON.")
@click.option("--data-dir", type=click.Path(path_type=Path), help="Snapshot directory [./agentwatch-data].")
def trace(trace_id: str, fmt: str, data_dir: Path | None) -> None:
    """Print one trace as a tree: agent steps, model calls and tool calls under their parents in
    start-time order, with the findings keyed by the trace id (agent_loop, hallucinated_tool)."""
    import duckdb

    from agentwatch.streams.snapshots import connect
    from agentwatch.trace_view import load_trace, render_text, tree_to_json

    con = connect(_settings(data_dir=data_dir).data_dir)
    try:
        tree = load_trace(con, trace_id)
    except duckdb.Error as exc:
        raise click.ClickException(f"reading the snapshots failed: {exc}") from exc
    finally:
        con.close()
    if tree is None:
        click.echo(f"error: no trace {trace_id!r} in the snapshots", err=True)
        sys.exit(1)
    if fmt == "json":
        import orjson

        sys.stdout.buffer.write(orjson.dumps(tree_to_json(tree), option=orjson.OPT_INDENT_2) + b"\n")
        sys.stdout.buffer.flush()
    else:
        click.echo(render_text(tree), nl=False)


def import_from_checkout(module: str, command: str) -> Any:
    """``module`` of the source checkout's bench/ folder, beside the agentwatch package.

    Benchmarks and evaluations (and the test receivers and synthetic streams they use, in
    tests/support) are not in the wheel; without a checkout the command stops with one line.
    """
    import importlib

    import agentwatch

    root = Path(agentwatch.__file__).resolve().parents[1]
    if not (root / "bench" / "__init__.py").is_file():
        raise click.ClickException(f"{command} runs from a source checkout of agentwatch (its bench/ folder); "
                                   f"this install has none beside {root}")
    if str(root) not in sys.path:
        sys.path.append(str(root))  # last: the checkout's folders never shadow installed packages
    imported = importlib.import_module(module)
    if not Path(imported.__file__).resolve().is_relative_to(root):
        raise click.ClickException(f"{command}: {module} was imported from {imported.__file__}, not from the "
                                   f"checkout at {root}")
    return imported


@main.command()
@click.option("--output", type=click.Path(path_type=Path), default=Path("bench/results.json"), show_default=True)
@click.option("--quick", is_flag=True, help="Smaller runs (for a smoke check, not for figures).")
@click.option("--section", help="Run one extra section only (e.g. faults, alert_latency_span_to_webhook) "
                                "and merge it into the output file.")
def bench(output: Path, quick: bool, section: str | None) -> None:
    """Measure throughput (decode, normalise, end to end), latency, memory and fault recovery;
    write bench/results.json. Runs from a source checkout (its bench/ and tests/ folders)."""
    from agentwatch.progress import progress

    runner = import_from_checkout("bench.runner", "agentwatch bench")
    run_bench, run_section = runner.run_bench, runner.run_section

    if section:
        try:
            with progress(f"bench {section}", plain=click.echo) as step:
                run_section(output, section, quick=quick, say=step)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--section") from exc
        return
    with progress("bench", plain=click.echo) as step:
        run_bench(output, quick=quick, say=step)


@main.command(hidden=True)
@click.option("--worker-index", type=int, default=0)
@click.option("--metrics-port", type=int, default=0)
@click.option("--ready-file", type=click.Path(path_type=Path))
@click.option("--bootstrap-servers")
@click.option("--loglevel", default="warning")
def worker(worker_index: int, metrics_port: int, ready_file: Path | None, bootstrap_servers: str | None,
           loglevel: str) -> None:
    """Run one Faust worker (the supervisor starts these; compose runs them directly)."""
    from agentwatch.streams.worker import run_worker

    settings = _pipeline_settings(bootstrap_servers=bootstrap_servers)
    if not settings.bootstrap_servers:
        raise click.ClickException("worker needs --bootstrap-servers or AGENTWATCH_BOOTSTRAP_SERVERS")
    run_worker(settings, worker_index=worker_index, metrics_port=metrics_port, ready_file=ready_file,
               loglevel=loglevel)


def _register_subcommands() -> None:
    from agentwatch.alerts.cli import notify, silence
    from agentwatch.collectors.gpu_exporter import gpu_exporter
    from agentwatch.dashboards.push import dashboards_group
    from agentwatch.doctor import doctor
    from agentwatch.mapping_cli import mapping_group
    from agentwatch.pii_cli import pii_group
    from agentwatch.reference_cli import drift_group, reference_group

    for command in (notify, silence, gpu_exporter, dashboards_group, reference_group, drift_group, pii_group):
        main.add_command(command)
    main.add_command(doctor)
    main.add_command(mapping_group)


_register_subcommands()

if __name__ == "__main__":
    main()
