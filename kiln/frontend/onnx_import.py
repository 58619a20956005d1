"""Import a decoder LLM exported to ONNX into a Relax module (the "imported form").

    load_onnx(path) -> (mod, params, info)

The file is ``torch.onnx.export(model, kwargs={"input_ids", "attention_mask"}, dynamo=True)`` of the
model's forward returning the logits, static or with a dynamic sequence length. TVM's ``from_onnx``
translates it; the entry is ``main(*inputs, *weights) -> logits [1, seq, V]``, as for torch.export
(torch_export.py; ``ImportInfo`` and ``op_histogram`` are shared from there).

Weights: every floating-point initializer of rank >= 1 is a parameter, named by its initializer name;
integer, bool and scalar initializers (shapes, axes, the static mask) stay constants, so shape
computations fold. The dynamo exporter's optimizer stores each linear's weight pre-transposed under a
generated name (``val_41`` = ``q_proj.weight.T``): only embeddings, norms and buffers keep their
state-dict keys. Recovering the rest is the weight-mapping step's job, not the importer's.

Where TVM 0.27's ONNX converters break on a transformers graph, kiln converts the node itself (one
function per breakage, ``CONVERTERS``). Errors a user can cause raise CheckpointError /
UnsupportedModelError naming the file and the ONNX node.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, UnsupportedModelError
from ..ir.tvm import IRModule, frontend, relax, tvm
from .torch_export import ENTRY, ImportInfo, describe_binding, failing_node, first_unknown_shape, short_error


# ---------------------------------------------------------------------------------------- converters


def convert_range_of_symbolic_length(inputs: list, params: list) -> Any | None:
    """TVM 0.27's ``Range`` converter computes a dynamic length as a tensor and ``match_cast``s it to a fresh
    symbolic var (``range_len_0``), unrelated to ``seq``. transformers' ``arange(seq)`` positions then feed
    RoPE's cos/sin, whose product with q/k ([1, h, seq, d] * [1, 1, range_len_0, d]) loses its shape, and the
    GQA ``Expand`` after it fails (``TypeError: 'NoneType' object is not iterable`` in ``Expand._impl_v13``).
    For ``Range(0, limit, 1)`` with a symbolic limit, emit ``R.arange(0, limit, 1)``, whose length is
    ``limit`` itself. Returns None (TVM's converter runs) for any other Range."""
    F = frontend("onnx").onnx_frontend
    start, limit, delta = (F.get_constant(x, params) for x in inputs[:3])
    if not tvm.ir.is_prim_expr(limit) or isinstance(limit, tvm.tirx.IntImm):
        return None
    values = [x.value.numpy() if isinstance(x, tvm.ir.Constant) else None for x in (start, delta)]
    if any(v is None or v.size != 1 or v.dtype.kind != "i" for v in values) or \
            [v.item() for v in values] != [0, 1]:
        return None
    if str(getattr(limit, "dtype", None) or limit.ty) != "int64":  # a symbolic Var has .ty, not .dtype
        limit = tvm.tirx.Cast("int64", limit)
    return relax.op.arange(0, limit, 1, str(values[0].dtype))


def convert_reshape_of_prim_value(inputs: list, params: list) -> Any | None:
    """TVM 0.27 imports ``Squeeze(Shape(x))`` as a ``PrimValue`` (a symbolic size), and ``Add`` of two of them
    as another; its ``Reshape`` converter then fails on one ("Reshape expects the input data to be a Tensor.
    However, the given input is ir.PrimType"). An exporter writes ``Reshape(past_len + seq, [-1])`` to build
    a shape when the graph has ``past_key_values`` inputs. A size reshaped to one element is that size as a
    one-element shape (what TVM's converter returns for a shape reshaped to [-1]). Returns None otherwise."""
    F = frontend("onnx").onnx_frontend
    data = inputs[0]
    if not tvm.ir.is_prim_expr(data):  # a Relax prim value is a PrimExpr in TVM 0.27
        return None
    target = F.get_constant(inputs[1], params)
    if not isinstance(target, tvm.ir.Constant) or target.value.numpy().tolist() not in ([-1], [1]):
        return None
    return relax.ShapeExpr([data])


# op type -> kiln converter (inputs, params) -> Relax expr, or None to fall back to TVM's converter
CONVERTERS = {"Range": convert_range_of_symbolic_length, "Reshape": convert_reshape_of_prim_value}


def _importer_class():
    base = frontend("onnx").onnx_frontend.ONNXGraphImporter

    class KilnOnnxImporter(base):
        """TVM's ONNX importer with kiln's converters tried first (``CONVERTERS``)."""

        applied: set

        def _parse_graph_initializers(self, graph):
            """Weights become parameters, everything else constants (so shape computations fold)."""
            for init in graph.initializer:
                array = self._parse_array(init)
                if _is_weight(init):
                    var = self._new_var(init.name, shape=array.shape, dtype=array.dtype)
                    self._nodes[init.name] = var
                    self._params[init.name] = (var, array)
                else:
                    self._nodes[init.name] = relax.const(array)

        def _convert_operator(self, op_name, inputs, attrs, opset):
            fix = CONVERTERS.get(op_name)
            if fix is not None:
                out = fix(inputs, [self._nodes, self._params])
                if out is not None:
                    self.applied.add(fix.__name__)
                    return self.bb.normalize(out)  # as TVM's _convert_operator does: later converters read .ty
            return super()._convert_operator(op_name, inputs, attrs, opset)

    return KilnOnnxImporter


# ---------------------------------------------------------------------------------------- reading


def _read_model(path: Path):
    import onnx

    if not path.is_file():
        raise CheckpointError(f"{path} does not exist or is not a file; expected an .onnx file")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # protobuf DecodeError and friends
        raise CheckpointError(f"{path} is not an ONNX model ({short_error(e)})") from None
    if not model.graph.node:
        raise CheckpointError(f"{path} is not an ONNX model (no graph nodes)")
    try:
        onnx.checker.check_model(str(path))  # by path: works for models over 2 GB
    except Exception as e:
        raise CheckpointError(f"{path} is not a valid ONNX model ({short_error(e)})") from None
    return model


def _opset(model) -> int:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return int(op.version)
    raise UnsupportedModelError("the ONNX model imports no default-domain (ai.onnx) opset")


def _is_weight(init) -> bool:
    import onnx

    floating = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                onnx.TensorProto.DOUBLE}
    return init.data_type in floating and len(init.dims) >= 1


