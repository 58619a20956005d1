"""quantize_params on the bundled demo model's real weights, for every scheme; the Calibration file."""

import logging
import math

import pytest
import torch

from kiln.errors import KilnError
from kiln.quant import SCHEMES, Calibration, dequantize_linear, quantize_params, quantized_linears
from kiln.quant.calibration import input_key, linear_shapes
from kiln.quant.smooth import smooth_layer

from conftest import DEMO_MODEL


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def load_demo(dtype=None):
    from kiln.frontend.hf import load_spec, load_weights
    from kiln.frontend.reference import param_shapes

    spec = load_spec(DEMO_MODEL, dtype=dtype)
    return spec, load_weights(DEMO_MODEL, spec, param_shapes(spec))


@pytest.fixture(scope="module")
def demo():
    return load_demo()


def synthetic_calibration(spec, seed=0) -> Calibration:
    """Random inputs with a few outlier channels, stored once per shared input."""
    g = torch.Generator().manual_seed(seed)
    mean_abs, max_abs, samples = {}, {}, {}
    for name, (_, in_f) in linear_shapes(spec).items():
        key = input_key(name)
        if key not in samples:
            scale = 0.1 + torch.rand(in_f, generator=g)
            scale[:3] *= 20
            x = torch.randn(256, in_f, generator=g) * scale
            samples[key], mean_abs[key], max_abs[key] = x, x.abs().mean(0), x.abs().amax(0)
    return Calibration(mean_abs, max_abs, samples, meta={"source": "synthetic"})


