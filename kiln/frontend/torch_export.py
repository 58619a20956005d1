"""Import a decoder LLM exported with ``torch.export`` into a Relax module (the "imported form").

    load_exported_program(path_or_ep) -> (mod, params, info)

The program is the model's ``forward(input_ids, attention_mask) -> logits`` with a dynamic sequence
length (``torch.export.Dim``), saved with ``torch.export.save`` (a ``.pt2`` file) or passed as an
``ExportedProgram``. TVM's ``from_exported_program`` translates it after PyTorch's decomposition to
core ATen ops, so the imported form is plain Relax: attention is ``matmul + softmax + where``, RoPE is
``cos/sin/strided_slice/concat``, RMSNorm is ``power/mean/rsqrt``. Recognising those as kiln's
canonical ops is the next step (not done here); this module only makes the import faithful:

* the entry ``main(*inputs, *weights) -> logits [1, seq, V]`` runs on the llvm target;
* weights stay parameters, each Relax parameter named after its torch state-dict key;
* where TVM 0.27 mistranslates the graph, one small fix function per breakage repairs it.

Errors a user can cause (not a .pt2 file, an op the frontend cannot translate, a program that does not
return logits) raise CheckpointError / UnsupportedModelError naming the file, op or node.
"""

from __future__ import annotations

import collections
import importlib
import logging
import re
import traceback
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, UnsupportedModelError
from ..ir.tvm import IRModule, PyExprMutator, frontend, mutator, relax, structural_equal, tvm

ENTRY = "main"


@dataclass(frozen=True)
class ImportInfo:
    """What an importer produced besides the module."""

    source: str  # "torch.export" | "onnx"
    input_names: tuple[str, ...]  # the entry's user inputs, in order
    param_names: tuple[str, ...]  # the entry's weight parameters after the inputs, in order (= params' keys)
    dynamic_dims: tuple[str, ...]  # names of the symbolic dims in the inputs' shapes (the sequence length)
    fixes: tuple[str, ...]  # kiln's fixes (functions in the importer's module) that changed the module

    def __post_init__(self):
        assert not set(self.input_names) & set(self.param_names)


def op_histogram(mod: IRModule, func: str = ENTRY) -> dict[str, int]:
    """Relax op name (without the ``relax.`` prefix) -> number of calls in ``mod[func]``, most used first."""
    counts: collections.Counter = collections.Counter()

    def visit(e):
        if isinstance(e, relax.Call) and hasattr(e.op, "name"):
            counts[e.op.name.removeprefix("relax.")] += 1

    relax.analysis.post_order_visit(mod[func].body, visit)
    return dict(counts.most_common())


def failing_node(exc: BaseException, frame_name: str) -> Any | None:
    """The ``node`` local of the innermost ``frame_name`` frame in ``exc``'s traceback: the graph node a
    TVM frontend was converting when it raised (TVM's own errors do not say which one)."""
    node = None
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        if frame.f_code.co_name == frame_name and "node" in frame.f_locals:
            node = frame.f_locals["node"]
    return node


def short_error(exc: BaseException) -> str:
    """The first line of a (possibly multi-line, C++-traceback carrying) TVM error."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:400]


# ---------------------------------------------------------------------------------------- reading


def _read_program(path_or_ep):
    import torch

    if isinstance(path_or_ep, torch.export.ExportedProgram):
        return path_or_ep, "<ExportedProgram>"
    path = Path(path_or_ep)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist or is not a file; expected a .pt2 file from torch.export.save")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a torch.export archive (.pt2, a zip file written by torch.export.save)")
    imported: set[str] = set()
    while True:
        logged = _LoggedErrors()
        logger = logging.getLogger("torch.export")
        logger.addFilter(logged)  # torch logs the real error as a warning (with a traceback) and raises another
        try:
            return torch.export.load(path), str(path)
        except Exception as e:  # torch raises many types for a wrong or truncated archive
            error = short_error(logged.errors[0] if logged.errors else e)
            # A program returning a transformers ModelOutput names its class in the archive; torch can only
            # rebuild it once the class's module is imported (which registers it with torch's pytree).
            module = next((m for m in map(_unregistered_pytree_module, [*logged.errors, e]) if m), None)
            if module is None or module in imported:
                break
            imported.add(module)
            try:
                importlib.import_module(module)
            except ImportError:
                break
        finally:
            logger.removeFilter(logged)
    raise CheckpointError(f"{path} could not be loaded by torch.export.load ({error}); "
                          "save the program with torch.export.save")


class _LoggedErrors(logging.Filter):
    """Keeps back and collects the exceptions logged with exc_info (torch.export.load logs the real cause,
    then raises a generic RuntimeError); other records pass."""

    def __init__(self):
        super().__init__()
        self.errors: list[BaseException] = []

    def filter(self, record):
        if record.exc_info and record.exc_info[1] is not None:
            self.errors.append(record.exc_info[1])
            return False
        return True


def _unregistered_pytree_module(exc: BaseException | None) -> str | None:
    """``transformers.modeling_outputs`` from "Deserializing transformers.modeling_outputs.X in pytree is not
    registered" anywhere in ``exc``'s chain, else None."""
    while exc is not None:
        m = re.search(r"Deserializing ([\w.]+)\.\w+ in pytree is not registered", str(exc))
        if m:
            return m.group(1)
        exc = exc.__cause__ or exc.__context__
    return None


