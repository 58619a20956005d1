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
        self.window = int(spec.sliding_window or 0)
        self.num_blocks = config.num_pages * len(self.owners)
        self._free = list(range(self.num_blocks - 1, -1, -1))
        self._refs = np.zeros(self.num_blocks, dtype=np.int32)
        self._tables: dict[int, np.ndarray] = {}  # seq id -> [owners, capacity] block ids, -1 where not held
        self._len: dict[int, int] = {}
        self.live: set[int] = set()
        self._batch: list[int] = []
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

    def _kept_from(self, length: int) -> int:
        """First position a sliding owner keeps after a step that left the sequence at ``length``."""
        return max(0, (length // self.P) * self.P - self.window + 1)

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
        if pos and self.sliding.any():
            need = max(0, pos - self.window + 1) // self.P
            t = self._tables[parent_id][self.sliding]
            if (t[:, need:pos // self.P] < 0).any():
                return 0
        return pos

    def max_sequence_tokens(self, context_len: int) -> int:
        """The longest sequence the pool can hold alone."""
        slide = int(self.sliding.sum()) * (self._pages_span(0, self.window + self.P + self.config.prefill_chunk_size) + 1)
        glob = int((~self.sliding).sum())
        room = self.num_blocks - slide
        if room < 0:
            return 0
        return context_len if glob == 0 else min(context_len, room // glob * self.P)

    # -- KVCache protocol --------------------------------------------------------------------------

    def pages_held(self, seq_id: int, length: int) -> int:
        return int((self._tables[seq_id] >= 0).sum())  # blocks, shared ones included

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    def sequence_len(self, seq_id: int) -> int:
        return self._len[seq_id]

    def add_sequence(self, seq_id: int) -> None:
        assert seq_id not in self.live, seq_id
        self._tables[seq_id] = np.full((len(self.owners), 8), -1, dtype=np.int32)
        self._len[seq_id] = 0
        self.live.add(seq_id)

    def _release(self, blocks: np.ndarray) -> None:
        for blk in blocks[blocks >= 0].tolist():
            self._refs[blk] -= 1
            if self._refs[blk] == 0:
                self._free.append(blk)

    def remove_sequence(self, seq_id: int) -> None:
        self._release(self._tables.pop(seq_id).reshape(-1))
        del self._len[seq_id]
        self.live.discard(seq_id)

    def fork_sequence(self, parent_id: int, child_id: int, fork_pos: int = -1) -> None:
        assert child_id not in self.live and parent_id in self.live
        pos = self._len[parent_id] if fork_pos == -1 else fork_pos
        if pos != self.fork_point(parent_id, pos):
            raise KilnError(f"cannot fork sequence {parent_id} at {pos}: use fork_point() (whole pages, in window)")
        parent = self._tables[parent_id]
        table = np.full_like(parent, -1)
        npages = pos // self.P
        table[:, :npages] = parent[:, :npages]
        if self.sliding.any():
            table[self.sliding, :self._kept_from(pos) // self.P] = -1
        shared = table[table >= 0]
        np.add.at(self._refs, shared, 1)
        self._tables[child_id], self._len[child_id] = table, pos
        self.live.add(child_id)

    def popn(self, seq_id: int, n: int) -> None:
        keep = self._len[seq_id] - n
        assert 0 <= keep
        table = self._tables[seq_id]
        if self.sliding.any() and (table[self.sliding, self._kept_from(keep) // self.P:-(-keep // self.P)] < 0).any():
            raise KilnError("popn: the sliding-window pages this length needs were already released")
        first = -(-keep // self.P)
        self._release(table[:, first:].reshape(-1))
        table[:, first:] = -1
        self._len[seq_id] = keep

    def _take(self, count: int) -> np.ndarray:
        if count > len(self._free):
            raise KilnError("the KV cache ran out of blocks (the scheduler plans with append_cost; this is a bug)")
        out = np.array([self._free.pop() for _ in range(count)], dtype=np.int32)
        self._refs[out] = 1
        return out

    def begin_forward(self, seq_ids: list[int], append_lens: list[int]) -> None:
        P, O = self.P, len(self.owners)
        n, b = sum(append_lens), len(seq_ids)
        self._keep = []
        maxp = max(-(-(self._len[s] + k) // P) for s, k in zip(seq_ids, append_lens))
        pages = np.full((O, b, maxp), -1, dtype=np.int32)
        slots = np.empty((O, n), dtype=np.int32)
        token_seq = np.empty(n, dtype=np.int32)
        token_pos = np.empty(n, dtype=np.int32)
        at = 0
        for row, (s, k) in enumerate(zip(seq_ids, append_lens)):
            L, table = self._len[s], self._tables[s]
            end_page = -(-(L + k) // P)
            if table.shape[1] < end_page:
                grown = np.full((O, max(end_page, 2 * table.shape[1])), -1, dtype=np.int32)
                grown[:, :table.shape[1]] = table
                table = self._tables[s] = grown
            first_new = -(-L // P)  # pages [first_new, end_page) are new for every owner
            if end_page > first_new:
                table[:, first_new:end_page] = self._take(O * (end_page - first_new)).reshape(O, -1)
            positions = np.arange(L, L + k, dtype=np.int32)
            slots[:, at:at + k] = table[:, positions // P] * P + positions % P
            token_seq[at:at + k] = row
            token_pos[at:at + k] = positions
            pages[:, row, :end_page] = table[:, :end_page]
            self._len[s] = L + k
            at += k
        self._batch = seq_ids
        if self._ffi is not None:
            self.args = [self.pool] + [self._to_device(a) for a in (pages, slots, token_seq, token_pos)]

    def _to_device(self, a: np.ndarray):
        import torch

        t = torch.from_numpy(a).to(self.device, copy=True)
        self._keep.append(t)
        return self._ffi.from_dlpack(t)

    def end_forward(self) -> None:
        """Release the sliding owners' pages that slid out of every future query's window."""
        if self.sliding.any():
            for s in self._batch:
                table = self._tables[s]
                cut = self._kept_from(self._len[s]) // self.P
                if cut:
                    old = table[self.sliding, :cut]
                    self._release(old.reshape(-1))
                    table[np.ix_(self.sliding, np.arange(cut))] = -1
        self._batch, self.args, self._keep = [], [], []
