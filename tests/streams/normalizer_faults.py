"""Work functions for the normaliser process that fail the way real children do (imported by name
in the spawned child, so they live in a module of their own)."""

from __future__ import annotations

import os
import time

from agentwatch.streams.pipeline import RecordOutcome


def die_on_poison(payload: bytes) -> RecordOutcome:
    """Kills its process on ``b"poison"`` (as a segfault or the OOM killer would). ``b"slow:PATH"``
    creates PATH once it holds the record, then takes a while, so a test can kill the process
    while the record is inside it."""
    if payload == b"poison":
        os._exit(139)
    if payload.startswith(b"slow:"):
        marker = payload[5:].decode()
        if not os.path.exists(marker):  # the first run only: the rerun finishes
            open(marker, "w").close()
            time.sleep(30)
    return RecordOutcome(spans=len(payload))
