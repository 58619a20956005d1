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
    handle: object  # what the compiled model functions take as their kv_cache argument

    def add_sequence(self, seq_id: int) -> None: ...
    def remove_sequence(self, seq_id: int) -> None: ...
    def fork_sequence(self, parent_id: int, child_id: int, fork_pos: int = -1) -> None: ...
    def popn(self, seq_id: int, n: int) -> None: ...
    def begin_forward(self, seq_ids: list[int], append_lens: list[int]) -> None: ...
    def end_forward(self) -> None: ...
    def sequence_len(self, seq_id: int) -> int: ...
    @property
    def num_free_pages(self) -> int: ...


class TVMPagedKVCache:
    """TVM's ``PagedAttentionKVCache`` (C++ runtime), created by the artifact's create_paged_kv_cache."""

    def __init__(self, vm, config: KVCacheConfig):
        import tvm_ffi

        S = tvm_ffi.Shape
        self.config = config
        self.handle = vm["create_paged_kv_cache"](S([config.max_num_seqs]), S([config.max_total_tokens]),
                                                   S([config.prefill_chunk_size]), S([config.page_size]), S([0]))
        self._shape = S
        self._add = global_func("vm.builtin.kv_state_add_sequence")
        self._remove = global_func("vm.builtin.kv_state_remove_sequence")
        self._fork = global_func("vm.builtin.kv_state_fork_sequence")
        self._popn = global_func("vm.builtin.kv_state_popn")
        self._begin = global_func("vm.builtin.kv_state_begin_forward")
        self._end = global_func("vm.builtin.kv_state_end_forward")
        self._len = global_func("vm.builtin.attention_kv_cache_get_sequence_length")
        self._free = global_func("vm.builtin.attention_kv_cache_get_num_available_pages")
        self.live: set[int] = set()

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
