"""The paged KV cache through kiln's interface (``LLM.kv``) and the model runner, plus the pure
step preparation and cache sizing."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.errors import RequestError
from kiln.runtime import LLM, KVCacheConfig, SamplingParams
from kiln.runtime.model_runner import prepare_step

pytestmark = pytest.mark.cpu

ATOL = 1e-4
SMALL = KVCacheConfig(max_num_seqs=2, max_total_tokens=64, prefill_chunk_size=32, page_size=16)


def pages(tokens: int, page_size: int = 16) -> int:
    return -(-tokens // page_size)


def toks(start: int, n: int) -> list[int]:
    """n distinct ordinary token ids (the fixture vocabulary is 320, ids 3.. are words)."""
    return [3 + (start + i) % 317 for i in range(n)]


@pytest.fixture(scope="module")
def art(zoo):
    return zoo.artifact("llama", dtype="float32")


@pytest.fixture(scope="module")
def llm(art) -> LLM:
    """A default-sized cache (prefill chunk 256 for the 256-token context)."""
    return LLM(art)


@pytest.fixture(scope="module")
def small(art) -> LLM:
    return LLM(art, kv_config=SMALL)


@pytest.fixture
def kv(llm):
    """The default LLM's cache; every test must leave it as it found it."""
    cache = llm.kv
    free = cache.num_free_pages
    yield cache
    leaked = sorted(cache.live)
    for s in leaked:
        cache.remove_sequence(s)
    assert leaked == [], f"the test left sequences {leaked} in the cache"
    assert cache.num_free_pages == free


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


# -- pure: step preparation and sizing ---------------------------------------------------------------


@pytest.mark.parametrize("token_lists, entry, positions", [
    ([[5]], "decode", [0]),
    ([[5], [6], [7]], "batch_decode", [0, 1, 2]),
    ([[1, 2, 3]], "prefill", [2]),
    ([[1, 2], [3], [4, 5, 6]], "batch_prefill", [1, 2, 5]),
    ([[9], [8, 7]], "batch_prefill", [0, 2]),
])
def test_prepare_step(token_lists, entry, positions):
    step = prepare_step(token_lists)
    assert step.entry == entry
    assert step.token_ids.dtype == np.int32 and step.token_ids.tolist() == [t for ts in token_lists for t in ts]
    assert step.append_lens == [len(t) for t in token_lists]
    assert step.logit_positions.dtype == np.int32 and step.logit_positions.tolist() == positions


def test_kv_cache_config_for_model():
    # room for max_num_seqs full-context sequences when memory allows
    c = KVCacheConfig.for_model(256, 512)
    assert (c.max_num_seqs, c.max_total_tokens, c.prefill_chunk_size, c.page_size) == (8, 8 * 256, 256, 16)
    assert c.num_pages == 8 * 256 // 16
    # capped by memory: 1 GiB / 128 KiB per token = 8192 tokens < 8 x 4096
    c = KVCacheConfig.for_model(4096, 128 * 1024)
    assert c.max_total_tokens == 8192 and c.prefill_chunk_size == 512
    # ... but always at least one full-context sequence
    c = KVCacheConfig.for_model(4096, 1 << 20, memory_bytes=1 << 30)
    assert c.max_total_tokens == 4096
    # rounded up to whole pages
    c = KVCacheConfig.for_model(33, 512, max_num_seqs=1)
    assert c.max_total_tokens == 48 and c.max_total_tokens % c.page_size == 0 and c.prefill_chunk_size == 33
    for ctx, kvb, n in [(256, 512, 8), (100, 4096, 3), (32768, 131072, 4), (17, 1 << 30, 1)]:
        c = KVCacheConfig.for_model(ctx, kvb, max_num_seqs=n)
        assert c.max_num_seqs == n
        assert c.max_total_tokens >= ctx and c.max_total_tokens % c.page_size == 0
        assert c.prefill_chunk_size <= c.max_total_tokens  # what ModelRunner requires


def test_llm_default_cache_is_sized_for_the_model(llm):
    spec = llm.spec
    assert llm.kv.config == KVCacheConfig.for_model(spec.context_len, spec.kv_bytes_per_token)
    assert spec.kv_bytes_per_token == 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * 4


# -- the cache through the runner ------------------------------------------------------------------


