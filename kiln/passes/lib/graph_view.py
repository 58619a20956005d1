"""A read-only Python view of an imported dataflow function, shared by the recognition passes.

The imported form (kiln/frontend/torch_export.py, onnx_import.py) is one Relax function
``main(*inputs, *weights)`` with one dataflow block. The recognition passes walk it by hand: which
binding defines a var, who uses it, which vars depend on the token ids (the "token" vars: the model's
activations) and which on nothing but weights, constants, the attention mask and the sequence length
(masks, RoPE tables, transposed weights). Those non-token values can be *evaluated* for a small
sequence length (``evaluate``), so a pass checks what a mask or a cos table computes instead of
trusting the ops that happen to build it.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from ...errors import PassError
from ...ir.tvm import relax, tirx, tvm

ENTRY = "main"


def op_name(value) -> str:
    """``relax.add`` -> "add"; "" for anything that is not a call of a Relax op."""
    if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op):
        return value.op.name.removeprefix("relax.")
    return ""


def shape_of(e) -> list | None:
    ty = getattr(e, "ty", None)
    if isinstance(ty, relax.TensorType) and ty.shape is not None:
        return list(ty.shape)
    return None


def int_dims(shape) -> list[int | None]:
    return [int(x) if isinstance(x, tirx.IntImm) else None for x in shape]


def scalar_const(e) -> float | None:
    """The value of a scalar (or one-element) Relax constant, else None."""
    if isinstance(e, tvm.ir.Constant):
        a = e.value.numpy()
        if a.size == 1:
            return float(a.reshape(()))
    return None


def describe(var, value) -> str:
    return f"{var.name} = {op_name(value) or type(value).__name__}(...)"


class GraphView:
    """Bindings, definitions, uses and token-dependence of ``func`` (one dataflow block)."""

    def __init__(self, func: relax.Function, num_input: int | None = None):
        if len(func.body.blocks) != 1:
            raise PassError("recognition expects the imported form: one dataflow block")
        self.func = func
        self.num_input = int(func.attrs["num_input"]) if num_input is None else num_input
        self.inputs = list(func.params[:self.num_input])
        self.weights = list(func.params[self.num_input:])
        self.bindings = list(func.body.blocks[0].bindings)
        self.value = {b.var: b.value for b in self.bindings}
        self.index = {b.var: i for i, b in enumerate(self.bindings)}
        self.users: dict = defaultdict(list)
        for b in self.bindings:
            for v in relax.analysis.free_vars(b.value):
                self.users[v].append(b.var)
        out = func.body.body
        if isinstance(out, relax.Var):
            self.users[out].append(None)  # the function's result counts as a use
        self.ids = self.inputs[0]
        self.token = {self.ids}  # vars whose value depends on the token ids
        for b in self.bindings:
            if any(v in self.token for v in relax.analysis.free_vars(b.value)):
                self.token.add(b.var)
        self.seq = self._seq_var()

    def _seq_var(self):
        shape = shape_of(self.ids)
        dyn = [d for d in shape or [] if not isinstance(d, tirx.IntImm)]
        if len(dyn) != 1:
            raise PassError(f"recognition expects input_ids with one symbolic (sequence) dimension, got {shape}")
        return dyn[0]

    def call(self, var) -> relax.Call | None:
        v = self.value.get(var)
        return v if isinstance(v, relax.Call) else None

    def op(self, var) -> str:
        return op_name(self.value.get(var))

    def is_weight(self, e) -> bool:
        return isinstance(e, relax.Var) and e in self.weights

    def depends_on_weights_only(self, e) -> bool:
        """True for a weight, a constant, or a var computed from weights and constants alone."""
        if isinstance(e, tvm.ir.Constant) or self.is_weight(e):
            return True
        if not isinstance(e, relax.Var) or e not in self.value:
            return False
        return all(self.depends_on_weights_only(v) for v in relax.analysis.free_vars(self.value[e]))

    def single_user(self, var):
        us = self.users.get(var, [])
        return us[0] if len(us) == 1 else None

    # ------------------------------------------------------------------------------- evaluation

    def evaluate(self, exprs: list, seq_len: int, weights: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Compute non-token ``exprs`` (vars or constants) at sequence length ``seq_len`` for one sequence from
        position 0 without padding (``_probe_input``), weights from ``weights`` (by parameter name)."""
        out = [None] * len(exprs)
        todo = []
        for i, e in enumerate(exprs):
            if isinstance(e, tvm.ir.Constant):
                out[i] = e.value.numpy()
            elif e in self.token:
                raise PassError(f"recognition: {e.name} depends on the token ids; cannot evaluate it")
            else:
                todo.append(i)
        if not todo:
            return out
        needed, stack = set(), [exprs[i] for i in todo]
        while stack:
            v = stack.pop()
            if v in needed or v not in self.value:
                continue
            needed.add(v)
            stack.extend(relax.analysis.free_vars(self.value[v]))
        bindings = [b for b in self.bindings if b.var in needed]
        free = {v for b in bindings for v in relax.analysis.free_vars(b.value)} | {exprs[i] for i in todo}
        params = [p for p in self.func.params if p in free]
        result = relax.Var("result", relax.TupleType([exprs[i].ty for i in todo]))
        bindings.append(relax.VarBinding(result, relax.Tuple([exprs[i] for i in todo])))
        body = relax.SeqExpr([relax.DataflowBlock(bindings)], result)
        # a shape parameter defines the sequence length for the binding, then goes (nothing reads it after)
        seq_shape = relax.Var("seq_shape", relax.ShapeType([self.seq]))
        f = relax.Function([*params, seq_shape], body, result.ty, True).bind_symbolic_vars({self.seq: seq_len})
        f = relax.Function(list(f.params[:-1]), f.body, f.ret_ty, True).with_attr("global_symbol", "main")
        mod = relax.transform.Normalize()(tvm.IRModule({"main": f}))
        target = tvm.target.Target({"kind": "llvm"})
        ex = tvm.compile(mod, target=target,
                         relax_pipeline=relax.backend.cpu_generic.get_default_pipeline(target))
        vm = relax.VirtualMachine(ex, tvm.cpu())
        args = []
        for p in params:
            if p in self.inputs:
                shape = [seq_len if not isinstance(d, tirx.IntImm) else int(d) for d in shape_of(p)]
                args.append(_probe_input(p.name, shape, str(p.ty.dtype)))
            else:
                args.append(np.asarray(weights[p.name]))
        res = vm["main"](*(tvm.runtime.tensor(a, tvm.cpu()) for a in args))
        for j, i in enumerate(todo):
            out[i] = res[j].numpy()
        return out


