"""Prometheus metrics of the notifier process, read from its counters at scrape time."""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from agentwatch.alerts.delivery import BreakerState


class NotifierCollector:
    """A prometheus_client ``Collector`` over a running :class:`NotifierService`.

    Counters live where the work happens (each destination's delivery thread, the consumer
    loop); this reads them per scrape instead of mirroring every increment.
    """

    def __init__(self, service: Any) -> None:
        self.service = service

    def collect(self) -> Iterator[Any]:
        deliveries = CounterMetricFamily("agentwatch_notifier_deliveries",
                                         "Notifications delivered, by destination.", labels=["destination"])
        failures = CounterMetricFamily("agentwatch_notifier_failures",
                                       "Failed delivery attempts (retried or permanent), by destination.",
                                       labels=["destination"])
        circuit_open = GaugeMetricFamily("agentwatch_notifier_circuit_open",
                                         "1 while a destination's circuit breaker is open.", labels=["destination"])
        for name, worker in sorted(self.service.workers.items()):
            stats = worker.stats
            deliveries.add_metric([name], stats.sent)
            failures.add_metric([name], stats.transient_failures + stats.failed_permanently)
            circuit_open.add_metric([name], 1.0 if worker.breaker.state is BreakerState.OPEN else 0.0)
        yield deliveries
        yield failures
        yield circuit_open
        yield CounterMetricFamily("agentwatch_notifier_alerts_consumed", "Alert records consumed.",
                                  value=self.service.stats.consumed)
        yield CounterMetricFamily("agentwatch_notifier_alerts_absorbed",
                                  "Alert records already routed (read again after a crash, or sent "
                                  "twice), absorbed before routing.",
                                  value=self.service.stats.duplicates)
        yield CounterMetricFamily("agentwatch_notifier_dead_lettered", "Malformed alert records dead-lettered.",
                                  value=self.service.stats.dead_lettered)
