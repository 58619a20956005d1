"""Packed weight layouts: how each is made (torch) and how it is read (NumPy references).

These layouts are kiln's ABI with its quantized kernels; the NumPy functions here are the truth
those kernels are checked against. Every layout keeps HF's ``[out, in]`` orientation, quantizes
along ``in`` and names its tensors ``NAME.<suffix>`` for a linear ``NAME``.

Groups. A group is ``group`` (128) consecutive input channels of one output row: column ``k``
belongs to group ``k // group``, so there are ``G = ceil(in / group)`` groups per row. When ``in``
is not a multiple of ``group`` (the demo model's ``intermediate_size`` is 688) the last group is
shorter; nothing else changes.

4-bit packing (``pack_int4``). ``q`` of shape ``[out, in]`` (values < 16, ``in % 8 == 0``) becomes
int32 ``[out, in/8]``: column ``k`` sits in bits ``4*(k%8) .. 4*(k%8)+3`` of word ``k//8``, so word
``j`` is ``sum_i q[:, 8j+i] << 4i`` (nibble 0 is the lowest; the int32 is that uint32's two's
complement). 3-bit values (< 8) use the same 4-bit slots: a 3-bit weight costs the bytes of a 4-bit one.

Layouts (``G = ceil(in/128)``; ``dtype`` is the model's dtype):

weight-only (``rtn-w4g128``, ``rtn-w3g128``, ``awq-w4g128``, ``awq-w3g128``), llm-awq's asymmetric
uint quantization per group::

    NAME.qweight  int32  [out, in/8]   packed q, 0 <= q < 2^bits
    NAME.scales   dtype  [out, G]
    NAME.zeros    uint8  [out, G]      0 <= z < 2^bits
    w[n, k] = (q[n, k] - z[n, k//128]) * s[n, k//128]            (dequantize_weight_only)

w4a8 (QoQ progressive group quantization): a per-output-channel int8 level with the protective
range +-119, then an unsigned 4-bit level with an integer scale and zero per group of the int8
values. The dequantized int8 weight is always in [-127, 127], ``q * s_g <= 240`` fits a byte and
``-z * s_g >= -127`` fits an int8 (QServe's multiply-then-add byte-lane trick)::

    NAME.qweight         int32    [out, in/8]  packed q, 0 <= q < 16
    NAME.group_scales    uint8    [out, G]     1 <= s_g <= 16
    NAME.zeros           uint8    [out, G]     0 <= z < 16
    NAME.channel_scales  float32  [out]        s_c
    w8[n, k] = (q[n, k] - z[n, k//128]) * s_g[n, k//128]          int8 (w4a8_weight_int8)

w8a8 (SmoothQuant): per-output-channel symmetric int8::

    NAME.qweight         int8     [out, in]    w8 in [-127, 127]
    NAME.channel_scales  float32  [out]        s_c

Activations of w4a8 and w8a8 are quantized per token by the kernel (quantize_activations_per_token),
products accumulate in int32 and the epilogue is ``y[t, n] = (float32(acc[t, n]) * s_x[t]) * s_c[n]``
in float32 (reference_w4a8_matmul, reference_w8a8_matmul).
"""

from __future__ import annotations

import math

import numpy as np
import torch

WEIGHT_EPS = 1e-5  # llm-awq's clamp on (max - min) of a group
ABS_EPS = 1e-5  # SmoothQuant's clamp on max|w| / max|x| before dividing by the int8 bound
QOQ_INT8_BOUND = 119  # QoQ's protective range for the int8 level of w4a8
INT8_BOUND = 127


def num_groups(in_features: int, group: int) -> int:
    return math.ceil(in_features / group)


# ------------------------------------------------------------------------------------------------
# packing (torch tensors or NumPy arrays in, the same kind out)

def pack_int4(q):
    """``q``: [out, in] integers in [0, 16) -> int32 [out, in/8] (column k in bits 4*(k%8) of word k//8)."""
    is_torch = isinstance(q, torch.Tensor)
    a = q.cpu().numpy() if is_torch else np.asarray(q)
    assert a.ndim == 2 and a.shape[1] % 8 == 0, f"pack_int4 needs [out, in] with in % 8 == 0, got {a.shape}"
    a = a.astype(np.uint32)
    assert (a < 16).all(), "pack_int4 takes values in [0, 16)"
    nibbles = a.reshape(a.shape[0], -1, 8) << (4 * np.arange(8, dtype=np.uint32))
    packed = np.bitwise_or.reduce(nibbles, axis=2).view(np.int32)  # [out, in/8]
    return torch.from_numpy(np.ascontiguousarray(packed)) if is_torch else packed


