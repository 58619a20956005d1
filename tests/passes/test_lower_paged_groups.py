"""kiln.passes.lower_paged_groups: a hand-written reference form against its hand-written serving form.

The Before is the smallest forward the grouped lowering accepts with both of its cases: layer 0 owns its
KV and attends over a sliding window, layer 1 reads layer 0's KV (``kiln.kv_source``, as share_kv leaves
it). The Expected spells ``embed`` and ``batch_prefill`` with BlockBuilder and kiln/ir's kernels (RoPE as
TE, the append and attention TIR kernels of kiln/ir/paged_kernels.py). The numerics of the grouped form
are tested end to end in tests/runtime/test_mixattention_engine.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from kiln.errors import PassError
from kiln.ir.abi import GROUPED_PAGE_SIZE
from kiln.ir.attention import build_attention_function, rope_te
from kiln.ir.paged_kernels import append_kernel, attention_kernel
from kiln.ir.spec import ModelSpec
from kiln.ir.tvm import IRModule, Target, relax, tirx, tvm
from kiln.passes.lower_paged_groups import lower_paged_groups

pytestmark = pytest.mark.cpu
V, H, HQ, HKV, D, W = 10, 8, 2, 1, 4, 4
SPEC = ModelSpec("MixAttention", vocab_size=V, hidden_size=H, intermediate_size=8, num_layers=2, num_q_heads=HQ,
                 num_kv_heads=HKV, head_dim=D, rms_norm_eps=1e-6, context_len=32, sliding_window=W)
SHAPES = {"embed_tokens": (V, H), "layers.0.q_proj": (HQ * D, H), "layers.0.k_proj": (HKV * D, H),
          "layers.0.v_proj": (HKV * D, H), "layers.0.o_proj": (H, HQ * D), "layers.1.q_proj": (HQ * D, H),
          "layers.1.o_proj": (H, HQ * D), "final_norm": (H,)}
PARAMS = relax.TupleType([relax.TensorType(list(s), "float32") for s in SHAPES.values()])


def before(kv_source: int | None = 0) -> IRModule:
    """forward: embed; layer 0 q/k/v -> attention_L0 (window W) -> o; layer 1 q -> attention_L1 on layer 0's
    k, v -> o; final norm; lm_head tied to the embedding."""
    bb = relax.BlockBuilder()
    gvs = [build_attention_function(bb, SPEC, i) for i in range(2)]
    n = tirx.Var("seq_len", "int64")
    ids = relax.Var("input_ids", relax.TensorType([n], "int32"))
    packed = relax.Var("params", PARAMS)
    with bb.function("forward", [ids, packed], attrs={"num_input": 1}):
        with bb.dataflow():
            w = {name: bb.emit(relax.TupleGetItem(packed, i)) for i, name in enumerate(SHAPES)}

            def linear(x, name):
                return bb.emit(relax.op.matmul(x, bb.emit(relax.op.permute_dims(w[name]))))

            x = bb.emit(relax.op.take(w["embed_tokens"], ids, axis=0))
            q = bb.emit(relax.op.reshape(linear(x, "layers.0.q_proj"), [n, HQ, D]))
            k = bb.emit(relax.op.reshape(linear(x, "layers.0.k_proj"), [n, HKV, D]))
            v = bb.emit(relax.op.reshape(linear(x, "layers.0.v_proj"), [n, HKV, D]))
            o = bb.emit(relax.Call(gvs[0], [q, k, v]))
            x = bb.emit(relax.op.add(x, linear(bb.emit(relax.op.reshape(o, [n, HQ * D])), "layers.0.o_proj")))
            q = bb.emit(relax.op.reshape(linear(x, "layers.1.q_proj"), [n, HQ, D]))
            o = bb.emit(relax.Call(gvs[1], [q, k, v]))
            x = bb.emit(relax.op.add(x, linear(bb.emit(relax.op.reshape(o, [n, HQ * D])), "layers.1.o_proj")))
            h = bb.emit(relax.op.nn.rms_norm(x, w["final_norm"], axes=[-1], epsilon=1e-6))
            out = bb.emit_output(relax.op.matmul(h, bb.emit(relax.op.permute_dims(w["embed_tokens"]))))
        bb.emit_func_output(out)
    mod = bb.get()
    if kv_source is not None:
        gv = mod.get_global_var("attention_L1")
        mod[gv] = mod[gv].with_attr("kiln.kv_source", kv_source)
    return mod


def expected(mod: IRModule) -> IRModule:
    """``embed`` and ``batch_prefill`` added to ``mod`` (so that new PrimFuncs are numbered after the
    composites' ones, as in the pass's output), then ``forward`` and what only it reached dropped."""
    P = GROUPED_PAGE_SIZE
    bb = relax.BlockBuilder(mod)
    idx = relax.Var("input_ids", relax.TensorType([tirx.Var("seq_len", "int64")], "int32"))
    packed = relax.Var("params", PARAMS)
    with bb.function("embed", [idx, packed], attrs={"num_input": 1}):
        with bb.dataflow():
            out = bb.emit_output(relax.op.take(bb.emit(relax.TupleGetItem(packed, 0)), idx, axis=0, mode="fast"))
        bb.emit_func_output(out)

    n, b, blocks, maxp = (tirx.Var(s, "int64") for s in ("seq_len", "batch_size", "num_blocks", "max_pages"))
    pool_ty = relax.TensorType([blocks, 2, HKV, P, D], "float32")
    embeds = relax.Var("input_embeds", relax.TensorType([1, n, H], "float32"))
    positions = relax.Var("logit_positions", relax.TensorType([b], "int32"))
    pool = relax.Var("kv_pool", pool_ty)
    pages = relax.Var("kv_pages", relax.TensorType([1, tirx.Var("num_seqs", "int64"), maxp], "int32"))
    slots = relax.Var("kv_slots", relax.TensorType([1, n], "int32"))
    seq = relax.Var("token_seq", relax.TensorType([n], "int32"))
    pos = relax.Var("token_pos", relax.TensorType([n], "int32"))
    packed = relax.Var("params", PARAMS)
    inv_freq = relax.const(np.asarray(SPEC.rope.inv_freq(D), dtype="float32"))
    append = bb.add_func(append_kernel(0, HKV, D, P, "float32"), "kv_append_o0")
    attend = bb.add_func(attention_kernel(0, W, HQ, HKV, D, P, "float32", D ** -0.5), f"kv_attention_o0_w{W}")
    with bb.function("batch_prefill", [embeds, positions, pool, pages, slots, seq, pos, packed],
                     attrs={"num_input": 7}):
        with bb.dataflow():
            w = {name: bb.emit(relax.TupleGetItem(packed, i)) for i, name in enumerate(SHAPES)}

            def linear(x, name):
                return bb.emit(relax.op.matmul(x, bb.emit(relax.op.permute_dims(w[name]))))

            x = bb.emit(relax.op.reshape(embeds, [n, H]))
            q = bb.emit(relax.op.reshape(linear(x, "layers.0.q_proj"), [n, HQ, D]))
            k = bb.emit(relax.op.reshape(linear(x, "layers.0.k_proj"), [n, HKV, D]))
            v = bb.emit(relax.op.reshape(linear(x, "layers.0.v_proj"), [n, HKV, D]))
            # the owner: q and k rotated at token_pos, k and v appended in place, attention over the window
            qr = bb.emit_te(rope_te, q, inv_freq, D, pos, primfunc_name_hint="rope")
            kr = bb.emit_te(rope_te, k, inv_freq, D, pos, primfunc_name_hint="rope")
            pool0 = bb.emit(relax.call_tir_inplace(append, [pool, kr, v, slots], 0, pool_ty))
            o = bb.emit(relax.call_tir(attend, [qr, pool0, pages, seq, pos], relax.TensorType([n, HQ, D], "float32")))
            x = bb.emit(relax.op.add(x, linear(bb.emit(relax.op.reshape(o, [n, HQ * D])), "layers.0.o_proj")))
            # the sharing layer: only q rotated, attention over owner 0's pages (the same kernel)
            q = bb.emit(relax.op.reshape(linear(x, "layers.1.q_proj"), [n, HQ, D]))
            qr = bb.emit_te(rope_te, q, inv_freq, D, pos, primfunc_name_hint="rope")
            o = bb.emit(relax.call_tir(attend, [qr, pool0, pages, seq, pos], relax.TensorType([n, HQ, D], "float32")))
            x = bb.emit(relax.op.add(x, linear(bb.emit(relax.op.reshape(o, [n, HQ * D])), "layers.1.o_proj")))
            # the token-wise tail (final norm, lm_head) runs on the wanted rows only
            x = bb.emit(relax.op.take(x, positions, axis=0, mode="clip"))
            h = bb.emit(relax.op.nn.rms_norm(x, w["final_norm"], axes=[-1], epsilon=1e-6))
            logits = bb.emit(relax.op.matmul(h, bb.emit(relax.op.permute_dims(w["embed_tokens"]))))
            logits = bb.emit(relax.op.reshape(logits, [1, b, V]))
            out = bb.emit_output(relax.Tuple([logits, pool0]))
        bb.emit_func_output(out)
    out = IRModule({gv: f for gv, f in bb.get().functions_items() if gv.name_hint != "forward"})
    return relax.transform.DeadCodeElimination(["embed", "batch_prefill"])(out)


def test_lower_paged_groups_before_expected():
    mod = before()
    got = lower_paged_groups(mod, Target({"kind": "llvm"}))
    assert relax.analysis.check_well_formed(got)
    tvm.ir.assert_structural_equal(got, expected(mod), map_free_vars=True)


def test_lower_paged_groups_rejects_a_source_that_is_not_an_earlier_owner():
    with pytest.raises(PassError, match="KV source 1 is not an earlier KV-owning layer"):
        lower_paged_groups(before(kv_source=1), Target({"kind": "llvm"}))
