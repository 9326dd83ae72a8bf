"""The transport floor: what the broker and the Kafka clients alone allow, at the benchmark's sizes.

A Faust worker with the real worker's client settings forwards every ``otlp_spans`` record,
bytes unchanged, to ``llm_calls`` and consumes ``llm_calls`` again: the two hops the real worker
makes (normalise, then detect and snapshot), with no work in either. A separate consumer reads
``llm_calls`` as the end-to-end benchmark does. Spans per second through this path are the
ceiling for any pipeline of this shape on this machine; the end-to-end figure is read against it.

Run by ``agentwatch bench``; ``python -m bench.transport_floor`` (from the checkout root) is the
worker it starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from agentwatch.broker import DEFAULT_TOPICS

FORWARD_PARTITIONS = DEFAULT_TOPICS["llm_calls"]


def run_forwarder() -> None:
    """The forwarding worker (foreground); the broker comes from AGENTWATCH_BOOTSTRAP_SERVERS."""
    import faust

    from agentwatch.settings import Settings
    from agentwatch.streams.app import faust_app, raw_topic

    app = faust_app(Settings(), app_id="agentwatch-bench-floor")
    forwarded = raw_topic(app, "llm_calls")

    @app.agent(raw_topic(app, "otlp_spans"), name="floor.forward")
    async def forward(stream: Any) -> None:
        sent = 0
        async for events in stream.take_events(16, within=0.005):  # the real worker's grouping
            for event in events:
                sent += 1
                await forwarded.send(value=event.value, partition=sent % FORWARD_PARTITIONS)

    @app.agent(forwarded, name="floor.consume")
    async def consume(stream: Any) -> None:
        async for _event in stream.events():
            pass

    faust.Worker(app, loglevel="warning", quiet=True).execute_from_commandline()


def bench_transport_floor(records: list[bytes], spans_per_record: int, timeout_s: float = 300,
                          warmup: list[bytes] | None = None) -> dict[str, Any]:
    """Spans/s of ``records`` through broker -> forwarder (two hops) -> consumer, and CPU per span.

    ``warmup``: records passed through before the clock starts (default: the first 5 of ``records``).
    """
    import psutil

    from agentwatch.broker import EmbeddedBroker, create_topics, free_port
    from agentwatch.settings import Settings
    from agentwatch.stack import terminate_group
    from bench.runner import bench_clients

    with EmbeddedBroker(free_port()) as broker:
        create_topics(broker.bootstrap_servers, DEFAULT_TOPICS)
        # The forwarder is this module, so the checkout root (above bench/) goes on its path.
        checkout = str(Path(__file__).resolve().parents[1])
        pythonpath = os.pathsep.join(p for p in (checkout, os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "AGENTWATCH_BOOTSTRAP_SERVERS": broker.bootstrap_servers, "PYTHONPATH": pythonpath}
        # Its log goes to a file, not an unread pipe (a full pipe would stall the forwarder).
        log = tempfile.TemporaryFile()
        worker = subprocess.Popen([sys.executable, "-m", "bench.transport_floor"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        try:
            consumer, producer = bench_clients(broker.bootstrap_servers, ["llm_calls"], Settings().max_message_bytes)
            deadline = time.monotonic() + timeout_s

            def pass_through(batch: list[bytes]) -> None:
                for payload in batch:
                    producer.send("otlp_spans", payload)
                producer.flush()
                seen = 0
                while seen < len(batch):
                    if time.monotonic() > deadline or worker.poll() is not None:
                        log.seek(0)
                        tail = log.read().decode(errors="replace")[-2000:]
                        raise RuntimeError(f"transport floor: {seen} of {len(batch)} records came through "
                                           f"(forwarder {'exited' if worker.poll() is not None else 'running'}); "
                                           f"its log ends:\n{tail}")
                    seen += sum(len(b) for b in consumer.poll(timeout_ms=200, max_records=1000).values())

            pass_through(records[:5] if warmup is None else warmup)  # the group join and first fetches happen here
            processes = {"forwarder": psutil.Process(worker.pid), "broker": psutil.Process(broker.proc.pid),
                         "bench_client": psutil.Process()}
            cpu_before = {name: sum(p.cpu_times()[:2]) for name, p in processes.items()}
            started = time.perf_counter()
            pass_through(records)
            seconds = time.perf_counter() - started
            cpu = {name: sum(p.cpu_times()[:2]) - cpu_before[name] for name, p in processes.items()}
            consumer.close()
            producer.close()
        finally:
            terminate_group(worker, timeout_s=10)
            log.close()
    spans = len(records) * spans_per_record
    return {"spans_per_s": round(spans / seconds), "seconds": round(seconds, 3), "spans": spans,
            "cpu_us_per_span": {name: round(s / spans * 1e6, 1) for name, s in cpu.items()}}


if __name__ == "__main__":
    run_forwarder()
