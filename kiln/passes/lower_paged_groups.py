"""lower_paged_groups: reference form -> serving form on kiln's grouped paged KV cache.

For models whose layers differ in KV lifetime — sliding-window layers (Mistral, MixAttention) and
layers that read another layer's KV (share_kv) — where TVM's cache, one page table for every layer of
a cache object, can neither free a sliding layer's old pages nor skip storing a sharing layer's KV
(../shared/notes/algorithms.md section 3; tools/spikes/tvm_sliding_cache.py measured its whole-cache
sliding mode computing a different attention).

Matches what lower_paged_attention matches (the same analysis), except that composites may carry a
sliding window (``kiln.sliding_window > 0``) and a KV source (``kiln.kv_source``, set by share_kv).

Emits ``embed`` and ``batch_prefill`` of kiln/ir/abi.py GROUPED_ENTRY_POINTS; ``batch_prefill`` serves
prefill chunks and decodes alike. Every *KV-owning* layer (no ``kiln.kv_source``; owner index = rank of
its layer id among the owners) rotates its q and k at ``token_pos``, appends k and v to its blocks in
the pool in place (``call_tir_inplace``, ir/paged_kernels.py ``append_kernel``) and attends over its
window through its page table (``attention_kernel``); a *sharing* layer rotates only its q and attends
over its source owner's pages, which the source appended earlier in the same forward. The pool value
is threaded through the layers in order, so every append precedes every attention that reads it.

Rejected, with a PassError: everything lower_paged_attention rejects except windows and KV sources; a
KV source that is not an earlier owner.

Invariant: for every sequence, ``batch_prefill``'s logits rows equal ``forward``'s at the same positions
(the forward of tests/mixattention_reference.py for a MixAttention model), whatever the chunking;
no serving function calls an attention composite.
"""

from __future__ import annotations

import numpy as np

from ..errors import PassError
from ..ir.abi import GROUPED_ENTRY_POINTS, GROUPED_PAGE_SIZE
from ..ir.attention import is_attention, rope_spec_of, rope_te
from ..ir.paged_kernels import append_kernel, attention_kernel
from ..ir.tvm import IRModule, Target, relax, tirx, tvm
from .lib.serving import Analysis, Cloner, emit_embed_function, emit_serving_function, finish_serving


def _serving(cl: Cloner, an: Analysis, owners: list[int], target: Target) -> None:
    bb, P = cl.bb, GROUPED_PAGE_SIZE
    hq, hkv, d, dt = an.num_q_heads, an.num_kv_heads, an.head_dim, an.dtype
    b, blocks, maxp = (tirx.Var(x, "int64") for x in ("num_seqs", "num_blocks", "max_pages"))
    pool_ty = relax.TensorType([blocks, 2, hkv, P, d], dt)
    pool = relax.Var("kv_pool", pool_ty)
    pages = relax.Var("kv_pages", relax.TensorType([len(owners), b, maxp], "int32"))
    inputs = {}

    def make_inputs(n):
        inputs["slots"] = relax.Var("kv_slots", relax.TensorType([len(owners), n], "int32"))
        inputs["seq"] = relax.Var("token_seq", relax.TensorType([n], "int32"))
        inputs["pos"] = relax.Var("token_pos", relax.TensorType([n], "int32"))
        return [pool, pages, inputs["slots"], inputs["seq"], inputs["pos"]]
    rope_fn = an.mod[an.value_of[an.attentions[0].var].op]
    inv_freq = relax.const(np.asarray(rope_spec_of(rope_fn).inv_freq(d), dtype="float32"))
    owner_of = {layer: i for i, layer in enumerate(owners)}
    kernels: dict[tuple, relax.GlobalVar] = {}
    state = {"pool": pool}

    def kernel(kind: str, owner: int, window: int, sm_scale: float) -> relax.GlobalVar:
        key = (kind, owner, window, sm_scale)
        if key not in kernels:
            gpu = target.kind.name == "cuda"
            f = append_kernel(owner, hkv, d, P, dt, gpu) if kind == "append" else \
                attention_kernel(owner, window, hq, hkv, d, P, dt, sm_scale, gpu)
            kernels[key] = bb.add_func(f, f"kv_{kind}_o{owner}" +
                                       (f"_w{window}" if kind == "attention" and window > 0 else ""))
        return kernels[key]

    def attend(c, bind, a, n_, values):
        q, k, v = [c.visit_expr(x) for x in bind.value.args]
        slots, seq, pos = inputs["slots"], inputs["seq"], inputs["pos"]
        src = a.layer_id if a.kv_source is None else a.kv_source
        if src not in owner_of:
            raise PassError(f"paged_groups: layer {a.layer_id} reads the KV of layer {src}, which stores none")
        o = owner_of[src]
        qr = bb.emit_te(rope_te, q, inv_freq, d, pos, primfunc_name_hint="rope")
        if a.kv_source is None:
            kr = bb.emit_te(rope_te, k, inv_freq, d, pos, primfunc_name_hint="rope")
            state["pool"] = bb.emit(relax.call_tir_inplace(kernel("append", o, -1, 0.0), [state["pool"], kr, v, slots],
                                                           0, pool_ty), name_hint=f"kv_pool{a.layer_id}")
        return bb.emit(relax.call_tir(kernel("attention", o, a.window, a.sm_scale),
                                      [qr, state["pool"], pages, seq, pos], relax.TensorType([n_, hq, d], dt)),
                       name_hint=f"attn{a.layer_id}")

    emit_serving_function(cl, an, "batch_prefill", GROUPED_ENTRY_POINTS["batch_prefill"],
                          make_inputs, attend, lambda: state["pool"])


@tvm.ir.transform.module_pass(opt_level=0, name="kiln.LowerPagedGroups")
class LowerPagedGroups:
    """Module pass; see the module docstring for what it matches, emits and rejects."""

    def __init__(self, target: Target, keep_reference: bool = False):
        self.target = target
        self.keep_reference = keep_reference

    def transform_module(self, mod: IRModule, _ctx) -> IRModule:
        an = Analysis(mod, grouped=True)
        owners = sorted(a.layer_id for a in an.attentions if a.kv_source is None)
        for a in an.attentions:
            if a.kv_source is not None and (a.kv_source not in owners or a.kv_source >= a.layer_id):
                raise PassError(f"paged_groups: layer {a.layer_id}'s KV source {a.kv_source} is not an earlier "
                                "KV-owning layer")
        cl = Cloner(mod)
        emit_embed_function(cl, an)
        _serving(cl, an, owners, self.target)
        return finish_serving(cl.bb.get(), GROUPED_ENTRY_POINTS, self.keep_reference)


def lower_paged_groups(mod: IRModule, target: Target, keep_reference: bool = False) -> IRModule:
    return LowerPagedGroups(target, keep_reference)(mod)


def needs_groups(mod: IRModule) -> bool:
    """Whether ``forward``'s attention needs kiln's grouped cache (a sliding window or a shared KV)."""
    return any(is_attention(f) and (int(f.attrs["kiln.sliding_window"]) > 0 or "kiln.kv_source" in f.attrs)
               for _, f in mod.functions_items())
