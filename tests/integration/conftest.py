"""Fixtures that start the real embedded stack (Tansu, rotel, Faust workers) on free ports."""

from __future__ import annotations

from pathlib import Path
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


@pytest.fixture
def running_stack(tmp_path: Path) -> Iterator[Stack]:
    stack = Stack(stack_settings(tmp_path / "data"), say=lambda _m: None)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()