def test_add_remove_restores_free_pages(llm, kv):
    free0 = kv.num_free_pages
    lens = {10: 20, 11: 5, 12: 40}
    for s in lens:
        kv.add_sequence(s)
    logits = llm.runner.forward(list(lens), [toks(s, n) for s, n in lens.items()])
    assert logits.shape == (3, llm.spec.vocab_size) and np.isfinite(logits).all()
    assert [kv.sequence_len(s) for s in lens] == list(lens.values())
    used = sum(pages(n) for n in lens.values())
    assert kv.num_free_pages == free0 - used
    llm.runner.forward([10, 11, 12], [[7], [8], [9]])  # batch decode: 21, 6, 41 tokens, no new page
    assert [kv.sequence_len(s) for s in lens] == [21, 6, 41]
    assert kv.num_free_pages == free0 - used
    kv.remove_sequence(12)
    assert kv.num_free_pages == free0 - used + pages(41)
    kv.remove_sequence(10)
    kv.remove_sequence(11)
    assert kv.num_free_pages == free0 and not kv.live


def test_fork_shares_the_prefix(llm, kv):
    prompt = toks(50, 20)
    kv.add_sequence(20)
    llm.runner.forward([20], [prompt])
    kv.fork_sequence(20, 21)
    assert kv.sequence_len(21) == kv.sequence_len(20) == 20
    both = llm.runner.forward([20, 21], [[30], [30]])
    np.testing.assert_allclose(both[0], both[1], atol=ATOL, rtol=0)
    # the child continues like an independent sequence with the same history ...
    kv.add_sequence(22)
    fresh = llm.runner.forward([22], [prompt + [30]])
    np.testing.assert_allclose(both[1], fresh[0], atol=ATOL, rtol=0)
    # ... and parent and child diverge independently afterwards
    split = llm.runner.forward([20, 21], [[40], [41]])
    ref = llm.runner.forward([22], [[41]])
    np.testing.assert_allclose(split[1], ref[0], atol=ATOL, rtol=0)
    assert np.abs(split[0] - split[1]).max() > 1e-3
    assert kv.sequence_len(20) == kv.sequence_len(21) == 22
    for s in (20, 21, 22):
        kv.remove_sequence(s)


def test_popn_then_refeed_reproduces_logits(llm, kv):
    kv.add_sequence(30)
    llm.runner.forward([30], [toks(80, 14)])
    first = llm.runner.forward([30], [[100, 101, 102]])  # prefill entry, crosses a page boundary (16)
    assert kv.sequence_len(30) == 17
    kv.popn(30, 3)
    assert kv.sequence_len(30) == 14
    again = llm.runner.forward([30], [[100, 101, 102]])
    np.testing.assert_allclose(again, first, atol=ATOL, rtol=0)
    other = llm.runner.forward([30], [[7]])  # decode entry
    kv.popn(30, 1)
    assert kv.sequence_len(30) == 17
    np.testing.assert_allclose(llm.runner.forward([30], [[7]]), other, atol=ATOL, rtol=0)
    # popping really removed the token: feeding another one gives other logits
    kv.popn(30, 1)
    assert np.abs(llm.runner.forward([30], [[8]]) - other).max() > 1e-3
    assert kv.sequence_len(30) == 18
    kv.remove_sequence(30)


def test_chunked_prefill_in_the_runner_matches_one_shot(llm, kv):
    prompt = toks(120, 45)
    kv.add_sequence(40)
    kv.add_sequence(41)
    whole = llm.runner.forward([40], [prompt])
    for i in range(0, len(prompt), 7):
        chunked = llm.runner.forward([41], [prompt[i:i + 7]])
    np.testing.assert_allclose(chunked, whole, atol=ATOL, rtol=0)
    kv.remove_sequence(40)
    kv.remove_sequence(41)


# -- generation under a small cache ------------------------------------------------------------------


def test_request_larger_than_the_cache(small):
    free0 = small.kv.num_free_pages
    with pytest.raises(RequestError, match="KV cache"):
        small.generate(["w5 w6 w7"], greedy(100))
    with pytest.raises(RequestError, match="KV cache"):  # one bad request fails the whole call up front
        small.generate(["w5 w6 w7", "w8 w9"], [greedy(4), greedy(63)])
    assert not small.kv.live and small.kv.num_free_pages == free0
    # exactly the capacity (64 tokens) fits
    (res,) = small.generate([toks(0, 20)], greedy(44))
    assert len(res.token_ids) == 44 and res.finish_reason == "length"
    assert not small.kv.live and small.kv.num_free_pages == free0


