"""kiln.passes.quantize_linears + kiln/ir/quant_kernels.py: the quantized reference form against NumPy.

Random packed tensors in each layout (weight-only 4-bit, w4a8, w8a8) go into the rewritten ``forward``
(compiled for llvm, run in-process), in the plain form the pass emits and after fuse_dequant_matmul; the
same model with each weight dequantized by this file's own NumPy code goes through the unquantized
reference form. Weight-only logits must agree to fp32 tolerance; w4a8/w8a8 round each linear's input to
int8, which the reference form cannot express, so there the fused form must equal the plain one and the
kernels' integer parts are checked exactly on their own.
"""

from __future__ import annotations

import numpy as np
import pytest

from kiln.errors import PassError
from kiln.frontend.reference import build_reference, param_shapes
from kiln.ir import quant_kernels as qk
from kiln.ir.spec import ModelSpec
from kiln.ir.tvm import IRModule, Target, relax, te, tirx, tvm
from kiln.passes.fuse_dequant_matmul import fuse_dequant_matmul
from kiln.passes.quantize_linears import packed_layout, quantize_linears

pytestmark = pytest.mark.cpu
G = 32
SPEC = ModelSpec("LlamaForCausalLM", vocab_size=101, hidden_size=64, intermediate_size=80, num_layers=2,
                 num_q_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, context_len=128)
LINEARS = {n for n in param_shapes(SPEC) if n.endswith("_proj")}


