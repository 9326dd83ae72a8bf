"""Drift on redacted prompts: PII placeholders must not read as skew, drift or OOD by themselves.

CLINC150 queries get realistic PII sentences (an e-mail, a phone number, a card, a resident
registration number, an API key) appended or prepended, in a share of the reference set and
of the windows; both sides go through the :class:`Redactor` as the normaliser and
``agentwatch reference add`` do, so the detector sees ``<CREDIT_CARD>`` where the number was.

The planted texts are split off fixed parts of the pools (the clean and the planted part of a
pool never share a query), embedded once and cached beside the CLINC pool embeddings.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import numpy as np
import pytest
from clinc_helpers import CLINC, POOL_SIZES, embedding_cache_dir

from agentwatch.detectors.drift import DriftDetector, EmbeddedWindow
from agentwatch.streams.pii import PiiPolicy, Redactor
from bench.drift_quality import clinc_pools
from bench.pii import EntityFactory

KEY = "service=assistant"
WINDOW = 200  # DriftSampler's default sample_size
PLANTED_PART = {"reference": 500, "in_mix": 400, "other_domains": 180}  # planted variants per pool

# (entity type, carrier sentences): how people put these values into a request.
SENTENCES = {
    "EMAIL": ("you can email me at {v}", "send the confirmation to {v}", "my email is {v}"),
    "PHONE": ("call me back on {v}", "my number is {v}", "text me at {v} when it's done"),
    "CREDIT_CARD": ("my card is {v}, can you check the charge", "i paid with {v}",
                    "the card number is {v}"),
    "KR_RRN": ("my resident registration number is {v}", "for verification my rrn is {v}"),
    "SECRET": ("here is my api key {v}", "use this token: {v}", "my key is {v} if you need it"),
}


def _plant(query: str, rng: random.Random, factory: EntityFactory) -> tuple[str, str, str]:
    """(query with a PII sentence, the entity type, the raw value)."""
    entity = rng.choice(sorted(SENTENCES))
    while True:
        value, kind, _ = factory.make(entity, "en")
        # One-line values only (a PEM block or a password pair is not what a chat user types).
        if "\n" not in value and kind not in ("SECRET/pair",):
            break
    sentence = rng.choice(SENTENCES[entity]).format(v=value)
    if rng.random() < 0.6:
        text = f"{query}, {sentence}" if rng.random() < 0.5 else f"{query}. {sentence}"
    else:
        text = f"{sentence[0].upper()}{sentence[1:]}. {query}"
    return text, entity, value


@pytest.fixture(scope="module")
def pools(request, tmp_path_factory):
    texts, vectors, _ = clinc_pools(CLINC, pool_sizes=POOL_SIZES,
                                    cache_dir=embedding_cache_dir(request, tmp_path_factory))
    return texts, vectors


@pytest.fixture(scope="module")
def corpus(pools, request, tmp_path_factory):
    """Per pool: the clean part (raw text, raw vectors) and the planted part (redacted text and
    its vectors), as ``{pool: {"clean": (texts, vectors), "planted": (texts, vectors)}}``."""
    texts, vectors = pools
    redactor = Redactor(PiiPolicy())
    factory = EntityFactory(seed=150)
    rng = random.Random(14)
    parts, planted_texts = {}, {}
    for pool, n_planted in PLANTED_PART.items():
        order = np.random.default_rng(len(pool)).permutation(len(texts[pool]))
        planted_idx, clean_idx = order[:n_planted], order[n_planted:]
        redacted = []
        for i in planted_idx:
            while True:
                text, entity, value = _plant(texts[pool][i], rng, factory)
                out, detected = redactor.redact(text)
                # Only values the recognisers find (a bare 10-digit phone number is left alone
                # by design): this test is about placeholders, recall is bench/pii.py's.
                if detected == (entity,):
                    break
            assert value not in out and f"<{entity}>" in out, (text, out)
            redacted.append(out)
        planted_texts[pool] = redacted
        parts[pool] = {"clean": ([texts[pool][i] for i in clean_idx], vectors[pool][clean_idx])}
    cache = embedding_cache_dir(request, tmp_path_factory)
    digest = hashlib.sha256("\n".join(t for v in planted_texts.values() for t in v).encode()
                            ).hexdigest()[:16]
    embedder = None
    for pool, redacted in planted_texts.items():
        path = Path(cache) / f"pii-planted-{pool}-{digest}.npy"
        if not path.exists():
            if embedder is None:
                from agentwatch.streams.embeddings import Embedder

                embedder = Embedder(max_sentences_per_s=None, threads=2, batch_size=128)
            tmp = path.with_name(path.stem + ".tmp.npy")
            np.save(tmp, embedder.encode(redacted))
            os.replace(tmp, path)
        parts[pool]["planted"] = (redacted, np.load(path))
    return parts


def _draw(part, n, rng):
    texts, vectors = part
    idx = rng.choice(len(texts), n, replace=False)
    return [texts[i] for i in idx], vectors[idx]


def _mix(corpus, pool, size, pii_share, rng):
    n_pii = int(round(size * pii_share))
    clean_t, clean_v = _draw(corpus[pool]["clean"], size - n_pii, rng)
    pii_t, pii_v = _draw(corpus[pool]["planted"], n_pii, rng)
    return clean_t + pii_t, np.concatenate([clean_v, pii_v])


def _window(corpus, rng, *, pii_share, other_share=0.0):
    """A window of in-mix prompts (``other_share`` of them from other CLINC domains), with
    ``pii_share`` of each part carrying a redacted PII sentence."""
    n_other = int(round(WINDOW * other_share))
    texts, vectors = _mix(corpus, "in_mix", WINDOW - n_other, pii_share, rng)
    if n_other:
        more_t, more_v = _mix(corpus, "other_domains", n_other, pii_share, rng)
        texts, vectors = texts + more_t, np.concatenate([vectors, more_v])
    order = rng.permutation(len(texts))
    return tuple(texts[i] for i in order), vectors[order]


def _detector(corpus, reference_share):
    texts, vectors = _reference(corpus, reference_share)
    detector = DriftDetector()
    detector.set_reference(KEY, vectors, texts, name=f"clinc-pii-{reference_share:.2f}")
    return detector


def _reference(corpus, share):
    """1500 reference prompts, ``share`` of them with a redacted PII sentence."""
    return _mix(corpus, "reference", 1500, share, np.random.default_rng(7))


def _scores(detector):
    """{kind: {statistic: (score, threshold)}} of the last window's checks, deciding ones."""
    out = {}
    for check in detector.last_checks:
        scores = check.evidence.scores
        out[check.kind] = {name: (round(scores[name]["score"], 4), round(scores[name]["threshold"], 4))
                           for name in check.evidence.deciding}
    return out


