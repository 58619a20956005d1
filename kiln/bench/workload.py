"""Synthetic, seeded request sets and arrival times for ``kiln bench``.

Prompts are random token ids (uniform over the vocabulary), so no prompt shares a prefix with another
and the prefix cache never helps; every request is greedy with ``ignore_eos`` and runs for exactly its
output length. The same seed gives the same requests on every machine.

The ShareGPT-like set imitates the lengths of vLLM's ShareGPT benchmark without the dataset: prompt
lengths lognormal with mean ~200 tokens, output lengths lognormal with mean ~250, and vLLM's
filter (prompt <= 1024, prompt + output <= 2048). A model whose context window is shorter than
2048 tokens gets every length scaled by ``context_len / 2048`` (the demo model's 512 tokens: prompts
~50, outputs ~62, prompt <= 256, prompt + output <= 512), so every request fits its window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PROMPT_MEAN, PROMPT_SIGMA = 200.0, 1.0  # lognormal: the mean in tokens, the standard deviation of the log
OUTPUT_MEAN, OUTPUT_SIGMA = 250.0, 0.8
MAX_PROMPT_LEN, MAX_TOTAL_LEN = 1024, 2048  # vLLM's ShareGPT filter; also the scale reference


@dataclass(frozen=True)
class BenchRequest:
    prompt_ids: tuple[int, ...]
    output_len: int  # tokens to generate (greedy, ignore_eos)

    def __post_init__(self):
        assert self.prompt_ids and self.output_len >= 1, (len(self.prompt_ids), self.output_len)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)


def random_prompt(rng: np.random.Generator, prompt_len: int, vocab_size: int) -> tuple[int, ...]:
    return tuple(int(t) for t in rng.integers(0, vocab_size, size=prompt_len))


def fixed_requests(num: int, prompt_len: int, output_len: int, vocab_size: int, seed: int) -> list[BenchRequest]:
    """``num`` random prompts of ``prompt_len`` tokens, each to run for ``output_len`` tokens."""
    rng = np.random.default_rng(seed)
    return [BenchRequest(random_prompt(rng, prompt_len, vocab_size), output_len) for _ in range(num)]


def length_scale(context_len: int) -> float:
    """How much the ShareGPT-like lengths shrink for a context window shorter than 2048 tokens."""
    return min(1.0, context_len / MAX_TOTAL_LEN)


def _lognormal(rng: np.random.Generator, mean: float, sigma: float, num: int) -> np.ndarray:
    return rng.lognormal(math.log(mean) - sigma**2 / 2, sigma, size=num)  # E[X] = mean


def sharegpt_like(num: int, context_len: int, vocab_size: int, seed: int) -> list[BenchRequest]:
    """``num`` requests with ShareGPT-like lengths scaled to ``context_len`` (see the module docstring)."""
    assert context_len >= 2, context_len
    rng = np.random.default_rng(seed)
    scale = length_scale(context_len)
    max_prompt = max(1, int(MAX_PROMPT_LEN * scale))
    max_total = min(context_len, int(MAX_TOTAL_LEN * scale))
    prompts = _lognormal(rng, PROMPT_MEAN * scale, PROMPT_SIGMA, num)
    outputs = _lognormal(rng, OUTPUT_MEAN * scale, OUTPUT_SIGMA, num)
    reqs = []
    for p, o in zip(prompts, outputs):
        prompt_len = min(max(1, round(p)), max_prompt)
        output_len = min(max(1, round(o)), max_total - prompt_len)
        reqs.append(BenchRequest(random_prompt(rng, prompt_len, vocab_size), output_len))
    return reqs


def poisson_arrivals(num: int, rate: float, seed: int) -> list[float]:
    """Arrival offsets in seconds of ``num`` requests at ``rate`` per second: the first at 0, then
    exponential gaps with mean 1/rate (a Poisson process). ``rate`` inf: all at 0."""
    assert rate > 0, rate
    if math.isinf(rate):
        return [0.0] * num
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=max(0, num - 1))
    return [0.0, *np.cumsum(gaps).tolist()][:num]


def parse_positive_ints(text: str) -> list[int]:
    """``1,8,32`` -> [1, 8, 32]; ValueError unless every item is a positive integer."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit() or int(item) < 1:
            raise ValueError(f"{item!r} is not a positive integer (expected a list like 1,8,32)")
        out.append(int(item))
    return out


def parse_rates(text: str) -> list[float]:
    """``1,4,16,inf`` -> [1.0, 4.0, 16.0, inf] requests per second; ValueError unless each is positive."""
    out = []
    for item in text.split(","):
        item = item.strip()
        try:
            rate = float(item)
        except ValueError:
            rate = math.nan
        if not rate > 0:  # also NaN
            raise ValueError(f"{item!r} is not a positive request rate or inf (expected a list like 1,4,16,inf)")
        out.append(rate)
    return out