def pack(q: np.ndarray) -> np.ndarray:
    """[O, K] values < 16 -> int32 [O, K/8], column k at bits 4 * (k % 8) of word k // 8."""
    O, K = q.shape
    words = np.zeros((O, K // 8), dtype=np.uint32)
    for j in range(8):
        words |= q[:, j::8].astype(np.uint32) << (4 * j)
    return words.view(np.int32)


def random_layout(kind: str, rng):
    """(packed params dict, dense dequantized weights dict) for every linear of SPEC."""
    layout = {n: (s, "float32") for n, s in param_shapes(SPEC).items()}
    packed, dense = {}, {}
    for name, (shape, _) in layout.items():
        if name not in LINEARS:
            a = 1.0 + 0.1 * rng.standard_normal(shape) if "norm" in name else 0.15 * rng.standard_normal(shape)
            packed[name] = dense[name] = a.astype("float32")
            continue
        O, K = shape
        ng = -(-K // G)  # down_proj's last group is short (K = 80)
        rep = lambda a: np.repeat(a, G, axis=1)[:, :K]  # noqa: E731
        q = rng.integers(0, 16, (O, K))
        if kind == "weight_only":
            scales = (0.02 + 0.02 * rng.random((O, ng))).astype("float32")
            zeros = rng.integers(0, 16, (O, ng)).astype("uint8")
            packed.update({f"{name}.qweight": pack(q), f"{name}.scales": scales, f"{name}.zeros": zeros})
            dense[name] = ((q - rep(zeros)) * rep(scales)).astype("float32")
        elif kind == "w4a8":
            gs = rng.integers(1, 9, (O, ng)).astype("uint8")
            zeros = rng.integers(0, 16, (O, ng)).astype("uint8")
            cs = (0.002 + 0.002 * rng.random(O)).astype("float32")
            packed.update({f"{name}.qweight": pack(q), f"{name}.group_scales": gs, f"{name}.zeros": zeros,
                           f"{name}.channel_scales": cs})
            w8 = (q - rep(zeros)) * rep(gs)
            dense[name] = (w8 * cs[:, None]).astype("float32")
        else:
            w8 = rng.integers(-127, 128, (O, K)).astype("int8")
            cs = (0.001 + 0.001 * rng.random(O)).astype("float32")
            packed.update({f"{name}.qweight": w8, f"{name}.channel_scales": cs})
            dense[name] = (w8.astype("float32") * cs[:, None]).astype("float32")
    return layout, packed, dense


def run_forward(mod, params: list[np.ndarray], ids) -> np.ndarray:
    target = Target({"kind": "llvm"})
    ex = tvm.compile(mod, target=target, relax_pipeline=relax.backend.cpu_generic.get_default_pipeline(target))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    dev = tvm.cpu()
    return vm["forward"](tvm.runtime.tensor(np.asarray(ids, "int32"), dev),
                         [tvm.runtime.tensor(p, dev) for p in params]).numpy()


@pytest.mark.parametrize("kind", ["weight_only", "w4a8", "w8a8"])
def test_quantized_forward_matches_dequantized_reference(kind):
    rng = np.random.default_rng(0)
    layout, packed, dense = random_layout(kind, rng)
    qmod = quantize_linears(build_reference(SPEC), layout, LINEARS, kind, group=G)
    new_layout = packed_layout(layout, LINEARS, kind, G)
    assert [(tuple(f.shape), str(f.dtype)) for f in qmod["forward"].params[1].ty.fields] == \
        [(s, dt) for s, dt in new_layout.values()]
    assert set(new_layout) == set(packed)
    ids = rng.integers(0, SPEC.vocab_size, 12)
    params = [packed[n] for n in new_layout]
    got = run_forward(qmod, params, ids)
    fused, fused_layout, merges = fuse_dequant_matmul(qmod, new_layout, G)
    assert fused_layout == new_layout and merges == []
    assert kernels_called(fused) == {"weight_only": {"dequant_matmul"}, "w4a8": {"quantize_per_token", "w4a8_matmul"},
                                     "w8a8": {"quantize_per_token", "w8a8_matmul"}}[kind]
    got_fused = run_forward(fused, params, ids)
    if kind == "weight_only":
        want = run_forward(build_reference(SPEC), [dense[n] for n in layout], ids)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got_fused, want, rtol=1e-4, atol=1e-4)
    else:
        # the same int8 codes and int32 sums in both forms, the same float epilogue: equal to rounding
        np.testing.assert_allclose(got_fused, got, rtol=0, atol=1e-5 * np.abs(got).max())
        # against the dense model the int8 rounding of the inputs shows; only check the model runs near it
        want = run_forward(build_reference(SPEC), [dense[n] for n in layout], ids)
        err = np.abs(got - want).max() / np.abs(want).max()
        assert np.isfinite(got).all() and err < 0.05, err


def kernels_called(mod) -> set[str]:
    """The PrimFuncs ``forward`` calls (call_tir), by name without the builder's numbering."""
    names = set()
    for b in mod["forward"].body.blocks[0].bindings:
        v = b.value
        if isinstance(v, relax.Call) and getattr(v.op, "name", "") == "relax.call_tir":
            names.add(v.args[0].name_hint.rstrip("0123456789_"))
    return names


@pytest.mark.parametrize("kind", ["weight_only", "w4a8"])
def test_plain_form_dequantizes_each_weight_once_and_fusion_removes_it(kind):
    layout = {n: (s, "float32") for n, s in param_shapes(SPEC).items()}
    qmod = quantize_linears(build_reference(SPEC), layout, LINEARS, kind, group=G)
    calls = [b.value.args[0].name_hint for b in qmod["forward"].body.blocks[0].bindings
             if isinstance(b.value, relax.Call) and getattr(b.value.op, "name", "") == "relax.call_tir"]
    assert sum(c.startswith("dequantize_") for c in calls) == len(LINEARS)
    fused, _, _ = fuse_dequant_matmul(qmod, packed_layout(layout, LINEARS, kind, G), G)
    assert not any(c.startswith("dequantize_") for c in kernels_called(fused))


def test_dequantize_kernels_match_the_numpy_reference():
    """The plain form's weight kernels: weight-only in fp32 and fp16, w4a8's int8 weight exactly."""
    from kiln.quant import formats

    rng = np.random.default_rng(3)
    O, K = 16, 80  # groups of 32: 32, 32, 16
    q = rng.integers(0, 16, (O, K))
    zeros = rng.integers(0, 16, (O, 3)).astype("uint8")
    dev = tvm.cpu()
    for dt in ("float32", "float16"):
        scales = (0.01 + 0.02 * rng.random((O, 3))).astype(dt)
        f = _build_te(lambda *a: qk.dequantize_weight_only(*a, group=G), te.placeholder(_i64(O, K // 8), "int32", "qw"),
                      te.placeholder(_i64(O, 3), dt, "s"), te.placeholder(_i64(O, 3), "uint8", "z"))
        w = tvm.runtime.tensor(np.zeros((O, K), dt), dev)
        f(*[tvm.runtime.tensor(a, dev) for a in (pack(q), scales, zeros)], w)
        want = formats.dequantize_weight_only(pack(q), scales.astype("float32"), zeros, group=G).astype(dt)
        np.testing.assert_array_equal(w.numpy(), want)
    gs = rng.integers(1, 9, (O, 3)).astype("uint8")
    f = _build_te(lambda *a: qk.dequantize_w4a8(*a, group=G), te.placeholder(_i64(O, K // 8), "int32", "qw"),
                  te.placeholder(_i64(O, 3), "uint8", "gs"), te.placeholder(_i64(O, 3), "uint8", "z"))
    w8 = tvm.runtime.tensor(np.zeros((O, K), "int8"), dev)
    f(*[tvm.runtime.tensor(a, dev) for a in (pack(q), gs, zeros)], w8)
    np.testing.assert_array_equal(w8.numpy(), formats.w4a8_weight_int8(pack(q), gs, zeros, group=G))


def _build_te(fn, *placeholders):
    outs = fn(*placeholders)
    outs = outs if isinstance(outs, (list, tuple)) else [outs]
    f = te.create_prim_func([*placeholders, *outs])
    return tvm.compile(tvm.IRModule({"main": f}), target=Target({"kind": "llvm"}))["main"]


def _i64(*xs):
    return tuple(tirx.IntImm("int64", x) for x in xs)


@pytest.mark.parametrize("kind", ["w4a8", "w8a8"])
def test_int8_linear_matches_the_numpy_reference(kind):
    """Against kiln/quant/formats.py's references: integer parts (codes, int32 sums) exactly."""
    from kiln.quant import formats
    rng = np.random.default_rng(1)
    n, O, K = 5, 24, 64
    x = (rng.standard_normal((n, K)) * 3).astype("float32")
    x[2] = 0.0  # an all-zero row: scale 1, codes 0
    dev = tvm.cpu()
    T = lambda a: tvm.runtime.tensor(a, dev)  # noqa: E731
    xq_f = _build_te(qk.quantize_per_token, te.placeholder(_i64(n, K), "float32", "x"))
    x8, sx = T(np.zeros((n, K), "int8")), T(np.zeros(n, "float32"))
    xq_f(T(x), x8, sx)
    codes_ref, s_ref = formats.quantize_activations_per_token(x)
    np.testing.assert_array_equal(x8.numpy(), codes_ref)
    np.testing.assert_array_equal(sx.numpy(), s_ref)

    cs = (0.01 + rng.random(O)).astype("float32")
    if kind == "w4a8":
        q = rng.integers(0, 16, (O, K))
        gs = rng.integers(1, 9, (O, K // G)).astype("uint8")
        zeros = rng.integers(0, 16, (O, K // G)).astype("uint8")
        w8 = (q - np.repeat(zeros, G, axis=1)) * np.repeat(gs, G, axis=1)
        args = [pack(q), gs, zeros, cs]
        ph = [te.placeholder(_i64(O, K // 8), "int32", "qw"), te.placeholder(_i64(O, K // G), "uint8", "gs"),
              te.placeholder(_i64(O, K // G), "uint8", "z"), te.placeholder(_i64(O), "float32", "cs")]
        fn = lambda a, b, *w: qk.w4a8_matmul(a, b, *w, group=G, out_dtype="float32")  # noqa: E731
    else:
        w8 = rng.integers(-127, 128, (O, K)).astype("int8")
        args = [w8, cs]
        ph = [te.placeholder(_i64(O, K), "int8", "qw"), te.placeholder(_i64(O), "float32", "cs")]
        fn = lambda a, b, *w: qk.w8a8_matmul(a, b, *w, out_dtype="float32")  # noqa: E731
    mm = _build_te(fn, te.placeholder(_i64(n, K), "int8", "x8"), te.placeholder(_i64(n), "float32", "sx"), *ph)
    y = T(np.zeros((n, O), "float32"))
    mm(x8, sx, *[T(a) for a in args], y)
    ref = formats.reference_w4a8_matmul(x, *args, group=G) if kind == "w4a8" else \
        formats.reference_w8a8_matmul(x, *args)
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-6)  # the int32 sums are exact; the epilogue is 2 fp32 ops


def test_rejects_a_weight_that_is_not_a_linear():
    layout = {n: (s, "float32") for n, s in param_shapes(SPEC).items()}
    with pytest.raises(PassError, match="not used as"):
        quantize_linears(build_reference(SPEC), layout, {"embed_tokens"}, "weight_only", group=G)


def test_ragged_last_group_and_unpackable_width():
    layout = {"w": ((4, 40), "float32")}
    assert packed_layout(layout, {"w"}, "weight_only", 32) == {
        "w.qweight": ((4, 5), "int32"), "w.scales": ((4, 2), "float32"), "w.zeros": ((4, 2), "uint8")}
    with pytest.raises(PassError, match="multiple of 8"):
        packed_layout({"w": ((4, 36), "float32")}, {"w"}, "w4a8", 32)


@pytest.mark.parametrize("out_dtype", ["float32", "float16"])
def test_weight_only_kernel_matches_the_numpy_reference(out_dtype):
    """The fused dequantize-in-the-sum kernel against kiln/quant/formats.py, a short last group included."""
    from kiln.quant import formats

    rng = np.random.default_rng(2)
    n, O, K = 3, 16, 80  # groups of 32: 32, 32, 16
    x = rng.standard_normal((n, K)).astype("float32")
    q = rng.integers(0, 16, (O, K))
    scales = (0.01 + 0.02 * rng.random((O, 3))).astype("float32")
    zeros = rng.integers(0, 16, (O, 3)).astype("uint8")
    ph = [te.placeholder(_i64(n, K), "float32", "x"), te.placeholder(_i64(O, K // 8), "int32", "qw"),
          te.placeholder(_i64(O, 3), "float32", "s"), te.placeholder(_i64(O, 3), "uint8", "z")]
    f = _build_te(lambda *a: qk.weight_only_matmul(*a, group=G, out_dtype=out_dtype), *ph)
    dev = tvm.cpu()
    y = tvm.runtime.tensor(np.zeros((n, O), out_dtype), dev)
    f(*[tvm.runtime.tensor(a, dev) for a in (x, pack(q), scales, zeros)], y)
    want = formats.reference_weight_only_matmul(x, pack(q), scales, zeros, group=G)
    np.testing.assert_allclose(y.numpy().astype("float32"), want, rtol=1e-5 if out_dtype == "float32" else 1e-3,
                               atol=1e-5 if out_dtype == "float32" else 1e-3)


# ------------------------------------------------------------------------------------------ Before/Expected

BE_H, BE_I, BE_G = 16, 8, 8
BE_FLOAT = {"embed_tokens": (10, BE_H), "a": (BE_I, BE_H), "b": (BE_I, BE_H), "c": (BE_H, BE_I)}


def _be_forward(layout: dict, body) -> IRModule:
    """forward(input_ids: [n] int32, params) -> body(bb, x, w, out); x = take(embed_tokens, ids). ``body`` returns
    the result's value; it is bound as the dataflow block's output."""
    n = tirx.Var("n", "int64")
    ids = relax.Var("input_ids", relax.TensorType([n], "int32"))
    packed = relax.Var("params", relax.TupleType([relax.TensorType(list(s), dt) for s, dt in layout.values()]))
    bb = relax.BlockBuilder()
    with bb.function("forward", [ids, packed], attrs={"num_input": 1}):
        with bb.dataflow():
            w = {name: bb.emit(relax.TupleGetItem(packed, i)) for i, name in enumerate(layout)}
            x = bb.emit(relax.op.take(w["embed_tokens"], ids, axis=0))
            out = bb.emit_output(body(bb, x, w))
        bb.emit_func_output(out)
    return bb.get()


def _be_before(bb, x, w):
    """a and b read the same input (their activation is quantized once), c reads their product and stays float."""
    ya = bb.emit(relax.op.matmul(x, bb.emit(relax.op.permute_dims(w["a"]))))
    yb = bb.emit(relax.op.matmul(x, bb.emit(relax.op.permute_dims(w["b"]))))
    y = bb.emit(relax.op.multiply(ya, yb))
    return relax.op.matmul(y, bb.emit(relax.op.permute_dims(w["c"])))


def _be_expected(kind):
    def body(bb, x, w):
        act = None
        ys = []
        for name in ("a", "b"):
            if kind == "weight_only":
                wd = bb.emit_te(qk.dequantize_weight_only, w[f"{name}.qweight"], w[f"{name}.scales"],
                                w[f"{name}.zeros"], group=BE_G, primfunc_name_hint="dequantize_weight_only")
                ys.append(bb.emit(relax.op.matmul(x, bb.emit(relax.op.permute_dims(wd)))))
                continue
            if act is None:  # once, before the first linear that reads x
                act = bb.emit_te(qk.quantize_per_token, x, primfunc_name_hint="quantize_per_token")
            x8, sx = bb.emit(relax.TupleGetItem(act, 0)), bb.emit(relax.TupleGetItem(act, 1))
            if kind == "w4a8":
                w8 = bb.emit_te(qk.dequantize_w4a8, w[f"{name}.qweight"], w[f"{name}.group_scales"],
                                w[f"{name}.zeros"], group=BE_G, primfunc_name_hint="dequantize_w4a8")
            else:
                w8 = w[f"{name}.qweight"]
            ys.append(bb.emit_te(qk.w8a8_matmul, x8, sx, w8, w[f"{name}.channel_scales"], out_dtype="float32",
                                 primfunc_name_hint="w8a8_matmul"))
        y = bb.emit(relax.op.multiply(*ys))
        # the output binding is re-bound as a dataflow var, then returned through the block's output
        return bb.emit(relax.op.matmul(y, bb.emit(relax.op.permute_dims(w["c"]))))
    return body


EXPECTED_PARTS = {  # packed parts of a [BE_I, BE_H] weight, group BE_G
    "weight_only": {"qweight": ((BE_I, BE_H // 8), "int32"), "scales": ((BE_I, BE_H // BE_G), "float32"),
                    "zeros": ((BE_I, BE_H // BE_G), "uint8")},
    "w4a8": {"qweight": ((BE_I, BE_H // 8), "int32"), "group_scales": ((BE_I, BE_H // BE_G), "uint8"),
             "zeros": ((BE_I, BE_H // BE_G), "uint8"), "channel_scales": ((BE_I,), "float32")},
    "w8a8": {"qweight": ((BE_I, BE_H), "int8"), "channel_scales": ((BE_I,), "float32")},
}


@pytest.mark.parametrize("kind", ["weight_only", "w4a8", "w8a8"])
def test_quantize_linears_before_expected(kind):
    layout = {n: (s, "float32") for n, s in BE_FLOAT.items()}
    got = quantize_linears(_be_forward(layout, _be_before), layout, {"a", "b"}, kind, group=BE_G)
    assert relax.analysis.check_well_formed(got)
    new_layout = {"embed_tokens": layout["embed_tokens"]}
    for name in ("a", "b"):
        new_layout.update({f"{name}.{p}": v for p, v in EXPECTED_PARTS[kind].items()})
    new_layout["c"] = layout["c"]
    assert packed_layout(layout, {"a", "b"}, kind, BE_G) == new_layout
    want = _be_forward(new_layout, _be_expected(kind))
    # kiln's quantized kernels are kept whole through FuseOps (op_pattern 8, kOpaque)
    want = IRModule({gv: (f.with_attr("op_pattern", 8) if isinstance(f, tirx.PrimFunc) else f)
                     for gv, f in want.functions_items()})
    tvm.ir.assert_structural_equal(got, want, map_free_vars=True)
