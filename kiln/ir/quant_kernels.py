"""The quantized linears' kernels, as TE computes (target-independent; codegen schedules them).

Packed layouts (kiln/quant/formats.py documents them and holds their NumPy references):

* weight-only ``wNgG`` (RTN, AWQ): ``qweight`` int32 ``[O, K/8]`` — column k is the 4-bit field at bits
  ``4 * (k % 8)`` of word ``k // 8`` (3-bit values use 4-bit fields) — ``scales`` ``[O, K/G]`` in the model
  dtype, ``zeros`` uint8 ``[O, K/G]``; ``w[o, k] = (q - zeros[o, k/G]) * scales[o, k/G]``.
* ``w4a8`` (QoQ): the same ``qweight`` packing, integer ``group_scales`` and ``zeros`` ``[O, K/G]`` giving an
  int8 weight ``w8 = (q - zero) * group_scale``, float32 ``channel_scales`` ``[O]``.
* ``w8a8`` (SmoothQuant): int8 ``qweight`` ``[O, K]``, float32 ``channel_scales`` ``[O]``.

Activations of w4a8/w8a8 are quantized per token by ``quantize_per_token`` (symmetric int8,
``s = max|x| / 127``) — its own op, placed before the linear and shared by the linears reading the same
input; the GEMM multiplies int8 by int8 into an int32 accumulator and applies ``s_x[i] * s_c[o]`` in
its epilogue.

kiln/passes/quantize_linears.py emits the plain form: ``dequantize_weight_only`` (or ``dequantize_w4a8``) makes the
whole weight, then an ordinary matmul (or ``w8a8_matmul``) reads it. kiln/passes/fuse_dequant_matmul.py
turns each such pair into ``weight_only_matmul`` (or ``w4a8_matmul``), which dequantizes inside the
kernel, a tile of output channels at a time, so no full-precision weight is materialised (``--no-fuse``
keeps the plain form).
"""

from __future__ import annotations

from .tvm import te, tirx


def _nibble(qweight, o, k):
    """The 4-bit field of column k in row o of a packed int32 ``[O, K/8]`` tensor, as int32."""
    shift = ((k % 8) * 4).astype("int32")
    return tirx.bitwise_and(tirx.shift_right(qweight[o, k // 8], shift), tirx.const(15, "int32"))


def dequantize_weight_only(qweight, scales, zeros, group: int):
    """The whole ``[O, K]`` weight ``(q - zeros[o, k/G]) * scales[o, k/G]`` in the scales' dtype (computed in
    float32, rounded once)."""
    O, K = qweight.shape[0], qweight.shape[1] * 8

    def weight(o, kk):
        g = kk // group
        w = (_nibble(qweight, o, kk) - zeros[o, g].astype("int32")).astype("float32") * scales[o, g].astype("float32")
        return w.astype(scales.dtype)

    return te.compute((O, K), weight, name="dequantize_weight_only")


def dequantize_w4a8(qweight, group_scales, zeros, group: int):
    """The whole int8 ``[O, K]`` weight ``(q - zero) * group_scale`` of QoQ's 4-bit level (within [-127, 127]
    by construction: kiln/quant/formats.py)."""
    O, K = qweight.shape[0], qweight.shape[1] * 8

    def weight8(o, kk):
        g = kk // group
        return ((_nibble(qweight, o, kk) - zeros[o, g].astype("int32")) * group_scales[o, g].astype("int32")) \
            .astype("int8")

    return te.compute((O, K), weight8, name="dequantize_w4a8")


WEIGHT_STAGES = ("dequant_weight", "w4a8_weight")  # the fused kernels' weight stages (codegen places them)


def weight_only_matmul(x, qweight, scales, zeros, group: int, out_dtype: str):
    """``y[i, o] = sum_k x[i, k] * (q[o, k] - zeros[o, k/G]) * scales[o, k/G]``, fp32 accumulation.

    The weight element is its own stage (``dequant_weight``) read by the sum: codegen places it, never as
    a whole weight — the CPU schedule inlines it for one row and, for more, computes one tile of output
    channels at a time, reused by every row of x (kiln/codegen/cpu_schedule.py); on CUDA it is inlined
    into the reduction."""
    n, K = x.shape
    O = qweight.shape[0]
    k = te.reduce_axis((tirx.IntImm("int64", 0), K), name="k")

    def weight(o, kk):
        g = kk // group
        return (_nibble(qweight, o, kk) - zeros[o, g].astype("int32")).astype("float32") * \
            scales[o, g].astype("float32")

    w = te.compute((O, K), weight, name="dequant_weight")
    acc = te.compute((n, O), lambda i, o: te.sum(x[i, k].astype("float32") * w[o, k], axis=k),
                     name="dequant_matmul")
    if out_dtype == "float32":
        return acc
    return te.compute((n, O), lambda i, o: acc[i, o].astype(out_dtype), name="dequant_matmul_cast")


def quantize_per_token(x):
    """``x`` [n, K] float -> (int8 ``rint(x / s)`` clamped to [-127, 127] (half to even), float32
    ``s = max(max|x|, 1e-5) / 127`` [n]): kiln/quant/formats.py ``quantize_activations_per_token``."""
    n, K = x.shape
    k = te.reduce_axis((tirx.IntImm("int64", 0), K), name="k")
    amax = te.compute((n,), lambda i: te.max(tirx.abs(x[i, k].astype("float32")), axis=k), name="act_absmax")
    scale = te.compute((n,), lambda i: tirx.max(amax[i], tirx.const(1e-5, "float32")) / tirx.const(127.0, "float32"),
                       name="act_scale")
    codes = te.compute((n, K), lambda i, j: tirx.max(tirx.min(tirx.nearbyint(x[i, j].astype("float32") / scale[i]),
                                                                  127.0), -127.0).astype("int8"),
                       name="act_quant")
    return codes, scale


def _int_matmul(x8, sx, weight8, channel_scales, O, out_dtype: str):
    n, K = x8.shape
    k = te.reduce_axis((tirx.IntImm("int64", 0), K), name="k")
    acc = te.compute((n, O), lambda i, o: te.sum(x8[i, k].astype("int32") * weight8(o, k), axis=k),
                     name="int_matmul")
    return te.compute((n, O), lambda i, o: (acc[i, o].astype("float32") * sx[i] * channel_scales[o]).astype(out_dtype),
                      name="int_matmul_dequant")


def w4a8_matmul(x8, sx, qweight, group_scales, zeros, channel_scales, group: int, out_dtype: str):
    """int8 activations x QoQ int4 weights (made int8 on the fly: ``(q - zero) * group_scale``, the
    ``w4a8_weight`` stage, placed like ``dequant_weight``), int32 sum."""
    def weight8(o, kk):
        g = kk // group
        return (_nibble(qweight, o, kk) - zeros[o, g].astype("int32")) * group_scales[o, g].astype("int32")

    w8 = te.compute((qweight.shape[0], qweight.shape[1] * 8), weight8, name="w4a8_weight")
    return _int_matmul(x8, sx, lambda o, kk: w8[o, kk], channel_scales, qweight.shape[0], out_dtype)


def w8a8_matmul(x8, sx, qweight, channel_scales, out_dtype: str):
    """int8 activations x int8 per-channel weights, int32 sum."""
    return _int_matmul(x8, sx, lambda o, kk: qweight[o, kk].astype("int32"), channel_scales, qweight.shape[0],
                       out_dtype)
