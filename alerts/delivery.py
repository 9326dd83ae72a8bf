"""Delivery from the outbox: one worker per destination, tenacity backoff, a circuit breaker.

Each destination's rows go out strictly in outbox order (a resolve never overtakes its
trigger), and a destination that is down holds only its own queue. A transient failure is
retried with exponential backoff and jitter (tenacity); after ``failure_threshold``
consecutive failures the breaker opens and the worker stops calling the endpoint until
``reset_timeout_s`` has passed, then lets one trial call through (half-open). The row stays
``pending`` in SQLite the whole time, so a restart picks it up where the worker left it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Callable

from tenacity import (RetryCallState, Retrying, retry_if_exception_type, wait_exponential_jitter)

from agentwatch.alerts.notifiers import (Notifier, PermanentDeliveryError,
                                         TransientDeliveryError)
from agentwatch.alerts.outbox import NotifierStore, OutboxRow

log = logging.getLogger(__name__)


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitOpenError(TransientDeliveryError):
    def __init__(self, destination: str, retry_at: float) -> None:
        super().__init__(f"circuit open for {destination}")
        self.retry_at = retry_at


class CircuitBreaker:
    """Consecutive-failure breaker with an explicit clock (``now`` from the caller).

    Examples
    --------
    >>> b = CircuitBreaker(failure_threshold=2, reset_timeout_s=10)
    >>> b.record_failure(0.0); b.record_failure(1.0); b.state
    <BreakerState.OPEN: 'open'>
    >>> b.allow(5.0), b.allow(11.0), b.state
    (False, True, <BreakerState.HALF_OPEN: 'half_open'>)
    """

    def __init__(self, *, failure_threshold: int = 5, reset_timeout_s: float = 5.0) -> None:
        if failure_threshold <= 0:
            raise ValueError("failure_threshold must be positive")
        if reset_timeout_s <= 0:
            raise ValueError("reset_timeout_s must be positive")
        self.failure_threshold = failure_threshold
        self.reset_timeout_s = reset_timeout_s
        self.state = BreakerState.CLOSED
        self.consecutive_failures = 0
        self.opened_at: float | None = None
        self.times_opened = 0

    @property
    def retry_at(self) -> float:
        return (self.opened_at or 0.0) + self.reset_timeout_s

    def allow(self, now: float) -> bool:
        if self.state is BreakerState.OPEN:
            if now < self.retry_at:
                return False
            self.state = BreakerState.HALF_OPEN  # one trial call
        return True

    def record_success(self) -> None:
        self.state = BreakerState.CLOSED
        self.consecutive_failures = 0
        self.opened_at = None

    def record_failure(self, now: float) -> None:
        self.consecutive_failures += 1
        if self.state is BreakerState.HALF_OPEN or (
                self.state is BreakerState.CLOSED
                and self.consecutive_failures >= self.failure_threshold):
            self.state = BreakerState.OPEN
            self.opened_at = now
            self.times_opened += 1


@dataclass
class DeliveryStats:
    sent: int = 0
    failed_permanently: int = 0
    transient_failures: int = 0
    circuit_rejections: int = 0
    # Wall time each row became deliverable -> sent (seconds), bounded for the bench.
    last_latencies: list[float] = field(default_factory=list)


class DeliveryWorker(threading.Thread):
    """Delivers one destination's outbox rows in order until ``stop_event`` is set."""

    def __init__(self, destination: str, notifier: Notifier, store: NotifierStore, *,
                 stop_event: threading.Event, breaker: CircuitBreaker,
                 initial_backoff_s: float = 0.2, max_backoff_s: float = 5.0,
                 clock: Callable[[], float] = time.time,
                 on_sent: Callable[[OutboxRow], None] | None = None) -> None:
        super().__init__(name=f"deliver-{destination}", daemon=True)
        self.destination = destination
        self.notifier = notifier
        self.store = store
        self.stop_event = stop_event
        self.breaker = breaker
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s
        self.clock = clock
        self.on_sent = on_sent
        self.wakeup = threading.Event()
        self.stats = DeliveryStats()
        self._exponential = wait_exponential_jitter(initial=initial_backoff_s, max=max_backoff_s,
                                                    jitter=initial_backoff_s)

    def notify(self) -> None:
        """New rows are in the outbox: wake up now instead of at the next idle check."""
        self.wakeup.set()

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                self.wakeup.clear()
                row = self.store.next_pending(self.destination)
                if row is None:
                    # The consumer calls notify() after each commit; the timeout only covers a
                    # row written by another process (none today) and shutdown.
                    self.wakeup.wait(0.5)
                    continue
                self.deliver(row)
        except Exception:  # pragma: no cover - a bug here must be loud, the row stays pending
            log.exception("delivery worker for %s crashed", self.destination)
            raise
        finally:
            self.notifier.close()

    # -- one row, retried until sent, failed permanently, or shutdown

    def _backoff_wait(self, state: RetryCallState) -> float:
        delay = self._exponential(state)
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, CircuitOpenError):
            delay = max(0.0, exc.retry_at - self.clock())
        elif isinstance(exc, TransientDeliveryError) and exc.retry_after_s is not None:
            delay = max(delay, min(exc.retry_after_s, 60.0))
        return delay

    def _should_stop(self, state: RetryCallState) -> bool:
        return self.stop_event.is_set()

    def _backoff_sleep(self, seconds: float) -> None:
        self.stop_event.wait(seconds)  # interruptible: shutdown does not wait out a backoff

    def _attempt(self, row: OutboxRow) -> None:
        now = self.clock()
        if not self.breaker.allow(now):
            self.stats.circuit_rejections += 1
            raise CircuitOpenError(self.destination, self.breaker.retry_at)
        try:
            self.notifier.send(row.notification)
        except TransientDeliveryError as exc:
            self.breaker.record_failure(self.clock())
            self.stats.transient_failures += 1
            self.store.record_attempt_failure(row.id, str(exc))
            log.warning("delivery to %s failed (attempt %d, breaker %s): %s", self.destination,
                        row.attempts + 1, self.breaker.state, exc)
            raise
        self.breaker.record_success()

    def deliver(self, row: OutboxRow) -> bool:
        """True when sent or permanently failed (move on); False on shutdown (row stays)."""
        retrying = Retrying(retry=retry_if_exception_type(TransientDeliveryError),
                            wait=self._backoff_wait, stop=self._should_stop,
                            sleep=self._backoff_sleep, reraise=True)
        try:
            retrying(self._attempt, row)
        except PermanentDeliveryError as exc:
            self.breaker.record_success()  # the endpoint answered; it just refused this row
            self.stats.failed_permanently += 1
            self.store.mark_failed(row.id, str(exc), self.clock())
            log.error("delivery to %s failed permanently, row %s kept as failed: %s",
                      self.destination, row.id, exc)
            return True
        except TransientDeliveryError:
            return False  # stopped while retrying
        now = self.clock()
        self.store.mark_sent(row.id, now)
        self.stats.sent += 1
        latencies = self.stats.last_latencies
        latencies.append(now - row.created_at)
        if len(latencies) > 10_000:
            del latencies[: len(latencies) - 10_000]
        if self.on_sent is not None:
            self.on_sent(row)
        return True
