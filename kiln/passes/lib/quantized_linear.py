"""Emitting a quantized linear (plain or fused form) and keeping kiln's quantized kernels whole through FuseOps.

Shared by quantize_linears (the plain form), fuse_dequant_matmul (the fused form) and the passes that
re-emit merged linears (lib/linears.py). Not a pass.
"""

from __future__ import annotations

from ...ir import quant_kernels as qk
from ...ir.tvm import IRModule, relax

KERNELS = ("dequant_matmul", "quantize_per_token", "w4a8_matmul", "w8a8_matmul", "dequantize_weight_only",
           "dequantize_w4a8")


def mark_opaque(mod: IRModule) -> IRModule:
    """kiln's quantized kernels kept whole by FuseOps: it would fuse them with their neighbours, and FuseTIR
    then fails on a shared input ("Inconsistent buffers ... mapped to the same relax var", TVM 0.27); their
    cast epilogue is inside already. A plain-form ``dequantize_*`` stays its own kernel, so ``--no-fuse``
    really materialises the weight."""
    return IRModule({gv: (f.with_attr("op_pattern", 8) if gv.name_hint.startswith(KERNELS) else f)
                     for gv, f in mod.functions_items()}, attrs=mod.attrs)


def is_op(v, name: str) -> bool:
    return isinstance(v, relax.Call) and getattr(v.op, "name", None) == name


def act_int8(bb, x, act_quant):
    """``x``'s per-token int8 codes and scales, emitted once per input (kept in ``act_quant``)."""
    if x not in act_quant:
        act_quant[x] = bb.emit_te(qk.quantize_per_token, x, primfunc_name_hint="quantize_per_token",
                                  name_hint="act_int8")
    q = act_quant[x]
    return bb.emit(relax.TupleGetItem(q, 0)), bb.emit(relax.TupleGetItem(q, 1))


def emit_plain_linear(bb, kind, matmul, x, p, group, out_dtype, act_quant, hint):
    """The plain form of ``matmul`` (``x @ W^T``, output ``out_dtype``) on W's packed tensors ``p`` (by part name)."""
    if kind == "weight_only":
        w = bb.emit_te(qk.dequantize_weight_only, p["qweight"], p["scales"], p["zeros"], group=group,
                       primfunc_name_hint="dequantize_weight_only", name_hint=hint + "_weight")
        return bb.emit(relax.Call(matmul.op, [x, bb.emit(relax.op.permute_dims(w))], matmul.attrs), name_hint=hint)
    x8, sx = act_int8(bb, x, act_quant)
    if kind == "w4a8":
        w8 = bb.emit_te(qk.dequantize_w4a8, p["qweight"], p["group_scales"], p["zeros"], group=group,
                        primfunc_name_hint="dequantize_w4a8", name_hint=hint + "_weight")
    else:
        w8 = p["qweight"]
    return bb.emit_te(qk.w8a8_matmul, x8, sx, w8, p["channel_scales"], out_dtype=out_dtype,
                      primfunc_name_hint="w8a8_matmul", name_hint=hint)


def emit_quantized_linear(bb, kind, x, p, group, out_dtype, act_quant, hint):
    """Emit ``x @ W^T`` on W's packed tensors ``p`` (by part name) in the fused form — the weight dequantized
    inside the reduction — with the ``kind``'s kernel; for w4a8/w8a8 the per-token int8 quantization of ``x``
    is emitted once per input and kept in ``act_quant``. Used by fuse_dequant_matmul and by the fusion passes
    that re-emit merged linears (linears.py)."""
    if kind == "weight_only":
        return bb.emit_te(qk.weight_only_matmul, x, p["qweight"], p["scales"], p["zeros"], group=group,
                          out_dtype=out_dtype, primfunc_name_hint="dequant_matmul", name_hint=hint)
    x8, sx = act_int8(bb, x, act_quant)
    return emit_int8_linear(bb, kind, x8, sx, p, group, out_dtype, hint)


def emit_int8_linear(bb, kind, x8, sx, p, group, out_dtype, hint):
    """The fused w4a8 / w8a8 product of int8 activations ``(x8, sx)`` and W's packed tensors ``p``."""
    if kind == "w4a8":
        return bb.emit_te(qk.w4a8_matmul, x8, sx, p["qweight"], p["group_scales"], p["zeros"], p["channel_scales"],
                          group=group, out_dtype=out_dtype, primfunc_name_hint="w4a8_matmul", name_hint=hint)
    return bb.emit_te(qk.w8a8_matmul, x8, sx, p["qweight"], p["channel_scales"], out_dtype=out_dtype,
                      primfunc_name_hint="w8a8_matmul", name_hint=hint)
