"""One worker process: metrics endpoint, detectors, alert encoding, and the Faust app."""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

from agentwatch.settings import Settings


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
    from agentwatch.detectors.registry import build_detectors
    from agentwatch.detectors.runner import DetectorRunner
    from agentwatch.streams.app import DriftStage, create_app

    # Detector state is many small long-lived objects: the default GC thresholds rescan them
    # constantly (measured: ~30% of detector throughput). Freeze start-up objects, collect less often.
    gc.freeze()
    gc.set_threshold(10_000, 20, 100)
    registry = CollectorRegistry()
    metrics = PipelineMetrics(registry)
    if metrics_port:
        serve_metrics(registry, metrics_port, settings.metrics_addr)
    runner = DetectorRunner(build_detectors(settings.detectors))
    drift_detector = runner.detectors.get("drift")
    drift = DriftStage(settings, drift_detector) if drift_detector is not None else None
    checkpoint = _restored_checkpoint(settings, worker_index, runner, drift)
    registry.register(WorkerStateCollector(sampler=drift.sampler if drift else None,
                                           embedder=drift.embedder if drift else None,
                                           checkpoint=checkpoint))
    app, _ = create_app(settings, worker_index=worker_index, ready_file=ready_file, detect=runner.process, drift=drift,
                        metrics=metrics, alert_record=alert_record_from_finding, drain_requested=drain_requested)
    if checkpoint is not None:
        _save_checkpoints(app, checkpoint)
    logging.getLogger("faust").setLevel(loglevel.upper())
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    worker.execute_from_commandline()


def _restored_checkpoint(settings: Settings, worker_index: int, runner: Any, drift: Any) -> Any:
    """The worker's detector checkpoint, already restored into ``runner`` (None: disabled)."""
    from agentwatch.streams.checkpoint import DetectorCheckpoint, checkpoint_path

    every_s = settings.detector_checkpoint_s
    if every_s <= 0:  # 0 disables checkpoints: detectors start empty and nothing is saved
        return None
    checkpoint = DetectorCheckpoint(
        checkpoint_path(settings.data_dir, settings.app_id, worker_index), runner, every_s=every_s,
        worker_id=f"{settings.app_id}-w{worker_index}", fork_saves=settings.detector_checkpoint_fork,
        # The drift detector is updated in the embedding thread: snapshot it there.
        snapshot_executors={"drift": drift.executor} if drift is not None else None)
    checkpoint.restore()  # before the app starts: no event reaches a detector before its state
    return checkpoint


def _save_checkpoints(app: Any, checkpoint: Any) -> None:
    """Save on a timer and once more on clean shutdown.

    Both start on the event loop, which is also the thread that feeds the detectors, so the state
    saved is the state between two events. A timer save forks and lets the child snapshot and
    write while the loop goes on; the shutdown save runs in-process (nothing waits on the loop
    then, and it must not race the process's exit).
    """
    # Ticks shorter than the interval, so timer drift never skips a whole interval.
    @app.timer(min(checkpoint.every_s, 5.0), name="agentwatch.checkpoint_detectors")
    async def checkpoint_detectors() -> None:
        await checkpoint.maybe_save_async()

    # Faust sends this after the consumer stopped and the streams drained: the final state.
    @app.on_before_shutdown.connect
    async def checkpoint_on_shutdown(app: Any, **kwargs: Any) -> None:
        await checkpoint.maybe_save_async(force=True, background=False)
