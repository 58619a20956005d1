"""kiln's grouped KV page manager (runtime/kv_groups.py), its page logic alone (no pool, no model): blocks
per KV owner only, a sliding owner's pages released as its window moves, whole-page forks that check the
window is still held, reference counts, and append_cost equal to what begin_forward takes."""

from __future__ import annotations

import random

import pytest

import mixattention_reference as ref
from kiln.errors import KilnError
from kiln.runtime.kv_cache import KVCacheConfig
from kiln.runtime.kv_groups import GroupedKVCache

SPEC = ref.character_ai_spec(window=64, context_len=4096)  # owners: 0 global; 1, 3, 7, 9 sliding
P = 16


def cache(tokens=4096) -> GroupedKVCache:
    return GroupedKVCache(SPEC, KVCacheConfig(max_num_seqs=8, max_total_tokens=tokens, prefill_chunk_size=512))


def grow(kv, seq, k):
    taken = kv.num_free_pages
    cost = kv.append_cost(kv.sequence_len(seq), k)
    kv.begin_forward([seq], [k])
    assert taken - kv.num_free_pages == cost  # the scheduler's plan is what the step takes
    kv.end_forward()


def held(kv, seq):
    return (kv._table[:, kv._rows[seq]] >= 0).sum(axis=1).tolist()  # blocks per owner


