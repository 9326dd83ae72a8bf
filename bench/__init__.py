"""Benchmarks and evaluations of agentwatch, run from a source checkout (never in the wheel).

``agentwatch bench`` (:mod:`bench.runner`) and ``agentwatch drift evaluate``
(:mod:`bench.drift_quality`) import this package from the checkout; figures go to files here
(``bench/results.json``, ``bench/drift_quality.json``). Test receivers and synthetic streams
come from ``tests/support``, also present in a checkout.
"""
