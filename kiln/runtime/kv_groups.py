"""kiln's own page manager: KV memory per distinct KV owner, sliding-window pages freed as the window moves.

For artifacts compiled by passes/lower_paged_groups.py (a model with sliding-window layers or cross-layer
KV sharing). One pool of *blocks*, ``[num_blocks, 2, kv_heads, P, head_dim]``, is shared by every
KV-owning layer; a block holds P tokens of one owner. Sharing layers own nothing. A sequence holds,
per owner, a page table indexed by absolute page number (token t is in page t // P):

- a **global** owner keeps every page of the sequence;
- a **sliding** owner (window W) keeps only the pages a future query can read: after a step that
  leaves the sequence at length L, pages wholly before ``floor(L / P) * P - W + 1`` are released
  (one page more than the window strictly needs, so a fork at the page boundary below L still finds
  the keys its window reads).

The same bytes as TVM's cache of ``max_total_tokens`` tokens for these owners buy ``num_pages x
owners`` blocks; what a sequence costs is counted in blocks (``append_cost``), so the scheduler
admits by the memory the sequence really takes: a 2,000-token sequence of the Character.AI 13-layer
map costs ``1 x 125 + 4 x 6`` blocks, not ``13 x 125``.

Forks (prefix reuse, n > 1) share whole pages only: ``fork_point`` rounds the position down to a page
boundary. A fork also needs, for every sliding owner, the pages its window reads. A sliding page the
parent released is remembered (block id and the block's allocation count): freed blocks are handed
out oldest first, and until its block is handed out again the page still holds the parent's K/V, so a
fork takes it back (``fork_cost`` counts those blocks). Where a needed page is gone, the fork point
is 0. Blocks are reference counted, so a page stays while any sequence holds it.

Per step, ``begin_forward`` takes the blocks the new tokens need and builds the kernels' inputs
(``args``: pool, page tables, slots, token rows and positions; ir/paged_kernels.py documents them).
The bookkeeping is NumPy over one table ``[owners, rows, pages]`` (a row per live sequence), so a
step's cost does not grow with a Python loop over its sequences.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import numpy as np

from ..errors import KilnError
from ..ir.abi import GROUPED_PAGE_SIZE
from .kv_cache import KVCacheConfig, pages_of


class GroupedKVCache:
    def __init__(self, spec, config: KVCacheConfig, device: str = "cpu", ffi=None):
        if config.page_size != GROUPED_PAGE_SIZE:
            raise KilnError(f"this artifact's KV kernels use pages of {GROUPED_PAGE_SIZE} tokens, "
                            f"not {config.page_size}")
        self.config, self.device, self._ffi = config, device, ffi
        self.P = P = config.page_size
        self.owners = [i for i, src in enumerate(spec.kv_sources) if src == i]
        self.sliding = np.array([spec.layer_types[i] == "sliding" for i in self.owners])
        self._srows = np.nonzero(self.sliding)[0]
        self.window = int(spec.sliding_window or 0)
        self.num_blocks = config.num_pages * len(self.owners)
        self._free = deque(range(self.num_blocks))  # oldest freed first: released pages live on longest
        self._refs = np.zeros(self.num_blocks, dtype=np.int32)
        self._gen = np.zeros(self.num_blocks, dtype=np.int64)  # times each block was handed out
        # owner, row (one per live sequence), absolute page -> block id; -1 where not held
        self._table = np.full((len(self.owners), 16, 8), -1, dtype=np.int32)
        self._rows: dict[int, int] = {}  # seq id -> row
        self._spare = list(range(15, -1, -1))
        self._lens = np.zeros(16, dtype=np.int64)
        self._released = np.zeros(16, dtype=np.int64)  # sliding owners hold no page below this one
        # sliding owner, row, page -> the block it was released from, and that block's _gen then
        self._ghost = np.full((len(self._srows), 16, 8), -1, dtype=np.int32)
        self._ghost_gen = np.zeros((len(self._srows), 16, 8), dtype=np.int64)
        self.live: set[int] = set()
        self._batch = None
        self._keep: list = []
        self.args: list = []
        self.handle = None
        self.pool = None
        if ffi is not None:  # a real cache: the pool on the device (tests of the page logic pass no ffi)
            import torch

            shape = (self.num_blocks, 2, spec.num_kv_heads, P, spec.head_dim)
            self._pool_t = torch.zeros(shape, dtype=getattr(torch, spec.dtype), device=device)
            self.pool = ffi.from_dlpack(self._pool_t)

    # -- the page arithmetic the scheduler plans with ---------------------------------------------

    def _kept_from(self, length):
        """First position a sliding owner keeps after a step that left the sequence at ``length``."""
        return np.maximum(0, (length // self.P) * self.P - self.window + 1)

    def _pages_span(self, lo: int, hi: int) -> int:
        return 0 if hi <= lo else (hi - 1) // self.P - lo // self.P + 1

    def append_cost(self, length: int, k: int) -> int:
        """Blocks that appending ``k`` tokens to a sequence of ``length`` takes: a new page for every owner
        (a sliding owner too: its old pages go back at the end of the step, ``end_forward``)."""
        return len(self.owners) * (-(-(length + k) // self.P) + (-length // self.P))

    def _window(self, parent_id: int, pos: int):
        """For a fork at page boundary ``pos``: the sliding pages its window reads, as (first page, the
        parent's blocks there, ghost blocks still intact there)."""
        row, need, end = self._rows[parent_id], max(0, pos - self.window + 1) // self.P, pos // self.P
        held = self._table[self._srows, row, need:end]
        ghost = self._ghost[:, row, need:end]
        intact = (held < 0) & (ghost >= 0) & (self._gen[np.maximum(ghost, 0)] == self._ghost_gen[:, row, need:end])
        return need, held, np.where(intact, ghost, -1)

    def fork_cost(self, parent_id: int, pos: int) -> int:
        """Blocks a fork at ``fork_point(parent_id, pos)`` takes from the free ones: released sliding pages
        it takes back (whole pages are shared, the partial page recomputed)."""
        if parent_id not in self._rows:  # not admitted yet: nothing of it was released
            return 0
        pos = self.fork_point(parent_id, pos)
        return int((self._window(parent_id, pos)[2] >= 0).sum()) if pos and len(self._srows) else 0

    def fork_point(self, parent_id: int, pos: int) -> int:
        """The position a fork of ``parent_id`` at ``pos`` can really share (<= pos; 0: none)."""
        pos = pos // self.P * self.P
        if pos and len(self._srows):
            _, held, back = self._window(parent_id, pos)
            if ((held < 0) & (back < 0)).any():
                return 0
        return pos

    def max_sequence_tokens(self, context_len: int) -> int:
        """The longest sequence the pool can hold alone."""
        slide = len(self._srows) * (self._pages_span(0, self.window + self.P + self.config.prefill_chunk_size) + 1)
        glob = len(self.owners) - len(self._srows)
        room = self.num_blocks - slide
        if room < 0:
            return 0
        return context_len if glob == 0 else min(context_len, room // glob * self.P)

    # -- KVCache protocol --------------------------------------------------------------------------

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    def page_set(self) -> "BlockPageSet":
        return BlockPageSet(self)

    def num_pages_of(self, seqs: dict[int, int], excluding: Iterable[int] = ()) -> int:
        return pages_of(self.page_set(), seqs, excluding)

    def sequence_len(self, seq_id: int) -> int:
        return int(self._lens[self._rows[seq_id]])

    def _new_row(self, seq_id: int) -> int:
        assert seq_id not in self.live, seq_id
        if not self._spare:  # twice the rows
            O, R, C = self._table.shape
            table = np.full((O, 2 * R, C), -1, dtype=np.int32)
            table[:, :R] = self._table
            self._table = table
            self._lens = np.concatenate([self._lens, np.zeros(R, dtype=np.int64)])
            self._released = np.concatenate([self._released, np.zeros(R, dtype=np.int64)])
            S = len(self._srows)
            ghost, ghost_gen = np.full((S, 2 * R, C), -1, dtype=np.int32), np.zeros((S, 2 * R, C), dtype=np.int64)
            ghost[:, :R], ghost_gen[:, :R] = self._ghost, self._ghost_gen
            self._ghost, self._ghost_gen = ghost, ghost_gen
            self._spare = list(range(2 * R - 1, R - 1, -1))
        row = self._spare.pop()
        self._rows[seq_id] = row
        self._lens[row] = self._released[row] = 0
        self.live.add(seq_id)
        return row

    def _ensure_pages(self, pages: int) -> None:
        O, R, C = self._table.shape
        if pages > C:
            C2 = max(pages, 2 * C)
            table = np.full((O, R, C2), -1, dtype=np.int32)
            table[:, :, :C] = self._table
            self._table = table
            S = len(self._srows)
            ghost, ghost_gen = np.full((S, R, C2), -1, dtype=np.int32), np.zeros((S, R, C2), dtype=np.int64)
            ghost[:, :, :C], ghost_gen[:, :, :C] = self._ghost, self._ghost_gen
            self._ghost, self._ghost_gen = ghost, ghost_gen

    def add_sequence(self, seq_id: int) -> None:
        self._new_row(seq_id)

    def _release(self, blocks: np.ndarray) -> None:
        blocks = blocks[blocks >= 0]
        if blocks.size:
            np.subtract.at(self._refs, blocks, 1)
            self._free.extend(np.unique(blocks[self._refs[blocks] == 0]).tolist())

    def remove_sequence(self, seq_id: int) -> None:
        row = self._rows.pop(seq_id)
        self._release(self._table[:, row].reshape(-1))
        self._table[:, row] = -1
        self._ghost[:, row] = -1
        self._spare.append(row)
        self.live.discard(seq_id)

    def fork_sequence(self, parent_id: int, child_id: int, fork_pos: int = -1) -> None:
        assert child_id not in self.live and parent_id in self.live
        pos = self.sequence_len(parent_id) if fork_pos == -1 else fork_pos
        if pos != self.fork_point(parent_id, pos):
            raise KilnError(f"cannot fork sequence {parent_id} at {pos}: use fork_point() (whole pages, in window)")
        parent = self._rows[parent_id]
        row = self._new_row(child_id)
        npages = pos // self.P
        self._table[:, row, :npages] = self._table[:, parent, :npages]
        if len(self._srows) and npages:
            need, held, back = self._window(parent_id, pos)
            self._released[row] = need
            self._table[self._srows, row, :need] = -1
            taken = back[back >= 0]
            for blk in taken[self._refs[taken] == 0].tolist():  # free again: take it out of the free list
                self._free.remove(blk)
            self._table[self._srows, row, need:npages] = np.where(held >= 0, held, back)
        shared = self._table[:, row, :npages]
        np.add.at(self._refs, shared[shared >= 0], 1)
        self._lens[row] = pos

    def popn(self, seq_id: int, n: int) -> None:
        row = self._rows[seq_id]
        keep = int(self._lens[row]) - n
        assert 0 <= keep
        first = -(-keep // self.P)
        if len(self._srows) and \
                (self._table[self._srows, row, int(self._kept_from(keep)) // self.P:first] < 0).any():
            raise KilnError("popn: the sliding-window pages this length needs were already released")
        self._release(self._table[:, row, first:].reshape(-1))
        self._table[:, row, first:] = -1
        self._lens[row] = keep

    def _take(self, count: int) -> np.ndarray:
        if count > len(self._free):
            raise KilnError("the KV cache ran out of blocks (the scheduler plans with append_cost; this is a bug)")
        out = np.fromiter((self._free.popleft() for _ in range(count)), dtype=np.int32, count=count)
        self._refs[out] = 1
        self._gen[out] += 1
        return out

    def begin_forward(self, seq_ids: list[int], append_lens: list[int]) -> None:
        P, O = self.P, len(self.owners)
        b = len(seq_ids)
        rows = np.fromiter((self._rows[s] for s in seq_ids), dtype=np.int64, count=b)
        k = np.asarray(append_lens, dtype=np.int64)
        L = self._lens[rows]
        first, end = (L + P - 1) // P, (L + k + P - 1) // P  # pages [first, end) are new for every owner
        self._ensure_pages(int(end.max()))
        new = end - first
        if (new <= 1).all():  # decodes and short chunks: at most one new page each, in one scatter
            idx = np.nonzero(new)[0]
            if idx.size:
                self._table[:, rows[idx], first[idx]] = self._take(O * idx.size).reshape(O, idx.size)
        else:
            for i in np.nonzero(new)[0]:
                self._table[:, rows[i], first[i]:end[i]] = self._take(O * int(new[i])).reshape(O, -1)
        starts = np.cumsum(k) - k
        token_seq = np.repeat(np.arange(b), k)
        token_pos = np.arange(int(k.sum())) - starts[token_seq] + L[token_seq]
        slots = self._table[:, rows[token_seq], token_pos // P] * P + token_pos % P
        pages = self._table[:, rows, :int(end.max())]
        self._lens[rows] = L + k
        self._batch = rows
        if self._ffi is not None:
            self._keep = []
            self.args = [self.pool] + [self._to_device(a.astype(np.int32))
                                       for a in (pages, slots, token_seq, token_pos)]

    def _to_device(self, a: np.ndarray):
        import torch

        t = torch.from_numpy(np.ascontiguousarray(a)).to(self.device, copy=True)
        self._keep.append(t)
        return self._ffi.from_dlpack(t)

    def end_forward(self) -> None:
        """Release the sliding owners' pages that slid out of every future query's window."""
        rows, self._batch, self.args, self._keep = self._batch, None, [], []
        if rows is None or not len(self._srows):
            return
        cut = self._kept_from(self._lens[rows]) // self.P
        start = self._released[rows]
        todo = np.nonzero(cut > start)[0]
        if not todo.size:
            return
        r, s, c = rows[todo], start[todo], cut[todo]
        if (c - s == 1).all():  # decodes: one page each
            self._slide_out(self._srows[:, None], r[None, :], s[None, :])
        else:
            for row, lo, hi in zip(r.tolist(), s.tolist(), c.tolist()):
                self._slide_out(self._srows, row, slice(lo, hi))
        self._released[r] = c

    def _slide_out(self, owners, rows, pages) -> None:
        """Release sliding pages, remembering their blocks for forks (see the module docstring)."""
        blocks = self._table[owners, rows, pages]
        ghosts = (slice(None), rows, pages) if not isinstance(rows, np.ndarray) else (
            np.arange(len(self._srows))[:, None], rows, pages)
        self._ghost[ghosts] = blocks
        self._ghost_gen[ghosts] = self._gen[np.maximum(blocks, 0)]
        self._release(blocks.reshape(-1))
        self._table[owners, rows, pages] = -1


class BlockPageSet:
    """The distinct blocks of a set of sequences of a ``GroupedKVCache`` (kv_cache.PageSet): a count per
    block of the members holding it. A member's page table must not change while it is in the set (a
    finished sequence's does not: only a step's sequences take or release blocks)."""

    def __init__(self, kv: GroupedKVCache):
        self.kv = kv
        self.num_pages = 0
        self._count = np.zeros(kv.num_blocks, dtype=np.int32)
        self._members: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._members)

    def add(self, seq_id: int, length: int) -> None:
        assert seq_id not in self._members, seq_id
        row = self.kv._table[:, self.kv._rows[seq_id]]
        blocks = self._members[seq_id] = row[row >= 0]  # a block is in one place of one row
        self.num_pages += int((self._count[blocks] == 0).sum())
        self._count[blocks] += 1

    def remove(self, seq_id: int) -> None:
        blocks = self._members.pop(seq_id)
        self._count[blocks] -= 1
        self.num_pages -= int((self._count[blocks] == 0).sum())

    def num_held_by(self, seq_ids: Iterable[int]) -> int:
        rows = [self.kv._rows[s] for s in seq_ids]
        if not rows:
            return 0
        blocks = self.kv._table[:, rows]
        blocks = blocks[blocks >= 0]
        return int(np.unique(blocks[self._count[blocks] > 0]).size)
