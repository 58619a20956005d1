"""Move each quantized weight's dequantization into the product that reads it.

Matches, in the quantized reference form (kiln/passes/quantize_linears.py's plain form), a dequantization kernel
whose only reader is one product over packed parameters:

    W' = dequantize_weight_only(qw, scales, zeros);  y = matmul(x, permute_dims(W'))
    W8 = dequantize_w4a8(qw, gs, zeros);             y = w8a8_matmul(x8, sx, W8, cs)

and emits one kernel that rebuilds each weight element inside the reduction
(kiln/ir/quant_kernels.py):

    y = dequant_matmul(x, qw, scales, zeros)         y = w4a8_matmul(x8, sx, qw, gs, zeros, cs)

so a decode step reads the packed 4-bit words instead of writing and reading back a full-precision copy
of every weight. A dequantized weight read by anything else is left alone.

Invariant: forward computes the same logits up to the order of float sums — a weight-only element is
formed in float32 inside the fused kernel, where the plain form rounded it to the model dtype first (the
same value in float32) — and the params tuple is unchanged.
"""

from __future__ import annotations

from ..errors import PassError
from ..ir.tvm import IRModule, relax
from .lib.linears import Layout, Merge, rewrite_forward
from .lib.quantized_linear import emit_int8_linear, emit_quantized_linear


def _op(v) -> str:
    return getattr(getattr(v, "op", None), "name", "") if isinstance(v, relax.Call) else ""


def _kernel(v, name: str):
    """The call_tir's argument fields if ``v`` calls kernel ``name``, else None."""
    if _op(v) == "relax.call_tir" and v.args[0].name_hint.startswith(name):
        return list(v.args[1].fields)
    return None


def fuse_dequant_matmul(mod: IRModule, layout: Layout, group: int | None = None) -> tuple[IRModule, Layout, list[Merge]]:
    fwd = mod["forward"]
    bindings = fwd.body.blocks[0].bindings
    value = {b.var: b.value for b in bindings}
    uses: dict = {}
    for b in bindings:
        for v in relax.analysis.free_vars(b.value):
            uses[v] = uses.get(v, 0) + 1
    if isinstance(fwd.body.body, relax.Var):
        uses[fwd.body.body] = uses.get(fwd.body.body, 0) + 1
    only = lambda v: uses.get(v, 0) == 1  # noqa: E731
    replace = {}
    for b in bindings:
        v = b.value
        out_dtype = str(getattr(b.var.ty, "dtype", ""))
        if _op(v) == "relax.matmul" and _op(value.get(v.args[1])) == "relax.permute_dims" and only(v.args[1]):
            w = value[v.args[1]].args[0]
            parts = _kernel(value.get(w), "dequantize_weight_only")
            if parts is None or not only(w):
                continue
            p = dict(zip(("qweight", "scales", "zeros"), parts))
            x = v.args[0]
            replace[b.var] = lambda bb, m, param, x=x, p=p, out_dtype=out_dtype, hint=b.var.name: \
                emit_quantized_linear(bb, "weight_only", m(x), {k: m(a) for k, a in p.items()}, group, out_dtype,
                                      {}, hint)
        elif (args := _kernel(v, "w8a8_matmul")) is not None and \
                (parts := _kernel(value.get(args[2]), "dequantize_w4a8")) is not None and only(args[2]):
            x8, sx, _, cs = args
            p = {"qweight": parts[0], "group_scales": parts[1], "zeros": parts[2], "channel_scales": cs}
            replace[b.var] = lambda bb, m, param, x8=x8, sx=sx, p=p, out_dtype=out_dtype, hint=b.var.name: \
                emit_int8_linear(bb, "w4a8", m(x8), m(sx), {k: m(a) for k, a in p.items()}, group, out_dtype, hint)
    if not replace:
        return mod, layout, []
    if group is None:
        raise PassError("fuse_dequant_matmul: a 4-bit weight needs the scheme's group size")
    return rewrite_forward(mod, layout, layout, replace), layout, []  # kernels kept whole (linears.py)


__all__ = ["fuse_dequant_matmul"]
