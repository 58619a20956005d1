"""kiln.passes.recognize_rms_norm and recognize_swiglu: Before/Expected modules, numerics, non-matches.

The Before modules are the op sequences the frontends emit (recorded from transformers' exports):
torch.export's ``power, mean, add eps, rsqrt, multiply, multiply(w)``, ONNX's ``sqrt`` + ``divide``, the
half-precision norm with its float32 upcast, and ``x * sigmoid(x)`` for SiLU.
"""

from __future__ import annotations

import numpy as np
import pytest

from kiln.ir.tvm import IRModule, Target, relax, tirx, tvm, structural_equal
from kiln.passes.recognize_rms_norm import recognize_rms_norm
from kiln.passes.recognize_swiglu import recognize_swiglu

pytestmark = pytest.mark.cpu
H, EPS = 8, 1e-6


def _module(body, dtype="float32", w_first=True) -> IRModule:
    """main(input_ids: [1, s] int64, x: [1, s, H], w: [H]) -> body(bb, x, w); input_ids only makes x "token"."""
    s = tirx.Var("s", "int64")
    ids = relax.Var("input_ids", relax.TensorType([1, s], "int64"))
    x = relax.Var("x", relax.TensorType([1, s, H], dtype))
    w = relax.Var("w", relax.TensorType([H], dtype))
    bb = relax.BlockBuilder()
    with bb.function("main", [ids, x, w], attrs={"num_input": 2}):
        with bb.dataflow():
            xt = bb.emit(relax.op.add(x, relax.op.astype(relax.op.expand_dims(ids, 2), dtype)))  # token-dependent
            out = bb.emit_output(body(bb, xt, w))
        bb.emit_func_output(out)
    return bb.get()


def torch_norm(bb, x, w):
    m = bb.emit(relax.op.mean(bb.emit(relax.op.power(x, relax.const(2.0, "float32"))), axis=[-1], keepdims=True))
    r = bb.emit(relax.op.rsqrt(bb.emit(relax.op.add(m, relax.const(EPS, "float32")))))
    return relax.op.multiply(w, bb.emit(relax.op.multiply(x, r)))


def onnx_norm(bb, x, w):
    m = bb.emit(relax.op.mean(bb.emit(relax.op.multiply(x, x)), axis=[2], keepdims=True))
    r = bb.emit(relax.op.divide(relax.const(1.0, "float32"),
                                bb.emit(relax.op.sqrt(bb.emit(relax.op.add(relax.const(EPS, "float32"), m))))))
    return relax.op.multiply(bb.emit(relax.op.multiply(r, x)), w)


def half_norm(bb, x, w):
    x32 = bb.emit(relax.op.astype(x, "float32"))
    y = bb.emit(relax.op.astype(torch_norm_inner(bb, x32), "float16"))
    return relax.op.multiply(w, y)


def torch_norm_inner(bb, x):
    m = bb.emit(relax.op.mean(bb.emit(relax.op.power(x, relax.const(2.0, "float32"))), axis=[-1], keepdims=True))
    r = bb.emit(relax.op.rsqrt(bb.emit(relax.op.add(m, relax.const(EPS, "float32")))))
    return relax.op.multiply(x, r)


def expected_norm(bb, x, w):
    return relax.op.nn.rms_norm(x, w, axes=[-1], epsilon=float(np.float32(EPS)))  # eps as the graph stores it


def run(mod, x, w, ids):
    target = Target({"kind": "llvm"})
    ex = tvm.compile(mod, target=target, relax_pipeline=relax.backend.cpu_generic.get_default_pipeline(target))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](*(tvm.runtime.tensor(a, tvm.cpu()) for a in (ids, x, w))).numpy()


@pytest.mark.parametrize("before", [torch_norm, onnx_norm], ids=["torch.export", "onnx"])
def test_recognize_rms_norm_before_expected(before):
    got = recognize_rms_norm(_module(before))
    assert structural_equal(got, _module(expected_norm), map_free_vars=True), got.script()
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((1, 5, H)).astype("float32"), rng.standard_normal(H).astype("float32")
    ids = rng.integers(0, 3, (1, 5))
    np.testing.assert_allclose(run(got, x, w, ids), run(_module(before), x, w, ids), atol=1e-5)


def test_half_precision_norm_drops_the_upcast():
    got = recognize_rms_norm(_module(half_norm, dtype="float16"))
    assert structural_equal(got, _module(expected_norm, dtype="float16"), map_free_vars=True), got.script()


def test_rms_norm_leaves_other_reductions_alone():
    def not_over_last_axis(bb, x, w):  # a mean over the sequence axis is not RMSNorm
        m = bb.emit(relax.op.mean(bb.emit(relax.op.power(x, relax.const(2.0, "float32"))), axis=[1], keepdims=True))
        r = bb.emit(relax.op.rsqrt(bb.emit(relax.op.add(m, relax.const(EPS, "float32")))))
        return relax.op.multiply(w, bb.emit(relax.op.multiply(x, r)))

    def not_squared(bb, x, w):  # mean |x| is not RMSNorm either
        m = bb.emit(relax.op.mean(bb.emit(relax.op.abs(x)), axis=[-1], keepdims=True))
        r = bb.emit(relax.op.rsqrt(bb.emit(relax.op.add(m, relax.const(EPS, "float32")))))
        return relax.op.multiply(w, bb.emit(relax.op.multiply(x, r)))

    for body in (not_over_last_axis, not_squared):
        before = _module(body)
        assert structural_equal(recognize_rms_norm(before), before)


def test_recognize_swiglu_before_expected():
    def before(bb, x, w):
        return relax.op.multiply(bb.emit(relax.op.sigmoid(x)), x)

    def expected(bb, x, w):
        return relax.op.nn.silu(x)

    got = recognize_swiglu(_module(before))
    assert structural_equal(got, _module(expected), map_free_vars=True), got.script()


def test_silu_needs_the_same_tensor():
    def gated(bb, x, w):  # x * sigmoid(x + w) is a gate, not SiLU
        return relax.op.multiply(x, bb.emit(relax.op.sigmoid(bb.emit(relax.op.add(x, w)))))

    before = _module(gated)
    assert structural_equal(recognize_swiglu(before), before)
