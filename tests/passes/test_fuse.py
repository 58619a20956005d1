"""kiln.passes.fuse_dequant_matmul, fuse_qkv, fuse_gate_up, fuse_add_rms_norm: Before/Expected, numerics, what
they leave alone.

Before/Expected modules are written here by hand in the reference form's conventions (packed params,
``matmul(x, permute_dims(W))``). The numerical tests run whole reference forms (float, with biases, and
each quantized layout) before and after the four passes, with the merged weights made by
``apply_merges``: the logits must not change. The fused add+RMSNorm kernel is checked against NumPy.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln.frontend.reference import build_reference, param_shapes
from kiln.ir.spec import ModelSpec
from kiln.ir.tvm import IRModule, Target, relax, structural_equal, tirx, tvm
from kiln.ir import quant_kernels as qk
from kiln.passes.fuse_add_rms_norm import add_rms_norm_te, fuse_add_rms_norm
from kiln.passes.fuse_dequant_matmul import fuse_dequant_matmul
from kiln.passes.fuse_gate_up import fuse_gate_up
from kiln.passes.fuse_qkv import fuse_qkv
from kiln.passes.lib.linears import Merge, apply_merges

pytestmark = pytest.mark.cpu
H, HQ, HKV, D, I = 16, 2, 1, 8, 24


def _forward(params: dict, body, dtypes: dict | None = None) -> IRModule:
    """forward(input_ids: [n] int32, params: tuple(params)) -> body(bb, x, w); x = take(embed, ids).
    ``dtypes``: a parameter's dtype other than float32."""
    n = tirx.Var("n", "int64")
    ids = relax.Var("input_ids", relax.TensorType([n], "int32"))
    packed = relax.Var("params", relax.TupleType([relax.TensorType(list(s), (dtypes or {}).get(k, "float32"))
                                                  for k, s in params.items()]))
    bb = relax.BlockBuilder()
    with bb.function("forward", [ids, packed], attrs={"num_input": 1}):
        with bb.dataflow():
            w = {name: bb.emit(relax.TupleGetItem(packed, i), name_hint=name.replace(".", "_"))
                 for i, name in enumerate(params)}
            x = bb.emit(relax.op.take(w["embed_tokens"], ids, axis=0))
            out = bb.emit_output(body(bb, x, w, n))
        bb.emit_func_output(out)
    return bb.get()


def _linear(bb, x, w):
    return bb.emit(relax.op.matmul(x, bb.emit(relax.op.permute_dims(w))))


QKV_BEFORE = {"embed_tokens": (10, H), "layers.0.q_proj": (HQ * D, H), "layers.0.k_proj": (HKV * D, H),
              "layers.0.v_proj": (HKV * D, H)}
QKV_AFTER = {"embed_tokens": (10, H), "layers.0.qkv_proj": ((HQ + 2 * HKV) * D, H)}


def qkv_before(bb, x, w, n):
    q = bb.emit(relax.op.reshape(_linear(bb, x, w["layers.0.q_proj"]), [n, HQ, D]))
    k = bb.emit(relax.op.reshape(_linear(bb, x, w["layers.0.k_proj"]), [n, HKV, D]))
    v = bb.emit(relax.op.reshape(_linear(bb, x, w["layers.0.v_proj"]), [n, HKV, D]))
    return relax.op.concat([q, k, v], axis=1)


def qkv_expected(bb, x, w, n):
    qkv = _linear(bb, x, w["layers.0.qkv_proj"])
    parts = []
    for b0, b1, h in ((0, HQ * D, HQ), (HQ * D, (HQ + HKV) * D, HKV), ((HQ + HKV) * D, (HQ + 2 * HKV) * D, HKV)):
        s = bb.emit(relax.op.strided_slice(qkv, axes=[1], begin=[b0], end=[b1], assume_inbound=True))
        parts.append(bb.emit(relax.op.reshape(s, [n, h, D])))
    return relax.op.concat(parts, axis=1)


def test_fuse_qkv_before_expected():
    layout = {k: (s, "float32") for k, s in QKV_BEFORE.items()}
    got, new_layout, merges = fuse_qkv(_forward(QKV_BEFORE, qkv_before), layout)
    assert structural_equal(got, _forward(QKV_AFTER, qkv_expected), map_free_vars=True), got.script()
    assert new_layout == {k: (s, "float32") for k, s in QKV_AFTER.items()}
    assert merges == [Merge("layers.0.qkv_proj", ("layers.0.q_proj", "layers.0.k_proj", "layers.0.v_proj"))]


