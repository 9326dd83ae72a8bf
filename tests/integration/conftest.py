"""Fixtures that start the real embedded stack (Tansu, rotel, Faust workers) on free ports."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
from stack_helpers import stack_settings

from agentwatch.stack import Stack


@pytest.fixture
def running_stack(tmp_path: Path) -> Iterator[Stack]:
    stack = Stack(stack_settings(tmp_path / "data"), say=lambda _m: None)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()
