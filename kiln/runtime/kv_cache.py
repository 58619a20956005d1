"""kiln's small KV-cache interface and its implementation over TVM's paged KV cache.

The model runner only talks to ``KVCache``; a different page manager (per-layer-group pages for
MixAttention, quantized KV) can replace ``TVMPagedKVCache`` without touching the runner.
"""

from __future__ import annotations

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
    def pages_held(self, seq_id: int, length: int) -> int: ...  # pages a sequence of length tokens holds


class UniformPages:
    """Page arithmetic of a cache whose every layer keeps every token (TVM's paged cache): appending k
    tokens to a sequence of length L takes ``ceil((L+k)/P) - ceil(L/P)`` pages (a sequence's last page
    is never shared), a fork inside a page copies that page, and a fork can happen anywhere."""

    config: KVCacheConfig
    args: list

    def append_cost(self, length: int, k: int) -> int:
        p = self.config.page_size
        return -(-(length + k) // p) + (-length // p)

    def fork_cost(self, parent_id: int, pos: int) -> int:
        return 1 if pos % self.config.page_size else 0

    def fork_point(self, parent_id: int, pos: int) -> int:
        return pos

    def max_sequence_tokens(self, context_len: int) -> int:
        return min(context_len, self.config.num_pages * self.config.page_size)

    def pages_held(self, seq_id: int, length: int) -> int:
        return -(-length // self.config.page_size)  # from the caller's length: no call into the cache


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

    def add_sequence(self, seq_id: int) -> None:
        assert seq_id not in self.live, seq_id
        self._add(self.handle, seq_id)
        self.live.add(seq_id)

    def remove_sequence(self, seq_id: int) -> None:
        self._remove(self.handle, seq_id)
        self.live.discard(seq_id)

    def fork_sequence(self, parent_id: int, child_id: int, fork_pos: int = -1) -> None:
        self._fork(self.handle, parent_id, child_id, fork_pos)
        self.live.add(child_id)

    def popn(self, seq_id: int, n: int) -> None:
        self._popn(self.handle, seq_id, n)

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

    def remove_sequence(self, seq_id: int) -> None:
        self._release(self._pages.pop(seq_id))
        del self._len[seq_id]
        self.live.discard(seq_id)

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

    def popn(self, seq_id: int, n: int) -> None:
        keep = self._len[seq_id] - n
        assert 0 <= keep
        npages = -(-keep // self.config.page_size)
        self._release(self._pages[seq_id][npages:])
        del self._pages[seq_id][npages:]
        self._len[seq_id] = keep

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