def _probe_input(name: str, shape: list[int], dtype: str) -> np.ndarray:
    """The value of a non-token input for evaluation: positions 0..n-1 for a ``position_ids`` input, ones
    (every token attended, no padding) for an attention mask and anything else."""
    if "position" in name and shape:
        return np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()
    return np.ones(shape, dtype=dtype)


# ----------------------------------------------------------------------------------- rewriting


def with_entry(mod, func: relax.Function):
    """A new module: ``mod``'s functions with ``main`` replaced by ``func`` (passes never mutate their input)."""
    out = tvm.IRModule({gv: f for gv, f in mod.functions_items() if gv.name_hint != ENTRY}, attrs=mod.attrs)
    out[ENTRY] = func
    return out


def rewrite_matches(mod, match, emit):
    """``mod`` with every binding of ``main`` for which ``match(g, var)`` finds something bound to
    ``emit(found, m)`` instead (``m`` maps an old var to its new one); ``mod`` itself if nothing matched."""
    g = GraphView(mod[ENTRY])
    replace = {}
    for b in g.bindings:
        found = match(g, b.var)
        if found is not None:
            replace[b.var] = lambda bb, m, found=found: emit(found, m)
    return with_entry(mod, rebuild(g.func, replace)) if replace else mod


def substitute(e, remap: dict):
    """``e`` with every var in ``remap`` replaced (Calls, Tuples, TupleGetItems; the imported form's values)."""
    if isinstance(e, relax.Var):
        return remap.get(e, e)
    if isinstance(e, relax.Call):
        return relax.Call(e.op, [substitute(a, remap) for a in e.args], e.attrs, e.ty_args)
    if isinstance(e, relax.Tuple):
        return relax.Tuple([substitute(f, remap) for f in e.fields])
    if isinstance(e, relax.TupleGetItem):
        return relax.TupleGetItem(substitute(e.tuple_value, remap), e.index)
    return e  # constants, shapes, prim values, ops


def rebuild(func: relax.Function, replace: dict, params: list | None = None, name: str = ENTRY,
            attrs: dict | None = None) -> relax.Function:
    """A copy of ``func`` in which each var ``v`` in ``replace`` is bound to ``replace[v](bb, m)`` instead of
    its value, where ``m`` maps an old var to its new one; then every unused binding is removed.

    ``params`` (default: func's) may be a new parameter list; ``replace`` may then also map old parameters
    (called with the new ones in scope). The result's value is the new var of func's result."""
    bb = relax.BlockBuilder()
    remap: dict = {}
    params = list(func.params) if params is None else params
    attrs = dict(func.attrs) if attrs is None else attrs
    with bb.function(name, params, attrs=attrs):
        with bb.dataflow():
            m = lambda v: remap.get(v, v)  # noqa: E731
            for p in func.params:
                if p in replace:
                    remap[p] = bb.emit(replace[p](bb, m), name_hint=p.name)
            for b in func.body.blocks[0].bindings:
                if b.var in replace:
                    value = replace[b.var](bb, m)
                elif isinstance(b, relax.MatchCast):
                    remap[b.var] = bb.match_cast(substitute(b.value, remap), b.ty, name_hint=b.var.name)
                    continue
                else:
                    value = substitute(b.value, remap)
                if isinstance(b.var, relax.DataflowVar):
                    remap[b.var] = bb.emit(value, name_hint=b.var.name)
                else:  # the block's output
                    remap[b.var] = bb.emit_output(value, name_hint=b.var.name)
        bb.emit_func_output(m(func.body.body))
    new = bb.get()[name]
    return relax.analysis.remove_all_unused(new)
