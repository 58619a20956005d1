"""Scale folding, SmoothQuant smoothing and AWQ (kiln/quant/smooth.py, awq.py) on random data."""

import pytest
import torch

from kiln.ir.spec import ModelSpec
from kiln.quant.awq import apply_clip, awq_layer, search_clip, search_scale
from kiln.quant.formats import pseudo_quantize
from kiln.quant.calibration import Calibration
from kiln.quant.smooth import fold_scales, scale_groups, smooth_layer, smoothquant_scales


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def spec(num_kv_heads=4, bias=False):
    return ModelSpec("LlamaForCausalLM", vocab_size=64, hidden_size=128, intermediate_size=200, num_layers=1,
                     num_q_heads=4, num_kv_heads=num_kv_heads, head_dim=32, rms_norm_eps=1e-5, context_len=64,
                     attention_bias=bias)


def layer_params(s: ModelSpec, seed=0):
    g = torch.Generator().manual_seed(seed)
    H, I, qd, kvd = s.hidden_size, s.intermediate_size, s.num_q_heads * s.head_dim, s.num_kv_heads * s.head_dim
    shapes = {"q_proj": (qd, H), "k_proj": (kvd, H), "v_proj": (kvd, H), "o_proj": (H, qd),
              "gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
    p = {f"layers.0.{k}": torch.randn(*v, generator=g) * 0.1 for k, v in shapes.items()}
    p["layers.0.input_norm"] = 1 + 0.1 * torch.randn(H, generator=g)
    p["layers.0.post_attention_norm"] = 1 + 0.1 * torch.randn(H, generator=g)
    if s.attention_bias:
        for k, n in (("q_bias", qd), ("k_bias", kvd), ("v_bias", kvd)):
            p[f"layers.0.{k}"] = torch.randn(n, generator=g)
    return p


def outlier_inputs(n, in_f, seed=0, num_outliers=4, gain=30.0):
    """Activations whose first channels are much larger than the rest, as in real LLMs."""
    g = torch.Generator().manual_seed(seed)
    scale = 0.5 + torch.rand(in_f, generator=g)
    scale[:num_outliers] *= gain
    return torch.randn(n, in_f, generator=g) * scale


def layer_outputs(p, s: ModelSpec, h, attn, eps=1e-5):
    """Every linear output of one layer for the residual ``h`` [n, H]. o_proj reads ``attn @ v``
    (``attn`` [n, n], fixed mixing weights: attention is linear in v), so folding into v's rows shows."""
    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * p[w]
    pre = "layers.0."
    x1 = norm(h, pre + "input_norm")
    out = {n: x1 @ p[pre + n].T + p.get(pre + n.replace("proj", "bias"), 0) for n in ("q_proj", "k_proj", "v_proj")}
    x2 = norm(h, pre + "post_attention_norm")
    gate, up = x2 @ p[pre + "gate_proj"].T, x2 @ p[pre + "up_proj"].T
    out["down_proj"] = (torch.nn.functional.silu(gate) * up) @ p[pre + "down_proj"].T
    out["gate_proj"], out["up_proj"] = gate, up
    if s.num_kv_heads == s.num_q_heads:  # attention is linear in v per head: o(attn(v)) with fixed weights
        out["o_proj"] = (attn @ out["v_proj"]) @ p[pre + "o_proj"].T
    return out


@pytest.mark.parametrize("bias", [False, True])
def test_fold_scales_keeps_the_function(bias):
    s = spec(num_kv_heads=4, bias=bias)  # no GQA: the v -> o group exists
    p = layer_params(s)
    g = torch.Generator().manual_seed(1)
    h = torch.randn(16, s.hidden_size, generator=g)
    attn = torch.rand(16, 16, generator=g).softmax(-1)  # mixes tokens, like attention
    before = layer_outputs(p, s, h, attn)
    groups = scale_groups(s, 0, fc_fc=True)
    assert [gr.prev.split(".")[-1] for gr in groups] == ["input_norm", "v_proj", "post_attention_norm", "up_proj"]
    folded = dict(p)
    for gr in groups:
        in_f = folded[gr.linears[0]].shape[1]
        fold_scales(folded, gr, 0.1 + 3 * torch.rand(in_f, generator=g))
    after = layer_outputs(folded, s, h, attn)
    for name in ("q_proj", "k_proj", "gate_proj", "down_proj", "o_proj"):
        assert torch.allclose(after[name], before[name], rtol=1e-4, atol=1e-4), name
    # v and up are scaled by design (their s^-1 is undone by o and down)
    assert not torch.allclose(after["v_proj"], before["v_proj"])
    for k in p:  # inputs are never modified in place
        assert torch.equal(p[k], layer_params(s)[k])


def test_gqa_has_no_v_o_group():
    assert [gr.prev.split(".")[-1] for gr in scale_groups(spec(num_kv_heads=2), 0, fc_fc=True)] == \
        ["input_norm", "post_attention_norm", "up_proj"]
    assert [gr.prev.split(".")[-1] for gr in scale_groups(spec(), 0, fc_fc=False)] == \
        ["input_norm", "post_attention_norm"]


def test_smoothing_moves_outliers_into_the_weights():
    s = spec(num_kv_heads=2)
    p = layer_params(s)
    x = outlier_inputs(64, s.hidden_size)
    act_max = x.abs().amax(0)
    calib = Calibration(mean_abs={}, max_abs={"layers.0.q_proj": act_max, "layers.0.gate_proj": act_max}, samples={})
    sm = dict(p)
    scales = smooth_layer(sm, s, 0, calib, alpha=0.5)
    assert set(scales) == {"layers.0.input_norm", "layers.0.post_attention_norm"}
    sq = scales["layers.0.input_norm"]
    qkv = [p[f"layers.0.{n}"] for n in ("q_proj", "k_proj", "v_proj")]
    expect = act_max.pow(0.5) / torch.cat(qkv).abs().amax(0).pow(0.5)
    assert torch.allclose(sq, expect) and torch.equal(sq, smoothquant_scales(act_max, qkv))
    # the smoothed input is flatter, the product unchanged
    xs = x / sq
    assert (xs.abs().amax(0).max() / xs.abs().amax(0).min()) < (act_max.max() / act_max.min()) / 4
    assert torch.allclose(xs @ sm["layers.0.q_proj"].T, x @ p["layers.0.q_proj"].T, rtol=1e-4, atol=1e-3)
    assert torch.allclose(sm["layers.0.input_norm"] * sq, p["layers.0.input_norm"])


@pytest.mark.parametrize("bits", [4, 3])
def test_awq_beats_rtn_on_outlier_channels(bits):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(192, 512, generator=g) * 0.05
    x = outlier_inputs(512, 512, seed=6)
    s = search_scale(w, x, x.abs().mean(0), bits, 128)
    assert s.shape == (512,) and (s > 0).all()
    rtn = (x @ (pseudo_quantize(w, bits, 128) - w).T).pow(2).mean()
    awq_w = pseudo_quantize(w * s, bits, 128) / s
    awq = (x @ (awq_w - w).T).pow(2).mean()
    assert awq < 0.7 * rtn, (bits, awq.item(), rtn.item())
    # clipping the scaled weight on the scaled inputs lowers the error further
    ws, xs = w * s, x / s
    clipped = apply_clip(ws, search_clip(ws, xs, bits, 128), 128)
    clip = (xs @ (pseudo_quantize(clipped, bits, 128) - ws).T).pow(2).mean()
    assert clip <= awq * 1.0001


def test_search_clip_shapes_and_range():
    g = torch.Generator().manual_seed(7)
    w = torch.randn(300, 200, generator=g)  # 300 rows: two output-channel batches; 200: a short last group
    x = torch.randn(64, 200, generator=g)
    mv = search_clip(w, x, 4, 128)
    assert mv.shape == (300, 2)
    org = torch.stack([w[:, :128].abs().amax(1), w[:, 128:].abs().amax(1)], 1)
    assert (mv <= org).all() and (mv >= 0.55 * org - 1e-6).all()
    clipped = apply_clip(w, mv, 128)
    assert clipped.shape == w.shape and (clipped[:, 128:].abs() <= mv[:, 1:] + 1e-6).all()


def test_awq_layer_skips_q_k_clipping_and_folds():
    s = spec(num_kv_heads=2)
    p = layer_params(s)
    H, I = s.hidden_size, s.intermediate_size
    xs = {"layers.0.q_proj": outlier_inputs(128, H, 1), "layers.0.o_proj": outlier_inputs(128, 128, 2),
          "layers.0.gate_proj": outlier_inputs(128, H, 3), "layers.0.down_proj": outlier_inputs(128, I, 4)}
    calib = Calibration({k: v.abs().mean(0) for k, v in xs.items()}, {k: v.abs().amax(0) for k, v in xs.items()}, xs)
    work = dict(p)
    scales = awq_layer(work, s, 0, calib, 4, 128)
    assert set(scales) == {"layers.0.input_norm", "layers.0.post_attention_norm", "layers.0.up_proj"}
    sq = scales["layers.0.input_norm"]
    # q and k: scaled but never clipped
    assert torch.allclose(work["layers.0.q_proj"], p["layers.0.q_proj"] * sq)
    assert torch.allclose(work["layers.0.input_norm"], p["layers.0.input_norm"] / sq)
    # up: rows divided by down's scale, columns multiplied by gate/up's scale (then clipped: never larger)
    sgu, sud = scales["layers.0.post_attention_norm"], scales["layers.0.up_proj"]
    assert (work["layers.0.up_proj"].abs() <= (p["layers.0.up_proj"] * sgu / sud[:, None]).abs() + 1e-6).all()
