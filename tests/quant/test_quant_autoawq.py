"""AutoAWQ GEMM checkpoints (kiln/quant/autoawq.py) against AutoAWQ's own packing, written out."""

import numpy as np
import pytest
import torch

from kiln.errors import CheckpointError
from kiln.quant.autoawq import AWQ_REVERSE_ORDER, pack_autoawq, to_kiln, unpack_autoawq
from kiln.quant.formats import dequantize_weight_only, quantize_weight_only


def autoawq_from_linear(intweight_out_in, zeros_out_g, scales_out_g):
    """AutoAWQ ``WQLinear_GEMM.from_linear``'s packing loops (awq/modules/linear/gemm.py), verbatim in
    structure: qweight [in, out/8], qzeros [in/g, out/8], scales [in/g, out]."""
    intweight = intweight_out_in.t().contiguous().to(torch.int32)  # [in, out]
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    qweight = torch.zeros((intweight.shape[0], intweight.shape[1] // 8), dtype=torch.int32)
    for col in range(intweight.shape[1] // 8):
        for i in range(8):
            qweight[:, col] |= intweight[:, col * 8 + order_map[i]] << (i * 4)
    zeros = zeros_out_g.t().contiguous().to(torch.int32)  # [in/g, out]
    qzeros = torch.zeros((zeros.shape[0], zeros.shape[1] // 8), dtype=torch.int32)
    for col in range(zeros.shape[1] // 8):
        for i in range(8):
            qzeros[:, col] |= zeros[:, col * 8 + order_map[i]] << (i * 4)
    return qweight, qzeros, scales_out_g.t().contiguous().half()


def autoawq_dequantize_gemm(qweight, qzeros, scales, group_size):
    """AutoAWQ ``dequantize_gemm`` (awq/utils/packing_utils.py): -> [in, out]."""
    shifts = torch.arange(0, 32, 4)
    iweights = torch.bitwise_right_shift(qweight[:, :, None], shifts[None, None, :]).to(torch.int8)
    iweights = iweights.view(iweights.shape[0], -1)
    izeros = torch.bitwise_right_shift(qzeros[:, :, None], shifts[None, None, :]).to(torch.int8)
    izeros = izeros.view(izeros.shape[0], -1)
    order = torch.arange(izeros.shape[-1]).view(-1, 8)[:, [0, 4, 1, 5, 2, 6, 3, 7]].view(-1)
    iweights, izeros = iweights[:, order] & 15, izeros[:, order] & 15
    return (iweights - izeros.repeat_interleave(group_size, dim=0)) * scales.repeat_interleave(group_size, dim=0)


def quantized_linear(out_f=64, in_f=384, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    q, scales, zeros = quantize_weight_only(w, 4, 128, scale_dtype=torch.float16)
    return q, zeros, scales


def test_reverse_order():
    assert AWQ_REVERSE_ORDER == (0, 4, 1, 5, 2, 6, 3, 7)


def test_pack_matches_autoawq_and_round_trips():
    q, zeros, scales = quantized_linear()
    qweight, qzeros, s = pack_autoawq(q, zeros, scales)
    ref_qweight, ref_qzeros, ref_s = autoawq_from_linear(q, zeros, scales)
    assert qweight.dtype == torch.int32 and qweight.shape == (384, 8) and qzeros.shape == (3, 8)
    assert s.dtype == torch.float16 and s.shape == (3, 64)
    assert torch.equal(qweight, ref_qweight) and torch.equal(qzeros, ref_qzeros) and torch.equal(s, ref_s)
    q2, zeros2, scales2 = unpack_autoawq(qweight, qzeros, s)
    assert torch.equal(q2, q) and torch.equal(zeros2, zeros) and torch.equal(scales2, scales)


def test_to_kiln_dequantizes_like_autoawq():
    q, zeros, scales = quantized_linear(seed=1)
    qweight, qzeros, s = autoawq_from_linear(q, zeros, scales)  # a checkpoint written by AutoAWQ
    kiln = to_kiln(qweight, qzeros, s, dtype=torch.float16)
    assert set(kiln) == {"qweight", "scales", "zeros"}
    assert kiln["qweight"].dtype == torch.int32 and kiln["qweight"].shape == (64, 48)
    assert kiln["scales"].dtype == torch.float16 and kiln["scales"].shape == (64, 3)
    assert kiln["zeros"].dtype == torch.uint8 and kiln["zeros"].shape == (64, 3)
    ours = dequantize_weight_only(kiln["qweight"], kiln["scales"], kiln["zeros"], 128)  # [out, in]
    theirs = autoawq_dequantize_gemm(qweight, qzeros, s, 128).float().T.numpy()  # fp16 product, [out, in]
    assert np.allclose(ours, theirs, rtol=1e-3, atol=1e-3)
    assert np.array_equal(ours.astype(np.float16), theirs.astype(np.float16))


def test_to_kiln_rejects_other_group_sizes_and_bad_shapes():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(16, 256, generator=g)
    q, scales, zeros = quantize_weight_only(w, 4, 64)
    qweight, qzeros, s = pack_autoawq(q, zeros, scales)
    with pytest.raises(CheckpointError, match="groups of 64"):
        to_kiln(qweight, qzeros, s)
    with pytest.raises(CheckpointError, match="inconsistent"):
        unpack_autoawq(qweight, qzeros[:, :1], s)
