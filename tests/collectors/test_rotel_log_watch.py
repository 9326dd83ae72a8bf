"""rotel's export failures recognised in its log, on lines captured from rotel 0.0.1-alpha10.

Captured by provoking each failure against a Tansu broker: a batch over the record limit
(traces and logs), and the broker stopped under a 3 s message timeout.
"""

from __future__ import annotations

from agentwatch.collectors.rotel import CollectorLogWatch, export_failures

E = "\x1b"
TOO_LARGE_TRACES = (f"{E}[2m2026-11-29T11:22:53.706893Z{E}[0m {E}[31mERROR{E}[0m Failed to send traces: "
                    "Message production error: MessageSizeTooLarge (Broker: Message size too large)")
TOO_LARGE_LOGS = (f"{E}[2m2026-11-29T11:30:43.513243Z{E}[0m {E}[31mERROR{E}[0m Failed to send logs: "
                  "Message production error: MessageSizeTooLarge (Broker: Message size too large)")
TIMED_OUT = (f"{E}[2m2026-11-29T11:30:20.596339Z{E}[0m {E}[31mERROR{E}[0m Failed to send traces: "
             "Message production error: MessageTimedOut (Local: Message timed out)")
# Around a broker outage: connection noise, not lost data (the loss is the MessageTimedOut line).
NOISE = [
    f"{E}[2m2026-11-29T11:30:13.729470Z{E}[0m {E}[31mERROR{E}[0m librdkafka: Global error: AllBrokersDown "
    "(Local: All broker connections are down): 1/1 brokers are down    ",
    f"{E}[2m2026-11-29T11:30:13.729473Z{E}[0m {E}[33m WARN{E}[0m Ignored event 'Error' on base producer poll    ",
    "%3|1795951813.734|FAIL|rotel#producer-1| [thrd:127.0.0.1:47583/bootstrap]: 127.0.0.1:47583/111: "
    "Connect to ipv4#127.0.0.1:47583 failed: Connection refused (after 2ms in state CONNECT)",
]


def test_export_failures_are_the_lost_batches_without_colour_codes():
    log = "\n".join([NOISE[0], TOO_LARGE_TRACES, NOISE[1], TOO_LARGE_LOGS, NOISE[2], TIMED_OUT]) + "\n"
    failures = export_failures(log)
    assert failures == [
        "2026-11-29T11:22:53.706893Z ERROR Failed to send traces: Message production error: "
        "MessageSizeTooLarge (Broker: Message size too large)",
        "2026-11-29T11:30:43.513243Z ERROR Failed to send logs: Message production error: "
        "MessageSizeTooLarge (Broker: Message size too large)",
        "2026-11-29T11:30:20.596339Z ERROR Failed to send traces: Message production error: "
        "MessageTimedOut (Local: Message timed out)",
    ]


def test_connection_noise_and_an_empty_log_are_no_failures():
    assert export_failures("\n".join(NOISE)) == []
    assert export_failures("") == []


def test_log_watch_reports_each_failure_once_and_waits_for_whole_lines(tmp_path):
    path = tmp_path / "collector.log"
    watch = CollectorLogWatch(path)
    assert watch.new_failures() == []  # no file yet
    path.write_text(NOISE[0] + "\n" + TOO_LARGE_TRACES + "\n" + TIMED_OUT[:40])
    assert [f.split(" ERROR ")[1][:21] for f in watch.new_failures()] == ["Failed to send traces"]
    assert watch.new_failures() == []
    with open(path, "a") as log:  # the half-written line is completed
        log.write(TIMED_OUT[40:] + "\n")
    assert [("MessageTimedOut" in f) for f in watch.new_failures()] == [True]
    assert watch.total == 2


def test_log_watch_starts_over_when_the_file_is_replaced(tmp_path):
    path = tmp_path / "collector.log"
    path.write_text((TOO_LARGE_TRACES + "\n") * 3)
    watch = CollectorLogWatch(path)
    assert len(watch.new_failures()) == 3
    path.write_text(TOO_LARGE_LOGS + "\n")  # shorter than what was read: a new file
    assert ["Failed to send logs" in f for f in watch.new_failures()] == [True]
    assert watch.total == 4
