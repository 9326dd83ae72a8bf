"""The trace stage's duplicate-span memory: a span sent again within the window (event time) is
recognised; past the cap the oldest are forgotten early and counted; state survives a checkpoint."""

from __future__ import annotations

import pytest

from agentwatch.streams.dataflow import RecentSpans


def test_a_span_sent_again_within_the_window_is_a_duplicate_and_after_it_is_not():
    seen = RecentSpans(max_entries=100, window_s=60.0)
    assert seen.add("t", "a", 1000.0)
    assert not seen.add("t", "a", 1000.0)  # the same span again
    for i in range(50):  # traffic moves event time on by 59 s
        seen.add("t", f"s{i}", 1000.0 + 59.0 * (i + 1) / 50)
    assert not seen.add("t", "a", 1000.0)  # 59 s behind the newest: still known
    seen.add("t", "late", 1061.0)  # the newest is now 61 s past it
    assert seen.add("t", "a", 1000.0)  # forgotten: outside the window
    assert seen.evicted_early == 0


def test_past_the_cap_the_oldest_go_early_and_are_counted():
    seen = RecentSpans(max_entries=10, window_s=60.0)
    for i in range(25):
        seen.add("t", f"s{i}", 1000.0 + i * 0.1)  # all within one window
    assert len(seen) == 10
    assert seen.evicted_early == 15
    assert seen.add("t", "s0", 1000.0)  # forgotten early: not recognised, and that was counted
    assert not seen.add("t", "s24", 1002.4)


def test_spans_out_of_window_leave_without_counting_as_early():
    seen = RecentSpans(max_entries=10, window_s=5.0)
    for i in range(100):
        seen.add("t", f"s{i}", float(i))
    assert len(seen) <= 6 and seen.evicted_early == 0


def test_snapshot_restore_keeps_the_window_and_the_counter():
    seen = RecentSpans(max_entries=10, window_s=60.0)
    for i in range(12):
        seen.add("t", f"s{i}", 100.0 + i)
    restored = RecentSpans(max_entries=10, window_s=60.0)
    restored.restore(seen.snapshot())
    assert restored.evicted_early == seen.evicted_early == 2
    assert not restored.add("t", "s11", 111.0) and restored.add("t", "s0", 100.0)
    legacy = RecentSpans(max_entries=10, window_s=60.0)
    legacy.restore(["ta", "tb"])  # a checkpoint from before the window: ids only
    assert not legacy.add("t", "a", 5.0)


@pytest.mark.parametrize("max_entries, window_s", [(0, 60.0), (10, 0.0)])
def test_arguments_are_checked(max_entries, window_s):
    with pytest.raises(ValueError):
        RecentSpans(max_entries=max_entries, window_s=window_s)
