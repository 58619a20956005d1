"""The prefix cache: a radix tree over the tokens of finished sequences whose KV is kept in the cache.

A finished sequence is not removed from the paged KV cache; it stays there under its own id as a
*cached sequence*, and its computed tokens are inserted into the tree. A new request walks the tree
for its longest prefix held by some cached sequence, and the scheduler forks that sequence at the
match length (the KV cache's fork shares every full page and copies the partial one), so only the
new tokens are computed. Cached sequences are evicted least-recently-used first when pages are
needed; the KV cache's block reference counts keep pages that a running fork still uses.

Invariant: every node's ``seqs`` is exactly the set of cached sequences whose tokens contain the
node's whole path from the root; a node with no sequence is removed.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(eq=False)
class _Node:
    key: tuple[int, ...]  # the edge's tokens, from the parent to this node
    parent: "_Node | None"
    children: dict[int, "_Node"] = field(default_factory=dict)
    seqs: set[int] = field(default_factory=set)


class PrefixCache:
    def __init__(self):
        self.root = _Node((), None)
        self.tokens: dict[int, tuple[int, ...]] = {}  # cached seq id -> its tokens with KV
        self._clock = 0
        self._last_use: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self.tokens

    def _touch(self, seq_id: int) -> None:
        self._clock += 1
        self._last_use[seq_id] = self._clock

    def match(self, tokens: list[int]) -> tuple[int | None, int]:
        """(a cached sequence holding the longest cached prefix of ``tokens``, its length); (None, 0) if none."""
        node, depth, best = self.root, 0, (None, 0)
        while depth < len(tokens):
            child = node.children.get(tokens[depth])
            if child is None:
                break
            key = child.key
            n = 0
            while n < len(key) and depth + n < len(tokens) and key[n] == tokens[depth + n]:
                n += 1
            best = (self._freshest(child.seqs), depth + n)
            if n < len(key):
                break
            node, depth = child, depth + n
        if best[0] is not None:
            self._touch(best[0])
        return best

    def _freshest(self, seqs: set[int]) -> int:
        return max(seqs, key=lambda s: self._last_use[s])

    def covers(self, tokens: list[int] | tuple[int, ...]) -> bool:
        """Whether some cached sequence already holds all of ``tokens``."""
        node, depth = self.root, 0
        while depth < len(tokens):
            child = node.children.get(tokens[depth])
            if child is None:
                return False
            key = child.key
            n = min(len(key), len(tokens) - depth)
            if tuple(tokens[depth:depth + n]) != key[:n]:
                return False
            node, depth = child, depth + n
        return True

    def insert(self, seq_id: int, tokens: list[int] | tuple[int, ...]) -> None:
        assert seq_id not in self.tokens and len(tokens) > 0
        tokens = tuple(tokens)
        self.tokens[seq_id] = tokens
        self._touch(seq_id)
        node, depth = self.root, 0
        while depth < len(tokens):
            child = node.children.get(tokens[depth])
            if child is None:
                leaf = _Node(tokens[depth:], node, seqs={seq_id})
                node.children[tokens[depth]] = leaf
                return
            key = child.key
            n = 0
            while n < len(key) and depth + n < len(tokens) and key[n] == tokens[depth + n]:
                n += 1
            if n < len(key):  # split the edge so this sequence ends or branches at a node boundary
                mid = _Node(key[:n], node, seqs=set(child.seqs))
                node.children[key[0]] = mid
                child.key, child.parent = key[n:], mid
                mid.children[key[n]] = child
                child = mid
            child.seqs.add(seq_id)
            node, depth = child, depth + n

    def remove(self, seq_id: int) -> None:
        tokens = self.tokens.pop(seq_id)
        self._last_use.pop(seq_id, None)
        node, depth = self.root, 0
        path = []
        while depth < len(tokens):
            node = node.children[tokens[depth]]
            path.append(node)
            depth += len(node.key)
        for node in reversed(path):
            node.seqs.discard(seq_id)
            if not node.seqs:
                del node.parent.children[node.key[0]]
            elif len(node.children) == 1 and node.seqs == next(iter(node.children.values())).seqs:
                self._merge(node)

    @staticmethod
    def _merge(node: _Node) -> None:
        """Fold a node into its only child when they hold the same sequences (keeps the tree a radix tree)."""
        (child,) = node.children.values()
        child.key = node.key + child.key
        child.parent = node.parent
        node.parent.children[child.key[0]] = child

    def lru(self) -> list[int]:
        """Cached sequence ids, least recently used first."""
        return sorted(self.tokens, key=self._last_use.__getitem__)

    def num_nodes(self) -> int:
        stack, n = [self.root], 0
        while stack:
            node = stack.pop()
            n += 1
            stack.extend(node.children.values())
        return n - 1
