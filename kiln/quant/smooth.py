"""Per-input-channel scales folded into the op before a linear, and SmoothQuant smoothing.

Linears ``W_1..W_m`` that read the same input ``x`` compute ``W_i x = (W_i diag(s)) (diag(s)^-1 x)``.
Folding ``s`` multiplies their columns by ``s`` and divides the op that produces ``x`` by ``s``:

- an RMSNorm (``x = h / rms(h) * w_norm``): ``w_norm / s``;
- a linear (``v_proj`` before ``o_proj``; ``up_proj`` before ``down_proj``, whose input is
  ``silu(gate) * up``): its rows and bias ``/ s``.

The float function of the model is unchanged (up to rounding); only what is quantized moves.
AWQ picks ``s`` by a search (awq.py); smoothing (SmoothQuant, used by w8a8 and w4a8) takes
``s_j = max|X_j|^a / max|W_j|^(1-a)`` so that activation outliers move into the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ir.spec import ModelSpec
from .calibration import Calibration

SMOOTH_ALPHA = 0.5  # SmoothQuant's migration strength for Llama-family models


@dataclass(frozen=True)
class ScaleGroup:
    """Linears sharing one input, and the op ``prev`` that produces it (receives ``s^-1``)."""

    prev: str  # a norm weight [in], or a linear [in, *] whose rows are divided
    linears: tuple[str, ...]  # their columns are multiplied by s
    prev_bias: str | None = None  # the bias of a linear ``prev``, if it has one

    def __post_init__(self):
        assert self.linears, "a scale group needs at least one linear"

    @property
    def input(self) -> str:
        """The calibration key of the shared input (the group's first linear)."""
        return self.linears[0]

    @property
    def prev_is_norm(self) -> bool:
        return not self.prev.endswith("_proj")


def scale_groups(spec: ModelSpec, layer: int, *, fc_fc: bool) -> list[ScaleGroup]:
    """The foldable groups of decoder layer ``layer``, in llm-awq's order.

    Always the two norm-fed groups (q/k/v after ``input_norm``, gate/up after
    ``post_attention_norm``); with ``fc_fc`` also v -> o (only without GQA: o's input channels are
    then v's output rows) and up -> down."""
    p = f"layers.{layer}."
    groups = [ScaleGroup(p + "input_norm", (p + "q_proj", p + "k_proj", p + "v_proj"))]
    if fc_fc and spec.num_kv_heads == spec.num_q_heads:
        groups.append(ScaleGroup(p + "v_proj", (p + "o_proj",), p + "v_bias" if spec.attention_bias else None))
    groups.append(ScaleGroup(p + "post_attention_norm", (p + "gate_proj", p + "up_proj")))
    if fc_fc:
        groups.append(ScaleGroup(p + "up_proj", (p + "down_proj",)))
    return groups


def fold_scales(params: dict[str, torch.Tensor], group: ScaleGroup, s: torch.Tensor) -> None:
    """Fold ``s`` [in] into ``group``: replaces the tensors in ``params`` (float32) by new ones;
    the tensors themselves are never modified in place."""
    s = s.float()
    if group.prev_is_norm:
        params[group.prev] = params[group.prev] / s
    else:
        params[group.prev] = params[group.prev] / s[:, None]  # rows of the previous linear
        if group.prev_bias is not None:
            params[group.prev_bias] = params[group.prev_bias] / s
    for name in group.linears:
        params[name] = params[name] * s[None, :]


def smoothquant_scales(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float = SMOOTH_ALPHA) -> torch.Tensor:
    """SmoothQuant's ``s_j = max|X_j|^a / max_i max|W_i[:, j]|^(1-a)`` [in] (both clamped at 1e-5)."""
    w_max = torch.cat([w.float().abs() for w in weights]).amax(dim=0).clamp(min=1e-5)  # [in]
    return (act_max.float().pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)


def smooth_layer(params: dict[str, torch.Tensor], spec: ModelSpec, layer: int, calib: Calibration,
                 alpha: float = SMOOTH_ALPHA) -> dict[str, torch.Tensor]:
    """Smooth the norm-fed groups of ``layer`` (q/k/v, gate/up) in ``params`` (float32, replaced
    in place in the dict). Returns the scales by ``prev`` name."""
    found = {}
    for g in scale_groups(spec, layer, fc_fc=False):
        s = smoothquant_scales(calib.get("max_abs", g.input), [params[n] for n in g.linears], alpha)
        fold_scales(params, g, s)
        found[g.prev] = s
    return found