def unpack_int4(qweight):
    """int32 [out, in/8] -> uint8 [out, in], the inverse of pack_int4."""
    is_torch = isinstance(qweight, torch.Tensor)
    a = np.ascontiguousarray(qweight.cpu().numpy() if is_torch else qweight)
    assert a.dtype == np.int32 and a.ndim == 2, f"unpack_int4 takes int32 [out, in/8], got {a.dtype} {a.shape}"
    words = a.view(np.uint32)[:, :, None] >> (4 * np.arange(8, dtype=np.uint32))
    q = (words & 0xF).astype(np.uint8).reshape(a.shape[0], -1)  # [out, in]
    return torch.from_numpy(q) if is_torch else q


# ------------------------------------------------------------------------------------------------
# making the layouts (torch, float32 math)

def to_groups(w: torch.Tensor, group: int) -> torch.Tensor:
    """[out, in] -> [out, G, group]. A short last group is padded with a copy of its own first
    column, which leaves every group's min, max and abs-max (so its scale and zero) unchanged."""
    out_f, in_f = w.shape
    pad = num_groups(in_f, group) * group - in_f
    if pad:
        w = torch.cat([w, w[:, in_f - (group - pad):][:, :1].expand(out_f, pad)], dim=1)
    return w.reshape(out_f, -1, group)


def from_groups(wg: torch.Tensor, in_features: int) -> torch.Tensor:
    """[out, G, group] -> [out, in], dropping the padding of to_groups."""
    return wg.reshape(wg.shape[0], -1)[:, :in_features]


def _asym_params(wg: torch.Tensor, bits: int, scale_dtype: torch.dtype = torch.float32):
    """llm-awq's scale and zero of each group of ``wg`` [..., group] (float32): both [..., 1].

    The scale is rounded to ``scale_dtype`` (what is stored) before the zero and the codes are
    computed from it, so the stored scale is the one the codes were made for."""
    qmax = 2 ** bits - 1
    w_max, w_min = wg.amax(dim=-1, keepdim=True), wg.amin(dim=-1, keepdim=True)
    scale = ((w_max - w_min).clamp(min=WEIGHT_EPS) / qmax).to(scale_dtype).float()
    zero = (-torch.round(w_min / scale)).clamp(0, qmax)
    return scale, zero


def pseudo_quantize_groups(wg: torch.Tensor, bits: int) -> torch.Tensor:
    """llm-awq's ``pseudo_quantize_tensor`` (zero_point=True) on groups ``wg`` [..., group] (float32):
    quantize and dequantize each group, same shape out."""
    scale, zero = _asym_params(wg, bits)
    q = (torch.round(wg / scale) + zero).clamp(0, 2 ** bits - 1)
    return (q - zero) * scale


