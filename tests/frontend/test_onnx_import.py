"""kiln.frontend.onnx_import: a transformers model's ONNX export (dynamo=True) -> a Relax module that runs.

Random-weight Llama (GQA) and Qwen2 (q/k/v bias, tied embeddings) are exported with a dynamic sequence
length (and Llama also with static shapes), imported, compiled for llvm and run against transformers;
kiln's Range converter is checked on a one-node graph; user errors must be kiln errors naming the file
or the ONNX node.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from kiln.errors import CheckpointError, UnsupportedModelError
from kiln.frontend.onnx_import import load_onnx
from kiln.frontend.torch_export import ENTRY, op_histogram
from kiln.ir.tvm import relax, tirx

from test_torch_export_import import check_logits, compile_llvm, run  # the same checks as torch.export

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript")

pytestmark = pytest.mark.cpu

VARIANTS = ("llama", "qwen2")


def export_onnx(model, path, dynamic: bool = True):
    """``model.forward(input_ids, attention_mask) -> logits`` to ONNX with the dynamo exporter."""
    model.config.use_cache = False
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    seq = torch.export.Dim("seq", min=2, max=128)
    dims = {"input_ids": {1: seq}, "attention_mask": {1: seq}} if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (), str(path), kwargs={"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                          dynamic_shapes=dims, input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamo=True, verbose=False)
    return path


@pytest.fixture(scope="module", params=VARIANTS)
def imported(request, zoo, tmp_path_factory):
    """(variant, transformers model, mod, params, info) of the dynamic-sequence export."""
    _, model = zoo.hf(request.param)
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / f"{request.param}.onnx")
    return (request.param, model, *load_onnx(path))


def test_dynamic_export_runs_and_matches_transformers(imported):
    variant, model, mod, params, info = imported
    assert relax.analysis.check_well_formed(mod)
    assert info.source == "onnx" and info.input_names == ("input_ids", "attention_mask")
    assert info.dynamic_dims == ("seq",)
    # kiln's Range converter keeps arange(seq) at length seq; TVM's would lose every shape after RoPE
    assert info.fixes == ("convert_range_of_symbolic_length",)
    assert list(params) == list(info.param_names) == [p.name for p in mod[ENTRY].params[2:]]
    assert all(v.dtype == np.float32 and v.ndim >= 1 for v in params.values())
    # embeddings and norms keep their state-dict keys (the exporter renames pre-transposed linear weights)
    state = model.state_dict()
    for name in ("model.norm.weight", "model.layers.1.input_layernorm.weight"):
        np.testing.assert_array_equal(params[name], state[name].numpy())
    print(f"\n{variant} ONNX op histogram (fixes {info.fixes}): {op_histogram(mod)}")
    check_logits(model, compile_llvm(mod), params)


def test_static_export_runs_and_matches_transformers(zoo, tmp_path):
    _, model = zoo.hf("llama")
    mod, params, info = load_onnx(export_onnx(model, tmp_path / "static.onnx", dynamic=False))
    assert info.dynamic_dims == () and info.fixes == ()
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.numpy()
    got = run(compile_llvm(mod), params, [ids.numpy(), np.ones((1, 12), np.int64)])
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------ converters


def _model(nodes, inputs, outputs, initializers=()):
    h = onnx.helper
    graph = h.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])


def test_range_of_symbolic_length_keeps_the_length(tmp_path):
    """positions = Range(0, Shape(x)[0], 1); y = x + positions: y must stay [n], not lose its shape."""
    h, T = onnx.helper, onnx.TensorProto
    nodes = [h.make_node("Shape", ["x"], ["shape"]),
             h.make_node("Squeeze", ["shape"], ["n"]),
             h.make_node("Range", ["zero", "n", "one"], ["positions"]),
             h.make_node("Add", ["x", "positions"], ["y"])]
    inits = [h.make_tensor("zero", T.INT64, [], [0]), h.make_tensor("one", T.INT64, [], [1])]
    m = _model(nodes, [h.make_tensor_value_info("x", T.INT64, ["n"])],
               [h.make_tensor_value_info("y", T.INT64, ["n"])], inits)
    path = tmp_path / "range.onnx"
    onnx.save(m, path)
    # kiln imports only [batch, seq, vocab] logits: check the converter on the module TVM builds
    with pytest.raises(UnsupportedModelError, match="not logits"):
        load_onnx(path)
    from kiln.frontend.onnx_import import _translate

    mod, fixes = _translate(m, str(path))
    assert fixes == ("convert_range_of_symbolic_length",)
    (n,) = mod[ENTRY].ret_ty.shape
    assert isinstance(n, tirx.Var) and n.same_as(mod[ENTRY].params[0].ty.shape[0])
    x = np.array([5, 6, 7], np.int64)
    np.testing.assert_array_equal(run(compile_llvm(mod), {}, [x]), x + np.arange(3))


# ------------------------------------------------------------------------------------------ errors


def test_bad_files_are_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_onnx(tmp_path / "nope.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07garbage that is not a protobuf \xff\xfe")
    with pytest.raises(CheckpointError, match="junk.onnx"):
        load_onnx(junk)


def test_unimportable_graphs_are_unsupported_model_errors(tmp_path):
    h, T = onnx.helper, onnx.TensorProto
    x = h.make_tensor_value_info("x", T.FLOAT, [1, 4, 8])
    y = h.make_tensor_value_info("y", T.FLOAT, [1, 4, 8])
    path = tmp_path / "celu.onnx"  # a standard op TVM 0.27 has no converter for
    onnx.save(_model([h.make_node("Celu", ["x"], ["y"])], [x], [y]), path)
    with pytest.raises(UnsupportedModelError, match="Celu"):
        load_onnx(path)
    # a converter that fails mid-graph: Pad with pads computed at run time
    pads = h.make_tensor_value_info("pads", T.INT64, [6])
    pad = _model([h.make_node("Pad", ["x", "pads"], ["y"], name="the_pad")], [x, pads], [y])
    path = tmp_path / "pad.onnx"
    onnx.save(pad, path)
    with pytest.raises(UnsupportedModelError, match="node 'the_pad' \\(op Pad\\)"):
        load_onnx(path)
