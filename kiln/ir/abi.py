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

# The reference form's single entry point, before the paged-attention pass.
REFERENCE_ENTRY = EntryPoint("forward", ("input_ids: [n] int32", "params"), "logits [n, V]", 1)
