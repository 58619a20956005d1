"""Packed layouts (kiln/quant/formats.py): packing, llm-awq's quantizer, QoQ w4a8 and w8a8 references."""

import numpy as np
import pytest
import torch

from kiln.quant import formats
from kiln.quant.formats import (dequantize_weight_only, int8_matmul, pack_int4, quantize_activations_per_token,
                                quantize_w4a8, quantize_w8a8, quantize_weight_only, reference_w4a8_matmul,
                                reference_w8a8_matmul, unpack_int4, w4a8_weight_int8)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def weights(out_f, in_f, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, in_f, generator=g) * (0.5 + torch.rand(out_f, 1, generator=g))


def llm_awq_pseudo_quantize(w, n_bit, q_group_size):
    """llm-awq ``pseudo_quantize_tensor`` (zero_point=True), written out as in awq/quantize/quantizer.py;
    a short last group is handled by quantizing it on its own."""
    out = torch.empty_like(w)
    for start in range(0, w.shape[1], q_group_size):
        g = w[:, start:start + q_group_size]
        max_val, min_val = g.amax(dim=1, keepdim=True), g.amin(dim=1, keepdim=True)
        max_int, min_int = 2 ** n_bit - 1, 0
        scales = (max_val - min_val).clamp(min=1e-5) / max_int
        zeros = (-torch.round(min_val / scales)).clamp_(min_int, max_int)
        q = torch.clamp(torch.round(g / scales) + zeros, min_int, max_int)
        out[:, start:start + q_group_size] = (q - zeros) * scales
    return out


def test_pack_int4_layout_and_round_trip():
    q = np.zeros((2, 16), np.uint8)
    q[0, :8] = np.arange(8)
    q[1, 8:] = 15
    p = pack_int4(q)
    assert p.dtype == np.int32 and p.shape == (2, 2)
    assert p[0, 0] == 0x76543210 and p[0, 1] == 0  # column k in bits 4*(k%8) of word k//8
    assert p[1, 1] == np.uint32(0xFFFFFFFF).view(np.int32) == -1
    g = torch.Generator().manual_seed(1)
    qt = torch.randint(0, 16, (48, 688), generator=g, dtype=torch.uint8)
    pt = pack_int4(qt)
    assert pt.dtype == torch.int32 and pt.shape == (48, 86)
    assert torch.equal(unpack_int4(pt), qt)
    assert np.array_equal(unpack_int4(pack_int4(qt.numpy())), qt.numpy())


