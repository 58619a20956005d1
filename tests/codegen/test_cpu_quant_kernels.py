"""The quantized kernels as kiln ships them for the CPU equal the NumPy references of kiln/quant/formats.py.

tests/passes/test_quantize.py checks the TE computes of kiln/ir/quant_kernels.py under TVM's default
lowering; what runs in an artifact is those computes after kiln's CPU pipeline (kiln/codegen/build.py),
where ScheduleCPUMatmul (cpu_schedule.py) recognises the ``dequant_matmul`` / ``int_matmul`` blocks by
name and tiles, rfactors, vectorizes and parallelizes them. Here each kernel is emitted into a small
Relax module over a symbolic row count ``n``, as kiln/passes/quantize_linears.py emits it (``emit_te``, kept
opaque to FuseOps), compiled with ``kiln.codegen.build.build`` and run for n = 1 (decode), 7 and 33
(prefill). Packed tensors come from random weights through formats.py's own quantize/pack functions.

* ``quantize_per_token``: int8 codes and float32 scales exactly (round half to even, the 1e-5 clamp).
* w4a8 / w8a8: the int32 sum is only visible after the epilogue ``(float32(acc) * s_x) * s_c``, so the
  output is compared with NumPy summing exactly in int64 and applying the same float32 products, with
  rtol 1e-6 and atol 0: an accumulator one unit off moves its output by 1 / |acc|, above 1e-6 while
  |acc| < 1e6 (here |acc| <= ~1.4e5). Measured: bit-identical.
* weight-only (4-bit and 3-bit, group 128, K = 688 so the last group is 48 columns): fp32, summed in a
  different order than NumPy, so within 1e-5 of the float64 sum relative to the output's scale
  (measured: 2e-7; NumPy's own float32 matmul is 5e-7 off).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln.quant import formats

pytestmark = pytest.mark.cpu

ROWS = (1, 7, 33, 70)  # every branch of the same compiled kernel: one row, a few (register blocks), many (panels)
GROUP = 128
OUT, IN = 256, 688  # the demo model's down_proj: 688 = 5 * 128 + 48, a short last group
KERNELS = ("dequant_matmul", "w4a8_matmul", "w8a8_matmul")  # the matmuls ScheduleCPUMatmul must tile
WEIGHT_ONLY = ("w4g128", "w3g128")
ARCHS = ("x86-64", "x86-64-v3", None)  # SSE2, AVX2 + FMA, kiln's default (the host's own CPU)


def _target(arch):
    from kiln.codegen.targets import CPU_ARCHS, resolve_target
    from kiln.cpu_features import host_cpu_flags

    if arch and not set(CPU_ARCHS[arch].cpu_flags) <= (host_cpu_flags() or set()):
        pytest.skip(f"this CPU cannot run {arch} code")
    return resolve_target("cpu", arch)


def _module(scheme: str, parts: dict[str, np.ndarray], k: int = IN):
    """``main(x [n, IN] float32, *parts) -> y`` (weight-only) or ``-> (x8, s_x, y)`` (w4a8, w8a8): the fused
    kernels as kiln/passes/fuse_dequant_matmul.py emits them (through quantize.py's own emitter), marked
    opaque as the pass marks them."""
    from kiln.ir.tvm import relax, tirx
    from kiln.passes.lib.quantized_linear import emit_quantized_linear, mark_opaque

    n = tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType((n, k), "float32"))
    p = {name: relax.Var(name, relax.TensorType(a.shape, str(a.dtype))) for name, a in parts.items()}
    bb = relax.BlockBuilder()
    with bb.function("main", [x, *p.values()]):
        with bb.dataflow():
            kind = "weight_only" if scheme in WEIGHT_ONLY else scheme
            act_quant: dict = {}
            y = emit_quantized_linear(bb, kind, x, p, GROUP, "float32", act_quant, "y")
            if kind == "weight_only":
                out = bb.emit_output(y)
            else:  # the activation codes and scales the product read, as outputs to check them too
                q = act_quant[x]
                x8, sx = bb.emit(relax.TupleGetItem(q, 0)), bb.emit(relax.TupleGetItem(q, 1))
                out = bb.emit_output(relax.Tuple([x8, sx, y]))
        bb.emit_func_output(out)
    return mark_opaque(bb.get())


def _build(mod, target):
    """kiln's CPU build of ``mod``, and its PrimFuncs right after ScheduleCPUMatmul (name -> func)."""
    from kiln.codegen.build import build
    from kiln.ir.tvm import tirx, tvm

    seen = {}

    @tvm.instrument.pass_instrument
    class AfterSchedule:
        def run_after_pass(self, m, info):
            if info.name == "kiln.ScheduleCPUMatmul":
                seen.update({gv.name_hint: f for gv, f in m.functions_items() if isinstance(f, tirx.PrimFunc)})

    with tvm.transform.PassContext(instruments=[AfterSchedule()]):
        ex = build(mod, target)
    assert seen, "kiln's CPU pipeline did not run ScheduleCPUMatmul"
    return ex, seen


def _assert_scheduled(funcs):
    """The quantized matmul got kiln's CPU schedule (else this test would check TVM's default lowering)."""
    mm = [f for name, f in funcs.items() if name.startswith(KERNELS)]
    assert len(mm) == 1, list(funcs)
    text = mm[0].script()
    assert mm[0].attrs.get("tirx.is_scheduled", False) and "T.parallel" in text and "T.vectorized" in text, \
        "ScheduleCPUMatmul no longer schedules the quantized matmul"


def _run(ex, arrays):
    from kiln.ir.tvm import relax, tvm

    dev = tvm.cpu()
    out = relax.VirtualMachine(ex, dev)["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in arrays])
    return out.numpy() if hasattr(out, "numpy") else [t.numpy() for t in out]  # a tensor, or a tuple of them


def _weight(seed: int, k: int = IN) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = 0.05 * torch.randn(OUT, k, generator=g)
    w[:, k - 48:] *= 3.0  # the short last group gets its own, wider range
    w[::17, 5] = 0.9  # a few outliers: groups whose scale they set
    return w


def _activations(n: int, seed: int, k: int = IN) -> np.ndarray:
    """[n, IN] float32 with channel outliers, plus rows that hit the per-token quantizer's edge cases:
    row 0 has max|x| = 127 (s_x = 1 exactly) and every other value halfway between two integers, so its
    codes test round-half-to-even; when n > 2 the last row is zeros (s_x = the 1e-5 clamp / 127, codes 0)
    and the one before is tiny (max|x| = 1e-8, below the clamp)."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, k)) * np.exp(rng.standard_normal(k))).astype(np.float32)
    x[0] = rng.integers(-126, 126, k) + 0.5
    x[0, 3] = -127.0
    if n > 2:
        x[-1] = 0.0
        x[-2] = x[-2] / np.abs(x[-2]).max() * 1e-8
    return x


def _parts(scheme: str, seed: int, k: int = IN) -> dict[str, np.ndarray]:
    w = _weight(seed, k)
    if scheme in WEIGHT_ONLY:
        q, scales, zeros = formats.quantize_weight_only(w, int(scheme[1]), GROUP)
        parts = {"qweight": formats.pack_int4(q), "scales": scales, "zeros": zeros}
    elif scheme == "w4a8":
        q, group_scales, zeros, channel_scales = formats.quantize_w4a8(w, GROUP)
        parts = {"qweight": formats.pack_int4(q), "group_scales": group_scales, "zeros": zeros,
                 "channel_scales": channel_scales}
    else:
        w8, channel_scales = formats.quantize_w8a8(w)
        parts = {"qweight": w8, "channel_scales": channel_scales}
    return {k: v.numpy() for k, v in parts.items()}


def test_activation_rows_hit_the_edge_cases():
    """The crafted rows do what _activations says (so the exact-code checks below cover them)."""
    x8, s_x = formats.quantize_activations_per_token(_activations(7, 0))
    ties = np.arange(IN) != 3  # column 3 holds the -127
    assert s_x[0] == 1.0 and (x8[0, ties] % 2 == 0).all()  # every tie went to its even neighbour
    assert s_x[-1] == s_x[-2] == np.float32(1e-5) / np.float32(127) and not x8[-1].any() and not x8[-2].any()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("scheme", WEIGHT_ONLY)
def test_weight_only_matches_numpy(scheme, arch):
    parts = _parts(scheme, seed=1)
    ex, funcs = _build(_module(scheme, parts), _target(arch))
    _assert_scheduled(funcs)
    w = formats.dequantize_weight_only(parts["qweight"], parts["scales"], parts["zeros"], GROUP)  # [OUT, IN] f32
    for n in ROWS:
        x = np.random.default_rng(n).standard_normal((n, IN)).astype(np.float32)
        got = _run(ex, [x, *parts.values()])
        want = formats.reference_weight_only_matmul(x, parts["qweight"], parts["scales"], parts["zeros"], GROUP)
        exact = x.astype(np.float64) @ w.astype(np.float64).T  # the sum of the fp32 products, unrounded
        assert got.shape == (n, OUT) and got.dtype == np.float32
        scale = np.abs(exact).max()
        np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-5 * scale, err_msg=f"n={n}")
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale, err_msg=f"n={n}")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("scheme", ["w4a8", "w8a8"])
def test_int8_matches_numpy(scheme, arch):
    parts = _parts(scheme, seed=2)
    ex, funcs = _build(_module(scheme, parts), _target(arch))
    _assert_scheduled(funcs)
    if scheme == "w4a8":
        w8 = formats.w4a8_weight_int8(parts["qweight"], parts["group_scales"], parts["zeros"], GROUP)
    else:
        w8 = parts["qweight"]
    for n in ROWS:
        x = _activations(n, seed=n)
        x8, s_x, y = _run(ex, [x, *parts.values()])
        want_x8, want_sx = formats.quantize_activations_per_token(x)
        assert x8.dtype == np.int8 and s_x.dtype == np.float32 and y.dtype == np.float32
        np.testing.assert_array_equal(x8, want_x8, err_msg=f"activation codes, n={n}")
        np.testing.assert_array_equal(s_x, want_sx, err_msg=f"activation scales, n={n}")
        acc = formats.int8_matmul(want_x8, w8)  # int64 sums, checked to fit int32
        want = (acc.astype(np.float32) * want_sx[:, None]) * parts["channel_scales"][None, :]
        np.testing.assert_allclose(y, want, rtol=1e-6, atol=0, err_msg=f"n={n}")
        ref = formats.reference_w4a8_matmul(x, *parts.values(), GROUP) if scheme == "w4a8" else \
            formats.reference_w8a8_matmul(x, *parts.values())
        np.testing.assert_allclose(y, ref, rtol=1e-6, atol=0, err_msg=f"formats' reference, n={n}")


# the instruction each --arch's w4a8 kernel multiplies bytes with (kiln/codegen/cpu_int8.py), as the intrinsic's
# name in the scheduled TIR: AVX2 and AVX-512BW multiply-add pairs of bytes, VNNI sums four in one
DOT_INTRINSIC = {"x86-64-v3": "llvm.x86.avx2.pmadd.ub.sw", "x86-64-v4": "llvm.x86.avx512.pmaddubs.w.512"}
ROWS_INT8 = (1, 2, 5, 8, 33)  # the one-row block, the 4-row blocks with padding (2, 5, 33) and without (8)


@pytest.mark.parametrize("arch", ("x86-64", "x86-64-v3", "x86-64-v4", None))
def test_w4a8_on_integer_dot_products_matches_numpy(arch):
    """With 128-column groups only (K = 768 here), the w4a8 linear runs on 8-bit dot products where the target
    has them (AVX2 and up) and on the generic schedule on plain x86-64; bit-equal to the int64 sum either way."""
    from kiln.cpu_features import host_cpu_flags

    k = 768
    parts = _parts("w4a8", seed=3, k=k)
    target = _target(arch)
    ex, funcs = _build(_module("w4a8", parts, k), target)
    (mm,) = [f for name, f in funcs.items() if name.startswith("w4a8_matmul")]
    text = mm.script()
    if arch == "x86-64":
        assert "T.vectorized" in text and "llvm.x86" not in text
    else:
        vnni = arch is None and "avx512_vnni" in (host_cpu_flags() or set())
        want = "llvm.x86.avx512.vpdpbusd.512" if vnni else DOT_INTRINSIC.get(arch, "llvm.x86.avx512.pmaddubs.w.512")
        assert want in text, f"{arch}: the w4a8 linear does not use {want}"
    w8 = formats.w4a8_weight_int8(parts["qweight"], parts["group_scales"], parts["zeros"], GROUP)
    for n in ROWS_INT8:
        x = _activations(n, seed=n, k=k)
        x8, s_x, y = _run(ex, [x, *parts.values()])
        acc = formats.int8_matmul(x8, w8)
        want = (acc.astype(np.float32) * s_x[:, None]) * parts["channel_scales"][None, :]
        np.testing.assert_array_equal(y, want, err_msg=f"n={n}")
