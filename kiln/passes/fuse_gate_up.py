"""Merge each layer's gate and up projections into one linear, followed by one SiLU-and-multiply.

Matches, in the reference form, ``multiply(silu(linear(h, layers.{i}.gate_proj)), linear(h,
layers.{i}.up_proj))`` (float or quantized linears of the same kind reading the same activation) and
emits

    gu  = linear(h, layers.{i}.gate_up_proj)      # [n, 2 I]: gate channels, then up channels
    act = silu(gu[:, :I]) * gu[:, I:]             # strided_slice x2, silu, multiply: one fused kernel

with ``layers.{i}.gate_up_proj`` (or each quantized part) = the gate rows then the up rows (a ``Merge``).
The activation is read once for both projections, and the MLP's first half is one GEMV (plus the
injective SiLU·mul kernel) instead of two.

Invariant: forward computes the same logits; the params tuple is the returned layout.
"""

from __future__ import annotations

from ..ir.tvm import IRModule, relax
from .lib.linears import Layout, Merge, emit_linear, find_linears, merge_params, rewrite_forward


def fuse_gate_up(mod: IRModule, layout: Layout, group: int | None = None) -> tuple[IRModule, Layout, list[Merge]]:
    lins = find_linears(mod, layout)
    fwd = mod["forward"]
    values = {b.var: b.value for b in fwd.body.blocks[0].bindings}

    def op(v) -> str:
        val = values.get(v)
        return getattr(getattr(val, "op", None), "name", "") if isinstance(val, relax.Call) else ""

    out_of = {lin.out: lin for lin in lins.values()}
    groups, plans = [], []
    for b in fwd.body.blocks[0].bindings:
        if op(b.var) != "relax.multiply":
            continue
        a, c = b.value.args
        for s, u in ((a, c), (c, a)):
            if op(s) == "relax.nn.silu" and values[s].args[0] in out_of and u in out_of:
                gate, up = out_of[values[s].args[0]], out_of[u]
                i = gate.name.split(".")[1] if gate.name.startswith("layers.") else None
                if i is None or gate.name != f"layers.{i}.gate_proj" or up.name != f"layers.{i}.up_proj" or \
                        not gate.x.same_as(up.x) or gate.kind != up.kind or gate.dtype != up.dtype or \
                        gate.bias or up.bias:
                    continue
                name = f"layers.{i}.gate_up_proj"
                groups.append((name, [gate.name, up.name]))
                plans.append((b.var, gate, name, int(gate.out.ty.shape[-1])))
                break
    if not plans:
        return mod, layout, []
    new_layout, merges = merge_params(layout, groups)
    replace = {}
    for var, gate, name, inter in plans:
        def act(bb, m, param, gate=gate, name=name, inter=inter):
            gu = emit_linear(bb, gate, m(gate.x), name, None, param, group)
            g = bb.emit(relax.op.strided_slice(gu, axes=[1], begin=[0], end=[inter], assume_inbound=True))
            u = bb.emit(relax.op.strided_slice(gu, axes=[1], begin=[inter], end=[2 * inter], assume_inbound=True))
            return relax.op.multiply(bb.emit(relax.op.nn.silu(g)), u)
        replace[var] = act
    return rewrite_forward(mod, layout, new_layout, replace, merges), new_layout, merges


__all__ = ["fuse_gate_up"]