def _check_signature(ep, where: str) -> tuple[list[str], dict[str, str]]:
    """(user input names, relax parameter name -> state-dict key) of ``ep``; reject what kiln cannot run."""
    from torch.export.graph_signature import InputKind, OutputKind

    sig = ep.graph_signature
    user_inputs = [s.arg.name for s in sig.input_specs if s.kind == InputKind.USER_INPUT]
    weights = {s.arg.name: s.target for s in sig.input_specs if s.kind == InputKind.PARAMETER}
    outputs = [s for s in sig.output_specs if s.kind == OutputKind.USER_OUTPUT]
    mutations = [s for s in sig.output_specs if s.kind != OutputKind.USER_OUTPUT]
    if not user_inputs:
        raise UnsupportedModelError(f"{where}: the exported program takes no inputs; export "
                                    "forward(input_ids, attention_mask)")
    if len(outputs) != 1 or mutations:
        raise UnsupportedModelError(
            f"{where}: the exported program returns {len(outputs)} outputs and mutates {len(mutations)} buffers; "
            "kiln imports a forward that returns only the logits (export with config.use_cache=False)")
    return user_inputs, weights


def _translate(ep, where: str) -> IRModule:
    """TVM's from_exported_program, its errors turned into UnsupportedModelError naming the op or node."""
    try:
        return frontend("torch").from_exported_program(ep, keep_params_as_input=True, unwrap_unit_return_tuple=True)
    except Exception as e:
        node = failing_node(e, "_translate_fx_graph")
        if node is not None:
            target = getattr(node.target, "__name__", node.target)
            raise UnsupportedModelError(
                f"{where}: TVM's torch.export importer failed on node {node.name!r} (op {target}): "
                f"{short_error(e)}") from None
        raise UnsupportedModelError(f"{where}: TVM's torch.export importer failed: {short_error(e)}") from None


# ---------------------------------------------------------------------------------------- fixes


def fix_bool_equal_cumsum(func: relax.Function) -> relax.Function:
    """TVM 0.27: ``R.equal`` on two bool tensors legalizes to ``fcmp oeq i1`` (LLVM rejects it), and the torch
    frontend imports ``torch.cumsum(bool)`` as a bool-typed ``R.cumsum`` (torch gives int64), whose TIR is a
    bool add that crashes codegen (``Check failed: t.MatchesCode(kDLFloat)``). Both come from transformers'
    packed-sequence detection when no attention_mask is given. Compare as int8; cumsum in int64 (the
    mutator re-types the bound variables, so the int64 result flows on)."""

    @mutator
    class _Fix(PyExprMutator):
        def visit_call_(self, call):
            call = self.visit_expr_post_order(call)
            name = getattr(call.op, "name", "")
            if name == "relax.equal" and all(a.ty.dtype == "bool" for a in call.args):
                return relax.op.equal(*(relax.op.astype(a, "int8") for a in call.args))
            if name == "relax.cumsum" and (call.args[0].ty.dtype == "bool" or call.ty.dtype == "bool"):
                return relax.op.cumsum(relax.op.astype(call.args[0], "int64"), axis=call.attrs.axis, dtype="int64",
                                       exclusive=call.attrs.exclusive)
            return call

    return _Fix().visit_expr(func)


def fix_inbound_strided_slice(func: relax.Function) -> relax.Function:
    """TVM 0.27: ``R.strided_slice(assume_inbound=False)`` on a symbolic extent infers ``min(end, seq)``-style
    shapes, because the shape analyzer ignores the entry's ``tir_var_lower_bound``/``upper_bound``
    attributes. Two slices of the same length then get extents it cannot prove equal, the op combining
    them loses its shape, and compiling fails ("DispatchSortScan: non-symbolic shape is not supported").
    transformers hits it in its packed-sequence detection when no attention_mask is given. Where the
    bounds prove ``0 <= begin <= end <= extent`` (stride 1), re-emit the slice with ``assume_inbound=True``,
    whose shape is ``end - begin``; the mutator re-infers every type downstream."""
    analyzer = tvm.sym.Analyzer()
    attrs = func.attrs or {}
    lower = dict(attrs.get("tir_var_lower_bound", {}))
    upper = dict(attrs.get("tir_var_upper_bound", {}))
    for var in relax.analysis.defined_symbolic_vars(func):
        lo = int(lower.get(var.name, 0))
        hi = int(upper[var.name]) if var.name in upper else 2**62
        analyzer.bind(var, tvm.ir.Range.from_min_extent(lo, hi - lo + 1))

    def inbound(call) -> bool:
        x, axes, begin, end = call.args[:4]
        strides = call.args[4].fields if len(call.args) > 4 else [1] * len(axes.fields)
        shape = x.ty.shape
        if shape is None or call.attrs.assume_inbound:
            return False
        for axis, b, e, st in zip(axes.fields, begin.fields, end.fields, strides):
            dim = shape[int(axis) % len(shape)]
            if int(st) != 1 or not (analyzer.can_prove(b >= 0) and analyzer.can_prove(b <= e)
                                    and analyzer.can_prove(e <= dim)):
                return False
        return True

    @mutator
    class _Fix(PyExprMutator):
        def visit_call_(self, call):
            call = self.visit_expr_post_order(call)
            if getattr(call.op, "name", "") == "relax.strided_slice" and inbound(call):
                x, axes, begin, end = call.args[:4]
                strides = call.args[4] if len(call.args) > 4 else None
                axes = [int(a) % x.ty.ndim for a in axes.fields]  # topi's symbolic slice rejects axis -1
                return relax.op.strided_slice(x, axes, begin, end, strides, assume_inbound=True)
            return call

    return _Fix().visit_expr(func)


