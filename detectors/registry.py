"""The detectors agentwatch runs, by name. Explicit on purpose: no autodiscovery.

Each entry maps a detector's ``name`` to its class; constructor keyword arguments are its
config (``AGENTWATCH_DETECTORS__<name>__<arg>`` or the config file fills them in ``main()``).
"""

from __future__ import annotations

from typing import Any, Mapping

from agentwatch.detectors.base import Detector
from agentwatch.detectors.cost import BudgetDetector, CostAnomalyDetector, RetryStormDetector
from agentwatch.detectors.drift import DriftDetector
from agentwatch.detectors.loops import LoopDetector
from agentwatch.detectors.slo import SloDetector
from agentwatch.detectors.tools import HallucinatedToolDetector
from agentwatch.detectors.vram import VramLeakDetector

DETECTORS: dict[str, type] = {
    DriftDetector.name: DriftDetector,
    CostAnomalyDetector.name: CostAnomalyDetector,
    BudgetDetector.name: BudgetDetector,
    RetryStormDetector.name: RetryStormDetector,
    LoopDetector.name: LoopDetector,
    HallucinatedToolDetector.name: HallucinatedToolDetector,
    SloDetector.name: SloDetector,
    VramLeakDetector.name: VramLeakDetector,
}


def build_detectors(config: Mapping[str, Mapping[str, Any]] | None = None,
                    enabled: set[str] | None = None) -> list[Detector]:
    """Instantiate every registered detector (or those in ``enabled``) with its config."""
    config = config or {}
    return [cls(**dict(config.get(name, {}))) for name, cls in DETECTORS.items()
            if enabled is None or name in enabled]
