"""The normaliser in a child process: otlp_spans records decoded and mapped on the other core,
surviving the child's death (see :class:`NormalizerProcess`)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from agentwatch.settings import Settings
from agentwatch.streams.normalize import Normalizer
from agentwatch.streams.pipeline import RecordOutcome, SpanPipeline
from agentwatch.streams.pricing import PricingTable

log = logging.getLogger(__name__)

_CHILD_PIPELINE: SpanPipeline | None = None


def _child_init(pricing_path: str | None, max_text_chars: int, partitions: dict[str, int],
                value_bounds: Any = None, pii_policy: Any = None, mapping_path: str | None = None) -> None:
    global _CHILD_PIPELINE
    from agentwatch.stack import _die_with_parent

    import signal

    # The stop signal reaches the worker's whole process group. The normaliser must outlive it
    # until the worker has drained its records (a dead child mid-stop would be restarted and the
    # record charged with its death); it goes when the worker goes, by the parent-death signal.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(signal.SIGKILL)  # a worker killed with SIGKILL takes its normaliser with it
    import gc

    # Each record allocates thousands of short-lived dicts; the default thresholds run a young
    # collection every 700 of them and promote the memos and parent memory into older ones.
    gc.freeze()
    gc.set_threshold(10_000, 20, 100)
    pricing = PricingTable.load(pricing_path)
    from agentwatch.streams.pii import Redactor

    redactor = Redactor(pii_policy) if pii_policy is not None else None
    from agentwatch.streams.mapping import MappingRules

    mapping = MappingRules.load(mapping_path) if mapping_path else None
    _CHILD_PIPELINE = SpanPipeline(Normalizer(pricing, max_text_chars=max_text_chars, value_bounds=value_bounds,
                                              redactor=redactor, mapping=mapping), partitions)


def _child_on_traces(payload: bytes) -> RecordOutcome:
    return _without_batch(_CHILD_PIPELINE.on_traces(payload))


def _without_batch(outcome: RecordOutcome) -> RecordOutcome:
    """The outcome the agent uses; the typed batch stays behind (it would cost a pickle)."""
    return RecordOutcome(outputs=outcome.outputs, dead_letter_reason=outcome.dead_letter_reason,
                         spans=outcome.spans, rejections=outcome.rejections, pii_rows=outcome.pii_rows,
                         coverage_rows=outcome.coverage_rows,
                         evaluation_rows=outcome.evaluation_rows)


class NormalizerDied(RuntimeError):
    """The normaliser process died on a record even when it ran alone: the record is the suspect."""


class NormalizerProcess:
    """otlp_spans records normalised in a child process, surviving the child's death.

    Decoding and mapping are pure CPU work; in a second process they run on the other core
    while the worker does Kafka I/O, detectors and snapshots. One process only, so its memory of
    parent spans sees every record of this worker, in order.

    When the child dies (the OOM killer, a crash) the records it held were not acknowledged and
    are not at fault: a new child is started and they run again, one at a time, so a record that
    kills a child while running alone is known to be the cause. After ``max_deaths_alone`` such
    deaths it raises :class:`NormalizerDied` and the caller dead-letters that record. A child
    that cannot even start raises, and the worker fails for its supervisor to see.
    """

    def __init__(self, settings: Settings, partitions: dict[str, int], *, max_deaths_alone: int = 2,
                 on_restart: Callable[[str], None] | None = None,
                 work: Callable[[bytes], RecordOutcome] | None = None) -> None:
        self.initargs = (str(settings.pricing_path) if settings.pricing_path else None, settings.max_text_chars,
                         dict(partitions), settings.value_bounds, settings.pii_policy(),
                         str(settings.mapping_path) if settings.mapping_path else None)
        self.max_deaths_alone = max_deaths_alone
        self.on_restart = on_restart
        self.work = work or _child_on_traces  # a module-level function: the child imports it by name
        self.restarts = 0
        self._pool = self._start()
        self._alone = asyncio.Lock()

    def _start(self) -> Any:
        pool, started = self._spawn()
        started.result()
        return pool

    def _spawn(self) -> tuple[Any, Any]:
        """A new pool, its process started now (not on the first record), and the future of its
        warm-up. Call it from the thread that lives as long as the worker: the child's
        parent-death signal follows the thread that started it, not the process."""
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),  # no fork of a threaded process
                                   initializer=_child_init, initargs=self.initargs)
        return pool, pool.submit(int)

    def child_pid(self) -> int | None:
        processes = getattr(self._pool, "_processes", None) or {}
        return next(iter(processes), None)

    async def __call__(self, payload: bytes) -> RecordOutcome:
        from concurrent.futures.process import BrokenProcessPool

        pool = self._pool
        try:
            return await asyncio.wrap_future(pool.submit(self.work, payload))
        except BrokenProcessPool as exc:  # died while it held this record and others
            death = str(exc)
        deaths_alone = 0
        async with self._alone:
            while True:
                pool = await self._replace(pool, death)
                try:
                    future = pool.submit(self.work, payload)
                except BrokenProcessPool as exc:  # broken by another record before this one got in
                    death = str(exc)
                    continue
                try:
                    return await asyncio.wrap_future(future)
                except BrokenProcessPool as exc:
                    death = str(exc)
                    deaths_alone += 1
                    if deaths_alone >= self.max_deaths_alone:
                        # A working process for the next record before the lock is let go: the
                        # pool notices its death asynchronously, and a record handed to it now
                        # would be charged with a death it did not cause.
                        await self._replace(pool, death)
                        raise NormalizerDied(f"the normaliser process died {deaths_alone} times while it held "
                                             f"only this record ({death})") from None

    async def _replace(self, broken: Any, reason: str) -> Any:
        """The live pool: the one another record already started, or a new one."""
        if self._pool is broken:
            broken.shutdown(wait=False, cancel_futures=True)
            self._pool, started = self._spawn()
            await asyncio.wrap_future(started)  # the child initialises while the loop goes on
            self.restarts += 1
            log.warning("normaliser process died (%s); restarted it (restart %d)", reason, self.restarts)
            if self.on_restart is not None:
                self.on_restart(reason)
        return self._pool

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
