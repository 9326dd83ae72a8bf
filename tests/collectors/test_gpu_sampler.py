"""NvmlSampler against a fake NVML replaying a recording; the missing-NVML path; nvml_available."""

from __future__ import annotations

import sys

import pytest
from click.testing import CliRunner

from agentwatch.collectors.gpu import NvmlSampler, NvmlUnavailableError, nvml_available
from agentwatch.collectors.gpu_exporter import EXIT_NVML_UNAVAILABLE, gpu_exporter
from agentwatch.events import GpuSample
from gpu_fake_nvml import FakeNvml, library_missing


def test_first_round_maps_every_nvml_reading():
    nvml = FakeNvml()
    sampler = NvmlSampler(nvml, host="gpu-node-1")
    rows = sampler.sample(1_700_000_000.0)

    common0 = dict(ts=1_700_000_000.0, host="gpu-node-1", gpu=0,
                   gpu_uuid="GPU-5d4c7a1e-9a3b-4a8e-bb51-2f0c2c7e3d10", gpu_name="NVIDIA A10G",
                   memory_free_bytes=9468641280, memory_total_bytes=24146608128)
    assert rows == [
        GpuSample(**common0, pid=0, memory_used_bytes=14677966848, utilization_pct=87.0,
                  temperature_c=63.0, power_w=241.562),
        # basename of the path NVML reports; pid 4711 (usage not available) has no row
        GpuSample(**common0, pid=31337, process_name="python3.11", memory_used_bytes=13958643712),
        # NVML could not name it (another PID namespace): the row stays, nameless
        GpuSample(**common0, pid=5150, process_name="", memory_used_bytes=268435456),
        # power NotSupported on the T4 -> None (not a reading of 0 W); memory figures intact,
        # an idle GPU's real 0% utilisation kept; no processes
        GpuSample(ts=1_700_000_000.0, host="gpu-node-1", gpu=1,
                  gpu_uuid="GPU-0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b", gpu_name="Tesla T4",
                  pid=0, memory_used_bytes=463863808, memory_free_bytes=15642263552,
                  memory_total_bytes=16106127360, utilization_pct=0.0, temperature_c=31.0,
                  power_w=None),
    ]
    # process rows carry no device readings of their own
    assert all(r.utilization_pct is None and r.temperature_c is None and r.power_w is None
               for r in rows if r.pid)
    assert not any(r.simulated for r in rows)


def test_rounds_replay_in_order_and_names_are_looked_up_once():
    nvml = FakeNvml(names_as_bytes=True)  # older bindings answer bytes
    sampler = NvmlSampler(nvml, host="h")
    rounds = [sampler.sample(float(t)) for t in (0, 5, 10)]
    device0_used = [r[0].memory_used_bytes for r in rounds]
    assert device0_used == [14677966848, 14865661952, 15053357056]
    proc_used = [[(s.pid, s.memory_used_bytes) for s in r if s.gpu == 0 and s.pid] for r in rounds]
    assert proc_used == [[(31337, 13958643712), (5150, 268435456)],
                         [(31337, 14146338816), (5150, 268435456)],
                         [(31337, 14334033920)]]
    assert rounds[0][0].gpu_name == "NVIDIA A10G" and rounds[0][1].process_name == "python3.11"
    # one lookup per pid, cached across rounds
    assert nvml.called("nvmlSystemGetProcessName") == [(31337,), (5150,)]
    # handles and identity resolved once at start, not every round
    assert nvml.called("nvmlDeviceGetHandleByIndex") == [(0,), (1,)]
    assert nvml.called("nvmlDeviceGetTemperature") == [("handle-0", 0), ("handle-1", 0)] * 3
    sampler.close()
    assert nvml.calls[-1] == ("nvmlShutdown", ())


def test_device_whose_memory_cannot_be_read_is_skipped_not_fatal():
    nvml = FakeNvml()
    nvml.recording["nvmlDeviceGetMemoryInfo"]["handle-0"] = [{"raise": "GpuIsLost"}]
    rows = NvmlSampler(nvml, host="h").sample(0.0)
    assert [(r.gpu, r.pid) for r in rows] == [(1, 0)]


def test_library_missing_raises_clear_error_naming_library_and_alternatives():
    nvml = library_missing()
    with pytest.raises(NvmlUnavailableError) as info:
        NvmlSampler(nvml)
    text = str(info.value)
    assert "libnvidia-ml.so" in text and "NVIDIA driver" in text
    assert "--source dcgm --dcgm-url" in text and "simulated" in text
    assert "NVMLError_LibraryNotFound" in text
    assert nvml.called("nvmlShutdown") == []  # never initialised, nothing to shut down


def test_no_gpu_is_unavailable_and_shuts_nvml_down():
    nvml = FakeNvml({"nvmlInit": None, "nvmlShutdown": None, "nvmlDeviceGetCount": 0})
    with pytest.raises(NvmlUnavailableError, match="no GPU"):
        NvmlSampler(nvml)
    assert nvml.called("nvmlShutdown") == [()]


def test_nvml_available():
    assert nvml_available(FakeNvml()) is True
    assert nvml_available(library_missing()) is False
    assert nvml_available(FakeNvml({"nvmlInit": None, "nvmlShutdown": None,
                                    "nvmlDeviceGetCount": 0})) is False
    nvml = FakeNvml()
    nvml_available(nvml)
    assert [fn for fn, _ in nvml.calls] == ["nvmlInit", "nvmlDeviceGetCount", "nvmlShutdown"]


def test_real_pynvml_on_this_host_is_reported_unavailable():
    """This machine has no GPU: the real nvidia-ml-py must lead to the clear message."""
    import pynvml

    if nvml_available(pynvml):
        pytest.skip("a GPU with NVML is present here")
    with pytest.raises(NvmlUnavailableError, match="libnvidia-ml.so"):
        NvmlSampler(pynvml)


def test_cli_without_nvml_exits_non_zero_with_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", library_missing())
    result = CliRunner().invoke(gpu_exporter, ["--once", "--bootstrap-servers", "127.0.0.1:1"])
    assert result.exit_code == EXIT_NVML_UNAVAILABLE != 0
    assert "libnvidia-ml.so" in result.output
    assert "--source dcgm" in result.output and "vram_leak" in result.output


def test_cli_dcgm_without_url_is_a_usage_error():
    result = CliRunner().invoke(gpu_exporter, ["--source", "dcgm", "--once"])
    assert result.exit_code == 2
    assert "--dcgm-url" in result.output
