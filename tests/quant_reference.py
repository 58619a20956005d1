"""The numerical truth for a quantized artifact: transformers running the same checkpoint with every
quantized linear replaced by what kiln's scheme makes of it.

* weight-only schemes (rtn/awq): each quantized weight replaced by its dequantized value
  (kiln/quant/schemes.py ``dequantize_linear``);
* w4a8 / w8a8: each quantized linear an ``Int8Linear`` — the kernels' own arithmetic, activations rounded
  to int8 per token — plus the linear's bias, added after the product as kiln adds it;
* every other parameter the scheme changed (norms and biases that received AWQ or smoothing scales) copied
  from the artifact's params, found through the architecture's weight table (kiln/frontend/registry.py).

Any architecture of the registry, so the compile matrix (tests/quant/test_quant_matrix.py) and the demo
model's tests share it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class Int8Linear(torch.nn.Module):
    """w4a8/w8a8's arithmetic in torch (kiln/quant/formats.py, reference_w8a8_matmul): ``x`` [..., in] float32
    is quantized per token (``s_x = max(max|x|, 1e-5) / 127``, ``x8 = clamp(rint(x / s_x), +-127)``, half to
    even), the integer sums are exact (float64 holds them), ``y = (float32(acc) * s_x) * s_c (+ bias)``."""

    def __init__(self, w8: torch.Tensor, channel_scales: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.w8 = w8.to(torch.float64)  # [out, in], integers in [-127, 127]
        self.s_c = channel_scales.float()  # [out]
        self.bias = None if bias is None else bias.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s_x = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5) / 127  # [..., 1] float32
        x8 = torch.round(x / s_x).clamp(-127, 127)  # torch.round: half to even, like np.rint and nearbyint
        acc = x8.to(torch.float64) @ self.w8.T  # exact: |acc| < 127 * 127 * in << 2^53
        y = (acc.float() * s_x) * self.s_c
        return y if self.bias is None else y + self.bias


def _hf_names(architecture: str, num_layers: int) -> dict[str, str]:
    """kiln parameter name -> transformers state-dict name, every layer."""
    from kiln.frontend.registry import ARCHITECTURES

    out = {}
    for k, hf in ARCHITECTURES[architecture].weights.items():
        for i in range(num_layers) if "{i}" in k else [0]:
            out[k.replace("{i}", str(i))] = hf.replace("{i}", str(i))
    return out


def hf_quantized_model(model_dir: Path, qparams: dict, spec, scheme: str, int8_activations: bool = False):
    """transformers' model of ``model_dir`` (float32) with ``qparams`` (kiln's params of the scheme, per linear:
    conftest.unfuse_params splits an artifact's merges) in place of its weights: see the module doc."""
    from transformers import AutoModelForCausalLM

    from kiln.quant import formats
    from kiln.quant.schemes import dequantize_linear, get_scheme, quantized_linears

    sch = get_scheme(scheme)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sd, modules = model.state_dict(), dict(model.named_modules())
    names = _hf_names(spec.architecture, spec.num_layers)
    linears = set(quantized_linears(spec))
    with torch.no_grad():
        for name, t in qparams.items():  # unpacked params, some with folded scales (norms, v bias)
            if name in names and names[name] in sd and name not in linears:
                sd[names[name]].copy_(t.float())
        for name in linears:
            module_name = names[name].removesuffix(".weight")
            lin = modules[module_name]
            if not int8_activations:
                lin.weight.copy_(dequantize_linear(qparams, name, sch))
                continue
            if sch.kind == "w4a8":
                w8 = torch.from_numpy(formats.w4a8_weight_int8(
                    qparams[f"{name}.qweight"], qparams[f"{name}.group_scales"], qparams[f"{name}.zeros"],
                    sch.group_size))
            else:
                w8 = qparams[f"{name}.qweight"]
            parent, _, attr = module_name.rpartition(".")
            setattr(modules[parent], attr, Int8Linear(w8, qparams[f"{name}.channel_scales"], lin.bias))
    return model


def hf_quantized_logits(model_dir: Path, qparams: dict, spec, scheme: str, ids: list[int],
                        int8_activations: bool = False) -> np.ndarray:
    """``hf_quantized_model``'s logits [len(ids), V] for one sequence ``ids``."""
    model = hf_quantized_model(model_dir, qparams, spec, scheme, int8_activations)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()
