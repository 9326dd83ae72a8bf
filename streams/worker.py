"""One worker process: metrics endpoint, the dataflow core, and the Faust runtime around it."""

from __future__ import annotations

import gc
import logging
import sys
from pathlib import Path
from typing import Any

from agentwatch.settings import Settings


def build_dataflow(settings: Settings, *, metrics: Any = None, alert_record: Any = None) -> Any:
    """The core as a worker runs it: every registered detector, partition checkpoints under the
    data directory (unless ``detector_checkpoint_s`` is 0), the map stage in this process for
    logs (spans go through the normaliser process unless ``normalize_in_process``)."""
    from types import SimpleNamespace

    from agentwatch.broker import DEFAULT_TOPICS
    from agentwatch.detectors.registry import build_detectors
    from agentwatch.streams.dataflow import Dataflow
    from agentwatch.streams.drift_sampler import DriftSampler, SamplerCounters
    from agentwatch.streams.mapping import MappingRules
    from agentwatch.streams.normalize import Normalizer
    from agentwatch.streams.pii import Redactor
    from agentwatch.streams.partition_checkpoint import PartitionCheckpointStore
    from agentwatch.streams.pipeline import SpanPipeline
    from agentwatch.streams.pricing import PricingTable

    partitions = dict(DEFAULT_TOPICS)
    redactor = Redactor(settings.pii_policy())
    mapping = MappingRules.load(settings.mapping_path) if settings.mapping_path else None
    mapper = SpanPipeline(Normalizer(PricingTable.load(settings.pricing_path), max_text_chars=settings.max_text_chars,
                                     value_bounds=settings.value_bounds, redactor=redactor, mapping=mapping),
                          partitions)
    counters = SamplerCounters()  # one set of drift-sampling counters for every partition's sampler

    def drift_sampler() -> DriftSampler:
        sampler = DriftSampler(key_fields=tuple(settings.drift_key_fields), window_s=settings.drift_window_s,
                               sample_size=settings.drift_sample_size)
        sampler.counters = counters
        return sampler

    if alert_record is not None and settings.grafana_url:
        # Every alert record carries a deep link into the Grafana dashboard of its detector.
        from functools import partial

        from agentwatch.dashboards.grafana import dashboard_index

        dashboard_index()  # build the panel index now, not on the loop at the first finding
        alert_record = partial(alert_record, grafana_url=settings.grafana_url)
    checkpoints = PartitionCheckpointStore(settings.data_dir, settings.app_id) \
        if settings.detector_checkpoint_s > 0 else None
    # Detector state is split over the partitions of its stage: each instance gets its share of
    # the caps (build_detectors' ``partitions``).
    shares = max(partitions["usage"], partitions["llm_calls"])
    dataflow = Dataflow(partitions=partitions,
                        build_detectors=lambda: build_detectors(settings.detectors, partitions=shares),
                        drift_key_fields=settings.drift_key_fields, mapper=mapper, checkpoints=checkpoints,
                        drift_sampler=drift_sampler, alert_record=alert_record, metrics=metrics,
                        value_bounds=settings.value_bounds, max_message_bytes=settings.max_message_bytes,
                        log_epoch=settings.log_epoch, redactor=redactor, dedup_spans=settings.dedup_spans,
                        dedup_window_s=settings.dedup_window_s)
    dataflow.sampler_counters = SimpleNamespace(counters=counters)  # what the metrics collector reads
    return dataflow


def run_worker(settings: Settings, *, worker_index: int = 0, metrics_port: int = 0,
               ready_file: Path | None = None, loglevel: str = "warning") -> None:
    import signal
    import threading

    # From the first instant: the supervisor may ask a worker that is still starting to drain.
    drain_requested = threading.Event()
    signal.signal(signal.SIGUSR1, lambda *_: drain_requested.set())

    import faust
    from prometheus_client import CollectorRegistry

    from agentwatch.alerts.model import alert_record_from_finding
    from agentwatch.dashboards.metrics import PipelineMetrics, WorkerStateCollector, serve_metrics
    from agentwatch.streams.app import create_app
    from agentwatch.streams.drift_stage import DriftStage

    # Detector state is many small long-lived objects: the default GC thresholds rescan them
    # constantly (measured: ~30% of detector throughput). Freeze start-up objects, collect less often.
    gc.freeze()
    gc.set_threshold(10_000, 20, 100)
    # The threads that move records to and from the worker's child processes (the process
    # pools' queue feeders and result readers) need the GIL for every hand-over; at the default
    # 5 ms a busy event loop delays each by up to that (measured, bench records, pipelined map
    # stage: the normaliser idle 6.3 s of a 23-s run at 5 ms, 2.6 s of 16 s at 0.5 ms).
    sys.setswitchinterval(0.0005)
    registry = CollectorRegistry()
    metrics = PipelineMetrics(registry)
    if metrics_port:
        serve_metrics(registry, metrics_port, settings.metrics_addr)
    dataflow = build_dataflow(settings, metrics=metrics, alert_record=alert_record_from_finding)
    drift = DriftStage(settings, dataflow) if dataflow.topology.drift_field else None
    registry.register(WorkerStateCollector(sampler=dataflow.sampler_counters if drift else None,
                                           embedder=drift.embedder if drift else None,
                                           checkpoint=dataflow.checkpoints, dataflow_counts=dataflow.counts))
    app = create_app(settings, dataflow, worker_index=worker_index, ready_file=ready_file, drift=drift,
                     drain_requested=drain_requested)
    logging.getLogger("faust").setLevel(loglevel.upper())
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    worker.execute_from_commandline()
