"""The linears of kiln's reference form, found and re-emitted: shared by the fusion passes that merge them.

A linear named ``NAME`` (a parameter name of the packed tuple: ``layers.0.q_proj``) is, in ``forward``:

    float:        y = matmul(x, permute_dims(W))           (+ astype back for fp16/bf16, fp32 accumulation)
    quantized:    y = call_tir(dequant_matmul | w4a8_matmul | w8a8_matmul, [x or x's int8 codes, NAME.<parts>])
    then maybe    y = add(y, BIAS)  (or add(BIAS, y))

``merge_params`` and ``rewrite_forward`` let a pass replace several linears by one over concatenated
weights: the packed params tuple loses the merged parameters and gains the concatenation (rows, axis 0,
which is valid for every kiln layout: each output channel's packed words, scales and zeros are its
own row), recorded as ``Merge``s that the compiler applies to the weights (``apply_merges``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ...errors import PassError
from ...ir.tvm import IRModule, PyExprMutator, mutator, relax
from .quantized_linear import emit_quantized_linear, mark_opaque

KERNEL_KINDS = {"dequant_matmul": "weight_only", "w4a8_matmul": "w4a8", "w8a8_matmul": "w8a8"}

Layout = dict[str, tuple[tuple[int, ...], str]]


@dataclass(frozen=True)
class Merge:
    """Parameter ``name`` is the row-wise (axis 0) concatenation of ``sources``, in order."""

    name: str
    sources: tuple[str, ...]


@dataclass
class Linear:
    name: str  # the weight's parameter name (quantized: the prefix of its parts)
    kind: str  # "float" | "weight_only" | "w4a8" | "w8a8"
    x: relax.Var  # the float input activation
    out: relax.Var  # the output (after the bias, if any)
    bias: str | None  # the bias parameter's name
    dtype: str  # the output dtype


def _op(v) -> str:
    return getattr(getattr(v, "op", None), "name", "") if isinstance(v, relax.Call) else ""


def find_linears(mod: IRModule, layout: Layout) -> dict[str, Linear]:
    """Every linear of ``forward`` by weight name."""
    fwd = mod["forward"]
    packed = fwd.params[1]
    names = list(layout)
    param_of, transposed, found = {}, {}, {}
    by_out: dict = {}
    for b in fwd.body.blocks[0].bindings:
        v = b.value
        if isinstance(v, relax.TupleGetItem) and v.tuple_value.same_as(packed):
            param_of[b.var] = names[v.index]
        elif _op(v) == "relax.permute_dims" and v.args[0] in param_of:
            transposed[b.var] = param_of[v.args[0]]
        elif _op(v) == "relax.matmul" and v.args[1] in transposed:
            lin = Linear(transposed[v.args[1]], "float", v.args[0], b.var, None, str(b.var.ty.dtype))
            found[lin.name], by_out[b.var] = lin, lin
        elif _op(v) == "relax.call_tir" and v.args[0].name_hint.startswith(tuple(KERNEL_KINDS)):
            kernel = next(k for k in KERNEL_KINDS if v.args[0].name_hint.startswith(k))
            args = list(v.args[1].fields)
            parts = [param_of[a] for a in args if a in param_of]
            if not parts:
                continue
            x = args[0]
            if KERNEL_KINDS[kernel] != "weight_only":  # x is the int8 codes: TupleGetItem(quantize_per_token(x))
                x = _act_quant_input(fwd, x)
            lin = Linear(parts[0].rsplit(".", 1)[0], KERNEL_KINDS[kernel], x, b.var, None, str(b.var.ty.dtype))
            found[lin.name], by_out[b.var] = lin, lin
        elif _op(v) == "relax.astype" and v.args[0] in by_out:
            lin = by_out[v.args[0]]
            lin.out, lin.dtype = b.var, str(b.var.ty.dtype)
            by_out[b.var] = lin
        elif _op(v) == "relax.add" and any(a in by_out and c in param_of for a, c in (v.args, v.args[::-1])):
            y, bias = v.args if v.args[0] in by_out else v.args[::-1]  # y + bias or bias + y
            lin = by_out[y]
            lin.out, lin.bias = b.var, param_of[bias]
            by_out[b.var] = lin
    return found


def _act_quant_input(fwd, codes):
    values = {b.var: b.value for b in fwd.body.blocks[0].bindings}
    tgi = values[codes]
    call = values[tgi.tuple_value]
    return call.args[1].fields[0]


def parts_of(layout: Layout, name: str) -> list[str]:
    """The parameter names holding linear ``name``'s weight: itself, or its quantized parts."""
    if name in layout:
        return [name]
    parts = [p for p in layout if p.startswith(name + ".")]
    if not parts:
        raise PassError(f"no parameter {name!r} or parts of it in the layout")
    return parts


def merge_params(layout: Layout, groups: list[tuple[str, list[str]]]) -> tuple[Layout, list[Merge]]:
    """The layout with each group's weights (and their quantized parts) replaced by their row-wise
    concatenation ``new`` (at the first member's position), and the merges that make the weights."""
    merges: list[Merge] = []
    replaced: dict[str, tuple[str, tuple[str, ...]]] = {}  # first old param -> (new param, sources)
    gone: set[str] = set()
    for new, olds in groups:
        cols = [parts_of(layout, o) for o in olds]
        for i, first in enumerate(cols[0]):
            suffix = first[len(olds[0]):]
            sources = tuple(c[i] for c in cols)
            if any(s[len(o):] != suffix for s, o in zip(sources, olds)):
                raise PassError(f"cannot merge {olds}: their parameters differ ({sources})")
            (_, dt) = layout[first]
            if any(layout[s][1] != dt or layout[s][0][1:] != layout[first][0][1:] for s in sources):
                raise PassError(f"cannot merge {sources}: shapes or dtypes differ beyond the rows")
            replaced[first] = (new + suffix, sources)
            gone.update(sources)
            merges.append(Merge(new + suffix, sources))
    out: Layout = {}
    for name, (shape, dt) in layout.items():
        if name in replaced:
            new, sources = replaced[name]
            out[new] = ((sum(layout[s][0][0] for s in sources), *shape[1:]), dt)
        elif name not in gone:
            out[name] = (shape, dt)
    return out, merges