def test_blocks_only_for_owners_and_sliding_pages_are_released():
    kv = cache()
    assert kv.num_blocks == 4096 // P * 5  # the bytes of 4096 tokens of all five owners
    kv.add_sequence(0)
    for L in range(0, 2000, 100):
        grow(kv, 0, 100)
        n = L + 100
        first = max(0, n // P * P - 63)  # the window of a query at the page boundary below n
        window_pages = -(-n // P) - first // P
        assert held(kv, 0) == [-(-n // P)] + [window_pages] * 4
        assert window_pages <= -(-(64 + P) // P) + 1
    assert kv.num_blocks - kv.num_free_pages == 125 + 4 * held(kv, 0)[1]  # not 5 x 125
    kv.remove_sequence(0)
    assert kv.num_free_pages == kv.num_blocks


def test_forks_share_whole_pages_within_the_window():
    kv = cache()
    kv.add_sequence(0)
    grow(kv, 0, 119)
    assert kv.fork_point(0, 119) == 112  # the page boundary below
    assert kv.fork_cost(0, 119) == 0  # its window's pages are all held
    before = kv.num_free_pages
    kv.fork_sequence(0, 1, 112)
    assert kv.num_free_pages == before and kv.sequence_len(1) == 112  # nothing copied
    with pytest.raises(KilnError, match="fork_point"):
        kv.fork_sequence(0, 2, 100)
    kv.remove_sequence(0)
    assert held(kv, 1)[0] == 7 and kv.num_free_pages < kv.num_blocks  # the child keeps the shared pages
    grow(kv, 1, 30)
    kv.remove_sequence(1)
    assert kv.num_free_pages == kv.num_blocks


def test_a_fork_takes_back_released_sliding_pages_until_their_blocks_are_reused():
    kv = cache(1024)
    kv.add_sequence(0)
    grow(kv, 0, 160)  # the sliding owners released pages 0..5 (positions < 96)
    assert held(kv, 0)[1] == 4
    # a fork at 64 reads positions 1..63 (pages 0..3): released, but their blocks are still free and unused
    assert kv.fork_point(0, 70) == 64 and kv.fork_cost(0, 70) == 4 * 4
    before = kv.num_free_pages
    kv.fork_sequence(0, 1, 64)
    assert before - kv.num_free_pages == 16 and held(kv, 1) == [4, 4, 4, 4, 4]
    grow(kv, 1, 40)
    kv.remove_sequence(1)
    # hand out every free block once: the released pages' blocks now hold other K/V
    kv.add_sequence(2)
    grow(kv, 2, (kv.num_free_pages // 5) * P)
    assert kv.fork_point(0, 70) == 0 and kv.fork_cost(0, 70) == 0
    assert kv.fork_point(0, 160) == 160  # the window it still holds
    for seq in (0, 2):
        kv.remove_sequence(seq)
    assert kv.num_free_pages == kv.num_blocks


def test_a_random_workload_frees_everything_and_never_overdraws():
    rng = random.Random(0)
    kv = cache(2048)
    live = {}
    for step in range(400):
        if live and rng.random() < 0.1:
            sid = live.pop(rng.choice(list(live)))
            freed, free = kv.num_pages_of({sid: 0}, {s: 0 for s in live}), kv.num_free_pages
            kv.remove_sequence(sid)
            assert kv.num_free_pages - free == freed
        elif len(live) < 6 and rng.random() < 0.3:
            sid = step
            if live and rng.random() < 0.5:
                parent = rng.choice(list(live))
                pos = kv.fork_point(parent, kv.sequence_len(parent))
                if pos:
                    kv.fork_sequence(parent, sid, pos)
                else:
                    kv.add_sequence(sid)
            else:
                kv.add_sequence(sid)
            live[sid] = sid
        if live:
            seqs = rng.sample(list(live), rng.randint(1, len(live)))
            lens = [rng.choice([1, 1, 1, 17, 70]) for _ in seqs]
            if sum(kv.append_cost(kv.sequence_len(s), k) for s, k in zip(seqs, lens)) <= kv.num_free_pages:
                kv.begin_forward(seqs, lens)
                kv.end_forward()
        refs = {}
        for row in kv._rows.values():
            t = kv._table[:, row]
            for b in t[t >= 0].tolist():
                refs[b] = refs.get(b, 0) + 1
        assert all(kv._refs[b] == c for b, c in refs.items()) and len(refs) + kv.num_free_pages == kv.num_blocks
        assert kv.num_pages_of({s: 0 for s in live}) == len(refs)
    for sid in list(live):
        kv.remove_sequence(sid)
    assert kv.num_free_pages == kv.num_blocks


def test_a_page_set_counts_the_blocks_finished_sequences_alone_hold():
    """The scheduler's count of the prefix cache's blocks: finished sequences join a page set and grow no
    more, new ones fork from them (prefix hits) or from running ones, and finished ones are evicted; the
    set's blocks less those running sequences also hold are exactly what the page tables say."""
    rng = random.Random(1)
    kv = cache(2048)
    running, finished = set(), set()
    kept = kv.page_set()
    ids = iter(range(10_000))

    def blocks(seqs):
        return {b for s in seqs for b in kv._table[:, kv._rows[s]].reshape(-1).tolist() if b >= 0}

    for _ in range(400):
        op = rng.random()
        if finished and op < 0.1:
            sid = rng.choice(sorted(finished))
            finished.discard(sid)
            kept.remove(sid)
            kv.remove_sequence(sid)
        elif running and op < 0.25:
            sid = rng.choice(sorted(running))
            running.discard(sid)
            finished.add(sid)
            kept.add(sid, kv.sequence_len(sid))
        elif len(running) + len(finished) < 8 and op < 0.5:
            sid = next(ids)
            parents = sorted(running | finished)
            parent = rng.choice(parents) if parents and rng.random() < 0.7 else None
            pos = kv.fork_point(parent, kv.sequence_len(parent)) if parent is not None else 0
            if pos:
                kv.fork_sequence(parent, sid, pos)
            else:
                kv.add_sequence(sid)
            running.add(sid)
        if running:
            seqs = rng.sample(sorted(running), rng.randint(1, len(running)))
            lens = [rng.choice([1, 1, 1, 17, 70]) for _ in seqs]
            if sum(kv.append_cost(kv.sequence_len(s), k) for s, k in zip(seqs, lens)) <= kv.num_free_pages:
                kv.begin_forward(seqs, lens)
                kv.end_forward()
        assert kept.num_pages == len(blocks(finished))
        assert kept.num_pages - kept.num_held_by(running) == len(blocks(finished) - blocks(running))
