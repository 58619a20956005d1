"""Quantize the linears of the reference form (the IR half of ``kiln compile --quant SCHEME``).

Each ``matmul(x, permute_dims(W))`` whose weight ``W`` is quantized is rewritten onto W's packed tensors
in the plain form — the weight dequantized by its own kernel, then the product:

    weight-only:  W' = dequantize_weight_only(qweight, scales, zeros);  matmul(x, permute_dims(W'))
    w4a8:         (x8, sx) = quantize_per_token(x);  W8 = dequantize_w4a8(qweight, group_scales, zeros)
                  w8a8_matmul(x8, sx, W8, channel_scales)
    w8a8:         (x8, sx) = quantize_per_token(x);  w8a8_matmul(x8, sx, qweight, channel_scales)

and the packed params tuple takes those tensors in W's place (kiln/quant/schemes.py transforms the
weights themselves, folding scales into the norms; the two meet in ``packed_layout``). The per-token
activation op is emitted once per input and shared by the linears that read it (q/k/v, gate/up).
kiln/passes/fuse_dequant_matmul.py then moves each dequantization into its product's reduction, so the
weight is never materialised (``--no-fuse`` leaves the plain form).

Invariant: ``forward`` computes what the reference form computes with every quantized weight replaced by
its dequantized value (rounded to the model dtype) — and, for w4a8/w8a8, every quantized linear's input
by its per-token int8 rounding — and its params tuple is ``packed_layout`` in order. Everything else is
untouched, so the fusion, paged-attention passes and codegen apply as before.
"""

from __future__ import annotations

from ..errors import PassError
from ..ir import quant_kernels as qk
from ..ir.tvm import IRModule, PyExprMutator, mutator, relax

KINDS = ("weight_only", "w4a8", "w8a8")


