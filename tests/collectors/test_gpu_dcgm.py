"""DcgmSource scraping a local HTTP server that serves a dcgm-exporter text exposition."""

from __future__ import annotations

import http.server
import threading
import urllib.error

import pytest

from agentwatch.collectors.gpu import DcgmSource, parse_dcgm_metrics
from agentwatch.collectors.gpu_exporter import decode_record, run_exporter
from agentwatch.events import GpuSample

MIB = 1 << 20

# Shape of dcgm-exporter 3.3 (default counters, Kubernetes pod attribution on GPU 0, GPU 1 split
# into MIG instances). Framebuffer figures are MiB.
_LABELS0 = ('gpu="0",UUID="GPU-9f3a1c52-7c1e-4d2b-8f61-3b9e8a0d4c21",pci_bus_id="00000000:00:1E.0",'
            'device="nvidia0",modelName="NVIDIA L4",Hostname="ip-10-0-3-17",'
            'DCGM_FI_DRIVER_VERSION="535.183.01",container="vllm",namespace="inference",'
            'pod="vllm-7d9f8c6b5-xk2lp"')
_LABELS1_MIG = ('gpu="1",UUID="GPU-1b2c3d4e-5f60-4172-8394-a5b6c7d8e9f0",'
                'pci_bus_id="00000000:00:1F.0",device="nvidia1",modelName="NVIDIA A100-SXM4-40GB",'
                'GPU_I_PROFILE="3g.20gb",GPU_I_ID="1",Hostname="ip-10-0-3-17",'
                'DCGM_FI_DRIVER_VERSION="535.183.01",container="",namespace="",pod=""')
EXPOSITION = f"""# HELP DCGM_FI_DEV_SM_CLOCK SM frequency (in MHz).
# TYPE DCGM_FI_DEV_SM_CLOCK gauge
DCGM_FI_DEV_SM_CLOCK{{{_LABELS0}}} 2040
DCGM_FI_DEV_SM_CLOCK{{{_LABELS1_MIG}}} 1410
# HELP DCGM_FI_DEV_GPU_TEMP GPU temperature (in C).
# TYPE DCGM_FI_DEV_GPU_TEMP gauge
DCGM_FI_DEV_GPU_TEMP{{{_LABELS0}}} 58
DCGM_FI_DEV_GPU_TEMP{{{_LABELS1_MIG}}} 41
# HELP DCGM_FI_DEV_POWER_USAGE Power draw (in W).
# TYPE DCGM_FI_DEV_POWER_USAGE gauge
DCGM_FI_DEV_POWER_USAGE{{{_LABELS0}}} 61.874000
DCGM_FI_DEV_POWER_USAGE{{{_LABELS1_MIG}}} 88.125000
# HELP DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION Total energy consumption since boot (in mJ).
# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter
DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{{{_LABELS0}}} 412936610251
# HELP DCGM_FI_DEV_GPU_UTIL GPU utilization (in %).
# TYPE DCGM_FI_DEV_GPU_UTIL gauge
DCGM_FI_DEV_GPU_UTIL{{{_LABELS0}}} 93
# HELP DCGM_FI_DEV_FB_FREE Framebuffer memory free (in MiB).
# TYPE DCGM_FI_DEV_FB_FREE gauge
DCGM_FI_DEV_FB_FREE{{{_LABELS0}}} 1873
DCGM_FI_DEV_FB_FREE{{{_LABELS1_MIG}}} 9847
# HELP DCGM_FI_DEV_FB_USED Framebuffer memory used (in MiB).
# TYPE DCGM_FI_DEV_FB_USED gauge
DCGM_FI_DEV_FB_USED{{{_LABELS0}}} 20677
DCGM_FI_DEV_FB_USED{{{_LABELS1_MIG}}} 10213
# HELP DCGM_FI_DEV_FB_RESERVED Framebuffer memory reserved (in MiB).
# TYPE DCGM_FI_DEV_FB_RESERVED gauge
DCGM_FI_DEV_FB_RESERVED{{{_LABELS0}}} 483
DCGM_FI_DEV_FB_RESERVED{{{_LABELS1_MIG}}} 0
# HELP DCGM_FI_PROF_GR_ENGINE_ACTIVE Ratio of time the graphics engine is active.
# TYPE DCGM_FI_PROF_GR_ENGINE_ACTIVE gauge
DCGM_FI_PROF_GR_ENGINE_ACTIVE{{{_LABELS0}}} 0.912345
"""

EXPECTED_GPU0 = dict(gpu=0, gpu_uuid="GPU-9f3a1c52-7c1e-4d2b-8f61-3b9e8a0d4c21",
                     gpu_name="NVIDIA L4", pid=0, memory_used_bytes=20677 * MIB,
                     memory_free_bytes=1873 * MIB,
                     memory_total_bytes=(20677 + 1873 + 483) * MIB,  # 23033 MiB, an L4's 24 GB
                     utilization_pct=93.0, temperature_c=58.0, power_w=61.874)


class _Handler(http.server.BaseHTTPRequestHandler):
    status = 200
    body = EXPOSITION
    hits: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        type(self).hits.append(self.path)
        data = self.body.encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def dcgm_server():
    handler = type("Handler", (_Handler,), {"hits": [], "status": 200, "body": EXPOSITION})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/metrics", handler
    finally:
        server.shutdown()
        server.server_close()


def test_scrape_maps_fb_fields_and_skips_mig_instances(dcgm_server):
    url, handler = dcgm_server
    rows = DcgmSource(url).sample(1_700_000_000.0)
    # host from the exporter's Hostname label (the node), not the URL's 127.0.0.1
    assert rows == [GpuSample(ts=1_700_000_000.0, host="ip-10-0-3-17", **EXPECTED_GPU0)]
    assert handler.hits == ["/metrics"]


def test_host_option_overrides_hostname_label(dcgm_server):
    url, _ = dcgm_server
    rows = DcgmSource(url, host="gpu-node-a").sample(5.0)
    assert [r.host for r in rows] == ["gpu-node-a"]


def test_without_hostname_label_the_url_host_is_used():
    text = EXPOSITION.replace('Hostname="ip-10-0-3-17",', "")
    rows = parse_dcgm_metrics(text, ts=1.0, default_host="127.0.0.1")
    assert rows[0].host == "127.0.0.1"


def test_exporter_loop_counts_failed_scrapes_and_keeps_going(dcgm_server):
    url, handler = dcgm_server
    handler.status = 503
    sent = []

    class Producer:
        def send(self, topic, key, value):
            sent.append((topic, key, value))

        def flush(self):
            pass

    source = DcgmSource(url, timeout_s=2.0)
    stats = run_exporter(source, Producer(), interval_s=0.01, count=2, wait=lambda s: None)
    assert (stats.rounds, stats.failed_rounds, sent) == (0, 2, [])
    with pytest.raises(urllib.error.HTTPError):
        source.sample(0.0)

    handler.status = 200
    stats = run_exporter(source, Producer(), interval_s=0.01, count=1, wait=lambda s: None)
    assert (stats.rounds, stats.records) == (1, 1)
    topic, key, value = sent[0]
    assert (topic, key) == ("gpu_samples", b"ip-10-0-3-17:0")
    [row] = decode_record(value)
    assert row.memory_used_bytes == 20677 * MIB and row.pid == 0


def test_rejects_non_http_url():
    with pytest.raises(ValueError, match="http"):
        DcgmSource("file:///etc/passwd")
