"""lower_paged_attention: reference form -> serving form on TVM's paged KV cache.

Matches: a module whose ``forward(input_ids: [n] int32, params: Tuple) -> [n, V]`` (kiln/ir/abi.py
REFERENCE_ENTRY) is in reference form: one dataflow body, the token ids used only by one
``take(embed_weight, input_ids, axis=0)`` whose weight is a packed parameter, and every attention a
call to a ``kiln.op = "attention"`` composite (kiln/ir/attention.py) with layer ids 0..L-1.

Emits the artifact's serving entry points (kiln/ir/abi.py ENTRY_POINTS): ``embed``; ``prefill``,
``decode``, ``batch_prefill``, ``batch_decode``, each a copy of ``forward`` in which the embedding
is replaced by an input, every attention call by
``vm.builtin.attention_kv_cache_attention_with_fused_qkv`` on the KV cache that is threaded through
(RoPE, append and attention in one builtin), and, for the prefills, the rows whose logits are
wanted gathered as early as the token-wise tail allows (before the final norm and lm_head); and
``create_paged_kv_cache`` with the cache's TIR kernels for the target. ``forward`` and the
composites are removed unless ``keep_reference``.

Preconditions: run before LegalizeOps (the pass matches Relax ops, not TIR calls); the composites
agree on head counts, head_dim and RoPE (one cache holds every layer).

Rejected, with a PassError naming what did not match: no ``forward``; a ``forward`` with no
attention composite; layer ids that are not exactly 0..L-1; composites that disagree on heads,
head_dim or RoPE; head attributes that contradict the q/k/v shapes of the call; non-causal
attention; a sliding window or a shared KV source (passes/lower_paged_groups.py lowers those to kiln's
grouped cache: TVM's keeps one page table for all layers); RoPE other than rotate-half; input ids used
by anything but one embedding take.

Invariant: for every sequence, the logits of ``prefill``/``decode`` (and of the batched entries,
row for row) equal ``forward``'s logits at the same positions, within float rounding; after the
pass no attention composite is called from a serving function.
"""

from __future__ import annotations

from ..ir.abi import ENTRY_POINTS
from ..ir.tvm import IRModule, RopeMode, Target, TIRPagedKVCache, relax, tirx, tvm
from .lib.serving import Analysis, Cloner, emit_embed_function, emit_entry_function, finish_serving

def _create_kv_function(cl: Cloner, an: Analysis, target: Target) -> None:
    names = ENTRY_POINTS["create_paged_kv_cache"].inputs
    svars = [tirx.Var(s.split(":")[0], "int64") for s in names]
    params = [relax.Var(v.name + "_", relax.ShapeType([v])) for v in svars]
    rope = an.kv_rope()
    bb = cl.bb
    with bb.function("create_paged_kv_cache", params, attrs={"num_input": len(params)}):
        cache = TIRPagedKVCache(
            attn_kind="mha", max_batch_size=svars[0], max_total_seq_len=svars[1], prefill_chunk_size=svars[2],
            page_size=svars[3], support_sliding_window=svars[4],
            layer_partition=relax.ShapeExpr([0, an.num_layers]), num_hidden_layers=an.num_layers,
            num_attention_heads=an.num_q_heads, num_key_value_heads=an.num_kv_heads,
            qk_head_dim=an.head_dim, v_head_dim=an.head_dim, mla_original_qk_head_dim=0, mla_original_v_head_dim=0,
            rope_mode=RopeMode.NORMAL, rope_scale=rope["scale"], rope_theta=rope["theta"],
            rope_scaling=rope["scaling"], rope_ext_factors=relax.prim_value(0), rotary_dim=an.head_dim,
            enable_disaggregation=False, dtype=an.dtype, target=target)
        out = bb.emit(cache._expr, name_hint="paged_kv_cache")
        bb.emit_func_output(out)


@tvm.ir.transform.module_pass(opt_level=0, name="kiln.LowerPagedAttention")
class LowerPagedAttention:
    """Module pass; see the module docstring for what it matches, emits and rejects."""

    def __init__(self, target: Target, keep_reference: bool = False):
        self.target = target
        self.keep_reference = keep_reference

    def transform_module(self, mod: IRModule, _ctx) -> IRModule:
        an = Analysis(mod)
        cl = Cloner(mod)
        emit_embed_function(cl, an)
        for name in ("prefill", "decode", "batch_prefill", "batch_decode"):
            emit_entry_function(cl, an, name)
        _create_kv_function(cl, an, self.target)
        return finish_serving(cl.bb.get(), ENTRY_POINTS, self.keep_reference)


def lower_paged_attention(mod: IRModule, target: Target, keep_reference: bool = False) -> IRModule:
    return LowerPagedAttention(target, keep_reference)(mod)