def packed_layout(layout: dict[str, tuple[tuple[int, ...], str]], quantized: set[str], kind: str, group: int,
                  dtypes: dict[str, str] | None = None) -> dict[str, tuple[tuple[int, ...], str]]:
    """The params layout after quantization: each quantized ``[O, K]`` weight becomes its packed tensors
    (names ``NAME.<part>``, shapes and dtypes per kiln/ir/quant_kernels.py); ``dtypes`` overrides a part's
    dtype (e.g. ``group_scales``' integer type, as the weights were written)."""
    if kind not in KINDS:
        raise PassError(f"quantize: unknown kind {kind!r}")
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for name, (shape, dtype) in layout.items():
        if name not in quantized:
            out[name] = (tuple(shape), dtype)
            continue
        O, K = shape
        ng = -(-K // group)  # a short last group has its own scale (kiln/quant/formats.py to_groups)
        if kind != "w8a8" and K % 8:
            raise PassError(f"quantize: {name} has {K} input channels; 4-bit packing needs a multiple of 8")
        if kind == "weight_only":
            parts = {"qweight": ((O, K // 8), "int32"), "scales": ((O, ng), dtype), "zeros": ((O, ng), "uint8")}
        elif kind == "w4a8":
            parts = {"qweight": ((O, K // 8), "int32"), "group_scales": ((O, ng), "uint8"),
                     "zeros": ((O, ng), "uint8"), "channel_scales": ((O,), "float32")}
        else:
            parts = {"qweight": ((O, K), "int8"), "channel_scales": ((O,), "float32")}
        for part, (s, dt) in parts.items():
            key = f"{name}.{part}"
            out[key] = (s, (dtypes or {}).get(key, dt))
    return out


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod: IRModule):
        super().__init__(mod)
        self.bb = relax.BlockBuilder(mod)  # as in paged_attention: keep the Python-side builder
        self.builder_ = self.bb


def quantize_linears(mod: IRModule, layout: dict[str, tuple[tuple[int, ...], str]], quantized: set[str], kind: str,
                     group: int = 128, dtypes: dict[str, str] | None = None) -> IRModule:
    """Rewrite ``forward`` (the reference form) for the quantized weights named in ``quantized``."""
    fwd = mod["forward"]
    ids, packed = fwd.params
    if len(fwd.body.blocks) != 1:
        raise PassError("quantize: expected the reference form (one dataflow block in forward)")
    names = list(layout)
    if len(packed.ty.fields) != len(names):
        raise PassError(f"quantize: forward takes {len(packed.ty.fields)} params, the layout names {len(names)}")
    missing = quantized - set(names)
    if missing:
        raise PassError(f"quantize: no parameters named {sorted(missing)}")
    new_layout = packed_layout(layout, quantized, kind, group, dtypes)
    index = {name: i for i, name in enumerate(new_layout)}
    new_packed = relax.Var("params", relax.TupleType([relax.TensorType(list(s), dt) for s, dt in new_layout.values()]))

    rw = _Rewriter(mod)
    bb = rw.bb
    param_of: dict[relax.Var, str] = {}  # old var bound to params[i] -> its name
    parts: dict[str, dict[str, relax.Var]] = {}  # quantized name -> its packed tensors in the new function
    transposed: dict[relax.Var, str] = {}  # old var bound to permute_dims(quantized weight) -> the weight's name
    act_quant: dict[relax.Var, relax.Var] = {}  # new input var -> its (codes, scales) tuple
    rewritten = 0
    attrs = {k: fwd.attrs[k] for k in fwd.attrs.keys()} if fwd.attrs is not None else {}
    with bb.function("forward_quantized", [ids, new_packed], attrs=attrs):
        with bb.dataflow():
            for b in fwd.body.blocks[0].bindings:
                v = b.value
                if isinstance(v, relax.TupleGetItem) and v.tuple_value.same_as(packed):
                    name = names[v.index]
                    param_of[b.var] = name
                    if name in quantized:
                        parts[name] = {p.split(".")[-1]: bb.emit(relax.TupleGetItem(new_packed, index[p]),
                                                                 name_hint=p.replace(".", "_"))
                                       for p in new_layout if p.startswith(name + ".")}
                        continue
                    new = bb.emit(relax.TupleGetItem(new_packed, index[name]), name_hint=b.var.name)
                elif _is_op(v, "relax.permute_dims") and param_of.get(v.args[0]) in quantized:
                    transposed[b.var] = param_of[v.args[0]]
                    continue
                elif _is_op(v, "relax.matmul") and v.args[1] in transposed:
                    name = transposed[v.args[1]]
                    x = rw.visit_expr(v.args[0])
                    new = _emit_plain_linear(bb, kind, v, x, parts[name], group, str(b.var.ty.dtype), act_quant,
                                             b.var.name)
                    rewritten += 1
                else:
                    new = bb.emit(rw.visit_expr(v), name_hint=b.var.name)
                rw.set_var_remap(b.var, new)
            out = bb.emit_output(rw.visit_expr(fwd.body.body))
        bb.emit_func_output(out)
    if rewritten != len(quantized):
        used = set(transposed.values())
        raise PassError(f"quantize: {len(quantized) - rewritten} quantized weights are not used as "
                        f"matmul(x, permute_dims(W)) in forward: {sorted(set(quantized) - used)[:4]}")
    built = bb.get()
    new_fwd = built["forward_quantized"]
    out = mark_opaque(IRModule({gv: f for gv, f in built.functions_items() if gv.name_hint != "forward_quantized"},
                               attrs=mod.attrs))
    if fwd.attrs is None or "global_symbol" not in fwd.attrs:
        new_fwd = new_fwd.without_attr("global_symbol")
    else:
        new_fwd = new_fwd.with_attr("global_symbol", fwd.attrs["global_symbol"])
    out[out.get_global_var("forward")] = new_fwd
    return out


KERNELS = ("dequant_matmul", "quantize_per_token", "w4a8_matmul", "w8a8_matmul", "dequantize_weight_only",
           "dequantize_w4a8")


def mark_opaque(mod: IRModule) -> IRModule:
    """kiln's quantized kernels kept whole by FuseOps: it would fuse them with their neighbours, and FuseTIR
    then fails on a shared input ("Inconsistent buffers ... mapped to the same relax var", TVM 0.27); their
    cast epilogue is inside already. A plain-form ``dequantize_*`` stays its own kernel, so ``--no-fuse``
    really materialises the weight."""
    return IRModule({gv: (f.with_attr("op_pattern", 8) if gv.name_hint.startswith(KERNELS) else f)
                     for gv, f in mod.functions_items()}, attrs=mod.attrs)


def _is_op(v, name: str) -> bool:
    return isinstance(v, relax.Call) and getattr(v.op, "name", None) == name


def _act_int8(bb, x, act_quant):
    """``x``'s per-token int8 codes and scales, emitted once per input (kept in ``act_quant``)."""
    if x not in act_quant:
        act_quant[x] = bb.emit_te(qk.quantize_per_token, x, primfunc_name_hint="quantize_per_token",
                                  name_hint="act_int8")
    q = act_quant[x]
    return bb.emit(relax.TupleGetItem(q, 0)), bb.emit(relax.TupleGetItem(q, 1))


def _emit_plain_linear(bb, kind, matmul, x, p, group, out_dtype, act_quant, hint):
    """The plain form of ``matmul`` (``x @ W^T``, output ``out_dtype``) on W's packed tensors ``p`` (by part name)."""
    if kind == "weight_only":
        w = bb.emit_te(qk.dequantize_weight_only, p["qweight"], p["scales"], p["zeros"], group=group,
                       primfunc_name_hint="dequantize_weight_only", name_hint=hint + "_weight")
        return bb.emit(relax.Call(matmul.op, [x, bb.emit(relax.op.permute_dims(w))], matmul.attrs), name_hint=hint)
    x8, sx = _act_int8(bb, x, act_quant)
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
    x8, sx = _act_int8(bb, x, act_quant)
    return emit_int8_linear(bb, kind, x8, sx, p, group, out_dtype, hint)


def emit_int8_linear(bb, kind, x8, sx, p, group, out_dtype, hint):
    """The fused w4a8 / w8a8 product of int8 activations ``(x8, sx)`` and W's packed tensors ``p``."""
    if kind == "w4a8":
        return bb.emit_te(qk.w4a8_matmul, x8, sx, p["qweight"], p["group_scales"], p["zeros"], p["channel_scales"],
                          group=group, out_dtype=out_dtype, primfunc_name_hint="w4a8_matmul", name_hint=hint)
    return bb.emit_te(qk.w8a8_matmul, x8, sx, p["qweight"], p["channel_scales"], out_dtype=out_dtype,
                      primfunc_name_hint="w8a8_matmul", name_hint=hint)