def _translate(model, where: str) -> tuple[IRModule, tuple[str, ...]]:
    importer = _importer_class()(None, None, keep_params_in_input=True, sanitize=True)
    importer.applied = set()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # TVM prints "Error converting operator ..." itself
            mod = importer.from_onnx(model.graph, _opset(model))
    except UnsupportedModelError:
        raise
    except Exception as e:
        node = failing_node(e, "_construct_nodes")
        if node is not None:
            raise UnsupportedModelError(
                f"{where}: TVM's ONNX importer failed on node {node.name!r} (op {node.op_type}): "
                f"{short_error(e)}") from None
        raise UnsupportedModelError(f"{where}: TVM's ONNX importer failed: {short_error(e)}") from None
    return mod, tuple(sorted(importer.applied))


def _logits_only(func: relax.Function) -> relax.Function:
    """A graph with ``past_key_values`` returns ``(logits, present.0.key, ...)``: keep the logits (kiln's
    paged KV cache replaces the presents). A function returning one tensor is returned as it is."""
    body = func.body
    out = body.body
    if not isinstance(out.ty, relax.TupleType):
        return func
    block = body.blocks[-1]
    value = {b.var: b.value for b in block.bindings}.get(out)
    if not isinstance(value, relax.Tuple) or not value.fields:
        return func
    logits = relax.Var("logits", value.fields[0].ty)
    blocks = [*body.blocks[:-1], relax.DataflowBlock([*block.bindings, relax.VarBinding(logits, value.fields[0])])]
    new = relax.Function(func.params, relax.SeqExpr(blocks, logits), logits.ty, func.is_pure, func.attrs)
    return relax.analysis.remove_all_unused(new)


def load_onnx(path) -> tuple[IRModule, dict[str, Any], ImportInfo]:
    """An ONNX file of a decoder LLM's forward -> (module, params, info).

    mod:    ``main(*inputs, *weights) -> logits``, weights in ``info.param_names`` order.
    params: initializer name -> numpy array (floating-point initializers of rank >= 1), in that order.
    """
    from onnx import numpy_helper

    path = Path(path)
    model = _read_model(path)
    where = str(path)
    mod, fixes = _translate(model, where)
    func = _logits_only(mod[ENTRY].without_attr("params"))  # the weights again, as TVM tensors
    num_input = int(func.attrs["num_input"])
    if not isinstance(func.ret_ty, relax.TensorType) or func.ret_ty.ndim != 3:
        raise UnsupportedModelError(f"{where}: the model returns {func.ret_ty}, not logits [batch, seq, vocab]")
    if (lost := first_unknown_shape(func)) is not None:
        raise UnsupportedModelError(f"{where}: after import, {describe_binding(lost)} has no known shape "
                                    "(TVM cannot prove a symbolic extent); export with static shapes")
    mod[ENTRY] = func
    param_names = tuple(p.name for p in func.params[num_input:])
    inits = {init.name: init for init in model.graph.initializer}
    params = {name: numpy_helper.to_array(inits[name]) for name in param_names}
    input_names = tuple(p.name for p in func.params[:num_input])
    dims = [str(d) for p in func.params[:num_input] for d in p.ty.shape if not isinstance(d, tvm.tirx.IntImm)]
    info = ImportInfo("onnx", input_names, param_names, tuple(dict.fromkeys(dims)), fixes)
    return mod, params, info


__all__ = ["CONVERTERS", "convert_range_of_symbolic_length", "load_onnx"]
