"""Token pricing: USD per 1M tokens per model, from a JSON file (the bundled one by default).

Reasoning tokens are billed as output tokens by the providers that report them (OpenAI counts
them inside ``output_tokens``), so they are not priced a second time. Cache reads and cache
writes are part of ``input_tokens`` (OTel GenAI semconv: input tokens include all cached ones) and
priced at the cache-read and cache-write rates instead of the input rate. A model without a
cache-write price (OpenAI, Gemini: no write surcharge) prices writes as input.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path


@dataclass(frozen=True, slots=True)
class ModelPrice:
    input: float
    output: float
    cache_read: float
    cache_write: float | None = None  # None: billed as input


MAX_MEMO_NAME_CHARS = 256


class PricingTable:
    """Looks up a model's price (exact name, then longest known prefix), memoised per name."""

    def __init__(self, prices: dict[str, ModelPrice]) -> None:
        self._prices = prices
        # Longest prefix first, so "gpt-4o-mini-2024" matches gpt-4o-mini before gpt-4o.
        self._prefixes = sorted(prices, key=len, reverse=True)
        self._memo: dict[str, ModelPrice | None] = {}

    @classmethod
    def load(cls, path: str | Path | None = None) -> "PricingTable":
        if path is None:
            text = resources.files("agentwatch.streams").joinpath("pricing.json").read_text()
        else:
            text = Path(path).read_text()
        doc = json.loads(text)
        models = doc.get("models", doc) if isinstance(doc, dict) else doc
        if not isinstance(models, dict):
            raise ValueError("pricing file must be a JSON object of models ({\"models\": {name: prices}})")
        prices = {}
        for name, p in models.items():
            if name.startswith("_"):
                continue
            try:
                write = p.get("cache_write")
                price = ModelPrice(float(p["input"]), float(p["output"]),
                                   float(p.get("cache_read", p["input"])),
                                   None if write is None else float(write))
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise ValueError(f"pricing entry {name!r} needs numeric 'input' and 'output': {exc}") from exc
            if not all(0.0 <= v < float("inf") for v in (price.input, price.output, price.cache_read,
                                                          price.input if price.cache_write is None
                                                          else price.cache_write)):
                raise ValueError(f"pricing entry {name!r} has a negative or non-finite price: {price}")
            prices[name.lower()] = price
        return cls(prices)

    def price(self, model: str) -> ModelPrice | None:
        try:
            return self._memo[model]
        except KeyError:
            pass
        name = model.lower()
        found = self._prices.get(name)
        if found is None:
            # Provider prefixes such as "openai/gpt-4o" or "models/gemini-2.5-pro".
            bare = name.rsplit("/", 1)[-1]
            found = self._prices.get(bare) or next(
                (self._prices[p] for p in self._prefixes if bare.startswith(p)), None)
        # Bounded in bytes too: the name comes from the telemetry, and a real one is far shorter.
        if len(self._memo) < 10_000 and len(model) <= MAX_MEMO_NAME_CHARS:
            self._memo[model] = found
        return found

    def cost_usd(self, model: str, input_tokens: int, output_tokens: int,
                 cache_read_tokens: int = 0, cache_write_tokens: int = 0) -> tuple[float, bool]:
        """(cost, priced): unknown models cost 0 and report priced=False so they get counted.

        Cached tokens beyond ``input_tokens`` are not priced: reads are taken first, then
        writes, out of the input tokens.
        """
        price = self.price(model) if model else None
        if price is None:
            return 0.0, False
        inputs = max(input_tokens, 0)
        cache_read = min(max(cache_read_tokens, 0), inputs)
        uncached = inputs - cache_read
        cost = uncached * price.input + cache_read * price.cache_read
        if cache_write_tokens > 0 and price.cache_write is not None:
            cache_write = min(cache_write_tokens, uncached)
            cost += cache_write * (price.cache_write - price.input)
        return (cost + max(output_tokens, 0) * price.output) / 1_000_000, True
