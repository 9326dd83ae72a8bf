"""Both collectors' limits checked against each other: no request a receiver accepts can become a
batch larger than a Kafka record (DESIGN.md, "Never acknowledge what cannot be stored")."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from agentwatch.broker import MAX_MESSAGE_BYTES
from agentwatch.collectors.rotel import (HTTP_MAX_BODY_BYTES, MIB, RECORD_SLACK_BYTES, RotelConfig,
                                         check_receive_limits, receive_limit_mib)
from agentwatch.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
OTELCOL = yaml.safe_load((ROOT / "collectors" / "otelcol-contrib.yaml").read_text())
# Flags of rotel's that batch by span count; with --disable-batching none may appear.
ROTEL_COUNT_BATCH_FLAGS = ("--batch-max-size", "--traces-batch-max-size", "--logs-batch-max-size",
                           "--metrics-batch-max-size")


def _flags(argv: list[str]) -> dict[str, str | bool]:
    flags: dict[str, str | bool] = {}
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            flags[arg] = argv[i + 1] if has_value else True
    return flags


# --- rotel (embedded stack) ------------------------------------------------------------------

@pytest.mark.parametrize("max_message_bytes", [
    2 * MIB + 1, 21 * MIB, 32 * MIB - 1, 32 * MIB, 32 * MIB + 1, 100 * 1000 * 1000, 1 << 30])
def test_receive_limit_is_the_largest_whole_mib_that_fits_a_record(max_message_bytes):
    mib = receive_limit_mib(max_message_bytes)
    assert mib * MIB + RECORD_SLACK_BYTES <= max_message_bytes
    assert (mib + 1) * MIB + RECORD_SLACK_BYTES > max_message_bytes


def test_receive_limit_refuses_a_record_too_small_for_any_request():
    with pytest.raises(ValueError):
        receive_limit_mib(RECORD_SLACK_BYTES + MIB - 1)


def test_rotel_command_line_keeps_every_accepted_request_within_one_record():
    flags = _flags(RotelConfig(brokers="127.0.0.1:9092").command())
    record = int(flags["--kafka-exporter-max-message-bytes"])
    assert record == MAX_MESSAGE_BYTES
    # One accepted request is one record (measured: rotel neither merges nor splits requests
    # then), so the receive limits are what bounds a record.
    assert flags["--disable-batching"] is True
    assert not [flag for flag in ROTEL_COUNT_BATCH_FLAGS if flag in flags]
    grpc_limit = int(flags["--otlp-grpc-max-recv-msg-size-mib"]) * MIB
    assert grpc_limit + RECORD_SLACK_BYTES <= record
    assert HTTP_MAX_BODY_BYTES + RECORD_SLACK_BYTES <= record
    assert grpc_limit == 31 * MIB  # the largest that fits a 32 MiB record: no needless rejections


def test_rotel_with_the_stacks_default_settings_is_valid():
    s = Settings()
    config = RotelConfig(brokers="b:9092", max_message_bytes=s.max_message_bytes)
    check_receive_limits(s.max_message_bytes, config.grpc_max_recv_mib)


def test_rotel_refuses_a_record_limit_below_its_fixed_http_body_limit():
    # rotel's HTTP receiver accepts 20 MiB bodies whatever we configure: with Kafka's 1 MB
    # default the collector would acknowledge requests it cannot store, so it must not start.
    with pytest.raises(ValueError):
        RotelConfig(brokers="b:9092", max_message_bytes=1_000_000)
    with pytest.raises(ValueError, match="HTTP body limit"):  # gRPC alone would fit (15 MiB)
        RotelConfig(brokers="b:9092", max_message_bytes=16 * MIB)
    with pytest.raises(ValueError):
        check_receive_limits(32 * MIB, 32)


# --- otelcol-contrib (compose / production) ----------------------------------------------------

def _otelcol_limits() -> dict[str, int]:
    kafka = OTELCOL["exporters"]["kafka"]
    protocols = OTELCOL["receivers"]["otlp"]["protocols"]
    batch = kafka["sending_queue"]["batch"]
    return {"record": kafka["producer"]["max_message_bytes"],
            "grpc": protocols["grpc"]["max_recv_msg_size_mib"] * MIB,
            # confighttp's default when unset is 20 MiB; the file must say what it relies on.
            "http": protocols["http"]["max_request_body_size"],
            "batch_max": batch["max_size"], "batch_min": batch["min_size"]}


def test_otelcol_batches_in_bytes_below_the_record_limit():
    kafka = OTELCOL["exporters"]["kafka"]
    queue = kafka["sending_queue"]
    assert queue["enabled"] is True
    assert queue["batch"]["sizer"] == "bytes"
    limits = _otelcol_limits()
    assert limits["record"] == MAX_MESSAGE_BYTES
    assert 0 < limits["batch_min"] <= limits["batch_max"]
    # Room for what Kafka adds around the OTLP bytes (trace-id key, headers, batch framing).
    assert limits["batch_max"] + RECORD_SLACK_BYTES <= limits["record"]
    # max_size is also what the kafka exporter's producer must accept after encoding.
    assert kafka["traces"]["encoding"] == "otlp_proto" and kafka["logs"]["encoding"] == "otlp_proto"


def test_otelcol_receive_limits_are_below_the_record_and_within_the_batch_cap():
    limits = _otelcol_limits()
    for receiver in ("grpc", "http"):
        assert limits[receiver] < limits["record"], receiver
        # Any one span of an accepted request fits a batch, so splitting by bytes always succeeds.
        assert limits[receiver] <= limits["batch_max"], receiver


def test_otelcol_has_no_span_counted_batch_without_a_byte_cap_after_it():
    byte_capped = {name for name, exporter in OTELCOL["exporters"].items()
                   if exporter.get("sending_queue", {}).get("batch", {}).get("sizer") == "bytes"
                   and exporter["sending_queue"]["batch"].get("max_size", 0) > 0}
    for signal, pipeline in OTELCOL["service"]["pipelines"].items():
        counted = [p for p in pipeline.get("processors", []) if p.split("/")[0] == "batch"]
        if counted:
            assert set(pipeline["exporters"]) <= byte_capped, (signal, counted)
