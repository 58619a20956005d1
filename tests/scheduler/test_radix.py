"""The prefix cache's radix tree against a brute-force model (pure Python)."""

from __future__ import annotations

import random

from kiln.scheduler.radix import PrefixCache


def brute_match(entries: dict[int, tuple], tokens: list[int]) -> int:
    best = 0
    for toks in entries.values():
        n = 0
        while n < len(toks) and n < len(tokens) and toks[n] == tokens[n]:
            n += 1
        best = max(best, n)
    return best


def check_invariant(cache: PrefixCache) -> None:
    """Every node's seqs are exactly the cached sequences containing its whole path; no empty nodes."""
    stack = [(cache.root, ())]
    while stack:
        node, path = stack.pop()
        for first, child in node.children.items():
            assert child.key and child.key[0] == first and child.parent is node
            full = path + child.key
            holders = {s for s, t in cache.tokens.items() if t[:len(full)] == full}
            assert child.seqs == holders and holders
            stack.append((child, full))


def test_match_insert_remove_against_brute_force():
    rng = random.Random(0)
    cache, entries, next_id = PrefixCache(), {}, 0
    stems = [[rng.randrange(8) for _ in range(rng.randrange(1, 30))] for _ in range(5)]
    for step in range(600):
        op = rng.random()
        if op < 0.45 or not entries:
            toks = rng.choice(stems)[:rng.randrange(1, 31)] + [rng.randrange(8) for _ in range(rng.randrange(0, 10))]
            if not toks or cache.covers(toks):
                assert any(t[:len(toks)] == tuple(toks) for t in entries.values()) or not toks
                continue
            cache.insert(next_id, toks)
            entries[next_id] = tuple(toks)
            next_id += 1
        elif op < 0.7:
            victim = rng.choice(list(entries))
            cache.remove(victim)
            del entries[victim]
        else:
            query = rng.choice(stems)[:rng.randrange(1, 31)] + [rng.randrange(8) for _ in range(rng.randrange(0, 5))]
            seq, n = cache.match(query)
            assert n == brute_match(entries, query)
            if n:
                assert entries[seq][:n] == tuple(query[:n])
            else:
                assert seq is None
        check_invariant(cache)
    for s in list(entries):
        cache.remove(s)
    assert cache.num_nodes() == 0 and len(cache) == 0


def test_lru_order_follows_use():
    cache = PrefixCache()
    cache.insert(1, [1, 2, 3])
    cache.insert(2, [4, 5])
    cache.insert(3, [6])
    assert cache.lru() == [1, 2, 3]
    assert cache.match([1, 2, 9]) == (1, 2)
    assert cache.lru() == [2, 3, 1]


def test_shared_prefix_splits_and_merges():
    cache = PrefixCache()
    cache.insert(1, [1, 2, 3, 4])
    cache.insert(2, [1, 2, 7])
    assert cache.num_nodes() == 3  # [1,2] -> [3,4] | [7]
    assert cache.match([1, 2, 7, 8])[1] == 3
    cache.remove(2)
    assert cache.num_nodes() == 1  # merged back into one edge
    assert cache.match([1, 2, 3, 4, 5]) == (1, 4)
    assert cache.covers([1, 2, 3]) and not cache.covers([1, 2, 7])
