"""EmbedderProcess: the bundled model in a child process at the lowest priority, the same
vectors as in process, rate-limited here, and a child that dies is replaced."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from agentwatch.streams.embedder_process import EmbedderProcess
from agentwatch.streams.embeddings import Embedder, TokenBucket
from tests.support.clocks import SleepRecordingClock

TEXTS = ["how do i freeze my bank account", "freeze my account please", "what's the weather tomorrow",
         "book a flight to paris", "cancel my card", "play some jazz"]


@pytest.fixture(scope="module")
def embedder():
    e = EmbedderProcess(batch_size=4, max_sentences_per_s=None)
    yield e
    e.shutdown()


def test_the_same_vectors_as_in_process_from_a_child_at_the_lowest_priority(embedder):
    vectors = embedder.encode(TEXTS)
    local = Embedder(batch_size=4, max_sentences_per_s=None).encode(TEXTS)
    assert vectors.shape == (6, 384) and vectors.dtype == np.float32
    assert np.allclose(vectors, local, atol=1e-5)
    assert embedder.child_priority() == (19, True) and embedder.child_pid() != os.getpid()
    assert embedder.sentences_embedded == 6 and embedder.dimension == 384
    assert embedder.encode([]).shape == (0, 384)


def test_the_rate_limit_is_charged_here_per_batch(embedder):
    clock = SleepRecordingClock()
    embedder.bucket = TokenBucket(rate=2.0, burst=4.0, clock=clock, sleep=clock.sleep)
    try:
        before = embedder.seconds_throttled
        embedder.encode(TEXTS)  # batches of 4 + 2 against a bucket of 4 at 2/s: the second waits 1 s
        assert clock.slept == pytest.approx([1.0])
        assert embedder.seconds_throttled - before == pytest.approx(1.0)
    finally:
        embedder.bucket = None


def test_a_child_that_dies_is_replaced_and_the_batch_runs_again(embedder):
    expected = embedder.encode(TEXTS[:2])
    os.kill(embedder.child_pid(), signal.SIGKILL)
    assert np.allclose(embedder.encode(TEXTS[:2]), expected, atol=1e-5)
    assert embedder.restarts == 1 and embedder.child_priority() == (19, True)


def test_arguments_are_validated_before_a_child_starts():
    for kwargs in ({"batch_size": 0}, {"max_sentences_per_s": 0}, {"threads": 0}):
        with pytest.raises(ValueError):
            EmbedderProcess(**kwargs)


def test_a_shutdown_stops_the_child_mid_load_and_starts_none_again():
    """A worker stopping while its child still loads the model (at idle priority that lasts as
    long as the CPU is busy) must not wait for it: the interpreter's exit joins the pool."""
    from concurrent.futures import CancelledError, ThreadPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    embedder = EmbedderProcess(max_sentences_per_s=None)
    with ThreadPoolExecutor(1) as thread:
        loading = thread.submit(embedder.preload)
        child = embedder.child_pid()
        embedder.shutdown()
        with pytest.raises((BrokenProcessPool, CancelledError)):  # running, or still queued
            loading.result(timeout=30)
    assert embedder.restarts == 0 and embedder.child_pid() in (None, child)
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)
