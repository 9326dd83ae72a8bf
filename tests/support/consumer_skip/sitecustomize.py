"""Fault injection for a worker process: its Kafka consumer skips records, as a delivery gap in
the client would.

On a worker's ``PYTHONPATH`` this module is imported at interpreter start. With
``AGENTWATCH_FAULT_SKIP="otlp_spans@0,otlp_spans@3,llm_calls@2"`` aiokafka's fetcher drops, for
each item once, the first record of that topic it fetches at that offset or later (any
partition); Faust then never hands it to an agent and commits past it, as it does for any gap.
An item at offset 0 drops the first record of a partition after the assignment. Each drop is appended to the file
``AGENTWATCH_FAULT_SKIP_LOG`` names (``topic partition offset`` per line), so a test can tell
the fault happened.
"""

from __future__ import annotations

import os

_spec = os.environ.get("AGENTWATCH_FAULT_SKIP", "")
if _spec:
    import threading

    from aiokafka.consumer.fetcher import Fetcher

    _pending = [(topic, int(offset)) for topic, offset in (item.split("@") for item in _spec.split(","))]
    _log_path = os.environ["AGENTWATCH_FAULT_SKIP_LOG"]
    _lock = threading.Lock()
    _fetched_records = Fetcher.fetched_records

    async def fetched_records(self, *args, **kwargs):
        batches = await _fetched_records(self, *args, **kwargs)
        with _lock:
            for tp, records in batches.items():
                for item in [item for item in _pending if item[0] == tp.topic]:
                    victim = next((r for r in records if r.offset >= item[1]), None)
                    if victim is None:
                        continue
                    _pending.remove(item)
                    records.remove(victim)
                    with open(_log_path, "a") as log:
                        log.write(f"{tp.topic} {tp.partition} {victim.offset}\n")
        return batches

    Fetcher.fetched_records = fetched_records
