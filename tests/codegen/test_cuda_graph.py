"""kiln/codegen/cuda_graph.py: batch_decode is captured per batch size and planned for a bound.

The pass only sets attributes; that TVM then captures the decode steps (and only them) is checked on the
CUDA builds of test_cuda_compile.py, and that the graphs replay correctly needs the GPU
(tools/gpu/run_all.sh runs the demo model with and without them against the CPU's tokens).
"""

from __future__ import annotations

import pytest

from kiln.codegen.cuda_graph import BATCH_VAR, annotate_decode_graphs
from kiln.ir.tvm import relax, tirx, tvm


def module(bounds=None):
    bb = relax.BlockBuilder()
    b = tirx.Var(BATCH_VAR, "int64")
    for name, rows in (("batch_decode", b), ("batch_prefill", tirx.Var("seq_len", "int64"))):
        x = relax.Var("x", relax.TensorType([rows, 8], "float32"))
        attrs = {"num_input": 1}
        if bounds and name == "batch_decode":
            attrs["tir_var_upper_bound"] = bounds
        with bb.function(name, [x], attrs=attrs):
            with bb.dataflow():
                y = bb.emit_output(relax.op.add(x, x))
            bb.emit_func_output(y)
    return bb.get()


def test_batch_decode_gets_its_capture_key_and_bound():
    mod = module()
    out = annotate_decode_graphs(32)(mod)
    attrs = out["batch_decode"].attrs
    assert [str(v) for v in attrs["relax.rewrite_cuda_graph.capture_symbolic_vars"]] == [BATCH_VAR]
    assert {str(k): int(v) for k, v in attrs["tir_var_upper_bound"].items()} == {BATCH_VAR: 32}
    assert int(attrs["num_input"]) == 1  # kept: the pass reads which params are step inputs from it
    assert out["batch_prefill"].same_as(mod["batch_prefill"])
    assert "tir_var_upper_bound" not in mod["batch_decode"].attrs  # the input module is unchanged


def test_existing_bounds_are_kept():
    out = annotate_decode_graphs(8)(module({"other": 5}))
    assert {str(k): int(v) for k, v in out["batch_decode"].attrs["tir_var_upper_bound"].items()} == \
        {"other": 5, BATCH_VAR: 8}


def test_module_without_batch_decode_is_untouched():
    mod = tvm.IRModule({"batch_prefill": module()["batch_prefill"]})
    assert annotate_decode_graphs(8)(mod).same_as(mod)


def test_bound_must_be_positive():
    with pytest.raises(ValueError):
        annotate_decode_graphs(0)
