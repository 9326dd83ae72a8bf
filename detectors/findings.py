"""Reading a finding's evidence back typed, by the detector that made it.

:attr:`~agentwatch.events.Finding.evidence` is a plain JSON-able mapping (it travels as JSON and
is stored as such); :func:`evidence_of` turns it back into the detector's evidence dataclass, so
consumers (dashboards, alerting) read fields, not guessed keys.
"""

from __future__ import annotations

from typing import TypeAlias

from agentwatch.detectors.cost import (BudgetDetector, BudgetEvidence, CostAnomalyDetector,
                                       CostSpikeEvidence, RetryStormDetector, RetryStormEvidence)
from agentwatch.detectors.drift import DriftDetector, DriftEvidence
from agentwatch.detectors.evaluations import EvaluationDropDetector, EvaluationDropEvidence
from agentwatch.detectors.evidence import Evidence
from agentwatch.detectors.loops import LoopDetector, LoopEvidence
from agentwatch.detectors.pii import PiiExposureDetector, PiiExposureEvidence
from agentwatch.detectors.prompts import PromptVersionEvidence, PromptVersionRegressionDetector
from agentwatch.detectors.slo import SloDetector, SloEvidence
from agentwatch.detectors.tools import HallucinatedToolDetector, ToolEvidence
from agentwatch.detectors.vram import (VramLeakDetector, VramLeakEvidence,
                                       VramLeakResolvedEvidence)
from agentwatch.events import Finding

AnyEvidence: TypeAlias = (CostSpikeEvidence | BudgetEvidence | RetryStormEvidence | LoopEvidence
                          | ToolEvidence | SloEvidence | VramLeakEvidence
                          | VramLeakResolvedEvidence | DriftEvidence | PiiExposureEvidence
                          | EvaluationDropEvidence | PromptVersionEvidence)

# Detector name -> (evidence of its findings, evidence of its resolutions).
EVIDENCE_TYPES: dict[str, tuple[type[Evidence], type[Evidence]]] = {
    CostAnomalyDetector.name: (CostSpikeEvidence, CostSpikeEvidence),
    BudgetDetector.name: (BudgetEvidence, BudgetEvidence),
    RetryStormDetector.name: (RetryStormEvidence, RetryStormEvidence),
    LoopDetector.name: (LoopEvidence, LoopEvidence),
    HallucinatedToolDetector.name: (ToolEvidence, ToolEvidence),
    SloDetector.name: (SloEvidence, SloEvidence),
    VramLeakDetector.name: (VramLeakEvidence, VramLeakResolvedEvidence),
    DriftDetector.name: (DriftEvidence, DriftEvidence),
    PiiExposureDetector.name: (PiiExposureEvidence, PiiExposureEvidence),
    EvaluationDropDetector.name: (EvaluationDropEvidence, EvaluationDropEvidence),
    PromptVersionRegressionDetector.name: (PromptVersionEvidence, PromptVersionEvidence),
}


def evidence_of(finding: Finding) -> AnyEvidence | None:
    """The typed evidence of ``finding``; ``None`` for a detector without an evidence type or
    evidence that lacks its type's required fields (written by another version).

    Examples
    --------
    >>> from agentwatch.events import Severity
    >>> ev = SloEvidence(service="shop", model="gpt-4o", window_s=300.0, calls=40, errors=12,
    ...                  slow_calls=0, error_rate=0.3, slow_fraction=0.0, calls_without_latency=0)
    >>> finding = Finding(detector="slo", key="service=shop/model=gpt-4o", kind="error_rate",
    ...                   severity=Severity.CRITICAL, ts=1.0, value=0.3, threshold=0.05,
    ...                   evidence=ev.to_mapping())
    >>> evidence_of(finding) == ev
    True
    """
    types = EVIDENCE_TYPES.get(finding.detector)
    if types is None:
        return None
    try:
        return types[bool(finding.resolved)].from_mapping(finding.evidence or {})
    except TypeError:  # a required field missing
        return None
