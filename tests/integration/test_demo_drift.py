"""`agentwatch demo --incident drift` end to end: real stack, real embeddings, a drift finding.

The demo's first service turns to out-of-scope queries half-way; its prompts are sampled per
10 s window, embedded under the default rate cap and checked against its previous windows.
"""

from __future__ import annotations

from collections import Counter

import pytest
from stack_helpers import stack_settings

from agentwatch.demo import run_demo
from agentwatch.streams.snapshots import connect
from agentwatch.traffic import SERVICES

pytestmark = pytest.mark.slow


def test_drift_incident_raises_drift_findings_on_the_drifting_service(tmp_path):
    settings = stack_settings(tmp_path / "data", gpu_exporter="off")
    summary = run_demo(settings, duration_s=60.0, incidents=["drift"], say=lambda _m: None)
    assert summary["incidents_injected"].get("drift", 0) > 0
    con = connect(settings.data_dir)
    try:
        keys = Counter(key for (key,) in con.execute(
            "SELECT key FROM findings WHERE detector = 'drift' AND NOT resolved").fetchall())
    finally:
        con.close()
    drifting = f"service={SERVICES[0].name}"
    assert keys[drifting] >= 1, keys
    # Unchanged services may see a rare false alarm, never more than the drifting one.
    assert all(count < keys[drifting] for key, count in keys.items() if key != drifting), keys
