"""Merge each layer's q, k and v projections into one linear over the concatenated weight.

Matches, in the reference form, three linears ``layers.{i}.{q,k,v}_proj`` (float or quantized, the same
kind) reading the same activation, each reshaped to heads ``[n, heads, d]``. Emits

    qkv = linear(h, layers.{i}.qkv_proj)                   # [n, (hq + 2 hkv) d], + layers.{i}.qkv_bias
    q   = reshape(strided_slice(qkv, [0, hq d)), [n, hq, d])  (k, v alike)

with ``layers.{i}.qkv_proj`` (or each quantized part) = rows of q, k, v stacked (a ``Merge``). The
paged-attention pass then hands ``qkv`` reshaped to the KV-cache builtin instead of concatenating q, k, v
again, so a decode step runs one projection GEMV where it ran three plus a concat.

Invariant: forward computes the same logits (each output channel is the same dot product), the params
tuple is the returned layout.
"""

from __future__ import annotations

from ..ir.tvm import IRModule, relax
from .lib.linears import Layout, Merge, emit_linear, find_linears, merge_params, rewrite_forward


def fuse_qkv(mod: IRModule, layout: Layout, group: int | None = None) -> tuple[IRModule, Layout, list[Merge]]:
    lins = find_linears(mod, layout)
    fwd = mod["forward"]
    users: dict = {}
    for b in fwd.body.blocks[0].bindings:
        for v in relax.analysis.free_vars(b.value):
            users.setdefault(v, []).append(b)
    groups, plans = [], []
    i = 0
    while f"layers.{i}.q_proj" in lins:
        q, k, v = (lins.get(f"layers.{i}.{r}_proj") for r in "qkv")
        i += 1
        if k is None or v is None or not (q.x.same_as(k.x) and q.x.same_as(v.x)) or len({q.kind, k.kind, v.kind}) != 1 \
                or len({q.dtype, k.dtype, v.dtype}) != 1 or len({q.bias is None, k.bias is None, v.bias is None}) != 1:
            continue
        heads = []
        for lin in (q, k, v):
            us = users.get(lin.out, [])
            ok = len(us) == 1 and isinstance(us[0].value, relax.Call) and \
                getattr(us[0].value.op, "name", "") == "relax.reshape"
            heads.append(us[0] if ok else None)
        if None in heads:
            continue
        name = f"layers.{i - 1}.qkv_proj"
        groups.append((name, [q.name, k.name, v.name]))
        if q.bias:
            groups.append((f"layers.{i - 1}.qkv_bias", [q.bias, k.bias, v.bias]))
        plans.append((q, k, v, heads, name, f"layers.{i - 1}.qkv_bias" if q.bias else None))
    if not plans:
        return mod, layout, []
    new_layout, merges = merge_params(layout, groups)
    replace = {}
    for q, k, v, heads, name, bias in plans:
        widths = [int(lin.out.ty.shape[-1]) for lin in (q, k, v)]
        cache: dict = {}

        def fused(bb, m, param, q=q, name=name, bias=bias, cache=cache):
            if "qkv" not in cache:
                cache["qkv"] = emit_linear(bb, q, m(q.x), name, bias, param, group)
            return cache["qkv"]

        begin = 0
        for lin, head, width in zip((q, k, v), heads, widths):
            def piece(bb, m, param, head=head, b0=begin, b1=begin + width, fused=fused):
                part = bb.emit(relax.op.strided_slice(fused(bb, m, param), axes=[1], begin=[b0], end=[b1],
                                                      assume_inbound=True))
                return relax.op.reshape(part, head.value.args[1])
            replace[head.var] = piece
            begin += width
    return rewrite_forward(mod, layout, new_layout, replace, merges), new_layout, merges


__all__ = ["fuse_qkv"]