def _stream(detector, corpus, seed, windows, **window_kwargs):
    """Feeds ``windows`` windows of one seeded stream; returns (findings, checks) per window."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(windows):
        texts, vectors = _window(corpus, rng, **window_kwargs)
        findings = detector.update(EmbeddedWindow(KEY, 300.0 * (i + 1), texts, vectors))
        out.append((findings, _scores(detector)))
    return out


def test_same_pii_share_in_reference_and_windows_raises_nothing(corpus):
    # A quarter of the reference and of every window carry a card, a phone number, ... now a
    # placeholder: no skew (MMD or OOD share) and, over a stream, no drift.
    detector = _detector(corpus, 0.25)
    calm = []
    for seed in range(4):
        detector.restore({"keys": {}})
        calm += _stream(detector, corpus, 500 + seed, 3, pii_share=0.25)
    worst = {kind: {stat: max(c[kind][stat][0] - c[kind][stat][1] for _, c in calm if kind in c)
                    for stat in ("mmd", "ood_share") if any(stat in c.get(kind, {}) for _, c in calm)}
             for kind in ("skew", "drift")}
    print(f"\nPII 25%/25%: {len(calm)} windows; first {calm[0][1]}; worst score - threshold {worst}")
    assert [f for findings, _ in calm for f in findings] == []
    # The placeholders are there: the detector really saw redacted PII.
    assert sum("<CREDIT_CARD>" in t for t in corpus["in_mix"]["planted"][0]) > 30


@pytest.mark.parametrize("other_share", [0.15, 1.0])
def test_shifted_window_with_the_same_pii_share_is_still_caught(corpus, other_share):
    for seed in range(3):
        detector = _detector(corpus, 0.25)
        out = _stream(detector, corpus, 900 + seed, 2, pii_share=0.25)
        rng = np.random.default_rng(950 + seed)
        texts, vectors = _window(corpus, rng, pii_share=0.25, other_share=other_share)
        shifted = detector.update(EmbeddedWindow(KEY, 900.0, texts, vectors))
        print(f"\nPII 25%/25%, other domains {other_share:.0%}, seed {seed}: {_scores(detector)}")
        assert [f for findings, _ in out for f in findings] == []
        kinds = {f.kind for f in shifted}
        assert "skew" in kinds, _scores(detector)
        if other_share == 1.0:
            assert kinds == {"skew", "drift"}


def test_reference_with_less_pii_than_the_windows_reads_as_skew_by_mmd_not_ood(corpus):
    """Reference 5% PII, windows 30%, both redacted: measured, the detector not tuned.

    It fires: MMD skew in every one of 8 windows (score 0.0014-0.0033 against thresholds
    0.0010-0.0014), while the OOD share stays at 0.03-0.07 under its 0.115 and the windows do
    not drift from each other (they share their PII rate). Measured beside this test on the same
    windows: with the values left raw the same 8/8 fire (MMD 0.0020-0.0036 in the first four),
    and with the carrier sentences alone (value and placeholder both cut out) 5/8 still fire. So what moves is the
    share of requests that talk about a card, a phone number or a key, a real change of the
    traffic's mix; the placeholder tokens add nothing to it and no prompt reads as out of
    distribution because of them.
    """
    detector = _detector(corpus, 0.05)
    results = []
    for seed in range(4):
        detector.restore({"keys": {}})
        results += _stream(detector, corpus, 700 + seed, 2, pii_share=0.30)
    print("\nPII 5%/30%: " + "; ".join(str(c) for _, c in results))
    for findings, scores in results:
        assert [(f.kind, f.evidence["statistic"]) for f in findings] == [("skew", "mmd")], scores
        ood, ood_threshold = scores["skew"]["ood_share"]
        assert ood < ood_threshold
