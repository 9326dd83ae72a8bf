"""What every registered detector provides so the one contract suite can exercise it.

``tests/detectors/test_contract.py`` runs over every class in
:data:`agentwatch.detectors.registry.DETECTORS`. Each class supplies its own sample streams:

.. code-block:: python

    class MyDetector:
        name: ClassVar[str] = "my_detector"
        accepts: ClassVar[tuple[type, ...]] = (LlmCall,)

        @classmethod
        def contract_stream(cls, seed: int) -> ContractStream: ...

        def state_size(self) -> int: ...   # entries currently held (keys, traces, ...)

A registered detector without ``contract_stream`` or ``state_size`` fails the suite on purpose:
nobody forgets to give a new detector the contract checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence


@dataclass(frozen=True)
class ContractStream:
    """Seeded sample streams for the detector contract.

    Attributes
    ----------
    params : Mapping[str, Any]
        Constructor keyword arguments (small caps, so the bounded-state check is cheap).
    warmup : Sequence
        Events during which the detector must report nothing (history still being learned, or
        plain normal traffic for detectors without a warm-up).
    events : Sequence
        Events after the warm-up that make the detector report at least one finding; the
        snapshot/restore and determinism checks compare the findings they cause.
    flood : Sequence
        Events over many distinct keys/traces (far more than ``state_cap``), for the
        bounded-state check.
    state_cap : int
        ``state_size()`` must never exceed this while ``flood`` is fed.
    """

    params: Mapping[str, Any]
    warmup: Sequence[Any]
    events: Sequence[Any]
    flood: Sequence[Any]
    state_cap: int
    notes: Mapping[str, Any] = field(default_factory=dict)
