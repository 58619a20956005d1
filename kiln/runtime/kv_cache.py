"""kiln's small KV-cache interface and its implementation over TVM's paged KV cache.

The model runner only talks to ``KVCache``; a different page manager (per-layer-group pages for
MixAttention, quantized KV) can replace ``TVMPagedKVCache`` without touching the runner.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from .tvm_runtime import global_func


@dataclass(frozen=True)
class KVCacheConfig:
    max_num_seqs: int = 8  # sequences in the cache at once
    max_total_tokens: int = 4096  # KV capacity in tokens, over all sequences
    prefill_chunk_size: int = 512  # most tokens one forward step may carry
    page_size: int = 16  # tokens per page

    def __post_init__(self):
        assert self.max_num_seqs > 0 and self.page_size > 0 and self.prefill_chunk_size > 0
        assert self.max_total_tokens >= self.page_size

    @property
    def num_pages(self) -> int:
        return self.max_total_tokens // self.page_size

    @classmethod
    def for_model(cls, context_len: int, kv_bytes_per_token: int, max_num_seqs: int = 8,
                  memory_bytes: int = 1 << 30) -> "KVCacheConfig":
        """Room for max_num_seqs full-context sequences, capped at memory_bytes (at least one sequence)."""
        tokens = min(max_num_seqs * context_len, max(context_len, memory_bytes // kv_bytes_per_token))
        page = 16
        return cls(max_num_seqs=max_num_seqs, max_total_tokens=-(-tokens // page) * page,
                   prefill_chunk_size=min(512, context_len), page_size=page)


class KVCache(Protocol):
    """Per-sequence paged KV storage. Sequence ids are caller-chosen ints, unique while live.

    ``begin_forward(seq_ids, append_lens)`` declares the next model call's batch (side effect: pages
    are reserved for the appended tokens); ``end_forward()`` closes it. ``remove_sequence`` frees a
    sequence's pages; ``fork_sequence`` shares the parent's pages with a new child (prefix reuse);
    ``popn`` drops a sequence's last n tokens.
    """

    config: KVCacheConfig
    handle: object  # TVM's cache object (None for kiln's grouped cache)
    args: list  # what the compiled entry points take for the KV state, valid from begin_forward to end_forward

    def add_sequence(self, seq_id: int) -> None: ...
    def remove_sequence(self, seq_id: int) -> None: ...
    def fork_sequence(self, parent_id: int, child_id: int, fork_pos: int = -1) -> None: ...
    def popn(self, seq_id: int, n: int) -> None: ...
    def begin_forward(self, seq_ids: list[int], append_lens: list[int]) -> None: ...
    def end_forward(self) -> None: ...
    def sequence_len(self, seq_id: int) -> int: ...
    @property
    def num_free_pages(self) -> int: ...
    # the page arithmetic the scheduler plans with (kiln/scheduler/scheduler.py)
    def append_cost(self, length: int, k: int) -> int: ...  # pages that appending k tokens takes
    def fork_cost(self, parent_id: int, pos: int) -> int: ...  # pages a fork of parent_id at pos takes
    def fork_point(self, parent_id: int, pos: int) -> int: ...  # where a fork at pos really forks (<= pos)
    def max_sequence_tokens(self, context_len: int) -> int: ...  # the longest sequence the cache holds alone
    # counting pages that sequences share (a page counts once): an empty PageSet, and the distinct pages
    # the sequences of seqs (id -> its length in tokens) hold that no sequence of excluding holds (what
    # removing seqs would free)
    def page_set(self) -> "PageSet": ...
    def num_pages_of(self, seqs: dict[int, int], excluding: Iterable[int] = ()) -> int: ...


class PageSet(Protocol):
    """The distinct pages of a set of live sequences, kept up to date as members join (``add``, at a length
    the member keeps while in the set) and leave (``remove``, before the cache removes the sequence);
    ``num_held_by`` counts the set's pages that other live sequences hold too. The scheduler keeps one
    for the prefix cache's entries."""

    num_pages: int

    def add(self, seq_id: int, length: int) -> None: ...
    def remove(self, seq_id: int) -> None: ...
    def num_held_by(self, seq_ids: Iterable[int]) -> int: ...


