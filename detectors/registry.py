"""The detectors agentwatch runs, by name. Explicit on purpose: no autodiscovery.

Each entry maps a detector's ``name`` to its class; constructor keyword arguments are its
config (``AGENTWATCH_DETECTORS__<name>__<arg>`` or the config file fills them in ``main()``).
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Mapping

from agentwatch.detectors.base import Detector
from agentwatch.detectors.cost import BudgetDetector, CostAnomalyDetector, RetryStormDetector
from agentwatch.detectors.drift import DriftDetector
from agentwatch.detectors.evaluations import EvaluationDropDetector
from agentwatch.detectors.loops import LoopDetector
from agentwatch.detectors.pii import PiiExposureDetector
from agentwatch.detectors.prompts import PromptVersionRegressionDetector
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
    PiiExposureDetector.name: PiiExposureDetector,
    EvaluationDropDetector.name: EvaluationDropDetector,
    PromptVersionRegressionDetector.name: PromptVersionRegressionDetector,
}


def build_detectors(config: Mapping[str, Mapping[str, Any]] | None = None,
                    enabled: set[str] | None = None, *, partitions: int = 1) -> list[Detector]:
    """Instantiate every registered detector (or those in ``enabled``) with its config.

    ``partitions``: how many partitions one detector's state is split over (the stream builds one
    instance per partition). The parameters a detector names in ``state_caps`` bound its state
    for the whole group; each instance gets twice the even share (so a partition that hashes
    more keys than average still fits), and a worker holding every partition holds at most
    twice the configured cap.
    """
    config = config or {}
    return [cls(**_partition_share(cls, dict(config.get(name, {})), partitions)) for name, cls in DETECTORS.items()
            if enabled is None or name in enabled]


def _partition_share(cls: type, kwargs: dict[str, Any], partitions: int) -> dict[str, Any]:
    if partitions <= 1:
        return kwargs
    defaults = inspect.signature(cls).parameters
    for cap in getattr(cls, "state_caps", ()):
        whole = kwargs.get(cap, defaults[cap].default)
        kwargs[cap] = max(1, math.ceil(2 * whole / partitions))
    return kwargs
