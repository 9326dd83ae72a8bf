"""Fixtures that start the real embedded stack (Tansu, rotel, Faust workers) on free ports."""

from __future__ import annotations

from typing import Iterator

import pytest
from stack_helpers import stack_settings

from agentwatch.stack import Stack
from tests.support.receivers import PagerDutyReceiver, SlackReceiver


@pytest.fixture(scope="module")
def receivers():
    """Local PagerDuty and Slack receivers that record exactly what they were sent."""
    pagerduty, slack = PagerDutyReceiver().up(), SlackReceiver().up()
    yield pagerduty, slack
    pagerduty.down()
    slack.down()


@pytest.fixture(scope="module")
def running_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One stack for a module's tests: each counts only what it sent (its own service names,
    counter deltas), so they pass in any order and together."""
    stack = Stack(stack_settings(tmp_path_factory.mktemp("stack") / "data"), say=lambda _m: None)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()
