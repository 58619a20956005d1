"""Continuous batching on the simulated paged cache with a fake model (pure Python, no TVM).

The fake model's next token is a function of the sequence's whole history, so any scheduling bug that
loses, duplicates or misplaces KV shows up as a different output. A tracking cache records which tokens
each KV sequence holds, and every step checks it against what the scheduler believes.
"""

from __future__ import annotations

import random
import zlib

import pytest

from kiln.runtime.kv_cache import KVCacheConfig, SimulatedKVCache
from kiln.scheduler.scheduler import Scheduler, SchedulerConfig
from kiln.scheduler.sequence import Sequence, Status

V = 50


def next_token(history: list[int]) -> int:
    return zlib.crc32(bytes(str(history), "ascii")) % V


class TrackingKV(SimulatedKVCache):
    """The simulated cache, plus the token ids whose KV each sequence holds."""

    def __init__(self, config):
        super().__init__(config)
        self.held: dict[int, list[int]] = {}
        self.pending = None

    def add_sequence(self, seq_id):
        super().add_sequence(seq_id)
        self.held[seq_id] = []

    def remove_sequence(self, seq_id):
        super().remove_sequence(seq_id)
        del self.held[seq_id]

    def fork_sequence(self, parent_id, child_id, fork_pos=-1):
        super().fork_sequence(parent_id, child_id, fork_pos)
        self.held[child_id] = list(self.held[parent_id][:self.sequence_len(child_id)])


class Driver:
    def __init__(self, pages=64, page_size=4, max_num_seqs=8, budget=32, policy="fcfs", prefix_cache=True):
        cfg = KVCacheConfig(max_num_seqs=max_num_seqs, max_total_tokens=pages * page_size, prefill_chunk_size=budget,
                            page_size=page_size)
        self.kv = TrackingKV(cfg)
        self.sched = Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_batched_tokens=budget,
                                               page_size=page_size, policy=policy, prefix_cache=prefix_cache), self.kv)
        self.steps = 0
        self.served: dict = {}  # user -> weighted service (1 per prompt token admitted, 2 per output token)

    def add(self, prompt, max_tokens, user=None, n=1, rid=None):
        seq = Sequence(self.sched.new_seq_id(), rid or f"r{self.sched._ids}", list(prompt), len(prompt), max_tokens,
                       user=user, forks=n - 1)
        self.sched.add(seq)
        return seq

    def step(self):
        batch = self.sched.schedule()
        self.steps += 1
        assert sum(batch.num_tokens) <= self.sched.config.max_batched_tokens
        assert len(batch) <= self.sched.config.max_num_seqs
        assert len(self.sched.running) + sum(s.forks for s in self.sched.running) <= self.sched.config.max_num_seqs
        for seq, chunk in zip(batch.seqs, batch.token_lists):
            assert seq.status is Status.RUNNING and chunk
            assert self.kv.held[seq.seq_id] == seq.tokens[:seq.num_computed], "KV does not hold the sequence's tokens"
            self.kv.held[seq.seq_id].extend(chunk)
        # every running decode is in the batch when the budget allows it (no stall behind prefills)
        decodes = [s for s in self.sched.running if s.remaining == 1]
        if len(decodes) <= self.sched.config.max_batched_tokens:
            assert all(any(d is s for s in batch.seqs) for d in decodes)
        if batch:
            self.kv.begin_forward(batch.seq_ids, batch.num_tokens)  # raises if the pages were not there
            self.kv.end_forward()
        tokens, finished = [], []
        for _, seq, index in batch.samples:  # a child-to-be's first token depends on its index
            own = index == seq.index
            tokens.append(next_token(seq.tokens if own else seq.tokens[:seq.prompt_len] + [index - seq.index - 1]))
            finished.append((seq.num_generated + 1 if own else 1) >= seq.max_tokens)
            self.served[seq.user] = self.served.get(seq.user, 0) + 2
        kids = self.sched.postprocess(batch, tokens, finished)
        assert sorted(k.index for k in kids) == sorted(i for _, s, i in batch.samples if i != s.index)
        self.check_pages()
        return batch

    def check_pages(self):
        """The page counts that /metrics reports, from the sequences, against the cache's own page table."""
        pages = lambda ids: set().union(*(self.kv._pages[s] for s in ids))
        running = {s.seq_id for s in self.sched.running}
        cached = set(self.sched.cache.tokens)
        assert set(self.kv.live) == running | cached
        assert self.sched.num_cached_pages == len(pages(cached) - pages(running))
        lengths = {s: self.kv.sequence_len(s) for s in self.kv.live}
        assert self.kv.num_pages_of(lengths) == len(pages(self.kv.live)) == \
            self.kv.config.num_pages + 1 - self.kv.num_free_pages

    def run(self, limit=10_000):
        while self.sched.has_work():
            self.step()
            assert self.steps < limit
        return self


def expected(prompt, max_tokens):
    toks = list(prompt)
    for _ in range(max_tokens):
        toks.append(next_token(toks))
    return toks[len(prompt):]


def rand_prompt(rng, n):
    return [rng.randrange(V) for _ in range(n)]


