"""The embedded collector: rotel (PyPI ``rotel``, binary ``rotel-agent``) with its Kafka exporter.

The invariant (DESIGN.md, "Reliability rules"): every request a receiver answers with success
becomes one record on ``otlp_spans``/``otlp_logs``; a request that cannot be stored gets an error.

rotel's batcher counts spans, never bytes, and answers the sender before the Kafka write: a batch
over the record limit is logged (``MessageSizeTooLarge``) and dropped after the sender heard
success, and no span count is safe once prompts are large (a count sized for 40 KiB spans lost
~99% of 64 KB-prompt traffic). So batching is off (``--disable-batching``): measured on rotel
0.0.1-alpha10, every accepted request is exported as exactly one record (concurrent requests are
not merged, a 512-span or multi-resource request is not split) whose size equals the request's
protobuf size (smaller for OTLP/JSON). The receive limits are then what bounds a record, and
both sit below the record limit:

- gRPC: ``--otlp-grpc-max-recv-msg-size-mib`` = :func:`receive_limit_mib`; larger messages are
  answered ``OUT_OF_RANGE`` ("decoded message length too large").
- HTTP: fixed by rotel at 20 MiB (:data:`HTTP_MAX_BODY_BYTES`, not configurable), applied to
  the body after gzip decompression too; larger bodies are answered 413 (or the connection is
  closed while the client is still sending), so a record limit under 21 MiB is refused.

Known gap (rotel's tonic 0.12 server): the gRPC limit is checked on the *compressed* message, so
a ``grpc-encoding: gzip`` request whose decompressed size exceeds the record limit is accepted
and then dropped. :class:`CollectorLogWatch` makes every such drop visible.

Access: rotel's OTLP receivers cannot authenticate senders. ``rotel-agent start --help``
(0.0.1-alpha10, the binary in PyPI ``rotel`` 0.0.1a15) offers no receiver option for a token,
header check or TLS; its only authentication settings are on the exporter side
(``--otlp-exporter-authenticator sigv4auth``, ``--otlp-exporter-custom-headers``). So the
receivers bind loopback unless asked otherwise (``bind_addr``), and :data:`RECEIVER_AUTH` says
that a token cannot be enforced here (tests/test_access.py checks the binary's help for a change).

Cost, measured here (2 cores): 512-span requests pass rotel as fast as with batching (23.7-25.0k
vs 14.2-22.0k spans/s, both bound by the sending client); 3,000 concurrent 1-span requests made
3,000 records instead of 6-7, and a worker fed 1-span records manages ~620-700 spans/s against
~10k spans/s for 500-span records. Senders should batch (every OTel SDK's BatchSpanProcessor does).
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

MIB = 1024 * 1024
# rotel's HTTP receiver (axum, tower-http RequestBodyLimit): 20 MiB, decompressed size, fixed.
# Measured: a 20,971,520-byte body is accepted, 20,971,521 bytes is refused.
HTTP_MAX_BODY_BYTES = 20 * MIB
# What a record may add to the request it carries: rotel re-encodes the request (measured: the
# same size for protobuf, smaller for JSON) and Kafka frames it (key, headers, batch header,
# ~100 bytes). A whole MiB because the gRPC limit is set in whole MiB anyway.
RECORD_SLACK_BYTES = 1 * MIB
# Whether rotel's OTLP receivers can require a bearer token (see the module docstring): no.
RECEIVER_AUTH = False


def rotel_binary() -> str:
    import rotel

    path = Path(rotel.__file__).with_name("rotel-agent")
    if not path.is_file():
        raise FileNotFoundError(f"rotel-agent binary not found next to {rotel.__file__}")
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return str(path)


def receive_limit_mib(max_message_bytes: int) -> int:
    """The largest gRPC receive limit (whole MiB) whose requests still fit one record.

    >>> receive_limit_mib(32 * 1024 * 1024)
    31
    """
    mib = (max_message_bytes - RECORD_SLACK_BYTES) // MIB
    if mib < 1:
        raise ValueError(f"max_message_bytes={max_message_bytes} leaves no room for a request "
                         f"(needs at least {MIB + RECORD_SLACK_BYTES})")
    return mib


def check_receive_limits(max_message_bytes: int, grpc_max_recv_mib: int,
                         http_max_body_bytes: int = HTTP_MAX_BODY_BYTES) -> None:
    """Raise ``ValueError`` unless every request either receiver accepts fits one record."""
    for name, limit in (("gRPC receive limit", grpc_max_recv_mib * MIB), ("HTTP body limit", http_max_body_bytes)):
        if limit + RECORD_SLACK_BYTES > max_message_bytes:
            raise ValueError(
                f"rotel's {name} ({limit:,} bytes) plus {RECORD_SLACK_BYTES:,} bytes of record "
                f"overhead exceeds the Kafka record limit max_message_bytes={max_message_bytes:,}: "
                "requests the collector accepts could not be stored; raise the broker's and "
                "AGENTWATCH_MAX_MESSAGE_BYTES to at least "
                f"{http_max_body_bytes + RECORD_SLACK_BYTES:,}")


def endpoint(addr: str, port: int) -> str:
    """``addr:port`` as rotel parses it (a socket address: an IP literal, IPv6 in brackets).

    >>> endpoint("127.0.0.1", 4317), endpoint("::", 4318)
    ('127.0.0.1:4317', '[::]:4318')
    """
    try:
        ip = ipaddress.ip_address(addr.strip("[]"))
    except ValueError:
        raise ValueError(f"OTLP bind address {addr!r} is not an IP address (rotel binds socket "
                         "addresses, not host names): use e.g. 127.0.0.1, 0.0.0.0 or ::") from None
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


@dataclass(frozen=True)
class RotelConfig:
    brokers: str
    grpc_port: int = 4317
    http_port: int = 4318
    bind_addr: str = "127.0.0.1"
    max_message_bytes: int = 32 * MIB
    traces_topic: str = "otlp_spans"
    logs_topic: str = "otlp_logs"
    pid_file: str = "/tmp/agentwatch-rotel.pid"

    def __post_init__(self) -> None:
        check_receive_limits(self.max_message_bytes, self.grpc_max_recv_mib)
        endpoint(self.bind_addr, self.grpc_port)

    @property
    def grpc_max_recv_mib(self) -> int:
        return receive_limit_mib(self.max_message_bytes)

    def command(self) -> list[str]:
        return [
            rotel_binary(), "start",
            "--otlp-grpc-endpoint", endpoint(self.bind_addr, self.grpc_port),
            "--otlp-http-endpoint", endpoint(self.bind_addr, self.http_port),
            "--otlp-grpc-max-recv-msg-size-mib", str(self.grpc_max_recv_mib),
            "--otlp-receiver-metrics-disabled",
            # One accepted request = one record: the receive limits above then bound every record.
            "--disable-batching",
            "--exporter", "kafka",
            "--kafka-exporter-brokers", self.brokers,
            "--kafka-exporter-traces-topic", self.traces_topic,
            "--kafka-exporter-logs-topic", self.logs_topic,
            "--kafka-exporter-format", "protobuf",
            "--kafka-exporter-acks", "all",
            "--kafka-exporter-max-message-bytes", str(self.max_message_bytes),
            "--pid-file", self.pid_file,
        ]


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# rotel's exporters log a lost batch at ERROR: "Failed to send traces: Message production error:
# MessageSizeTooLarge (...)", "... KafkaError (Message production error: MessageTimedOut ...)",
# "Exporting failed, dropping data.", "Failed to encode request, dropping." (captured lines in
# tests/collectors/test_rotel_log_watch.py).
_EXPORT_FAILURE = re.compile(r"\bERROR\b.*(Failed to send|dropping|Exporting failed|Message production error"
                             r"|Kafka producer error|MessageSizeTooLarge)")


def export_failures(log_text: str) -> list[str]:
    """The lines of rotel's log that report telemetry lost on the way to Kafka, colour codes removed."""
    lines = (_ANSI.sub("", line).strip() for line in log_text.splitlines())
    return [line for line in lines if _EXPORT_FAILURE.search(line)]


class CollectorLogWatch:
    """Reads rotel's log file incrementally; :meth:`new_failures` returns the failures since the last call.

    Only whole lines are read (a line still being written waits for the next call), and a file
    that shrank (truncated or replaced) is read again from its start.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.offset = 0
        self.total = 0

    def new_failures(self) -> list[str]:
        try:
            with open(self.path, "rb") as log:
                if os.fstat(log.fileno()).st_size < self.offset:
                    self.offset = 0
                log.seek(self.offset)
                chunk = log.read()
        except FileNotFoundError:
            return []
        end = chunk.rfind(b"\n") + 1
        self.offset += end
        failures = export_failures(chunk[:end].decode("utf-8", errors="replace"))
        self.total += len(failures)
        return failures