def test_fuse_qkv_leaves_projections_of_different_inputs():
    def body(bb, x, w, n):
        x2 = bb.emit(relax.op.multiply(x, relax.const(2.0, "float32")))
        q = bb.emit(relax.op.reshape(_linear(bb, x, w["layers.0.q_proj"]), [n, HQ, D]))
        k = bb.emit(relax.op.reshape(_linear(bb, x2, w["layers.0.k_proj"]), [n, HKV, D]))
        v = bb.emit(relax.op.reshape(_linear(bb, x, w["layers.0.v_proj"]), [n, HKV, D]))
        return relax.op.concat([q, k, v], axis=1)

    before = _forward(QKV_BEFORE, body)
    layout = {k: (s, "float32") for k, s in QKV_BEFORE.items()}
    got, new_layout, merges = fuse_qkv(before, layout)
    assert got is before and new_layout == layout and merges == []


MLP_BEFORE = {"embed_tokens": (10, H), "layers.0.gate_proj": (I, H), "layers.0.up_proj": (I, H)}
MLP_AFTER = {"embed_tokens": (10, H), "layers.0.gate_up_proj": (2 * I, H)}


def test_fuse_gate_up_before_expected():
    def before(bb, x, w, n):
        g = bb.emit(relax.op.nn.silu(_linear(bb, x, w["layers.0.gate_proj"])))
        return relax.op.multiply(g, _linear(bb, x, w["layers.0.up_proj"]))

    def expected(bb, x, w, n):
        gu = _linear(bb, x, w["layers.0.gate_up_proj"])
        g = bb.emit(relax.op.strided_slice(gu, axes=[1], begin=[0], end=[I], assume_inbound=True))
        u = bb.emit(relax.op.strided_slice(gu, axes=[1], begin=[I], end=[2 * I], assume_inbound=True))
        return relax.op.multiply(bb.emit(relax.op.nn.silu(g)), u)

    layout = {k: (s, "float32") for k, s in MLP_BEFORE.items()}
    got, new_layout, merges = fuse_gate_up(_forward(MLP_BEFORE, before), layout)
    assert structural_equal(got, _forward(MLP_AFTER, expected), map_free_vars=True), got.script()
    assert merges == [Merge("layers.0.gate_up_proj", ("layers.0.gate_proj", "layers.0.up_proj"))]


def test_fuse_gate_up_needs_silu_on_the_gate():
    def gelu_mlp(bb, x, w, n):
        g = bb.emit(relax.op.nn.gelu(_linear(bb, x, w["layers.0.gate_proj"])))
        return relax.op.multiply(g, _linear(bb, x, w["layers.0.up_proj"]))

    before = _forward(MLP_BEFORE, gelu_mlp)
    got, _, merges = fuse_gate_up(before, {k: (s, "float32") for k, s in MLP_BEFORE.items()})
    assert got is before and merges == []


