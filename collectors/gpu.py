"""GPU samplers: NVML through an injected ``pynvml`` module, or a dcgm-exporter endpoint.

Both sources have the shape ``sample(ts) -> list[GpuSample]`` and ``close()``: one row per device
(``pid == 0``) followed by one row per compute process on it (NVML only; DCGM exports no
per-process memory). Process rows carry the device's free and total memory so a reader can put
the process's usage against the card it lives on.

The NVML module is an argument (the real one is ``import pynvml`` from the ``nvidia-ml-py``
package), so tests pass a fake with recorded behaviour and nothing here needs a GPU to import.
"""

from __future__ import annotations

import math
import socket
import urllib.parse
import urllib.request
from collections import OrderedDict
from typing import Any, Protocol, Sequence

from agentwatch.events import GpuSample

MIB = 1 << 20

NVML_MISSING_HELP = (
    "NVML is not available: {reason}.\n"
    "The NVML exporter needs the NVIDIA driver's management library libnvidia-ml.so.1 "
    "(installed with the NVIDIA driver; in a container, run with the NVIDIA container toolkit, "
    "e.g. `--gpus all`) and a visible GPU.\n"
    "Alternatives:\n"
    "  agentwatch gpu-exporter --source dcgm --dcgm-url http://HOST:9400/metrics\n"
    "      scrape a dcgm-exporter (what Kubernetes GPU nodes usually run)\n"
    "  agentwatch gpu-exporter --source simulated   or   agentwatch demo --incident vram_leak\n"
    "      a simulated GPU (samples are labelled simulated) to try the pipeline without one"
)


class GpuSource(Protocol):
    def sample(self, ts: float) -> list[GpuSample]: ...

    def close(self) -> None: ...


class NvmlUnavailableError(RuntimeError):
    """NVML cannot be used here (no driver library, no GPU); the message names the alternatives."""

    def __init__(self, reason: str) -> None:
        super().__init__(NVML_MISSING_HELP.format(reason=reason))
        self.reason = reason


def _nvml_error(nvml: Any) -> type[BaseException]:
    return getattr(nvml, "NVMLError", Exception)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def nvml_available(nvml_module: Any) -> bool:
    """True when NVML initialises and reports at least one GPU (so ``up`` starts the exporter).

    Initialises and shuts NVML down again; never raises.
    """
    try:
        nvml_module.nvmlInit()
    except Exception:  # NVMLError_LibraryNotFound / DriverNotLoaded / OSError: not available
        return False
    try:
        return int(nvml_module.nvmlDeviceGetCount()) > 0
    except Exception:
        return False
    finally:
        try:
            nvml_module.nvmlShutdown()
        except Exception:
            pass


