"""The embedded collector: rotel (PyPI ``rotel``, binary ``rotel-agent``) with its Kafka exporter.

rotel batches by span count, not bytes, and with its defaults (8,192 spans per record) a batch
of ordinary GenAI spans is ~5.5 MB: over the message limit, so the exporter logs
``MessageSizeTooLarge`` and drops the batch while still answering HTTP 200 to the app.
The batch size is therefore derived from the message limit and the largest span we promise to
carry (a 32 KiB prompt plus attributes), and the exporter's own limit is raised to match.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def rotel_binary() -> str:
    import rotel

    path = Path(rotel.__file__).with_name("rotel-agent")
    if not path.is_file():
        raise FileNotFoundError(f"rotel-agent binary not found next to {rotel.__file__}")
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return str(path)


def traces_batch_max_spans(max_message_bytes: int, max_span_bytes: int) -> int:
    """Spans per Kafka record such that a batch of maximum-size spans still fits one record.

    10% of the record is kept for the OTLP envelope (resource and scope repeated per batch).
    """
    if max_span_bytes <= 0 or max_message_bytes <= max_span_bytes:
        raise ValueError("max_message_bytes must exceed max_span_bytes")
    return max(1, int(max_message_bytes * 0.9) // max_span_bytes)


@dataclass(frozen=True)
class RotelConfig:
    brokers: str
    grpc_port: int = 4317
    http_port: int = 4318
    max_message_bytes: int = 32 * 1024 * 1024
    max_span_bytes: int = 40 * 1024
    batch_timeout_ms: int = 100
    # An SDK exports up to 512 spans per request; with 32 KiB prompts that is ~17 MB, far over
    # the 4 MiB gRPC default, and the SDK drops the whole export after its retries.
    grpc_max_recv_mib: int = 64
    traces_topic: str = "otlp_spans"
    logs_topic: str = "otlp_logs"
    pid_file: str = "/tmp/agentwatch-rotel.pid"

    def command(self) -> list[str]:
        batch = traces_batch_max_spans(self.max_message_bytes, self.max_span_bytes)
        return [
            rotel_binary(), "start",
            "--otlp-grpc-endpoint", f"127.0.0.1:{self.grpc_port}",
            "--otlp-http-endpoint", f"127.0.0.1:{self.http_port}",
            "--otlp-grpc-max-recv-msg-size-mib", str(self.grpc_max_recv_mib),
            "--otlp-receiver-metrics-disabled",
            "--exporter", "kafka",
            "--kafka-exporter-brokers", self.brokers,
            "--kafka-exporter-traces-topic", self.traces_topic,
            "--kafka-exporter-logs-topic", self.logs_topic,
            "--kafka-exporter-format", "protobuf",
            "--kafka-exporter-acks", "all",
            "--kafka-exporter-max-message-bytes", str(self.max_message_bytes),
            "--traces-batch-max-size", str(batch),
            "--logs-batch-max-size", str(batch),
            "--batch-timeout", f"{self.batch_timeout_ms}ms",
            "--pid-file", self.pid_file,
        ]