G = 8  # the quantization group in the dequantize Before/Expected tests
W4 = {"embed_tokens": (10, H), "w.qweight": (I, H // 8), "w.scales": (I, H // G), "w.zeros": (I, H // G)}
W4A8 = {"embed_tokens": (10, H), "w.qweight": (I, H // 8), "w.group_scales": (I, H // G), "w.zeros": (I, H // G),
        "w.channel_scales": (I,)}
W4_DTYPES = {"w.qweight": "int32", "w.zeros": "uint8", "w.group_scales": "uint8"}


def _opaque(mod: IRModule) -> IRModule:
    from kiln.passes.lib.quantized_linear import mark_opaque
    return relax.transform.DeadCodeElimination(["forward"])(mark_opaque(mod))


def _dequant_fusion(params, before, expected):
    layout = {k: (s, W4_DTYPES.get(k, "float32")) for k, s in params.items()}
    mod = _opaque(_forward(params, before, W4_DTYPES))
    got, new_layout, merges = fuse_dequant_matmul(mod, layout, G)
    got = relax.transform.DeadCodeElimination(["forward"])(got)
    assert relax.analysis.check_well_formed(got)
    assert structural_equal(got, _opaque(_forward(params, expected, W4_DTYPES)), map_free_vars=True), got.script()
    assert new_layout == layout and merges == []


def test_fuse_dequant_matmul_weight_only_before_expected():
    def before(bb, x, w, n):
        wd = bb.emit_te(qk.dequantize_weight_only, w["w.qweight"], w["w.scales"], w["w.zeros"], group=G,
                        primfunc_name_hint="dequantize_weight_only")
        return relax.op.matmul(x, bb.emit(relax.op.permute_dims(wd)))

    def expected(bb, x, w, n):
        return bb.emit_te(qk.weight_only_matmul, x, w["w.qweight"], w["w.scales"], w["w.zeros"], group=G,
                          out_dtype="float32", primfunc_name_hint="dequant_matmul")

    _dequant_fusion(W4, before, expected)


def test_fuse_dequant_matmul_w4a8_before_expected():
    def act(bb, x):
        q = bb.emit_te(qk.quantize_per_token, x, primfunc_name_hint="quantize_per_token")
        return bb.emit(relax.TupleGetItem(q, 0)), bb.emit(relax.TupleGetItem(q, 1))

    def before(bb, x, w, n):
        x8, sx = act(bb, x)
        w8 = bb.emit_te(qk.dequantize_w4a8, w["w.qweight"], w["w.group_scales"], w["w.zeros"], group=G,
                        primfunc_name_hint="dequantize_w4a8")
        return bb.emit_te(qk.w8a8_matmul, x8, sx, w8, w["w.channel_scales"], out_dtype="float32",
                          primfunc_name_hint="w8a8_matmul")

    def expected(bb, x, w, n):
        x8, sx = act(bb, x)
        return bb.emit_te(qk.w4a8_matmul, x8, sx, w["w.qweight"], w["w.group_scales"], w["w.zeros"],
                          w["w.channel_scales"], group=G, out_dtype="float32", primfunc_name_hint="w4a8_matmul")

    _dequant_fusion(W4A8, before, expected)


def test_fuse_dequant_matmul_leaves_a_weight_read_twice():
    def before(bb, x, w, n):  # the dequantized weight is also an output: it must be materialised anyway
        wd = bb.emit_te(qk.dequantize_weight_only, w["w.qweight"], w["w.scales"], w["w.zeros"], group=G,
                        primfunc_name_hint="dequantize_weight_only")
        y = bb.emit(relax.op.matmul(x, bb.emit(relax.op.permute_dims(wd))))
        return relax.Tuple([y, wd])

    mod = _opaque(_forward(W4, before, W4_DTYPES))
    got, _, _ = fuse_dequant_matmul(mod, {k: (s, W4_DTYPES.get(k, "float32")) for k, s in W4.items()}, G)
    assert got is mod


NORM = {"embed_tokens": (10, H), "w": (H,)}


def test_fuse_add_rms_norm_before_expected():
    def before(bb, x, w, n):
        s = bb.emit(relax.op.add(x, bb.emit(relax.op.multiply(x, x))))
        h = bb.emit(relax.op.nn.rms_norm(s, w["w"], axes=[-1], epsilon=1e-5))
        return relax.op.add(s, h)  # the sum is still read: the residual stream

    def expected(bb, x, w, n):
        y = bb.emit(relax.op.multiply(x, x))
        t = bb.emit_te(add_rms_norm_te, x, y, w["w"], 1e-5, primfunc_name_hint="add_rms_norm")
        s, h = bb.emit(relax.TupleGetItem(t, 0)), bb.emit(relax.TupleGetItem(t, 1))
        return relax.op.add(s, h)

    got = fuse_add_rms_norm(_forward(NORM, before))
    assert relax.analysis.check_well_formed(got)
    want = _forward(NORM, expected)
    want = IRModule({gv: (f.with_attr("op_pattern", 8) if gv.name_hint == "add_rms_norm" else f)
                     for gv, f in want.functions_items()})
    assert structural_equal(got, want, map_free_vars=True), got.script()


def test_add_rms_norm_kernel_against_numpy():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((5, H)).astype("float32"), rng.standard_normal((5, H)).astype("float32")
    w = (1 + 0.1 * rng.standard_normal(H)).astype("float32")
    xs, ys, ws = (relax.Var(nm, relax.TensorType(list(a.shape), "float32")) for nm, a in (("x", x), ("y", y), ("w", w)))
    bb = relax.BlockBuilder()
    with bb.function("main", [xs, ys, ws]):
        out = bb.emit_te(add_rms_norm_te, xs, ys, ws, 1e-5)
        bb.emit_func_output(out)
    ex = tvm.compile(bb.get(), target=Target({"kind": "llvm"}))
    s, h = relax.VirtualMachine(ex, tvm.cpu())["main"](*(tvm.runtime.tensor(a, tvm.cpu()) for a in (x, y, w)))
    ref_s = x + y
    ref_h = ref_s / np.sqrt((ref_s.astype("float64") ** 2).mean(-1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(s.numpy(), ref_s, rtol=0, atol=0)
    np.testing.assert_allclose(h.numpy(), ref_h, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------- whole models


SPEC = ModelSpec("Qwen2ForCausalLM", vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2,
                 num_q_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, context_len=64, attention_bias=True)


def _run_forward(mod, params: dict, layout, ids):
    target = Target({"kind": "llvm"})
    ex = tvm.compile(mod, target=target, relax_pipeline=relax.backend.cpu_generic.get_default_pipeline(target))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    ps = [tvm.runtime.tensor(params[n].numpy(), tvm.cpu()) for n in layout]
    return vm["forward"](tvm.runtime.tensor(ids, tvm.cpu()), ps).numpy()


def _fuse_all(mod, layout, group=None):
    mod, layout, _ = fuse_dequant_matmul(mod, layout, group)
    mod, layout, m1 = fuse_qkv(mod, layout, group)
    mod, layout, m2 = fuse_gate_up(mod, layout, group)
    return fuse_add_rms_norm(mod), layout, m1 + m2


def _random(shape, dtype: str, g) -> torch.Tensor:
    """Values of every packed dtype: any int32 words, 4-bit zeros, small positive scales."""
    if dtype == "int32":
        return torch.randint(-2**31, 2**31 - 1, shape, generator=g, dtype=torch.int64).to(torch.int32)
    if dtype == "int8":
        return torch.randint(-127, 128, shape, generator=g).to(torch.int8)
    if dtype == "uint8":  # zeros and w4a8's group scales: (q - z) * s_g stays within int8, as every kiln layout's
        return torch.randint(1, 9, shape, generator=g).to(torch.uint8)
    return 0.01 + 0.02 * torch.rand(shape, generator=g)


@pytest.mark.parametrize("scheme", [None, "rtn-w4g128", "w4a8", "w8a8"])
def test_fused_reference_form_computes_the_same_logits(scheme):
    from kiln.passes.quantize_linears import packed_layout, quantize_linears
    from kiln.quant.schemes import get_scheme, quantized_linears

    spec = SPEC if scheme is None else SPEC.replace(hidden_size=128, intermediate_size=128, head_dim=32)
    g = torch.Generator().manual_seed(0)
    layout = {n: (s, "float32") for n, s in param_shapes(spec).items()}
    mod, group = build_reference(spec), None
    if scheme is not None:  # random packed tensors: only "the same before and after" matters here
        sch = get_scheme(scheme)
        group = sch.group_size
        names = set(quantized_linears(spec))
        mod = quantize_linears(mod, layout, names, sch.kind, group or 1)
        layout = packed_layout(layout, names, sch.kind, group or 1)
    params = {n: (1 + 0.1 * torch.randn(s, generator=g)) if n.endswith("norm") else
              0.2 * torch.randn(s, generator=g) if dt == "float32" and n in param_shapes(spec) else _random(s, dt, g)
              for n, (s, dt) in layout.items()}
    ids = np.array([3, 7, 11, 5, 2, 9], dtype="int32")
    want = _run_forward(mod, params, layout, ids)
    fused, new_layout, merges = _fuse_all(mod, layout, group)
    assert {m.name.split(".")[2] for m in merges} >= {"qkv_proj", "gate_up_proj"}
    assert not any(".q_proj" in n or ".gate_proj" in n for n in new_layout)
    got = _run_forward(fused, apply_merges(params, new_layout, merges), new_layout, ids)
    assert np.isfinite(want).all() and np.abs(want).max() > 0.1
    np.testing.assert_allclose(got, want, atol=2e-5 * max(1.0, np.abs(want).max()), rtol=0)
    assert relax.analysis.check_well_formed(fused)