@mutator
class _Remap(PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.bb = relax.BlockBuilder(mod)
        self.builder_ = self.bb


class _Params:
    """``param(name)``: the new tuple's element ``name``, emitted on first use; ``param.has(name)``."""

    def __init__(self, bb, packed, index: dict[str, int]):
        self.bb, self.packed, self.index, self.got = bb, packed, index, {}

    def has(self, name: str) -> bool:
        return name in self.index

    def __call__(self, name: str):
        if name not in self.got:
            self.got[name] = self.bb.emit(relax.TupleGetItem(self.packed, self.index[name]),
                                          name_hint=name.replace(".", "_"))
        return self.got[name]


def rewrite_forward(mod: IRModule, old: Layout, new: Layout, replace: dict[relax.Var, Callable],
                    merges: list[Merge] = ()) -> IRModule:
    """``forward`` over the params tuple ``new``; each var ``v`` in ``replace`` bound to
    ``replace[v](bb, m, param)`` instead, where ``m`` maps an old var to its new one and ``param(name)`` is
    the new tuple's element ``name``. A merged parameter is unpacked where its first source was; the
    sources' bindings, and everything that becomes unused, are removed."""
    fwd = mod["forward"]
    ids, packed = fwd.params
    old_names, index = list(old), {n: i for i, n in enumerate(new)}
    first_of = {mg.sources[0]: mg.name for mg in merges}
    new_packed = relax.Var("params", relax.TupleType([relax.TensorType(list(s), dt) for s, dt in new.values()]))
    rw = _Remap(mod)
    bb = rw.bb
    param = _Params(bb, new_packed, index)

    def m(v):
        return rw.visit_expr(v)

    def bind(var, value):
        if not isinstance(var, relax.DataflowVar):
            return bb.emit_output(value, name_hint=var.name)  # the block's output
        if isinstance(value, relax.Var):  # already bound (a replacement that emitted its own result)
            return value
        return bb.emit(value, name_hint=var.name)

    attrs = {str(k): fwd.attrs[k] for k in fwd.attrs.keys()} if fwd.attrs is not None else {}
    with bb.function("forward_rewritten", [ids, new_packed], attrs=dict(attrs)):  # it writes global_symbol in
        with bb.dataflow():
            for b in fwd.body.blocks[0].bindings:
                v = b.value
                if b.var in replace:
                    new_var = bind(b.var, replace[b.var](bb, m, param))
                elif isinstance(v, relax.TupleGetItem) and v.tuple_value.same_as(packed):
                    name = old_names[v.index]
                    if name in first_of:
                        param(first_of[name])  # the merged parameter, where its first source was
                    if name not in index:
                        continue  # merged away
                    new_var = param(name)
                else:
                    new_var = bind(b.var, rw.visit_expr(v))
                rw.set_var_remap(b.var, new_var)
        bb.emit_func_output(rw.visit_expr(fwd.body.body))
    built = bb.get()
    new_fwd = relax.analysis.remove_all_unused(built["forward_rewritten"])
    if "global_symbol" in attrs:
        new_fwd = new_fwd.with_attr("global_symbol", attrs["global_symbol"])
    else:
        new_fwd = new_fwd.without_attr("global_symbol")
    out_mod = IRModule({gv: f for gv, f in built.functions_items() if gv.name_hint != "forward_rewritten"},
                       attrs=mod.attrs)
    out_mod[out_mod.get_global_var("forward")] = new_fwd
    return mark_opaque(out_mod)  # a re-emitted quantized kernel is a new PrimFunc: keep it whole too


def emit_linear(bb, lin: Linear, x, name: str, bias: str | None, param, group: int | None) -> relax.Var:
    """Re-emit ``lin``'s computation on input ``x`` with the weight ``name`` (and ``bias``) of the new tuple;
    returns the bound output."""
    if lin.kind == "float":
        w = param(name)
        half = lin.dtype in ("float16", "bfloat16")
        y = bb.emit(relax.op.matmul(x, bb.emit(relax.op.permute_dims(w)), out_dtype="float32" if half else None))
        if half:
            y = bb.emit(relax.op.astype(y, lin.dtype))
    else:
        if group is None and lin.kind != "w8a8":
            raise PassError(f"merging the quantized {lin.name} needs the scheme's group size")
        prefix = name + "."
        parts = {p: param(prefix + p) for p in ("qweight", "scales", "zeros", "group_scales", "channel_scales")
                 if param.has(prefix + p)}
        y = emit_quantized_linear(bb, lin.kind, x, parts, group, lin.dtype, {}, name.replace(".", "_"))
    return bb.emit(relax.op.add(y, param(bias))) if bias else y


def apply_merges(params: dict, layout: Layout, merges: list[Merge]) -> dict:
    """The weights for ``layout`` from the weights before the merges (torch tensors, by name)."""
    import torch

    made = dict(params)
    for mg in merges:
        made[mg.name] = torch.cat([made[s] for s in mg.sources], dim=0)
    return {name: made[name].contiguous() for name in layout}
