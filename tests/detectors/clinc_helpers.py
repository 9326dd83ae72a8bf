"""What the CLINC150 drift tests share: the data folder, the pool sizes and the embedding cache."""

from __future__ import annotations

from pathlib import Path

from agentwatch.traffic import find_clinc

_FOUND = find_clinc(Path(__file__).parent)  # ../shared/data/clinc150 beside the checkout
# The data ships beside every checkout (CI included); a missing copy is an error, not a skip.
assert _FOUND is not None, "CLINC150 not found: expected shared/data/clinc150 beside the repository"
CLINC = _FOUND.parent
# Subsampled pools (same seed, same digest in every test): embedded once, cached for all.
POOL_SIZES = {"in_mix": 1500, "other_domains": 600, "out_of_scope": 600}


def embedding_cache_dir(request, tmp_path_factory) -> Path:
    """pytest's cache dir, so embeddings survive between runs; a temp dir without the cache."""
    try:
        return Path(request.config.cache.mkdir("agentwatch-clinc-embeddings"))
    except AttributeError:  # -p no:cacheprovider
        return tmp_path_factory.mktemp("clinc-embeddings")
