"""The normaliser child process dies (OOM killer, crash): records it held run again in a new one;
a record that kills it even when it runs alone is reported for the dead-letter topic."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from agentwatch.broker import DEFAULT_TOPICS
from agentwatch.settings import Settings
from agentwatch.streams.normalizer_process import NormalizerDied, NormalizerProcess

from normalizer_faults import die_on_poison


@pytest.fixture
def restarts():
    return []


@pytest.fixture
def process(tmp_path, restarts):
    normalizer = NormalizerProcess(Settings(data_dir=tmp_path), dict(DEFAULT_TOPICS), work=die_on_poison,
                                   on_restart=restarts.append)
    yield normalizer
    normalizer.shutdown()


def test_a_poison_record_is_named_and_its_neighbours_still_processed(process, restarts):
    async def run():
        tasks = [asyncio.ensure_future(process(p)) for p in (b"first", b"poison", b"second")]
        return await asyncio.gather(*tasks, return_exceptions=True)

    first, poison, second = asyncio.run(run())
    assert (first.spans, second.spans) == (5, 6)  # not dead-lettered with the culprit
    assert isinstance(poison, NormalizerDied)
    assert "died 2 times while it held only this record" in str(poison)
    # The next record gets a working process.
    assert asyncio.run(process(b"after")).spans == 5
    # Three deaths (all three records together, then the poison alone twice), three new processes.
    assert process.restarts == len(restarts) == 3


def test_a_normaliser_killed_from_outside_loses_nothing(process, restarts, tmp_path):
    marker = tmp_path / "inside"
    payload = b"slow:" + str(marker).encode()

    async def run():
        pending = asyncio.ensure_future(process(payload))
        while not marker.exists():  # the child holds the record now
            await asyncio.sleep(0.01)
        os.kill(process.child_pid(), signal.SIGKILL)
        return await pending

    assert asyncio.run(asyncio.wait_for(run(), 60)).spans == len(payload)  # rerun in a new process
    assert process.restarts == 1 and len(restarts) == 1