def test_more_prompts_than_sequences(small, llm):
    free0 = small.kv.num_free_pages
    prompts = [toks(7 * i, 3 + i) for i in range(5)]  # 5 prompts > max_num_seqs=2
    results = small.generate(prompts, greedy(8))
    assert len(results) == 5
    assert [r.prompt_token_ids for r in results] == prompts
    assert all(len(r.token_ids) == 8 and r.finish_reason == "length" for r in results)
    assert not small.kv.live and small.kv.num_free_pages == free0
    for p, r in zip(prompts, results):  # the same tokens as each prompt alone in a large cache
        assert llm.generate([p], greedy(8))[0].token_ids == r.token_ids


def test_long_prompt_prefilled_in_chunks(small, llm):
    prompt = toks(200, 50)  # > prefill_chunk_size=32: prefilled as 32 + 18
    assert len(prompt) > small.kv.config.prefill_chunk_size
    (chunked,) = small.generate([prompt], greedy(8))
    (whole,) = llm.generate([prompt], greedy(8))
    assert len(chunked.token_ids) == 8
    assert chunked.token_ids == whole.token_ids


def test_prompts_packed_into_one_chunk(small, llm):
    prompts = [toks(10, 20), toks(40, 20)]  # one wave; steps of 20 + 12, then 8 (a partial batch prefill)
    results = small.generate(prompts, greedy(6))
    for p, r in zip(prompts, results):
        assert r.token_ids == llm.generate([p], greedy(6))[0].token_ids
    assert not small.kv.live


def test_shared_pages_are_counted_as_tvm_frees_them(llm, kv):
    """Random adds, forks (inside and at page boundaries), appends, popn and removes on TVM's cache: after
    each, ``num_pages_of`` over every live sequence is the pages TVM has in use, a removal frees exactly
    ``num_pages_of`` that sequence less the others, and the simulated twin (the scheduler's tests run
    on it) has TVM's free-page count."""
    import random

    from kiln.runtime.kv_cache import SimulatedKVCache

    assert not kv.live
    twin = SimulatedKVCache(kv.config)
    total = kv.num_free_pages
    assert twin.num_free_pages == total
    rng = random.Random(0)
    ids = iter(range(100, 10_000))
    forks = 0
    for _ in range(300):
        live = sorted(kv.live)
        lens = {s: kv.sequence_len(s) for s in live}
        op = rng.random()
        if live and op < 0.15:
            s = rng.choice(live)
            others = {t: n for t, n in lens.items() if t != s}
            freed = kv.num_pages_of({s: lens[s]}, others)
            free = kv.num_free_pages
            kv.remove_sequence(s)
            twin.remove_sequence(s)
            assert kv.num_free_pages - free == freed
        elif len(live) < kv.config.max_num_seqs and (not live or op < 0.35):
            s = next(ids)
            kv.add_sequence(s)
            twin.add_sequence(s)
        elif len(live) < kv.config.max_num_seqs and op < 0.55 and any(lens.values()):
            parent = rng.choice([t for t in live if lens[t]])
            pos = rng.choice([lens[parent], rng.randint(1, lens[parent]), lens[parent] // 16 * 16 or lens[parent]])
            s = next(ids)
            kv.fork_sequence(parent, s, pos)
            twin.fork_sequence(parent, s, pos)
            forks += 1
        elif live and op < 0.6 and any(lens.values()):
            s = rng.choice([t for t in live if lens[t]])
            n = rng.randint(1, min(lens[s], 5))
            kv.popn(s, n)
            twin.popn(s, n)
        elif live:
            batch = rng.sample(live, rng.randint(1, len(live)))
            k = [rng.randint(1, 20) for _ in batch]
            if sum(kv.append_cost(lens[s], n) for s, n in zip(batch, k)) < kv.num_free_pages and \
                    all(lens[s] + n <= llm.spec.context_len for s, n in zip(batch, k)):
                llm.runner.forward(batch, [toks(s, n) for s, n in zip(batch, k)])
                twin.begin_forward(batch, k)
                twin.end_forward()
        lens = {s: kv.sequence_len(s) for s in kv.live}
        assert lens == {s: twin.sequence_len(s) for s in twin.live}
        assert kv.num_free_pages == twin.num_free_pages
        assert kv.num_pages_of(lens) == total - kv.num_free_pages
    assert forks > 10
    for s in list(kv.live):
        kv.remove_sequence(s)
        twin.remove_sequence(s)
