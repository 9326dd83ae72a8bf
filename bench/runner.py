"""``agentwatch bench``: measured throughput of the span path, written to bench/results.json.

- ``decode_limit_spans_per_s``: protobuf decode + attribute walk of otlp_spans records, in
  process: the practical ceiling for any Python consumer on this machine.
- ``normalize_spans_per_s``: the same records through the real pipeline code (decode,
  convention mapping, pricing, partitioned JSON encoding), in process.
- ``end_to_end``: records produced to the embedded broker until the whole pipeline is done with
  them (every worker input topic committed by the worker group, the event rows in Parquet), for
  1 and 2 workers, interleaved with the transport floor, with CPU per span per process
  (:mod:`bench.end_to_end`); ``end_to_end_spans_per_s`` is the 1-worker median.
  ``agentwatch bench --section end_to_end`` runs it alone.
- ``transport_floor``: the same records through the broker and a Faust worker that only forwards
  them (:mod:`bench.transport_floor`): what the broker and Kafka clients alone allow; measured in
  the same rounds as the end-to-end figures.

The other sections (detector state memory, drift, alert latency, faults, ...) are in the other
:mod:`bench` modules and run in the same invocation.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from agentwatch.broker import free_port

OUTPUT_TOPICS = ("llm_calls", "tool_calls", "agent_steps")


def make_records(n_records: int, spans_per_record: int = 1000, seed: int = 11,
                 pool_spans: int = 60_000) -> list[bytes]:
    """Realistic otlp_spans records: demo agent traffic from the real SDK, encoded as the collector does.

    Every record holds distinct traces. The SDK makes a pool of ``pool_spans`` spans once (its span
    machinery is slow); records past the pool replay it with fresh trace and span ids and times
    moved on by the pool's length, so the stream reads as more of the same traffic. (Replaying the
    same ids and times, as this once did, made a fifth of all events look like retries and loops
    and put ~40k findings and alerts into the measured path.)
    """
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from agentwatch.traffic import AgentTraffic

    exporters: list[InMemorySpanExporter] = []

    def factory(_service: str) -> InMemorySpanExporter:
        exporters.append(InMemorySpanExporter())
        return exporters[-1]

    traffic = AgentTraffic(factory, seed=seed, schedule_delay_ms=50)
    now = time.time_ns()
    pool_target = min(n_records * spans_per_record, max(pool_spans, spans_per_record))
    i = 0
    while traffic.stats.spans < pool_target:
        traffic.run(now + i * 10_000_000)
        i += 1
    traffic.shutdown()
    spans = [s for e in exporters for s in e.get_finished_spans()]
    spans.sort(key=lambda s: s.end_time)  # so a replay follows on in time
    pool_ns = spans[-1].end_time - min(s.start_time for s in spans) + 1_000_000_000
    records = []
    for r in range(n_records):
        replay, start = divmod(r * spans_per_record, len(spans))
        request = _replayed(encode_spans(spans[start:start + spans_per_record]), replay, pool_ns)
        wrapped = spans_per_record - (len(spans) - start)
        if wrapped > 0:  # the record runs on into the next replay
            request.MergeFrom(_replayed(encode_spans(spans[:wrapped]), replay + 1, pool_ns))
        records.append(request.SerializeToString())
    return records


def _replayed(request: Any, replay: int, pool_ns: int) -> Any:
    """The pool's spans as replay number ``replay``: fresh ids, times moved on (0: as made)."""
    if not replay:
        return request
    shift = replay * pool_ns
    for resource_spans in request.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                span.trace_id = _mix(span.trace_id, replay)
                span.span_id = _mix(span.span_id, replay)
                if span.parent_span_id:
                    span.parent_span_id = _mix(span.parent_span_id, replay)
                span.start_time_unix_nano += shift
                span.end_time_unix_nano += shift
                for event in span.events:
                    event.time_unix_nano += shift
    return request


def _mix(identifier: bytes, replay: int) -> bytes:
    # XOR with a mask that differs per replay is a bijection: ids stay distinct within a replay,
    # and each replay maps an id to a different one.
    mask = (replay * 0x9E3779B97F4A7C15).to_bytes(16, "big")[-len(identifier):]
    return bytes(a ^ b for a, b in zip(identifier, mask))


