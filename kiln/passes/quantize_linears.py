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
from ..ir.tvm import IRModule, PyExprMutator, mutator, relax
from .lib.quantized_linear import emit_plain_linear, is_op, mark_opaque

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
                elif is_op(v, "relax.permute_dims") and param_of.get(v.args[0]) in quantized:
                    transposed[b.var] = param_of[v.args[0]]
                    continue
                elif is_op(v, "relax.matmul") and v.args[1] in transposed:
                    name = transposed[v.args[1]]
                    x = rw.visit_expr(v.args[0])
                    new = emit_plain_linear(bb, kind, v, x, parts[name], group, str(b.var.ty.dtype), act_quant,
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
