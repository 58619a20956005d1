"""kiln.bench.workload: seeded request sets that fit the context window, Poisson arrivals, list options."""

from __future__ import annotations

import math

import pytest

from kiln.bench.workload import (fixed_requests, length_scale, parse_positive_ints, parse_rates, poisson_arrivals,
                                 sharegpt_like)


@pytest.mark.parametrize("context_len", [16, 512, 2048, 8192])
def test_sharegpt_like_fits_the_context_window(context_len):
    reqs = sharegpt_like(500, context_len, vocab_size=100, seed=3)
    scale = length_scale(context_len)
    assert all(1 <= r.prompt_len <= max(1, 1024 * scale) for r in reqs)
    assert all(r.output_len >= 1 and r.prompt_len + r.output_len <= min(context_len, 2048) for r in reqs)
    assert all(0 <= t < 100 for r in reqs for t in r.prompt_ids)


def test_sharegpt_like_lengths_and_seed():
    reqs = sharegpt_like(4000, 4096, vocab_size=1000, seed=0)
    mean_prompt = sum(r.prompt_len for r in reqs) / len(reqs)
    mean_output = sum(r.output_len for r in reqs) / len(reqs)
    assert 170 < mean_prompt < 215 and 220 < mean_output < 265  # ~200 and ~250 before clipping
    assert sharegpt_like(20, 512, 1000, seed=1) == sharegpt_like(20, 512, 1000, seed=1)
    assert sharegpt_like(20, 512, 1000, seed=1) != sharegpt_like(20, 512, 1000, seed=2)
    small = sharegpt_like(4000, 512, vocab_size=1000, seed=0)  # scaled by 512 / 2048
    assert 40 < sum(r.prompt_len for r in small) / len(small) < 55


def test_fixed_requests():
    reqs = fixed_requests(3, 7, 5, vocab_size=50, seed=0)
    assert [(r.prompt_len, r.output_len) for r in reqs] == [(7, 5)] * 3
    assert len({r.prompt_ids for r in reqs}) == 3


def test_poisson_arrivals():
    times = poisson_arrivals(20_000, rate=4.0, seed=0)
    assert times[0] == 0.0 and all(a <= b for a, b in zip(times, times[1:]))
    assert times[-1] / (len(times) - 1) == pytest.approx(0.25, rel=0.03)  # mean gap 1 / rate
    assert poisson_arrivals(5, math.inf, seed=0) == [0.0] * 5
    assert poisson_arrivals(5, 2.0, seed=1) == poisson_arrivals(5, 2.0, seed=1)
    assert poisson_arrivals(1, 2.0, seed=1) == [0.0]


def test_list_options():
    assert parse_positive_ints("1,8, 32") == [1, 8, 32]
    assert parse_rates("1,0.5,inf") == [1.0, 0.5, math.inf]
    for bad in ("", "1,,2", "0", "-1", "1.5", "x"):
        with pytest.raises(ValueError, match="positive integer"):
            parse_positive_ints(bad)
    for bad in ("", "0", "-1", "nan", "fast", "1,"):
        with pytest.raises(ValueError, match="positive request rate"):
            parse_rates(bad)
