"""The artifact's ABI: the serving entry points the paged-attention pass emits and the runtime calls.

Defined once here; pure Python so the runtime can check a loaded library against it. Shapes use
``n`` for the total tokens of a step, ``b`` for the number of sequences, ``H`` for hidden size and
``V`` for vocabulary size. ``params`` is the packed tuple of weights in the artifact's order.
"""

from __future__ import annotations

from dataclasses import dataclass

ABI_VERSION = 1


@dataclass(frozen=True)
class EntryPoint:
    name: str
    inputs: tuple[str, ...]  # in call order; the last one is always the packed params (if any)
    outputs: str
    num_input: int  # leading arguments that are not parameters (the VM's "num_input" attribute)


ENTRY_POINTS: dict[str, EntryPoint] = {
    e.name: e
    for e in (
        EntryPoint("embed", ("input_ids: [n] int32", "params"), "[n, H]", 1),
        EntryPoint("prefill", ("input_embed: [1, n, H]", "kv_cache", "params"), "(logits [1, 1, V], kv_cache)", 2),
        EntryPoint("decode", ("input_embed: [1, 1, H]", "kv_cache", "params"), "(logits [1, 1, V], kv_cache)", 2),
        EntryPoint("batch_prefill", ("input_embeds: [1, n, H]", "logit_positions: [b] int32", "kv_cache", "params"),
                   "(logits [1, b, V], kv_cache)", 3),
        EntryPoint("batch_decode", ("input_embeds: [b, 1, H]", "kv_cache", "params"), "(logits [b, 1, V], kv_cache)", 2),
        EntryPoint("create_paged_kv_cache",
                   ("max_batch_size: shape", "max_total_seq_len: shape", "prefill_chunk_size: shape",
                    "page_size: shape", "support_sliding_window: shape"), "kv_cache", 5),
    )
}

# kiln's own paged KV cache (passes/lower_paged_groups.py, runtime/kv_groups.py): models whose layers differ in
# KV lifetime (sliding windows, cross-layer sharing). One entry point serves prefill and decode alike;
# the KV state is a block pool plus the page tables and slots of the step (ir/paged_kernels.py).
GROUPED_PAGE_SIZE = 16  # tokens per block, compiled into the kernels
GROUPED_ENTRY_POINTS: dict[str, EntryPoint] = {
    e.name: e
    for e in (
        EntryPoint("embed", ("input_ids: [n] int32", "params"), "[n, H]", 1),
        EntryPoint("batch_prefill", ("input_embeds: [1, n, H]", "logit_positions: [b] int32",
                                     "kv_pool: [blocks, 2, kv_heads, P, head_dim]",
                                     "kv_pages: [owners, b, max_pages] int32", "kv_slots: [owners, n] int32",
                                     "token_seq: [n] int32", "token_pos: [n] int32", "params"),
                   "(logits [1, b, V], kv_pool)", 7),
    )
}


def entry_points(grouped: bool) -> dict[str, EntryPoint]:
    """The serving ABI of an artifact: TVM's paged cache, or kiln's grouped one."""
    return GROUPED_ENTRY_POINTS if grouped else ENTRY_POINTS


# The reference form's single entry point, before the paged-attention pass.
REFERENCE_ENTRY = EntryPoint("forward", ("input_ids: [n] int32", "params"), "logits [n, V]", 1)