def test_pack_int4_rejects_bad_input():
    with pytest.raises(AssertionError):
        pack_int4(np.full((2, 8), 16, np.uint8))
    with pytest.raises(AssertionError):
        pack_int4(np.zeros((2, 12), np.uint8))


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("in_f", [256, 688])  # 688: a short last group (the demo model's down_proj)
def test_rtn_equals_llm_awq(bits, in_f):
    w = weights(64, in_f)
    w[3, 5] = 9.0  # an outlier
    w[7, :] = 0.25  # a flat row: max == min
    expect = llm_awq_pseudo_quantize(w, bits, 128)
    assert torch.equal(formats.pseudo_quantize(w, bits, 128), expect)
    q, scales, zeros = quantize_weight_only(w, bits, 128)
    G = -(-in_f // 128)
    assert q.dtype == torch.uint8 and q.shape == (64, in_f) and int(q.max()) < 2 ** bits
    assert scales.dtype == torch.float32 and scales.shape == (64, G)
    assert zeros.dtype == torch.uint8 and zeros.shape == (64, G) and int(zeros.max()) < 2 ** bits
    deq = dequantize_weight_only(pack_int4(q), scales, zeros, 128)
    assert deq.dtype == np.float32 and np.array_equal(deq, expect.numpy())


def test_weight_only_scales_in_half_precision():
    w = weights(32, 256)
    q, scales, zeros = quantize_weight_only(w, 4, 128, scale_dtype=torch.float16)
    assert scales.dtype == torch.float16
    deq = dequantize_weight_only(pack_int4(q), scales, zeros, 128)
    # the codes were made for the stored (rounded) scale: error at most half a step (+ fp16 rounding)
    step = scales.float().repeat_interleave(128, dim=1).numpy()
    assert (np.abs(deq - w.numpy()) <= 0.5 * step * (1 + 1e-3)).all()


@pytest.mark.parametrize("in_f", [256, 688])
def test_w4a8_progressive_bounds(in_f):
    w = weights(96, in_f, seed=2)
    w[0, 0] = 20.0  # an outlier that sets the channel scale
    w[1] = w[1].abs()  # all-positive row: groups with min > 0
    w[2, :128] = 0.0  # an all-zero group
    q, gs, z, sc = quantize_w4a8(w, 128)
    G = -(-in_f // 128)
    assert q.dtype == gs.dtype == z.dtype == torch.uint8 and sc.dtype == torch.float32
    assert q.shape == (96, in_f) and gs.shape == z.shape == (96, G) and sc.shape == (96,)
    assert int(q.max()) <= 15 and int(z.max()) <= 15 and 1 <= int(gs.min()) and int(gs.max()) <= 16
    # QServe's byte-lane arithmetic: q * s_g fits a uint8, -z * s_g fits an int8
    assert int((q.int() * gs.int().repeat_interleave(128, 1)[:, :in_f]).max()) <= 255
    assert int((-(z.int() * gs.int())).min()) >= -128
    w8 = w4a8_weight_int8(pack_int4(q), gs, z, 128)
    assert w8.dtype == np.int8 and np.abs(w8.astype(np.int32)).max() <= 127
    # level 1 is int8 with the protective range, level 2 re-quantizes it: close to w / s_c
    s_c = w.abs().amax(1) / 119
    assert torch.allclose(sc, s_c)
    lvl1 = torch.round(w / s_c[:, None])
    assert lvl1.abs().max() <= 119
    err = (torch.from_numpy(w8).float() - lvl1).abs()
    assert (err <= gs.float().repeat_interleave(128, 1)[:, :in_f] / 2 + 1e-6).float().mean() > 0.99


def test_w4a8_matmul_reference_is_integer_exact():
    g = torch.Generator().manual_seed(3)
    w = weights(80, 384, seed=3)
    x = torch.randn(7, 384, generator=g) * 3
    x[2] = 0.0  # an all-zero token
    q, gs, z, sc = quantize_w4a8(w, 128)
    qweight = pack_int4(q)
    y = reference_w4a8_matmul(x, qweight, gs, z, sc, 128)
    assert y.dtype == np.float32 and y.shape == (7, 80)
    x8, s_x = quantize_activations_per_token(x)
    w8 = w4a8_weight_int8(qweight, gs, z, 128)
    acc = int8_matmul(x8, w8)
    # the integer part equals a float64 computation of the same products (exact below 2**53)
    assert acc.dtype == np.int32
    assert np.array_equal(acc.astype(np.float64), x8.astype(np.float64) @ w8.astype(np.float64).T)
    assert np.array_equal(y, (acc.astype(np.float32) * s_x[:, None]) * sc.numpy()[None, :])
    assert (y[2] == 0).all()
    # and the whole thing approximates the float linear
    ref = x.numpy() @ w.numpy().T
    assert np.abs(y - ref).max() < 0.05 * np.abs(ref).max()


def test_activation_quantization():
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [254.0, 1.0, -127.0]])
    x8, s_x = quantize_activations_per_token(x)
    assert x8.dtype == np.int8 and s_x.dtype == np.float32
    assert np.allclose(s_x, [2 / 127, 1e-5 / 127, 2.0])
    assert x8[0].tolist() == [64, -127, 32] and x8[1].tolist() == [0, 0, 0]
    assert x8[2].tolist() == [127, 0, -64]  # 0.5 and -63.5 round half to even


def test_w8a8_reference():
    g = torch.Generator().manual_seed(4)
    w = weights(64, 200, seed=4)
    x = torch.randn(5, 200, generator=g)
    w8, sc = quantize_w8a8(w)
    assert w8.dtype == torch.int8 and w8.shape == (64, 200) and sc.shape == (64,) and sc.dtype == torch.float32
    assert int(w8.abs().max()) == 127 and torch.allclose(sc, w.abs().amax(1) / 127)
    assert ((w8.float() * sc[:, None] - w).abs() <= sc[:, None] / 2 + 1e-6).all()
    y = reference_w8a8_matmul(x, w8, sc)
    x8, s_x = quantize_activations_per_token(x)
    acc = int8_matmul(x8, w8)
    assert np.array_equal(acc.astype(np.float64), x8.astype(np.float64) @ w8.numpy().astype(np.float64).T)
    assert np.array_equal(y, (acc.astype(np.float32) * s_x[:, None]) * sc.numpy()[None, :])
    ref = x.numpy() @ w.numpy().T
    assert np.abs(y - ref).max() < 0.02 * np.abs(ref).max()