def forward(params, spec, ids, record=None, act_quant=False):
    """A plain torch Llama forward over float weights [out, in]; ``record`` collects each linear's
    inputs; ``act_quant`` fake-quantizes them per token to int8 (as the w4a8/w8a8 kernels do)."""
    d, eps, n = spec.head_dim, spec.rms_norm_eps, ids.shape[0]
    ang = torch.arange(n, dtype=torch.float32)[:, None] * torch.tensor(spec.rope.inv_freq(d))[None, :].float()
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]  # [n, 1, d]

    def rope(t):  # [n, h, d], rotate-half
        return t * cos + torch.cat([-t[..., d // 2:], t[..., : d // 2]], -1) * sin

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * params[w].float()

    def linear(x, name, bias=None):
        if record is not None:
            record.setdefault(name, []).append(x)
        if act_quant:
            s = x.abs().amax(-1, keepdim=True).clamp(min=1e-5) / 127
            x = torch.round(x / s).clamp(-127, 127) * s
        y = x @ params[name].float().T
        return y + params[bias].float() if bias in params else y

    x = params["embed_tokens"].float()[ids]
    mask = torch.full((n, n), float("-inf")).triu(1)
    for i in range(spec.num_layers):
        p = f"layers.{i}."
        h = norm(x, p + "input_norm")
        q, k, v = (linear(h, p + f"{c}_proj", p + f"{c}_bias").view(n, -1, d) for c in "qkv")
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(spec.num_groups, 1), v.repeat_interleave(spec.num_groups, 1)
        att = (torch.einsum("qhd,khd->hqk", q, k) * spec.sm_scale + mask).softmax(-1)
        x = x + linear(torch.einsum("hqk,khd->qhd", att, v).reshape(n, -1), p + "o_proj", p + "o_bias")
        h = norm(x, p + "post_attention_norm")
        mlp = torch.nn.functional.silu(linear(h, p + "gate_proj")) * linear(h, p + "up_proj")
        x = x + linear(mlp, p + "down_proj")
    head = params["embed_tokens"] if spec.tie_word_embeddings else params["lm_head"]
    return norm(x, "final_norm") @ head.float().T


@pytest.fixture(scope="module")
def real_calibration(demo):
    """Statistics of the demo model's own activations on random token sequences (what calibrate.py makes)."""
    spec, params = demo
    g = torch.Generator().manual_seed(1)
    rec = {}
    with torch.no_grad():
        for _ in range(8):
            forward(params, spec, torch.randint(0, spec.vocab_size, (128,), generator=g), rec)
    tables = {"mean_abs": {}, "max_abs": {}, "samples": {}}
    for name, xs in rec.items():
        x = torch.cat(xs)
        tables["mean_abs"][name], tables["max_abs"][name] = x.abs().mean(0), x.abs().amax(0)
        tables["samples"][name] = x[torch.randperm(x.shape[0], generator=g)[:512]].contiguous()
    return Calibration(**tables)


EXPECTED = {  # suffix -> (dtype, shape from (out, in)); "model" is the model's dtype
    "weight_only": {"qweight": (torch.int32, lambda o, i: (o, i // 8)),
                    "scales": ("model", lambda o, i: (o, math.ceil(i / 128))),
                    "zeros": (torch.uint8, lambda o, i: (o, math.ceil(i / 128)))},
    "w4a8": {"qweight": (torch.int32, lambda o, i: (o, i // 8)),
             "group_scales": (torch.uint8, lambda o, i: (o, math.ceil(i / 128))),
             "zeros": (torch.uint8, lambda o, i: (o, math.ceil(i / 128))),
             "channel_scales": (torch.float32, lambda o, i: (o,))},
    "w8a8": {"qweight": (torch.int8, lambda o, i: (o, i)), "channel_scales": (torch.float32, lambda o, i: (o,))},
}


def check_layout(out, params, spec, scheme):
    sch = SCHEMES[scheme]
    model_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[spec.dtype]
    shapes = linear_shapes(spec)
    expected_keys = []
    for k in params:
        expected_keys += [f"{k}.{suf}" for suf in sch.suffixes] if k in shapes else [k]
    assert list(out) == expected_keys  # in place, in order; no fp weight of a quantized linear remains
    assert list(EXPECTED[sch.kind]) == list(sch.suffixes)
    for name, (o, i) in shapes.items():
        for suf, (dtype, shape) in EXPECTED[sch.kind].items():
            t = out[f"{name}.{suf}"]
            assert t.dtype == (model_dtype if dtype == "model" else dtype), (name, suf, t.dtype)
            assert tuple(t.shape) == shape(o, i), (name, suf, tuple(t.shape))
    folds = sch.awq or sch.kind != "weight_only"
    for k, v in params.items():
        if k in shapes:
            continue
        assert out[k].dtype == v.dtype and out[k].shape == v.shape
        if k.endswith(("input_norm", "post_attention_norm")) and folds:
            assert not torch.equal(out[k], v), k
        else:
            assert out[k] is v, k  # passed through untouched (embedding, final norm, unscaled norms)


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_every_scheme_on_the_demo_model(demo, scheme):
    spec, params = demo
    snapshot = {k: v.clone() for k, v in params.items()}
    calib = synthetic_calibration(spec)
    out = quantize_params(params, spec, scheme, calib)
    check_layout(out, params, spec, scheme)
    again = quantize_params(params, spec, scheme, synthetic_calibration(spec))
    assert list(again) == list(out) and all(torch.equal(again[k], out[k]) for k in out)  # deterministic
    assert all(torch.equal(params[k], snapshot[k]) for k in params)  # the input is left alone


def test_awq_reports_its_search_a_line_per_layer(demo, caplog):
    """AWQ's search is the slow step of an awq-* compile: kiln.progress says where it is (`kiln compile` prints it)."""
    spec, params = demo
    with caplog.at_level(logging.INFO, logger="kiln.progress"):
        quantize_params(params, spec, "awq-w4g128", synthetic_calibration(spec))
    assert [r.getMessage() for r in caplog.records if r.name == "kiln.progress"] == \
        [f"awq-w4g128: searched layer {i}/{spec.num_layers}" for i in range(1, spec.num_layers + 1)]


@pytest.mark.parametrize("scheme", ["rtn-w4g128", "w4a8"])
def test_half_precision_model(scheme):
    spec, params = load_demo(dtype="bfloat16")
    out = quantize_params(params, spec, scheme, synthetic_calibration(spec))
    check_layout(out, params, spec, scheme)


def test_quantized_demo_model_stays_close(demo, real_calibration):
    """The dequantized models' logits against the float model's: AWQ beats RTN at 4 and 3 bits,
    int8 activations with smoothing stay close."""
    spec, params = demo
    ids = torch.randint(0, spec.vocab_size, (128,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = forward(params, spec, ids).log_softmax(-1)
        kl = {}
        for scheme, sch in SCHEMES.items():
            out = quantize_params(params, spec, scheme, real_calibration)
            fl = {k: v for k, v in out.items() if k.rpartition(".")[2] not in sch.suffixes}
            fl.update({n: dequantize_linear(out, n, scheme) for n in quantized_linears(spec)})
            y = forward(fl, spec, ids, act_quant=sch.act_bits is not None).log_softmax(-1)
            kl[scheme] = torch.nn.functional.kl_div(y, ref, log_target=True, reduction="batchmean").item()
    assert kl["awq-w4g128"] < 0.85 * kl["rtn-w4g128"], kl
    assert kl["awq-w3g128"] < 0.85 * kl["rtn-w3g128"], kl
    assert kl["w8a8"] < 0.01 and max(kl.values()) < 0.5, kl


def test_smoothing_keeps_the_demo_model_function(demo, real_calibration):
    spec, params = demo
    work = {k: v.float() for k, v in params.items()}
    for i in range(spec.num_layers):
        smooth_layer(work, spec, i, real_calibration)
    assert not torch.equal(work["layers.0.input_norm"], params["layers.0.input_norm"])
    ids = torch.randint(0, spec.vocab_size, (64,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(forward(work, spec, ids), forward(params, spec, ids), rtol=1e-4, atol=1e-3)


def test_schemes_that_need_calibration_say_so(demo):
    spec, params = demo
    for scheme, sch in SCHEMES.items():
        if sch.needs_calib:
            with pytest.raises(KilnError, match="kiln calibrate"):
                quantize_params(params, spec, scheme, None)
    with pytest.raises(KilnError, match="unknown quantization scheme 'int2'"):
        quantize_params(params, spec, "int2", None)


def test_calibration_of_another_model_is_rejected(demo):
    spec, params = demo
    calib = synthetic_calibration(spec)
    calib.max_abs["layers.1.gate_proj"] = calib.max_abs["layers.1.gate_proj"][:100]
    with pytest.raises(KilnError, match=r"max_abs for the input of layers.1.gate_proj has shape \[100\]"):
        quantize_params(params, spec, "w8a8", calib)
    del calib.samples["layers.2.down_proj"]
    with pytest.raises(KilnError, match="no samples for the input of layers.2.down_proj"):
        quantize_params(params, spec, "awq-w4g128", calib)


def test_calibration_save_load(tmp_path, demo):
    spec, _ = demo
    calib = synthetic_calibration(spec)
    shared = calib.samples["layers.0.q_proj"]
    calib.samples["layers.0.k_proj"] = shared  # the same tensor under two names: stored once
    calib.max_abs["layers.0.gate_proj"] = calib.max_abs["layers.0.gate_proj"][::1]  # a view
    calib.save(tmp_path / "calib.safetensors")
    back = Calibration.load(tmp_path / "calib.safetensors")
    assert back.meta == {"source": "synthetic"}
    for table in Calibration.TABLES:
        a, b = getattr(calib, table), getattr(back, table)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert back.samples["layers.0.k_proj"] is back.samples["layers.0.q_proj"]
    assert torch.equal(back.get("samples", "layers.0.v_proj"), shared)  # resolved through q_proj
    back.check(spec)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(KilnError, match="not a kiln calibration file"):
        Calibration.load(tmp_path / "bad.safetensors")
    with pytest.raises(KilnError, match="does not exist"):
        Calibration.load(tmp_path / "missing.safetensors")