def bench_decode(records: list[bytes]) -> float:
    from agentwatch.streams.otlp import attributes, decode_traces

    spans = 0
    started = time.perf_counter()
    for payload in records:
        request = decode_traces(payload)
        for rs in request.resource_spans:
            attributes(rs.resource.attributes)
            for ss in rs.scope_spans:
                for span in ss.spans:
                    attributes(span.attributes)
                    spans += 1
    return spans / (time.perf_counter() - started)


def bench_normalize(records: list[bytes]) -> tuple[float, int]:
    from agentwatch.broker import DEFAULT_TOPICS
    from agentwatch.streams.normalize import Normalizer
    from agentwatch.streams.pipeline import SpanPipeline
    from agentwatch.streams.pricing import PricingTable

    pipeline = SpanPipeline(Normalizer(PricingTable.load()), DEFAULT_TOPICS)
    spans = events = 0
    started = time.perf_counter()
    for payload in records:
        outcome = pipeline.on_traces(payload)
        spans += outcome.spans
        batch = outcome.batch
        events += batch.events
    return spans / (time.perf_counter() - started), events


def bench_clients(bootstrap_servers: str, output_topics: Sequence[str], max_message_bytes: int) -> tuple[Any, Any]:
    """The benchmark's own producer, and a consumer of every partition of ``output_topics``
    positioned at their ends (only what the timed run produces is counted)."""
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers, enable_auto_commit=False, fetch_max_wait_ms=50,
                             fetch_max_bytes=64 * 1024 * 1024, max_partition_fetch_bytes=16 * 1024 * 1024)
    parts = [TopicPartition(t, p) for t in output_topics for p in consumer.partitions_for_topic(t) or ()]
    consumer.assign(parts)
    consumer.seek_to_end(*parts)
    for tp in parts:
        consumer.position(tp)
    producer = KafkaProducer(bootstrap_servers=bootstrap_servers, max_request_size=max_message_bytes,
                             linger_ms=5, batch_size=1 << 20, acks=1)
    return consumer, producer


WARMUP_RECORDS = 5


