"""AWQ (Lin et al., MLSys 2024) as llm-awq implements it: per-layer scale search, then clip search.

For each decoder layer, on the calibration inputs of its linears (``Calibration.samples``, the FP
model's activations):

1. Scale search per group of linears sharing an input (smooth.scale_groups with fc_fc: q/k/v,
   v -> o without GQA, gate/up, up -> down). For ratio a in {0, 0.05, .., 0.95}:
   ``s = mean|x|^a`` (clamped at 1e-4), normalised by ``sqrt(max(s) * min(s))``; the loss is the MSE
   of the group's linear outputs ``x W^T`` against ``x (Q(W diag(s)) diag(s)^-1)^T``. All groups are
   searched on the original weights, then every best ``s`` is folded (smooth.fold_scales).
2. The samples are divided by their group's ``s`` (the inputs the scaled linears now see).
3. Clip search for every linear but q/k ("due to qk bmm, it is hard to clip precisely"): per
   (output channel, group) the max |w| shrinks by i/20 for i in 0..9; the one with the lowest MSE
   of the group's partial dot products over the samples is kept and the weight clamped to it.

The result is a float model (same function up to the clipping) that is then quantized with plain
round-to-nearest (formats.quantize_weight_only). Differences from llm-awq, all deliberate: the loss
of the q/k/v and gate/up groups is their linear outputs (llm-awq uses the whole attention / MLP
block output); the v -> o condition is ``num_kv_heads == num_q_heads`` (llm-awq compares the two
weight shapes, which also requires ``num_q_heads * head_dim == hidden_size``).
"""

from __future__ import annotations

import torch

from ..ir.spec import ModelSpec
from .calibration import Calibration
from .formats import from_groups, num_groups, pseudo_quantize, pseudo_quantize_groups, to_groups
from .smooth import fold_scales, scale_groups

N_GRID = 20
MAX_SHRINK = 0.5
CLIP_OC_BATCH = 256  # output channels per clip-search batch (bounds memory at T * G * 256 floats)


@torch.no_grad()
def search_scale(w: torch.Tensor, x: torch.Tensor, x_mean: torch.Tensor, bits: int, group: int,
                 n_grid: int = N_GRID) -> torch.Tensor:
    """The AWQ scale [in] of linears ``w`` [out, in] (concatenated along out) fed by ``x`` [T, in]
    whose per-channel mean |x| over all calibration tokens is ``x_mean`` [in]."""
    w, x, x_mean = w.float(), x.float(), x_mean.float()
    assert w.shape[1] == x.shape[1] == x_mean.shape[0], (w.shape, x.shape, x_mean.shape)
    best_loss, best_s = float("inf"), None
    for i in range(n_grid):
        s = x_mean.pow(i / n_grid).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        w_hat = pseudo_quantize(w * s, bits, group) / s
        loss = (x @ (w_hat - w).T).pow(2).mean().item()  # output error, [T, out]
        if loss < best_loss:
            best_loss, best_s = loss, s
    assert best_s is not None and not best_s.isnan().any(), "AWQ scale search found no finite loss"
    return best_s


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, bits: int, group: int, n_grid: int = N_GRID,
                max_shrink: float = MAX_SHRINK) -> torch.Tensor:
    """The best clip value per (output channel, group) of ``w`` [out, in] on inputs ``x`` [T, in]:
    -> max_val [out, G]."""
    w, x = w.float(), x.float()
    in_f = w.shape[1]
    pad = num_groups(in_f, group) * group - in_f
    xg = torch.nn.functional.pad(x, (0, pad)).reshape(x.shape[0], -1, group)  # [T, G, g], zeros padded
    wg_all = to_groups(w, group)  # [out, G, g]; padded columns meet zero inputs
    best_all = []
    for start in range(0, w.shape[0], CLIP_OC_BATCH):
        wg = wg_all[start:start + CLIP_OC_BATCH]
        org_max = wg.abs().amax(dim=-1, keepdim=True)  # [ob, G, 1]
        best = org_max.clone()
        min_err = torch.full_like(org_max, float("inf"))
        for i in range(int(max_shrink * n_grid)):
            max_val = org_max * (1 - i / n_grid)
            q = pseudo_quantize_groups(torch.clamp(wg, -max_val, max_val), bits)
            # error of each group's partial dot products: [ob, T, G] -> mean over tokens
            err = torch.einsum("tgk,ogk->otg", xg, q - wg).pow(2).mean(dim=1)[..., None]
            better = err < min_err
            min_err = torch.where(better, err, min_err)
            best = torch.where(better, max_val, best)
        best_all.append(best.squeeze(-1))
    return torch.cat(best_all)


def apply_clip(w: torch.Tensor, max_val: torch.Tensor, group: int) -> torch.Tensor:
    """Clamp ``w`` [out, in] to +-max_val [out, G] per group; a new tensor."""
    mv = max_val[..., None]
    return from_groups(torch.clamp(to_groups(w, group), -mv, mv), w.shape[1])


@torch.no_grad()
def awq_layer(params: dict[str, torch.Tensor], spec: ModelSpec, layer: int, calib: Calibration,
              bits: int, group: int) -> dict[str, torch.Tensor]:
    """Run AWQ on decoder layer ``layer`` of ``params`` (float32; tensors are replaced in the dict,
    never modified in place): fold the searched scales, clip the weights. Returns the scales by the
    name of the op that received ``s^-1``."""
    groups = scale_groups(spec, layer, fc_fc=True)
    samples = {g.input: calib.get("samples", g.input).float() for g in groups}
    scales = {}
    for g in groups:  # every search sees the original weights, as in llm-awq
        w = torch.cat([params[n] for n in g.linears])
        scales[g.prev] = search_scale(w, samples[g.input], calib.get("mean_abs", g.input), bits, group)
    inputs = {}  # linear -> the samples its scaled weight sees
    for g in groups:
        fold_scales(params, g, scales[g.prev])
        for n in g.linears:
            inputs[n] = samples[g.input] / scales[g.prev]
    p = f"layers.{layer}."
    for proj in ("v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):  # q/k are not clipped
        name = p + proj
        x = inputs[name] if name in inputs else calib.get("samples", name).float()
        params[name] = apply_clip(params[name], search_clip(params[name], x, bits, group), group)
    return scales