def pseudo_quantize(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """w [out, in] -> w_hat [out, in] float32, the weight a weight-only kernel sees (float32 scales)."""
    return from_groups(pseudo_quantize_groups(to_groups(w.float(), group), bits), w.shape[1])


def quantize_weight_only(w: torch.Tensor, bits: int, group: int, scale_dtype: torch.dtype = torch.float32):
    """w [out, in] -> (q uint8 [out, in], scales scale_dtype [out, G], zeros uint8 [out, G])."""
    wg = to_groups(w.float(), group)  # [out, G, group]
    scale, zero = _asym_params(wg, bits, scale_dtype)
    q = (torch.round(wg / scale) + zero).clamp(0, 2 ** bits - 1)
    q = from_groups(q, w.shape[1]).to(torch.uint8)
    return q, scale.squeeze(-1).to(scale_dtype), zero.squeeze(-1).to(torch.uint8)


def quantize_w4a8(w: torch.Tensor, group: int):
    """QoQ progressive group quantization of w [out, in].

    Level 1: ``s_c = max|w_row| / 119``, ``w8 = clamp(round(w / s_c), -119, 119)``.
    Level 2, per group of w8: ``s_g = max(round((max - min) / 15), 1)``,
    ``z = clamp(-round(min / s_g), 0, 15)``, ``q = clamp(round(w8 / s_g) + z, 0, 15)``.
    Returns (q uint8 [out, in], group_scales uint8 [out, G], zeros uint8 [out, G], channel_scales float32 [out]).
    """
    w = w.float()
    s_c = w.abs().amax(dim=1).clamp(min=ABS_EPS) / QOQ_INT8_BOUND  # [out]
    w8 = torch.round(w / s_c[:, None]).clamp(-QOQ_INT8_BOUND, QOQ_INT8_BOUND)
    wg = to_groups(w8, group)  # [out, G, group], integer-valued
    g_max, g_min = wg.amax(dim=-1, keepdim=True), wg.amin(dim=-1, keepdim=True)
    s_g = torch.round((g_max - g_min) / 15).clamp(min=1)
    z = (-torch.round(g_min / s_g)).clamp(0, 15)
    q = (torch.round(wg / s_g) + z).clamp(0, 15)
    deq = (q - z) * s_g  # the int8 weight the kernel rebuilds; the protective range keeps it in int8
    assert s_g.max() <= 16 and deq.abs().max() <= INT8_BOUND, "QoQ bound violated"
    q = from_groups(q, w.shape[1]).to(torch.uint8)
    return q, s_g.squeeze(-1).to(torch.uint8), z.squeeze(-1).to(torch.uint8), s_c


def quantize_w8a8(w: torch.Tensor):
    """SmoothQuant's per-channel int8: ``s_c = max|w_row| / 127``, ``w8 = round(w / s_c)``.
    Returns (w8 int8 [out, in], channel_scales float32 [out])."""
    w = w.float()
    s_c = w.abs().amax(dim=1).clamp(min=ABS_EPS) / INT8_BOUND
    w8 = torch.round(w / s_c[:, None]).clamp(-INT8_BOUND, INT8_BOUND).to(torch.int8)
    return w8, s_c


# ------------------------------------------------------------------------------------------------
# NumPy references (what the kernels must compute)

def _np(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu()
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy()
    return np.asarray(t)


def _per_column(a: np.ndarray, in_features: int, group: int) -> np.ndarray:
    """[out, G] -> [out, in]: each column gets its group's value."""
    return a[:, np.arange(in_features) // group]


def dequantize_weight_only(qweight, scales, zeros, group: int = 128) -> np.ndarray:
    """-> float32 [out, in]: ``w[n, k] = float32(q[n, k] - z[n, k//group]) * float32(s[n, k//group])``."""
    q = unpack_int4(_np(qweight)).astype(np.int32)
    in_f = q.shape[1]
    z = _per_column(_np(zeros).astype(np.int32), in_f, group)
    s = _per_column(_np(scales).astype(np.float32), in_f, group)
    return (q - z).astype(np.float32) * s


def reference_weight_only_matmul(x, qweight, scales, zeros, group: int = 128) -> np.ndarray:
    """x [n, in] -> float32 [n, out] = float32(x) @ dequantize_weight_only(...).T"""
    return _np(x).astype(np.float32) @ dequantize_weight_only(qweight, scales, zeros, group).T


def w4a8_weight_int8(qweight, group_scales, zeros, group: int = 128) -> np.ndarray:
    """-> int8 [out, in]: ``w8[n, k] = (q[n, k] - z[n, k//group]) * s_g[n, k//group]``."""
    q = unpack_int4(_np(qweight)).astype(np.int32)
    in_f = q.shape[1]
    z = _per_column(_np(zeros).astype(np.int32), in_f, group)
    s = _per_column(_np(group_scales).astype(np.int32), in_f, group)
    w8 = (q - z) * s
    assert np.abs(w8).max(initial=0) <= INT8_BOUND, "w4a8 weight outside int8: not a QoQ layout"
    return w8.astype(np.int8)


def quantize_activations_per_token(x) -> tuple[np.ndarray, np.ndarray]:
    """Per-token symmetric int8 (SmoothQuant's ``quantize_activation_per_token_absmax``), in float32:
    ``s_x[t] = max(max_k |x[t, k]|, 1e-5) / 127``, ``x8 = clip(rint(x / s_x), -127, 127)`` (round half
    to even). Returns (x8 int8 [n, in], s_x float32 [n])."""
    x = _np(x).astype(np.float32)
    s_x = np.maximum(np.abs(x).max(axis=1), np.float32(ABS_EPS)) / np.float32(INT8_BOUND)
    x8 = np.clip(np.rint(x / s_x[:, None]), -INT8_BOUND, INT8_BOUND).astype(np.int8)
    return x8, s_x.astype(np.float32)


def int8_matmul(x8, w8) -> np.ndarray:
    """int8 [n, in] x int8 [out, in] -> int32 [n, out], exact (int64 accumulation, checked to fit int32)."""
    acc = _np(x8).astype(np.int64) @ _np(w8).astype(np.int64).T
    assert np.abs(acc).max(initial=0) < 2 ** 31, "int32 accumulator overflow"
    return acc.astype(np.int32)


def _int8_epilogue(acc: np.ndarray, s_x: np.ndarray, channel_scales) -> np.ndarray:
    s_c = _np(channel_scales).astype(np.float32)
    return (acc.astype(np.float32) * s_x[:, None]) * s_c[None, :]


def reference_w4a8_matmul(x, qweight, group_scales, zeros, channel_scales, group: int = 128) -> np.ndarray:
    """x [n, in] float -> float32 [n, out]: per-token int8 x, QoQ int8 weight, int32 accumulation,
    ``y = (float32(acc) * s_x[t]) * s_c[n]``."""
    x8, s_x = quantize_activations_per_token(x)
    acc = int8_matmul(x8, w4a8_weight_int8(qweight, group_scales, zeros, group))
    return _int8_epilogue(acc, s_x, channel_scales)


def reference_w8a8_matmul(x, qweight, channel_scales) -> np.ndarray:
    """x [n, in] float -> float32 [n, out]: per-token int8 x, int8 weight, int32 accumulation,
    ``y = (float32(acc) * s_x[t]) * s_c[n]``."""
    x8, s_x = quantize_activations_per_token(x)
    acc = int8_matmul(x8, _np(qweight))
    return _int8_epilogue(acc, s_x, channel_scales)
