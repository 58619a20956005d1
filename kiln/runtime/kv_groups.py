"""kiln's own page manager: KV memory per distinct KV owner, sliding-window pages freed as the window moves.

For artifacts compiled by passes/paged_groups.py (a model with sliding-window layers or cross-layer
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
boundary, and to 0 when a sliding owner of the parent no longer holds the pages the child's window
needs. Blocks are reference counted, so a page stays while any sequence holds it.

Per step, ``begin_forward`` takes the blocks the new tokens need and builds the kernels' inputs
(``args``: pool, page tables, slots, token rows and positions; ir/paged_kernels.py documents them).
The bookkeeping is NumPy over one table ``[owners, rows, pages]`` (a row per live sequence), so a
step's cost does not grow with a Python loop over its sequences.
"""

from __future__ import annotations

import numpy as np

from ..errors import KilnError
from ..ir.abi import GROUPED_PAGE_SIZE
from .kv_cache import KVCacheConfig


class GroupedKVCache:
    def __init__(self, spec, config: KVCacheConfig, device: str = "cpu", ffi=None):
        if config.page_size != GROUPED_PAGE_SIZE:
            raise KilnError(f"this artifact's KV kernels use pages of {GROUPED_PAGE_SIZE} tokens, not {config.page_size}")
        self.config, self.device, self._ffi = config, device, ffi
        self.P = P = config.page_size
        self.owners = [i for i, src in enumerate(spec.kv_sources) if src == i]
        self.sliding = np.array([spec.layer_types[i] == "sliding" for i in self.owners])
        self._srows = np.nonzero(self.sliding)[0]
        self.window = int(spec.sliding_window or 0)
        self.num_blocks = config.num_pages * len(self.owners)
        self._free = list(range(self.num_blocks - 1, -1, -1))
        self._refs = np.zeros(self.num_blocks, dtype=np.int32)
        # owner, row (one per live sequence), absolute page -> block id; -1 where not held
        self._table = np.full((len(self.owners), 16, 8), -1, dtype=np.int32)
        self._rows: dict[int, int] = {}  # seq id -> row
        self._spare = list(range(15, -1, -1))
        self._lens = np.zeros(16, dtype=np.int64)
        self._released = np.zeros(16, dtype=np.int64)  # sliding owners hold no page below this one
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

    def fork_cost(self, pos: int) -> int:
        return 0  # forks share whole pages; the child's partial page is recomputed

    def fork_point(self, parent_id: int, pos: int) -> int:
        """The position a fork of ``parent_id`` at ``pos`` can really share (<= pos; 0: none)."""
        pos = pos // self.P * self.P
        if pos and len(self._srows):
            need = max(0, pos - self.window + 1) // self.P
            if (self._table[self._srows, self._rows[parent_id], need:pos // self.P] < 0).any():
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

    def pages_held(self, seq_id: int, length: int) -> int:
        return int((self._table[:, self._rows[seq_id]] >= 0).sum())  # blocks, shared ones included

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
            self._spare = list(range(2 * R - 1, R - 1, -1))
        row = self._spare.pop()
        self._rows[seq_id] = row
        self._lens[row] = self._released[row] = 0
        self.live.add(seq_id)
        return row

    def _ensure_pages(self, pages: int) -> None:
        O, R, C = self._table.shape
        if pages > C:
            table = np.full((O, R, max(pages, 2 * C)), -1, dtype=np.int32)
            table[:, :, :C] = self._table
            self._table = table

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
        if len(self._srows):
            self._released[row] = int(self._kept_from(pos)) // self.P
            self._table[self._srows, row, :self._released[row]] = -1
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
        out = np.array(self._free[len(self._free) - count:], dtype=np.int32)
        del self._free[len(self._free) - count:]
        self._refs[out] = 1
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
            self.args = [self.pool] + [self._to_device(a.astype(np.int32)) for a in (pages, slots, token_seq, token_pos)]

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
            sr = self._srows[:, None]
            self._release(self._table[sr, r[None, :], s[None, :]].reshape(-1))
            self._table[sr, r[None, :], s[None, :]] = -1
        else:
            for row, lo, hi in zip(r.tolist(), s.tolist(), c.tolist()):
                self._release(self._table[self._srows, row, lo:hi].reshape(-1))
                self._table[self._srows, row, lo:hi] = -1
        self._released[r] = c