def bench_end_to_end(records: list[bytes], warmup: list[bytes], expected_events: int, *, rounds: int,
                     say: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole pipeline, 1 and 2 workers, against the transport floor (see :mod:`bench.end_to_end`)."""
    from bench.end_to_end import bench_end_to_end_rounds

    return bench_end_to_end_rounds(records, warmup, expected_events, rounds=rounds, say=say)


def end_to_end_section(quick: bool, say: Callable[[str], None] = lambda m: print(m, flush=True)) -> dict[str, Any]:
    """``--section end_to_end``: its own records (as run_bench makes them), the floor in the same rounds."""
    n_records = 40 if quick else 200
    say(f"building {WARMUP_RECORDS} + {n_records} records x 1000 spans of demo agent traffic ...")
    built = make_records(WARMUP_RECORDS + n_records)
    warmup, records = built[:WARMUP_RECORDS], built[WARMUP_RECORDS:]
    _, events = bench_normalize(records)
    return bench_end_to_end(records, warmup, events, rounds=2 if quick else 3, say=say)


def _continuity(results: dict[str, Any]) -> None:
    """The figures earlier results files carried under these names: the 1-worker median, the floor."""
    e2e = results.get("end_to_end") or {}
    if "workers_1" in e2e:
        results["end_to_end_spans_per_s"] = e2e["workers_1"]["spans_per_s"]["median"]
        floor = e2e["transport_floor"]
        median_run = min(floor["runs"], key=lambda r: abs(r["spans_per_s"] - floor["spans_per_s"]["median"]))
        results["transport_floor"] = {**median_run, "spans_per_s": floor["spans_per_s"]["median"],
                                      "range": floor["spans_per_s"]["range"],
                                      "note": "median of the rounds in end_to_end; the other fields: the run nearest it"}


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_section(output: Path, name: str, *, quick: bool = False, say: Callable[[str], None] = print) -> dict[str, Any]:
    """One extra section alone, merged into an existing results file (the other figures stay)."""
    sections = dict(_extra_sections(quick))
    if name not in sections:
        raise ValueError(f"no bench section {name!r}; sections: {', '.join(sections)}")
    results = json.loads(output.read_text()) if output.exists() else {}
    say(f"running {name} ...")
    results[name] = sections[name]()
    if name == "end_to_end":
        _continuity(results)
        say(_table(results))
    say(f"{name}: {json.dumps(results[name], default=str)[:2000]}")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2, default=str))
    say(f"wrote {output}")
    return results


def run_bench(output: Path, *, quick: bool = False, say: Callable[[str], None] = print) -> dict[str, Any]:
    n_records = 40 if quick else 200
    say(f"building {WARMUP_RECORDS} + {n_records} records x 1000 spans of demo agent traffic ...")
    built = make_records(WARMUP_RECORDS + n_records)
    # Warm-up records of their own: re-sent timed records would be dropped as duplicate spans.
    warmup, records = built[:WARMUP_RECORDS], built[WARMUP_RECORDS:]
    total_spans = n_records * 1000
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                           "platform": platform.platform()},
                               "records": n_records, "spans_per_record": 1000,
                               "record_bytes_mean": sum(map(len, records)) // len(records)}
    # Interleaved rounds, medians: this machine's speed drifts by ~10% from one second to the
    # next, and the two figures are only comparable when measured side by side.
    decode_rates, normalize_rates = [], []
    for _ in range(2 if quick else 5):
        decode_rates.append(bench_decode(records))
        normalize_rate, events = bench_normalize(records)
        normalize_rates.append(normalize_rate)
    results["decode_limit_spans_per_s"] = round(statistics.median(decode_rates))
    results["normalize_spans_per_s"] = round(statistics.median(normalize_rates))
    results["normalize_vs_decode"] = round(statistics.median(
        n / d for n, d in zip(normalize_rates, decode_rates)), 3)
    results["decode_normalize_rounds"] = [{"decode": round(d), "normalize": round(n)}
                                          for d, n in zip(decode_rates, normalize_rates)]
    say(f"decode limit {results['decode_limit_spans_per_s']:,} spans/s; normalise {results['normalize_spans_per_s']:,} spans/s")
    # The transport floor (the same records through the broker and a do-nothing two-hop Faust
    # worker: the ceiling the transport alone sets) is measured in the same rounds.
    say(f"end to end: transport floor, 1 worker, 2 workers; {2 if quick else 3} interleaved rounds ...")
    try:
        results["end_to_end"] = bench_end_to_end(records, warmup, events, rounds=2 if quick else 3, say=say)
        results["end_to_end"]["events_expected"] = events
        _continuity(results)
    except Exception as exc:
        results["end_to_end"] = {"error": f"{type(exc).__name__}: {exc}"}
        results["end_to_end_spans_per_s"] = 0
    say(f"end to end {results['end_to_end_spans_per_s']:,} spans/s (1 worker, median), {total_spans:,} spans")
    for name, section in [s for s in _extra_sections(quick) if s[0] != "end_to_end"]:
        try:
            say(f"running {name} ...")
            results[name] = section()
        except Exception as exc:  # one section failing must not hide the others' figures
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        say(f"{name}: {json.dumps(results[name], default=str)[:400]}")

    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2, default=str))
    say(_table(results))
    say(f"wrote {output}")
    return results


def bench_alert_latency(n_traces: int = 120, rate_per_s: float = 10.0) -> dict[str, Any]:
    """Span export (OTel SDK) -> Slack webhook received, for agent-loop incidents, end to end.

    The real stack (rotel, broker, worker with detectors, notifier) and a local receiver standing
    in for Slack. Each trace is an agent calling the same tool with the same arguments 3 times.
    """
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from agentwatch.settings import Settings
    from agentwatch.stack import Stack
    from bench.alerts import dedup_key_of_slack_message
    from tests.support.receivers import SlackReceiver

    work = Path(tempfile.mkdtemp(prefix="agentwatch-alert-bench-"))
    receiver = SlackReceiver().up()
    received: dict[str, float] = {}
    receiver.on_request = lambda request: received.setdefault(dedup_key_of_slack_message(request.body) or "", request.received_at)
    routes = work / "routes.yaml"
    routes.write_text(f"destinations:\n  slack:\n    type: slack\n    webhook_url: {receiver.url}/hook\n"
                      "routes:\n  - name: loops\n    match: {detector: agent_loop, kind: repeated_tool_call}\n"
                      "    destinations: [slack]\n    group_wait_s: 0\n")
    settings = Settings(broker_port=free_port(), otlp_grpc_port=free_port(), otlp_http_port=free_port(),
                        metrics_port=free_port(4), data_dir=work / "data", alert_routes=routes,
                        alerts_state_dir=work / "alerts", gpu_exporter="off")

    exported: dict[str, float] = {}

    class TimedExporter(OTLPSpanExporter):
        def export(self, spans):  # the moment the SDK hands the spans to the network
            now = time.time()
            for span in spans:
                exported.setdefault(format(span.context.trace_id, "032x"), now)
            return super().export(spans)

    with Stack(settings, say=lambda _m: None):
        # Steady state: the notifier's group join and the worker's embedding-model preload
        # (a few CPU-seconds after start-up) are over before the first span is sent.
        time.sleep(12.0)
        provider = TracerProvider(resource=Resource.create({"service.name": "loop-bench", "agentwatch.project": "bench"}))
        provider.add_span_processor(BatchSpanProcessor(
            TimedExporter(endpoint=f"127.0.0.1:{settings.otlp_grpc_port}", insecure=True), schedule_delay_millis=20))
        tracer = provider.get_tracer("bench")

        def loop_trace(i: int) -> str:
            with tracer.start_as_current_span("invoke_agent looper", attributes={
                    "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "looper"}) as root:
                for _ in range(3):
                    with tracer.start_as_current_span("execute_tool search", attributes={
                            "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "search",
                            "gen_ai.tool.call.arguments": json.dumps({"q": f"same question {i}"})}):
                        pass
            return format(root.get_span_context().trace_id, "032x")

        def wait_for(ids: list[str], timeout_s: float) -> None:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and len(_matched(ids, received)) < len(ids):
                time.sleep(0.05)

        # The first alert after start-up pays one-time costs on every hop (the exporters' first
        # metadata and connections, the notifier's first webhook call): measured on its own, so
        # the distribution below is the steady state on-call lives with.
        cold = [loop_trace(-1)]
        provider.force_flush()
        wait_for(cold, 30)
        trace_ids = []
        for i in range(n_traces):
            trace_ids.append(loop_trace(i))
            time.sleep(1.0 / rate_per_s)
        provider.force_flush()
        wait_for(trace_ids, 30)
        provider.shutdown()
    receiver.down()
    first = _matched(cold, received)
    cold_ms = round((first[cold[0]] - exported[cold[0]]) * 1000, 1) if cold[0] in first and cold[0] in exported else None
    matched = _matched(trace_ids, received)
    latencies = sorted((matched[t] - exported[t]) * 1000 for t in matched if t in exported)
    if not latencies:
        return {"alerts": 0, "traces": n_traces, "first_alert_after_start_ms": cold_ms}
    return {"traces": n_traces, "alerts": len(latencies),
            "p50_ms": round(statistics.median(latencies), 1),
            "p99_ms": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1),
            "max_ms": round(latencies[-1], 1), "target_p99_ms": 2000,
            "first_alert_after_start_ms": cold_ms}


def _matched(trace_ids: list[str], received: dict[str, float]) -> dict[str, float]:
    by_trace = {key.rsplit(":", 1)[-1]: ts for key, ts in received.items() if key}
    return {t: by_trace[t] for t in trace_ids if t in by_trace}


def _extra_sections(quick: bool) -> list[tuple[str, Callable[[], Any]]]:
    """Figures owned by the detector, alerting and dashboard packages, measured in the same run."""
    from bench.checkpoint import bench_checkpoint
    from bench.detector_state import bench_detectors, bench_trace_state
    from bench.faults import bench_faults
    from bench.metrics import bench_metrics
    from bench.pii import pii_section
    from bench.vram import bench_vram

    return [
        # In run_bench the end-to-end rounds run first, on the records the decode figures use;
        # this entry is for ``--section end_to_end``.
        ("end_to_end", lambda: end_to_end_section(quick)),
        ("stack_ready_s", bench_stack_ready),
        # Latency-sensitive sections run before the ones that leave this process holding
        # hundreds of MB of objects.
        ("alert_latency_span_to_webhook", lambda: bench_alert_latency(n_traces=30 if quick else 120)),
        ("detectors_events_per_s", lambda: bench_detectors(n_traces=10_000 if quick else 30_000)),
        # Before the sections that load torch (drift) or build 25 MB snapshots (checkpoint):
        # they would raise the RSS baseline this one reports against.
        ("trace_state_memory", lambda: bench_trace_state(n_traces=100_000 if quick else 1_000_000)),
        *_drift_sections(quick),
        ("vram_detector", lambda: bench_vram(hosts=10 if quick else 50)),
        ("metrics_overhead", bench_metrics),
        ("detector_checkpoint", lambda: bench_checkpoint(n_traces=20_000 if quick else 60_000)),
        ("faults", lambda: bench_faults(rounds=1 if quick else 2)),
        # Recogniser precision/recall per type and redaction speed (bench/pii.py).
        ("pii", lambda: pii_section(quick)),
    ]


def _drift_sections(quick: bool) -> list[tuple[str, Callable[[], Any]]]:
    from bench.drift_sampler import bench_drift

    return [("drift", bench_drift)]


def bench_stack_ready() -> dict[str, Any]:
    """Seconds from `up` to every component ready (broker, topics, collector, worker joined)."""
    from agentwatch.settings import Settings
    from agentwatch.stack import Stack

    settings = Settings(broker_port=free_port(), otlp_grpc_port=free_port(), otlp_http_port=free_port(),
                        metrics_port=free_port(4), data_dir=Path(tempfile.mkdtemp()), gpu_exporter="off")
    runs = []
    for _ in range(3):
        started = time.perf_counter()
        stack = Stack(settings, say=lambda _m: None).start()
        runs.append(round(time.perf_counter() - started, 2))
        stack.stop()
    return {"runs_s": runs, "max_s": max(runs), "target_s": 15}


def _table(results: dict[str, Any]) -> str:
    rows: list[tuple[str, Any, str]] = []
    if "decode_limit_spans_per_s" in results:
        rows += [("decode_limit_spans_per_s", results["decode_limit_spans_per_s"], ""),
                 ("normalize_spans_per_s", results["normalize_spans_per_s"],
                  f"{results['normalize_vs_decode']:.2f} x decode (target >= 0.33)")]
    e2e = results.get("end_to_end") or {}
    if "workers_1" in e2e:
        ratio = e2e["ratio_to_transport_floor"]
        for name in ("workers_1", "workers_2"):
            spread = e2e[name]["spans_per_s"]
            low, high = spread["range"]
            r = ratio[name]
            rows.append((f"end_to_end_{name}_spans_per_s", spread["median"],
                         f"range {low:,}..{high:,}; {r['median']:.3f} x floor "
                         f"(range {r['range'][0]:.3f}..{r['range'][1]:.3f}, goal >= {e2e['ratio_goal']})"))
        rows.append(("two_workers_vs_one", e2e["two_workers_vs_one"]["median"],
                     f"per round {e2e['two_workers_vs_one']['per_round']} (goal >= 1)"))
        floor = e2e["transport_floor"]["spans_per_s"]
        rows.append(("transport_floor_spans_per_s", floor["median"],
                     f"range {floor['range'][0]:,}..{floor['range'][1]:,}; broker + Kafka clients, no work"))
    elif "end_to_end_spans_per_s" in results:
        rows.append(("end_to_end_spans_per_s", results["end_to_end_spans_per_s"], ""))
    width = max([len(r[0]) for r in rows] + [8])
    lines = ["", f"{'measure':<{width}}  {'value':>12}  note"]
    lines += [f"{name:<{width}}  {value:>12,}  {note}" for name, value, note in rows]
    if "cpu_us_per_span" in e2e:
        cpu = e2e["cpu_us_per_span"]
        roles = [k for k in dict.fromkeys(k for c in cpu.values() for k in c) if k != "total"] + ["total"]
        columns = list(cpu)
        lines += ["", "CPU us per span (medians)", f"{'process':<34}" + "".join(f"{c:>17}" for c in columns)]
        for role in roles:
            lines.append(f"{role:<34}" + "".join(
                f"{cpu[c][role]:>17.2f}" if role in cpu[c] else f"{'-':>17}" for c in columns))
    return "\n".join(lines)
