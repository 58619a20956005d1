"""Fuse each residual add with the RMSNorm that reads it into one kernel with two outputs.

Matches, in the reference form, ``s = add(x, y)`` followed by ``h = rms_norm(s, w, axes=[-1], eps)``
(the residual stream after attention or the MLP, and the next norm). Emits one ``call_tir`` of
``add_rms_norm`` returning ``(s, h)``: the sum is written once and normalised while it is in cache,
and ``s`` still feeds the next residual add. With fuse_qkv and fuse_gate_up this takes a Llama layer
from 11 kernels per decode step to 8 (docs/benchmarking.md, tools/bench_fusion.py).

The kernel computes in float32 (like TOPI's rms_norm) and is marked opaque so that TVM's FuseOps keeps
it whole. Invariant: ``s`` and ``h`` hold the same values as before (to float rounding).
"""

from __future__ import annotations

from ..ir.tvm import IRModule, relax, te, tirx
from .lib.linears import rewrite_forward


def add_rms_norm_te(x: te.Tensor, y: te.Tensor, w: te.Tensor, eps: float):
    """x, y: [n, H], w: [H] -> (x + y, rms_norm(x + y) * w), both in x's dtype."""
    n, H = x.shape
    dt = x.dtype
    s = te.compute((n, H), lambda i, j: x[i, j] + y[i, j], name="residual")
    k = te.reduce_axis((0, H), name="k")
    sq = te.compute((n,), lambda i: te.sum(s[i, k].astype("float32") * s[i, k].astype("float32"), axis=k),
                    name="sum_sq")
    r = te.compute((n,), lambda i: tirx.rsqrt(sq[i] / tirx.Cast("float32", H) + tirx.const(eps, "float32")),
                   name="rsqrt")
    out = te.compute((n, H), lambda i, j: (r[i] * s[i, j].astype("float32") * w[j].astype("float32")).astype(dt),
                     name="rms_norm")
    return [s, out]


def _op(v) -> str:
    return getattr(getattr(v, "op", None), "name", "") if isinstance(v, relax.Call) else ""


def fuse_add_rms_norm(mod: IRModule) -> IRModule:
    fwd = mod["forward"]
    values = {b.var: b.value for b in fwd.body.blocks[0].bindings}
    replace, adds, fused_of = {}, {}, {}
    for b in fwd.body.blocks[0].bindings:
        v = b.value
        if _op(v) != "relax.nn.rms_norm" or _op(values.get(v.args[0])) != "relax.add":
            continue
        s = v.args[0]
        x, y = values[s].args
        shapes = [getattr(e.ty, "shape", None) for e in (x, y, s)]
        axes = [int(a) for a in v.attrs.axes]
        if any(sh is None or len(sh) != 2 for sh in shapes) or axes not in ([-1], [1]) or \
                str(shapes[0]) != str(shapes[1]) or s in adds:
            continue
        adds[s] = b.var
        eps = float(v.attrs.epsilon)

        def fused(bb, m, param, s=s, x=x, y=y, w=v.args[1], eps=eps):
            call = bb.emit_te(add_rms_norm_te, m(x), m(y), m(w), eps, primfunc_name_hint="add_rms_norm")
            fused_of[s] = call
            return relax.TupleGetItem(call, 0)

        def normed(bb, m, param, s=s):
            return relax.TupleGetItem(fused_of[s], 1)

        replace[s], replace[b.var] = fused, normed
    if not replace:
        return mod
    layout = {f"p{i}": (tuple(int(d) for d in t.shape), str(t.dtype)) for i, t in enumerate(fwd.params[1].ty.fields)}
    out = rewrite_forward(mod, layout, layout, replace)
    return IRModule({gv: (f.with_attr("op_pattern", 8) if gv.name_hint.startswith("add_rms_norm") else f)
                     for gv, f in out.functions_items()}, attrs=out.attrs)


__all__ = ["add_rms_norm_te", "fuse_add_rms_norm"]
