"""AutoAWQ "GEMM" checkpoints (the format HF, vLLM and MLC-LLM call "awq") <-> kiln's weight-only layout.

AutoAWQ (``awq/modules/linear/gemm.py`` WQLinear_GEMM, ``awq/utils/packing_utils.py``) stores a
linear with ``in`` inputs and ``out`` outputs, quantized per group of ``g`` inputs, as::

    qweight  int32    [in, out/8]     4-bit codes, packed along OUT
    qzeros   int32    [in/g, out/8]   4-bit zeros, packed along OUT
    scales   float16  [in/g, out]
    w[k, n] = (q[k, n] - z[k//g, n]) * s[k//g, n]      (w is the transpose of HF's [out, in])

Nibble ``i`` (bits ``4i .. 4i+3``) of word ``j`` holds column ``8j + AWQ_ORDER[i]`` with
``AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]``; unpacking applies its inverse ``[0, 4, 1, 5, 2, 6, 3, 7]``
(AutoAWQ's ``AWQ_REVERSE_ORDER``). The checkpoint's quant_config reads
``{"quant_method": "awq", "zero_point": true, "q_group_size" or "group_size": 128, "w_bit" or "bits": 4,
"version": "gemm"}``. kiln's layout (formats.py) is the same numbers in ``[out, in]`` order with
plain nibble order and uint8 zeros. ``from_autoawq`` turns a whole imported checkpoint (frontend/hf.py
reads the stored tensors) into kiln's ``awq-w4g128`` params: ``kiln compile AWQ_DIR`` needs no calibration.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import CheckpointError
from ..ir.spec import ModelSpec
from .formats import pack_int4, unpack_int4

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = tuple(int(i) for i in np.argsort(AWQ_ORDER))  # (0, 4, 1, 5, 2, 6, 3, 7)


def _pack_along_cols(v: torch.Tensor) -> torch.Tensor:
    """[rows, cols] values < 16 -> int32 [rows, cols/8] in AutoAWQ's nibble order."""
    rows, cols = v.shape
    return pack_int4(v.reshape(rows, cols // 8, 8)[:, :, list(AWQ_ORDER)].reshape(rows, cols))


def _unpack_along_cols(p: torch.Tensor) -> torch.Tensor:
    """int32 [rows, cols/8] in AutoAWQ's nibble order -> uint8 [rows, cols]."""
    u = unpack_int4(p)
    rows, cols = u.shape
    return u.reshape(rows, cols // 8, 8)[:, :, list(AWQ_REVERSE_ORDER)].reshape(rows, cols)


def unpack_autoawq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor):
    """AutoAWQ GEMM tensors -> (q uint8 [out, in], zeros uint8 [out, in/g], scales [out, in/g] in the
    checkpoint's dtype)."""
    in_f, packed_out = qweight.shape
    n_groups, out_f = scales.shape
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise CheckpointError(f"AutoAWQ qweight/qzeros must be int32, got {qweight.dtype}/{qzeros.dtype}")
    if packed_out * 8 != out_f or tuple(qzeros.shape) != (n_groups, packed_out) or in_f % n_groups:
        raise CheckpointError(f"inconsistent AutoAWQ GEMM shapes: qweight {tuple(qweight.shape)}, qzeros "
                              f"{tuple(qzeros.shape)}, scales {tuple(scales.shape)} (want [in, out/8], "
                              f"[in/g, out/8], [in/g, out])")
    q = _unpack_along_cols(qweight).T.contiguous()  # [out, in]
    zeros = _unpack_along_cols(qzeros).T.contiguous()  # [out, in/g]
    return q, zeros, scales.T.contiguous()


def pack_autoawq(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor):
    """The inverse of unpack_autoawq: (q [out, in], zeros [out, in/g], scales [out, in/g]) ->
    (qweight int32 [in, out/8], qzeros int32 [in/g, out/8], scales float16 [in/g, out])."""
    out_f, in_f = q.shape
    assert out_f % 8 == 0 and zeros.shape == scales.shape and zeros.shape[0] == out_f and in_f % zeros.shape[1] == 0
    return (_pack_along_cols(q.T.contiguous()), _pack_along_cols(zeros.T.contiguous()),
            scales.T.to(torch.float16).contiguous())


def to_kiln(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float16,
            group_size: int = 128) -> dict[str, torch.Tensor]:
    """One AutoAWQ GEMM linear -> kiln's weight-only tensors by suffix: ``qweight`` int32 [out, in/8],
    ``scales`` ``dtype`` [out, in/128], ``zeros`` uint8 [out, in/128] (formats.py)."""
    q, zeros, s = unpack_autoawq(qweight, qzeros, scales)
    in_f, n_groups = q.shape[1], s.shape[1]
    if in_f != n_groups * group_size:
        raise CheckpointError(f"the AutoAWQ checkpoint has groups of {in_f // n_groups} inputs; kiln's weight-only "
                              f"layout uses {group_size}: re-quantize with q_group_size={group_size}")
    return {"qweight": pack_int4(q), "scales": s.to(dtype), "zeros": zeros}


def from_autoawq(params: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """An imported AutoAWQ GEMM checkpoint -> kiln's ``awq-w4g128`` params, with no calibration.

    ``params`` (frontend ``import_hf`` of the checkpoint) holds each decoder linear ``NAME`` as its stored
    ``NAME.qweight`` / ``NAME.qzeros`` / ``NAME.scales`` and everything else in the model dtype; the result
    holds ``NAME.qweight`` / ``NAME.scales`` / ``NAME.zeros`` (formats.py, scales in the model dtype) in
    their place and everything else unchanged, in order — what ``quantize_params(.., "awq-w4g128", ..)``
    returns for a float model. Nothing is folded: AutoAWQ already folded its scales into the norms."""
    from .calibration import linear_shapes

    shapes = linear_shapes(spec)
    dtype = getattr(torch, spec.dtype)
    out: dict[str, torch.Tensor] = {}
    for key, t in params.items():
        if key in shapes:
            raise CheckpointError(f"{key} is not quantized in the AutoAWQ checkpoint (modules_to_not_convert?); "
                                  f"kiln's awq-w4g128 needs every decoder linear quantized")
        name, _, suffix = key.rpartition(".")
        if name not in shapes:
            out[key] = t
            continue
        if suffix != "qweight":
            continue  # qzeros and scales are read with their qweight
        try:
            packed = to_kiln(t, params[f"{name}.qzeros"], params[f"{name}.scales"], dtype)
        except CheckpointError as e:
            raise CheckpointError(f"{name}: {e}") from None
        out_f, in_f = shapes[name]
        if tuple(packed["qweight"].shape) != (out_f, in_f // 8):
            got_out, got_in = packed["qweight"].shape[0], packed["qweight"].shape[1] * 8
            raise CheckpointError(f"{name}: the AutoAWQ tensors hold a [{got_out}, {got_in}] weight, config.json "
                                  f"implies [{out_f}, {in_f}]")
        out.update({f"{name}.{suf}": packed[suf] for suf in ("qweight", "scales", "zeros")})
    return out
