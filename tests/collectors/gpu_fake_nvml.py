"""A fake ``pynvml`` module that replays recorded answers and records every call.

The recording below has the shape of what nvidia-ml-py 12/13 returns on a two-GPU host
(an A10G serving an inference process, one process whose usage NVML cannot report and one
it cannot name, and a T4 with no processes whose
power reading is not supported): memory in bytes, power in milliwatts, names as ``str`` (older
bindings return ``bytes``; :class:`FakeNvml` can return either).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any

NVML_TEMPERATURE_GPU = 0


class NVMLError(Exception):
    def __init__(self, value: int = 999, message: str = "Unknown Error") -> None:
        super().__init__(message)
        self.value = value


class NVMLError_LibraryNotFound(NVMLError):
    def __init__(self) -> None:
        super().__init__(12, "NVML Shared Library Not Found")


class NVMLError_NotSupported(NVMLError):
    def __init__(self) -> None:
        super().__init__(3, "Not Supported")


class NVMLError_NotFound(NVMLError):
    def __init__(self) -> None:
        super().__init__(6, "Not Found")


class NVMLError_GpuIsLost(NVMLError):
    def __init__(self) -> None:
        super().__init__(15, "GPU is lost")


ERRORS = {"LibraryNotFound": NVMLError_LibraryNotFound, "NotSupported": NVMLError_NotSupported,
          "NotFound": NVMLError_NotFound, "GpuIsLost": NVMLError_GpuIsLost}

GIB = 1 << 30
MIB = 1 << 20

# function -> answer; a dict answer is keyed by the first argument (device handle or pid); a
# list answer is replayed one element per call (the last repeats); {"raise": name} raises.
A10G_TWO_GPU_RECORDING: dict[str, Any] = {
    "nvmlInit": None,
    "nvmlShutdown": None,
    "nvmlDeviceGetCount": 2,
    "nvmlDeviceGetHandleByIndex": {0: "handle-0", 1: "handle-1"},
    "nvmlDeviceGetUUID": {"handle-0": "GPU-5d4c7a1e-9a3b-4a8e-bb51-2f0c2c7e3d10",
                          "handle-1": "GPU-0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b"},
    "nvmlDeviceGetName": {"handle-0": "NVIDIA A10G", "handle-1": "Tesla T4"},
    "nvmlDeviceGetMemoryInfo": {
        "handle-0": [
            {"total": 24146608128, "free": 9468641280, "used": 14677966848},
            {"total": 24146608128, "free": 9280946176, "used": 14865661952},
            {"total": 24146608128, "free": 9093251072, "used": 15053357056},
        ],
        "handle-1": {"total": 16106127360, "free": 15642263552, "used": 463863808},
    },
    "nvmlDeviceGetUtilizationRates": {"handle-0": {"gpu": 87, "memory": 41},
                                      "handle-1": {"gpu": 0, "memory": 0}},
    "nvmlDeviceGetTemperature": {"handle-0": 63, "handle-1": 31},
    "nvmlDeviceGetPowerUsage": {"handle-0": 241562, "handle-1": {"raise": "NotSupported"}},
    "nvmlDeviceGetComputeRunningProcesses": {
        "handle-0": [
            [{"pid": 31337, "usedGpuMemory": 13958643712},
             {"pid": 4711, "usedGpuMemory": None},
             {"pid": 5150, "usedGpuMemory": 268435456}],
            [{"pid": 31337, "usedGpuMemory": 14146338816},
             {"pid": 4711, "usedGpuMemory": None},
             {"pid": 5150, "usedGpuMemory": 268435456}],
            [{"pid": 31337, "usedGpuMemory": 14334033920},
             {"pid": 4711, "usedGpuMemory": None}],
        ],
        "handle-1": [],
    },
    # 5150 runs in another PID namespace: NVML cannot name it.
    "nvmlSystemGetProcessName": {31337: "/usr/bin/python3.11", 5150: {"raise": "NotFound"}},
}


_NAME_FUNCTIONS = ("nvmlDeviceGetName", "nvmlDeviceGetUUID", "nvmlSystemGetProcessName")


def _as_obj(value: Any) -> Any:
    if isinstance(value, dict):
        return SimpleNamespace(**value)
    if isinstance(value, list):
        return [_as_obj(v) for v in value]
    return value


class FakeNvml:
    """Replays ``recording``; ``calls`` lists ``(function, args)`` in call order."""

    NVML_TEMPERATURE_GPU = NVML_TEMPERATURE_GPU
    NVMLError = NVMLError
    NVMLError_LibraryNotFound = NVMLError_LibraryNotFound
    NVMLError_NotSupported = NVMLError_NotSupported
    NVMLError_NotFound = NVMLError_NotFound

    def __init__(self, recording: dict[str, Any] | None = None, *,
                 names_as_bytes: bool = False) -> None:
        self.recording = copy.deepcopy(A10G_TWO_GPU_RECORDING if recording is None else recording)
        self.names_as_bytes = names_as_bytes
        self.calls: list[tuple[str, tuple]] = []
        self._replayed: dict[tuple[str, Any], int] = {}

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("nvml"):
            raise AttributeError(name)
        if name not in self.recording:
            def missing(*args: Any) -> Any:
                self.calls.append((name, args))
                raise AssertionError(f"{name} not in the recording")
            return missing

        def replay(*args: Any) -> Any:
            self.calls.append((name, args))
            answer = self.recording[name]
            key: Any = name
            if isinstance(answer, dict) and "raise" not in answer and args and \
                    args[0] in answer:
                key = (name, args[0])
                answer = answer[args[0]]
            per_call = name != "nvmlDeviceGetComputeRunningProcesses"  # its answer is a list
            if isinstance(answer, list) and answer and per_call:
                n = self._replayed.get(key, 0)
                self._replayed[key] = n + 1
                answer = answer[min(n, len(answer) - 1)]
            elif (name == "nvmlDeviceGetComputeRunningProcesses" and answer
                  and isinstance(answer[0], list)):
                n = self._replayed.get(key, 0)
                self._replayed[key] = n + 1
                answer = answer[min(n, len(answer) - 1)]
            if isinstance(answer, dict) and "raise" in answer:
                raise ERRORS[answer["raise"]]()
            if self.names_as_bytes and isinstance(answer, str) and name in _NAME_FUNCTIONS:
                return answer.encode()
            return _as_obj(answer)

        return replay

    def called(self, name: str) -> list[tuple]:
        return [args for fn, args in self.calls if fn == name]


def library_missing() -> FakeNvml:
    """What nvidia-ml-py does on a host without the driver: nvmlInit raises LibraryNotFound."""
    return FakeNvml({"nvmlInit": {"raise": "LibraryNotFound"}, "nvmlShutdown": None})