@pytest.mark.parametrize("pages, prefix_cache", [(200, True), (200, False), (24, True), (24, False)])
def test_outputs_match_one_at_a_time(pages, prefix_cache):
    """Many requests of mixed lengths, shared prefixes, chunked prefill; with 24 pages they get preempted."""
    rng = random.Random(pages)
    stem = rand_prompt(rng, 30)
    reqs = []
    for i in range(30):
        prompt = (stem[:rng.randrange(0, 30)] if i % 2 else []) + rand_prompt(rng, rng.randrange(1, 40))
        reqs.append((prompt, rng.randrange(1, 25)))
    d = Driver(pages=pages, prefix_cache=prefix_cache)
    seqs = [d.add(p, m) for p, m in reqs]
    d.run()
    for seq, (prompt, m) in zip(seqs, reqs):
        assert seq.tokens[len(prompt):] == expected(prompt, m)
    stats = d.sched.stats
    if pages == 24:
        assert stats.preemptions > 0
    if prefix_cache and pages == 200:
        assert stats.prefix_cache_hits > 0
    # nothing is held but the prefix cache's sequences
    assert set(d.kv.live) == set(d.sched.cache.tokens)
    for sid in list(d.kv.live):
        d.kv.remove_sequence(sid)
    assert d.kv.num_free_pages == d.kv.config.num_pages + 1


def test_n_greater_than_one_forks_after_the_prompt():
    d = Driver(pages=64)
    prompt = list(range(10))  # 10 % 4 != 0: each child copies the partial page
    parent = d.add(prompt, 5, n=3)
    d.run()
    assert parent.tokens[10:] == expected(prompt, 5)
    assert d.sched.stats.prefill_tokens_computed == 10  # the prompt ran once for all three choices


def test_cached_pages_exclude_those_a_running_choice_still_uses():
    """Two choices of an n=3 request stop early (as a stop token would make them) while the first runs on:
    the prefix cache keeps them, but the prompt's whole pages they share with the running one are not
    the cache's alone."""
    d = Driver(pages=64, page_size=4)
    parent = d.add(list(range(10)), 8, n=3)  # 10 tokens: two whole pages shared, the third copied
    d.step()
    kids = [s for s in d.sched.running if s is not parent]
    assert len(kids) == 2
    for kid in kids:
        kid.max_tokens = kid.num_generated + 1
    d.step()  # the kids finish: cached, holding the parent's first two pages as well as their own
    assert set(d.sched.cache.tokens) == {k.seq_id for k in kids} and d.sched.running == [parent]
    own = sum(-(-k.num_computed // 4) - 2 for k in kids)  # each: the copied third page and what it appended
    assert d.sched.num_cached_pages == own and d.sched.cached_pages.num_pages == own + 2
    d.run()


def test_children_to_fork_count_against_max_num_seqs():
    d = Driver(pages=64, max_num_seqs=2)
    parent = d.add(list(range(10)), 3, n=2)  # its child is forked after the prompt: two sequences
    other = d.add([20, 21], 3)
    d.step()
    assert len(d.sched.running) == 2 and other.status is Status.WAITING
    d.run()
    assert parent.tokens[10:] == expected(list(range(10)), 3) and other.tokens[2:] == expected([20, 21], 3)


def test_prefix_reuse_computes_only_new_tokens():
    d = Driver(pages=256, page_size=16, budget=64)
    rng = random.Random(1)
    shared = rand_prompt(rng, 200)
    d.add(shared + [1, 2, 3], 4)
    d.run()
    before = d.sched.stats.prefill_tokens_computed
    second = d.add(shared + [7, 8, 9, 10, 11], 4)
    d.run()
    assert d.sched.stats.prefill_tokens_computed - before == 5
    assert second.num_cached == 200 and d.sched.stats.prefix_cache_hit_tokens == 200
    assert second.tokens[205:] == expected(shared + [7, 8, 9, 10, 11], 4)


def test_long_prompt_does_not_stall_decodes():
    d = Driver(pages=400, page_size=4, budget=16)
    short = d.add([1, 2, 3], 40)
    d.step()
    d.step()  # the short one is decoding now
    long = d.add(list(range(5, 45)) * 3, 2)
    seen_decode_steps = 0
    while long.num_computed < long.prompt_len:
        batch = d.step()
        assert any(s is short for s in batch.seqs)
        seen_decode_steps += 1
    assert seen_decode_steps >= 120 // 15  # the prompt was chunked under the budget alongside the decode
    d.run()


def test_vtc_keeps_backlogged_clients_within_the_bound_and_fcfs_does_not():
    """Two backlogged clients; 'heavy' sends 10x the requests of 'light'. VTC bounds the service gap by
    2 * max(w_in * L_input, w_out * M) with M the tokens the cache holds; FCFS lets it grow with time."""

    def trace(policy):
        d = Driver(pages=32, page_size=8, max_num_seqs=4, budget=64, policy=policy, prefix_cache=False)
        rng = random.Random(7)
        for i in range(330):  # interleaved arrivals, 10 heavy per light
            user = "light" if i % 11 == 0 else "heavy"
            d.add(rand_prompt(rng, 16), 16, user=user)
        gaps = []
        light_left = lambda: any(s.user == "light" for s in d.sched.policy.waiting())
        served = {"heavy": 0, "light": 0}
        d.served = served
        orig = d.sched.policy.on_admit

        def on_admit(seq):  # count served input tokens the way VTC charges them (once per request)
            if seq.admissions == 1 and seq.num_generated == 0:
                served[seq.user] += seq.prompt_len
            orig(seq)

        d.sched.policy.on_admit = on_admit
        while light_left():
            d.step()
            gaps.append(served["heavy"] - served["light"])
        return gaps

    bound = 2 * max(1 * 16, 2 * 32 * 8)
    vtc, fcfs = trace("vtc"), trace("fcfs")
    assert max(abs(g) for g in vtc) <= bound
    assert max(abs(g) for g in fcfs) > 4 * bound