class NvmlSampler:
    """Samples every GPU through NVML: memory, utilisation, temperature, power, processes.

    Parameters
    ----------
    nvml : module
        ``pynvml`` (package ``nvidia-ml-py``) or a fake with the same functions.
    host : str, optional
        Host name on the samples; defaults to this machine's.
    max_process_names : int
        Process names are looked up once per pid and cached (bounded) because NVML's lookup
        reads /proc for every call.

    Raises
    ------
    NvmlUnavailableError
        When ``nvmlInit`` fails or no GPU is visible.
    """

    def __init__(self, nvml: Any, *, host: str | None = None,
                 max_process_names: int = 4096) -> None:
        self.nvml = nvml
        self.host = host or socket.gethostname()
        self.max_process_names = max_process_names
        self._names: OrderedDict[int, str] = OrderedDict()
        error = _nvml_error(nvml)
        try:
            nvml.nvmlInit()
        except error as exc:
            raise NvmlUnavailableError(f"nvmlInit failed ({type(exc).__name__}: {exc})") from exc
        except OSError as exc:
            raise NvmlUnavailableError(f"nvmlInit failed ({exc})") from exc
        try:
            count = int(nvml.nvmlDeviceGetCount())
            if count < 1:
                raise NvmlUnavailableError("NVML reports no GPU on this host")
            self.devices = []
            for index in range(count):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                self.devices.append((index, handle, _text(nvml.nvmlDeviceGetUUID(handle)),
                                     _text(nvml.nvmlDeviceGetName(handle))))
        except BaseException:
            nvml.nvmlShutdown()
            raise

    def _optional(self, fn: Any, *args: Any) -> Any:
        # Consumer cards and some drivers answer NotSupported for power or utilisation; a
        # missing reading must not cost the memory figures the leak detection needs.
        try:
            return fn(*args)
        except _nvml_error(self.nvml):
            return None

    def _process_name(self, pid: int) -> str:
        name = self._names.get(pid)
        if name is not None:
            self._names.move_to_end(pid)
            return name
        raw = self._optional(self.nvml.nvmlSystemGetProcessName, pid)
        name = _text(raw).rsplit("/", 1)[-1] if raw else ""
        self._names[pid] = name
        while len(self._names) > self.max_process_names:
            self._names.popitem(last=False)
        return name

    def sample(self, ts: float) -> list[GpuSample]:
        """One round over every device; a device whose memory cannot be read is skipped."""
        nvml = self.nvml
        rows: list[GpuSample] = []
        for index, handle, uuid, name in self.devices:
            memory = self._optional(nvml.nvmlDeviceGetMemoryInfo, handle)
            if memory is None:
                continue
            util = self._optional(nvml.nvmlDeviceGetUtilizationRates, handle)
            temp = self._optional(nvml.nvmlDeviceGetTemperature, handle,
                                  getattr(nvml, "NVML_TEMPERATURE_GPU", 0))
            power_mw = self._optional(nvml.nvmlDeviceGetPowerUsage, handle)
            common = dict(ts=ts, host=self.host, gpu=index, gpu_uuid=uuid, gpu_name=name,
                          memory_free_bytes=int(memory.free), memory_total_bytes=int(memory.total))
            rows.append(GpuSample(
                **common, pid=0, memory_used_bytes=int(memory.used),
                utilization_pct=float(util.gpu) if util is not None else None,
                temperature_c=float(temp) if temp is not None else None,
                power_w=power_mw / 1000.0 if power_mw is not None else None))
            procs = self._optional(nvml.nvmlDeviceGetComputeRunningProcesses, handle) or []
            for proc in procs:
                used = getattr(proc, "usedGpuMemory", None)
                if used is None:
                    # NVML_VALUE_NOT_AVAILABLE (WDDM, some containers): no figure to trend.
                    continue
                pid = int(proc.pid)
                rows.append(GpuSample(**common, pid=pid, process_name=self._process_name(pid),
                                      memory_used_bytes=int(used)))
        return rows

    def close(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except _nvml_error(self.nvml):
            pass


# dcgm-exporter field -> how it maps (framebuffer figures are MiB, power W, temperature C).
DCGM_FIELDS = ("DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE", "DCGM_FI_DEV_FB_RESERVED",
               "DCGM_FI_DEV_FB_TOTAL", "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_GPU_TEMP",
               "DCGM_FI_DEV_POWER_USAGE")


def parse_dcgm_metrics(text: str, *, ts: float, host: str | None = None,
                       default_host: str = "") -> list[GpuSample]:
    """Device rows from a dcgm-exporter Prometheus text exposition.

    ``host`` overrides the ``Hostname`` label (the node name dcgm-exporter reports), which
    overrides ``default_host``. MIG instances (series with a ``GPU_I_ID``) are skipped: a
    :class:`GpuSample` describes a whole device. Total memory is used + free + reserved (newer
    exporters export FB_RESERVED; FB_TOTAL wins when present).
    """
    from prometheus_client.parser import text_string_to_metric_families

    devices: dict[int, dict[str, Any]] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in DCGM_FIELDS:
            continue
        for sample in family.samples:
            labels = sample.labels
            if labels.get("GPU_I_ID"):
                continue
            try:
                gpu = int(labels.get("gpu", ""))
            except ValueError:
                continue
            value = float(sample.value)
            if math.isnan(value):
                continue
            dev = devices.setdefault(gpu, {"labels": labels})
            dev[family.name] = value
    rows = []
    for gpu in sorted(devices):
        dev = devices[gpu]
        if "DCGM_FI_DEV_FB_USED" not in dev:
            continue
        labels = dev["labels"]
        used = dev["DCGM_FI_DEV_FB_USED"]
        free = dev.get("DCGM_FI_DEV_FB_FREE", 0.0)
        total = dev.get("DCGM_FI_DEV_FB_TOTAL",
                        used + free + dev.get("DCGM_FI_DEV_FB_RESERVED", 0.0))
        rows.append(GpuSample(
            ts=ts, host=host or labels.get("Hostname") or default_host, gpu=gpu,
            gpu_uuid=labels.get("UUID", ""), gpu_name=labels.get("modelName", ""), pid=0,
            memory_used_bytes=int(used * MIB), memory_free_bytes=int(free * MIB),
            memory_total_bytes=int(total * MIB),
            utilization_pct=dev.get("DCGM_FI_DEV_GPU_UTIL"),
            temperature_c=dev.get("DCGM_FI_DEV_GPU_TEMP"),
            power_w=dev.get("DCGM_FI_DEV_POWER_USAGE")))
    return rows


class DcgmSource:
    """Scrapes a dcgm-exporter ``/metrics`` endpoint each round.

    Parameters
    ----------
    url : str
        e.g. ``http://gpu-node-1:9400/metrics``.
    host : str, optional
        Host on the samples; by default the exporter's ``Hostname`` label, else the URL's host.
    timeout_s : float
        HTTP timeout per scrape.
    """

    def __init__(self, url: str, *, host: str | None = None, timeout_s: float = 5.0) -> None:
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"--dcgm-url must be an http(s) URL, got {url!r}")
        self.url = url
        self.host = host
        self.timeout_s = timeout_s
        self.default_host = parsed.hostname

    def sample(self, ts: float) -> list[GpuSample]:
        request = urllib.request.Request(self.url, headers={"Accept": "text/plain"})
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            text = response.read().decode("utf-8", "replace")
        return parse_dcgm_metrics(text, ts=ts, host=self.host, default_host=self.default_host)

    def close(self) -> None:
        pass


__all__: Sequence[str] = ("GpuSource", "NvmlSampler", "NvmlUnavailableError", "DcgmSource",
                          "nvml_available", "parse_dcgm_metrics", "NVML_MISSING_HELP")