def first_unknown_shape(func: relax.Function) -> relax.VarBinding | None:
    """The first binding whose tensor has no known shape, or None. TVM's importers lose a shape where its
    arithmetic cannot prove two symbolic extents equal (``strided_slice`` on ``seq`` gives
    ``min(1, seq)``: the analyzer ignores the ``tir_var_lower_bound`` attribute); later passes
    (``DispatchSortScan``, legalization) then fail with "non-symbolic shape is not supported"."""
    for block in func.body.blocks:
        for b in block.bindings:
            if isinstance(b.var.ty, relax.TensorType) and b.var.ty.shape is None:
                return b
    return None


def describe_binding(b: relax.VarBinding) -> str:
    value = b.value
    op = getattr(getattr(value, "op", None), "name", type(value).__name__)
    return f"{b.var.name} = {op}(...)"


def name_params(func: relax.Function, names: dict[str, str]) -> relax.Function:
    """Rename the weight parameters (``p_model_layers_0_...``) to their state-dict keys
    (``model.layers.0....``) and drop the ``params`` attribute (the weights, which params carries)."""
    new = {p: relax.Var(names[p.name], p.ty) for p in func.params if p.name in names}
    if not new:
        return func
    bound = func.bind_params(new)  # the renamed vars are free in the body now; make them parameters again
    params = [new.get(p, p) for p in func.params]
    return relax.Function(params, bound.body, bound.ret_ty, func.is_pure, func.attrs).without_attr("params")


# kiln's repairs of the frontend's output, in the order they apply
FIXES = (fix_bool_equal_cumsum, fix_inbound_strided_slice)


def apply_fixes(func: relax.Function, fixes=FIXES) -> tuple[relax.Function, tuple[str, ...]]:
    """Apply each fix to ``func``; return it and the names of the fixes that changed it."""
    applied = []
    for fix in fixes:
        fixed = fix(func)
        if not structural_equal(fixed, func):
            applied.append(fix.__name__)
        func = fixed
    return func, tuple(applied)


# ---------------------------------------------------------------------------------------- entry point


def load_exported_program(path_or_ep) -> tuple[IRModule, dict[str, Any], ImportInfo]:
    """A ``.pt2`` file (or ExportedProgram) of a decoder LLM's forward -> (module, params, info).

    mod:    ``main(*inputs, *weights) -> logits``, weights named by their state-dict keys, in
            ``info.param_names`` order; runs on llvm after ``tvm.compile``.
    params: state-dict key -> torch tensor, in the entry's parameter order.
    """
    ep, where = _read_program(path_or_ep)
    user_inputs, weights = _check_signature(ep, where)
    mod = _translate(ep, where)
    func = mod[ENTRY]
    if not isinstance(func.ret_ty, relax.TensorType) or func.ret_ty.ndim != 3:
        raise UnsupportedModelError(f"{where}: the program returns {func.ret_ty}, not logits [batch, seq, vocab]")
    func, fixes = apply_fixes(name_params(func, weights))
    if (lost := first_unknown_shape(func)) is not None:
        raise UnsupportedModelError(
            f"{where}: after import, {describe_binding(lost)} has no known shape (TVM cannot prove a symbolic "
            "extent and kiln has no fix for this graph); export with static shapes")
    mod[ENTRY] = func
    param_names = tuple(p.name for p in func.params[len(user_inputs):])
    params = {name: ep.state_dict[name].detach() for name in param_names}
    dims = [str(d) for p in func.params[:len(user_inputs)] for d in p.ty.shape if not isinstance(d, tvm.tirx.IntImm)]
    info = ImportInfo("torch.export", tuple(user_inputs), param_names, tuple(dict.fromkeys(dims)), fixes)
    return mod, params, info


__all__ = ["ENTRY", "FIXES", "ImportInfo", "apply_fixes", "fix_bool_equal_cumsum", "load_exported_program",
           "op_histogram"]