def pages_of(pages: "PageSet", seqs: dict[int, int], excluding: Iterable[int] = ()) -> int:
    """``KVCache.num_pages_of`` on an empty page set of the cache."""
    for seq_id, length in seqs.items():
        pages.add(seq_id, length)
    return pages.num_pages - pages.num_held_by(excluding)


class UniformPages:
    """Page arithmetic of a cache whose every layer keeps every token (TVM's paged cache): appending k
    tokens to a sequence of length L takes ``ceil((L+k)/P) - ceil(L/P)`` pages (a sequence's last page
    is never shared), a fork inside a page copies that page, and a fork can happen anywhere.

    It also knows which pages sequences share (TVM's cache tells only how many are free), for
    ``page_set`` and ``num_pages_of``: page k of a fork is page k of its parent while k is below the
    whole pages the fork shared, and a page of its own otherwise. So each sequence's pages are spans
    ``(origin, first page, end page)``, the last one its own pages (end None: up to its length), where
    an origin names one sequence's own pages. Every sequence holding an origin's pages holds them from
    the same first page, and no other holder reaches past its owner's length (a fork shares at most
    what its parent has); a sequence popped back (``popn``) starts a new origin for what it appends.
    The caches call the ``_track_*`` methods from add/fork/remove/popn."""

    config: KVCacheConfig
    args: list
    _spans: dict[int, tuple[tuple[int, int, int | None], ...]]  # seq id -> ((origin, first page, end page), ...)
    _origins: itertools.count

    def append_cost(self, length: int, k: int) -> int:
        p = self.config.page_size
        return -(-(length + k) // p) + (-length // p)

    def fork_cost(self, parent_id: int, pos: int) -> int:
        return 1 if pos % self.config.page_size else 0

    def fork_point(self, parent_id: int, pos: int) -> int:
        return pos

    def max_sequence_tokens(self, context_len: int) -> int:
        return min(context_len, self.config.num_pages * self.config.page_size)

    def page_set(self) -> "OriginPageSet":
        return OriginPageSet(self)

    def num_pages_of(self, seqs: dict[int, int], excluding: Iterable[int] = ()) -> int:
        return pages_of(self.page_set(), seqs, excluding)

    # -- which pages are shared ----------------------------------------------------------------------

    def _init_tracking(self) -> None:
        self._spans, self._origins = {}, itertools.count()

    def _track_add(self, seq_id: int) -> None:
        self._spans[seq_id] = ((next(self._origins), 0, None),)

    def _track_remove(self, seq_id: int) -> None:
        del self._spans[seq_id]

    def _page_spans(self, seq_id: int, pages: int) -> tuple[tuple[int, int, int], ...]:
        """Where the first ``pages`` pages of ``seq_id`` come from."""
        out = []
        for origin, lo, end in self._spans[seq_id]:
            if lo >= pages:
                break
            out.append((origin, lo, pages if end is None else min(end, pages)))
        return tuple(out)

    def _track_fork(self, parent_id: int, child_id: int, pos: int) -> None:
        full = pos // self.config.page_size  # the partial page is the child's own copy
        self._spans[child_id] = self._page_spans(parent_id, full) + ((next(self._origins), full, None),)

    def _track_popn(self, seq_id: int, keep: int) -> None:
        P = self.config.page_size
        pages = -(-keep // P)
        kept = self._page_spans(seq_id, pages)
        if keep % P and self._held_elsewhere(kept[-1][0], pages - 1, seq_id):
            pages -= 1  # TVM gives a sequence popped back into a shared page its own copy of it
            kept = self._page_spans(seq_id, pages)
        self._spans[seq_id] = kept + ((next(self._origins), pages, None),)

    def _held_elsewhere(self, origin: int, page: int, seq_id: int) -> bool:
        P = self.config.page_size
        return any(o == origin and lo <= page < (end if end is not None else -(-self.sequence_len(t) // P))
                   for t, spans in self._spans.items() if t != seq_id for o, lo, end in spans)


class OriginPageSet:
    """The distinct pages of a set of sequences of a ``UniformPages`` cache, kept as sequences join and
    leave. A member is added at a length it keeps while in the set (a prefix-cache entry: finished, it
    grows no more); ``num_held_by`` says how many of the set's pages other sequences hold too."""

    def __init__(self, kv: UniformPages):
        self.kv = kv
        self.num_pages = 0
        self._members: dict[int, tuple[tuple[int, int, int], ...]] = {}  # seq id -> its spans when added
        self._ends: dict[int, dict[int, int]] = {}  # origin -> {end page: members whose span ends there}
        self._first: dict[int, int] = {}  # origin -> its first page

    def __len__(self) -> int:
        return len(self._members)

    def add(self, seq_id: int, length: int) -> None:
        assert seq_id not in self._members, seq_id
        spans = self._members[seq_id] = self.kv._page_spans(seq_id, -(-length // self.kv.config.page_size))
        for origin, lo, end in spans:
            ends = self._ends.setdefault(origin, {})
            self.num_pages += max(0, end - max(ends, default=lo))
            ends[end] = ends.get(end, 0) + 1
            self._first[origin] = lo

    def remove(self, seq_id: int) -> None:
        for origin, lo, end in self._members.pop(seq_id):
            ends = self._ends[origin]
            top = max(ends)
            ends[end] -= 1
            if not ends[end]:
                del ends[end]
            self.num_pages -= top - max(ends, default=lo)
            if not ends:
                del self._ends[origin], self._first[origin]

    def num_held_by(self, seq_ids: Iterable[int]) -> int:
        """Pages of the set that some of ``seq_ids`` (live sequences outside the set) hold too. A sequence
        reaches as far into its own origin as any member can, so its length is not needed."""
        reach: dict[int, float] = {}
        for seq_id in seq_ids:
            for origin, lo, end in self.kv._spans[seq_id]:
                if origin in self._ends:
                    reach[origin] = max(reach.get(origin, lo), math.inf if end is None else end)
        return sum(min(max(self._ends[o]), e) - self._first[o] for o, e in reach.items())


class TVMPagedKVCache(UniformPages):
    """TVM's ``PagedAttentionKVCache`` (C++ runtime), created by the artifact's create_paged_kv_cache."""

    def __init__(self, vm, config: KVCacheConfig):
        import tvm_ffi

        S = tvm_ffi.Shape
        self.config = config
        self.handle = vm["create_paged_kv_cache"](S([config.max_num_seqs]), S([config.max_total_tokens]),
                                                   S([config.prefill_chunk_size]), S([config.page_size]), S([0]))
        new_shape = global_func("ffi.Shape")  # tvm_ffi.Shape checks each element's type: 10x dearer per step
        self._shape = lambda xs: new_shape(*xs)
        self._add = global_func("vm.builtin.kv_state_add_sequence")
        self._remove = global_func("vm.builtin.kv_state_remove_sequence")
        self._fork = global_func("vm.builtin.kv_state_fork_sequence")
        self._popn = global_func("vm.builtin.kv_state_popn")
        self._begin = global_func("vm.builtin.kv_state_begin_forward")
        self._end = global_func("vm.builtin.kv_state_end_forward")
        self._len = global_func("vm.builtin.attention_kv_cache_get_sequence_length")
        self._free = global_func("vm.builtin.attention_kv_cache_get_num_available_pages")
        self.live: set[int] = set()
        self.args = [self.handle]  # what the compiled entry points take for the KV state
        self._init_tracking()

    def add_sequence(self, seq_id: int) -> None:
        assert seq_id not in self.live, seq_id
        self._add(self.handle, seq_id)
        self.live.add(seq_id)
        self._track_add(seq_id)

    def remove_sequence(self, seq_id: int) -> None:
        self._remove(self.handle, seq_id)
        self.live.discard(seq_id)
        self._track_remove(seq_id)

    def fork_sequence(self, parent_id: int, child_id: int, fork_pos: int = -1) -> None:
        self._fork(self.handle, parent_id, child_id, fork_pos)
        self.live.add(child_id)
        self._track_fork(parent_id, child_id, self.sequence_len(parent_id) if fork_pos == -1 else fork_pos)

    def popn(self, seq_id: int, n: int) -> None:
        self._popn(self.handle, seq_id, n)
        self._track_popn(seq_id, self.sequence_len(seq_id))

    def begin_forward(self, seq_ids: list[int], append_lens: list[int]) -> None:
        self._begin(self.handle, self._shape(seq_ids), self._shape(append_lens))

    def end_forward(self) -> None:
        self._end(self.handle)

    def sequence_len(self, seq_id: int) -> int:
        return int(self._len(self.handle, seq_id))

    @property
    def num_free_pages(self) -> int:
        return int(self._free(self.handle))


class SimulatedKVCache(UniformPages):
    """A host-only twin of TVM's paged cache that keeps the page table but no K/V data.

    Pages are reference counted the way TVM's blocks are: a fork shares the parent's full pages and
    copies the page it forks inside; appends take new pages; removal frees the pages nobody else
    holds. The scheduler's tests and the engine-overhead benchmark run on it, and a test checks it
    against ``TVMPagedKVCache`` op for op.
    """

    def __init__(self, config: KVCacheConfig):
        self.config = config
        self.handle = None
        self.args: list = []
        total = config.num_pages + 1  # TVM's cache holds one page beyond max_total_tokens (measured)
        self._free = list(range(total - 1, -1, -1))
        self._refs = [0] * total
        self._pages: dict[int, list[int]] = {}  # seq id -> its pages, in order
        self._len: dict[int, int] = {}
        self._batch: tuple[list[int], list[int]] | None = None
        self.live: set[int] = set()
        self._init_tracking()

    def _take(self) -> int:
        if not self._free:
            raise RuntimeError("the simulated KV cache ran out of pages")
        page = self._free.pop()
        self._refs[page] = 1
        return page

    def _release(self, pages: list[int]) -> None:
        for page in pages:
            self._refs[page] -= 1
            if self._refs[page] == 0:
                self._free.append(page)

    def add_sequence(self, seq_id: int) -> None:
        assert seq_id not in self.live, seq_id
        self._pages[seq_id], self._len[seq_id] = [], 0
        self.live.add(seq_id)
        self._track_add(seq_id)

    def remove_sequence(self, seq_id: int) -> None:
        self._release(self._pages.pop(seq_id))
        del self._len[seq_id]
        self.live.discard(seq_id)
        self._track_remove(seq_id)

    def fork_sequence(self, parent_id: int, child_id: int, fork_pos: int = -1) -> None:
        assert child_id not in self.live and parent_id in self.live
        pos = self._len[parent_id] if fork_pos == -1 else fork_pos
        assert 0 <= pos <= self._len[parent_id]
        full, part = divmod(pos, self.config.page_size)
        shared = self._pages[parent_id][:full]
        for page in shared:
            self._refs[page] += 1
        self._pages[child_id] = shared + ([self._take()] if part else [])
        self._len[child_id] = pos
        self.live.add(child_id)
        self._track_fork(parent_id, child_id, pos)

    def popn(self, seq_id: int, n: int) -> None:
        keep = self._len[seq_id] - n
        assert 0 <= keep
        npages = -(-keep // self.config.page_size)
        pages = self._pages[seq_id]
        self._release(pages[npages:])
        del pages[npages:]
        if keep % self.config.page_size and self._refs[pages[-1]] > 1:  # as TVM: a copy of a shared page popped into
            copy = self._take()
            self._release(pages[-1:])
            pages[-1] = copy
        self._len[seq_id] = keep
        self._track_popn(seq_id, keep)

    def begin_forward(self, seq_ids: list[int], append_lens: list[int]) -> None:
        assert len(seq_ids) <= self.config.max_num_seqs and sum(append_lens) <= self.config.prefill_chunk_size
        for s, k in zip(seq_ids, append_lens):
            need = -(-(self._len[s] + k) // self.config.page_size)
            while len(self._pages[s]) < need:
                self._pages[s].append(self._take())
            self._len[s] += k
        self._batch = (seq_ids, append_lens)

    def end_forward(self) -> None:
        self._batch = None

    def sequence_len(self, seq_id: int) -> int:
        return self._len[seq_id]

    @property
    def num_free_pages(self) -> int:
        return len(self._free)
