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
def up(**flags: Any) -> None:
    """Run the stack in the foreground until Ctrl-C/SIGTERM.

    Starts the embedded Tansu broker (or uses --bootstrap-servers), creates the topics, starts
    the rotel collector and the Faust workers, and supervises them: a child that dies is
    restarted with backoff (restarts are printed and counted on the supervisor's /metrics);
    one that keeps dying, or the death of the embedded broker, stops everything with exit code 1.
    """
    from agentwatch.broker import PortInUseError
    from agentwatch.stack import Stack, StackError

    settings = _settings(**flags)
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
              type=click.Choice(["cost_spike", "retry_storm", "loop", "unknown_tool", "errors", "drift", "vram_leak"]),
              help="Inject an incident through the real OTel SDK path (repeatable).")
@click.option("--seed", type=int, default=7, show_default=True)
def demo(duration: float, rate: float, incidents: tuple[str, ...], seed: int, **flags: Any) -> None:
    """Start the stack, send simulated agent traffic, print a summary.

    Traffic is a simulated agent application on the real OpenTelemetry SDK, exporting OTLP to
    the collector: several services, projects, users and models, tool-calling agents, prompts
    from the CLINC150 data set. Snapshots stay in the data dir afterwards.
    """
    from agentwatch.broker import PortInUseError
    from agentwatch.demo import run_demo
    from agentwatch.stack import StackError

    settings = _settings(**flags)
    try:
        run_demo(settings, duration_s=duration, rate=rate, incidents=incidents, seed=seed, say=click.echo)
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
    runner = import_from_checkout("bench.runner", "agentwatch bench")
    run_bench, run_section = runner.run_bench, runner.run_section

    if section:
        try:
            run_section(output, section, quick=quick, say=click.echo)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--section") from exc
        return
    run_bench(output, quick=quick, say=click.echo)


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

    settings = _settings(bootstrap_servers=bootstrap_servers)
    if not settings.bootstrap_servers:
        raise click.ClickException("worker needs --bootstrap-servers or AGENTWATCH_BOOTSTRAP_SERVERS")
    run_worker(settings, worker_index=worker_index, metrics_port=metrics_port, ready_file=ready_file,
               loglevel=loglevel)


def _register_subcommands() -> None:
    from agentwatch.alerts.cli import notify, silence
    from agentwatch.collectors.gpu_exporter import gpu_exporter
    from agentwatch.dashboards.push import dashboards_group
    from agentwatch.reference_cli import drift_group, reference_group

    for command in (notify, silence, gpu_exporter, dashboards_group, reference_group, drift_group):
        main.add_command(command)


_register_subcommands()

if __name__ == "__main__":
    main()
