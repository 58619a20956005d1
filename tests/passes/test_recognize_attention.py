"""kiln.passes.recognize_attention and recognize_model on graphs exported with torch.export.

Besides transformers' graphs (tests/frontend/test_graph_import.py runs those end to end), a small
hand-written decoder (``TinyLM``) is exported in variants that a recogniser must tell apart: a
``masked_fill``-style causal mask (``where(~allowed, -inf, scores)``), a sliding window, GQA by
``repeat_interleave``, and the variants kiln must refuse — no mask (bidirectional), no RoPE, an additive
position bias, heads split in another order, a GELU MLP — each with an error naming what did not match.
The recognised graph must compute the imported graph's logits.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kiln.errors import PassError
from kiln.passes.recognize_attention import recognize_attention
from kiln.passes.recognize_rms_norm import recognize_rms_norm
from kiln.passes.recognize_swiglu import recognize_swiglu
from kiln.frontend.torch_export import load_exported_program
from kiln.ir.attention import build_attention_function, is_attention
from kiln.ir.spec import ModelSpec, RopeSpec
from kiln.ir.tvm import IRModule, Target, relax, tirx, tvm
from kiln.passes.lib.graph_view import op_name
from kiln.passes.recognize_model import recognize_model

pytestmark = pytest.mark.cpu
V, H, HEADS, KV_HEADS, D = 50, 32, 4, 2, 8


class TinyLM(torch.nn.Module):
    """One Llama-style layer written with plain torch ops; the keyword arguments break it on purpose."""

    def __init__(self, mask="causal", window=None, rope=True, bias=False, head_order="standard", mlp="swiglu"):
        super().__init__()
        self.mask, self.window, self.rope, self.bias, self.head_order, self.mlp = mask, window, rope, bias, head_order, mlp
        g = torch.Generator().manual_seed(0)
        p = lambda *s: torch.nn.Parameter(0.3 * torch.randn(*s, generator=g))  # noqa: E731
        self.emb, self.q, self.k, self.v, self.o = p(V, H), p(HEADS * D, H), p(KV_HEADS * D, H), p(KV_HEADS * D, H), p(H, HEADS * D)
        self.n1, self.n2, self.nf = (torch.nn.Parameter(1 + 0.1 * torch.randn(H, generator=g)) for _ in range(3))
        self.gate, self.up, self.down, self.head = p(64, H), p(64, H), p(H, 64), p(V, H)
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, D, 2).float() / D), persistent=False)

    @staticmethod
    def norm(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))

    def heads(self, x, n):
        s = x.shape[1]
        if self.head_order == "standard":
            return x.view(1, s, n, D).transpose(1, 2)
        return x.view(1, s, D, n).permute(0, 3, 1, 2)  # [1, n, s, d] with the channels split the other way

    def forward(self, input_ids, attention_mask):
        s = input_ids.shape[1]
        x = self.emb[input_ids]
        h = self.norm(x, self.n1)
        q, k, v = self.heads(h @ self.q.T, HEADS), self.heads(h @ self.k.T, KV_HEADS), self.heads(h @ self.v.T, KV_HEADS)
        if self.rope == "interleaved":  # pairs (2i, 2i + 1), as transformers' interleaved rotary helpers
            f = (torch.arange(s).float()[:, None] * self.inv_freq[None]).repeat_interleave(2, dim=-1)
            cos, sin = f.cos(), f.sin()
            rot = lambda t: torch.stack((-t[..., 1::2], t[..., 0::2]), dim=-1).flatten(-2)  # noqa: E731
            q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        elif self.rope:
            f = torch.arange(s).float()[:, None] * self.inv_freq[None]
            cos, sin = torch.cat([f, f], -1).cos(), torch.cat([f, f], -1).sin()
            rot = lambda t: torch.cat([-t[..., D // 2:], t[..., :D // 2]], -1)  # noqa: E731
            q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        k, v = k.repeat_interleave(HEADS // KV_HEADS, dim=1), v.repeat_interleave(HEADS // KV_HEADS, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(D)
        i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
        if self.bias:
            scores = scores + 0.1 * (j - i).float()  # ALiBi-like: a position bias, not a mask
        if self.mask == "causal":
            allowed = j <= i
            if self.window:
                allowed = allowed & (i - j < self.window)
            scores = scores.masked_fill(~allowed, float("-inf"))
        o = (scores.softmax(-1) @ v).transpose(1, 2).reshape(1, s, HEADS * D)
        x = x + o @ self.o.T
        h = self.norm(x, self.n2)
        act = torch.nn.functional.silu(h @ self.gate.T) if self.mlp == "swiglu" else torch.nn.functional.gelu(h @ self.gate.T)
        x = x + (act * (h @ self.up.T)) @ self.down.T
        return self.norm(x, self.nf) @ self.head.T


def imported(**kw):
    model = TinyLM(**kw).eval()
    ids = torch.randint(0, V, (1, 9))
    seq = torch.export.Dim("seq", min=2, max=512)
    ep = torch.export.export(model, (ids, torch.ones_like(ids)), dynamic_shapes=({1: seq}, {1: seq}))
    mod, params, _ = load_exported_program(ep)
    return model, mod, {k: v.numpy() for k, v in params.items()}


def recognise(mod, weights):
    # the compile pipeline's recognition steps before recognize_model, in its order
    return recognize_attention(recognize_swiglu(recognize_rms_norm(mod)), weights, 257, None)


def run_main(mod, weights, ids):
    target = Target({"kind": "llvm"})
    ex = tvm.compile(mod, target=target, relax_pipeline=relax.backend.cpu_generic.get_default_pipeline(target))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    args = [ids, np.ones_like(ids), *(weights[p.name] for p in mod["main"].params[2:])]
    return vm["main"](*(tvm.runtime.tensor(np.asarray(a), tvm.cpu()) for a in args)).numpy()


def composites(mod):
    return [f for gv, f in mod.functions_items() if is_attention(f)]


@pytest.mark.parametrize("window, rope", [(None, True), (4, True), (None, "interleaved")],
                         ids=["global", "window-4", "interleaved-rope"])
def test_tiny_decoder_is_recognised_and_computes_the_same(window, rope, one_torch_thread):
    model, mod, weights = imported(window=window, rope=rope)
    rec = recognise(mod, weights)
    [attn] = composites(rec)
    assert int(attn.attrs["kiln.num_q_heads"]) == HEADS and int(attn.attrs["kiln.num_kv_heads"]) == KV_HEADS
    assert int(attn.attrs["kiln.head_dim"]) == D and abs(float(attn.attrs["kiln.sm_scale"]) - D ** -0.5) < 1e-7
    assert float(attn.attrs["kiln.rope_theta"]) == 10000.0 and str(attn.attrs["kiln.rope_type"]) == "default"
    assert int(attn.attrs["kiln.sliding_window"]) == (window or -1)
    ops = set()
    relax.analysis.post_order_visit(rec["main"].body, lambda e: ops.add(op_name(e)))
    assert "nn.softmax" not in ops and "cos" not in ops
    ids = np.random.default_rng(0).integers(0, V, (1, 11))
    np.testing.assert_allclose(run_main(rec, weights, ids), run_main(mod, weights, ids), atol=1e-5)
    with torch.no_grad():
        np.testing.assert_allclose(run_main(rec, weights, ids), model(torch.tensor(ids), None).numpy(), atol=1e-4)


@pytest.mark.parametrize("rope", [True, "interleaved"])
def test_model_form_names_every_weight(rope):
    _, mod, weights = imported(rope=rope)
    ref = recognize_model(recognise(mod, weights))
    assert list(ref.params) == ["embed_tokens", "layers.0.input_norm", "layers.0.q_proj", "layers.0.k_proj",
                                "layers.0.v_proj", "layers.0.o_proj", "layers.0.post_attention_norm",
                                "layers.0.gate_proj", "layers.0.up_proj", "layers.0.down_proj", "final_norm", "lm_head"]
    assert ref.params["layers.0.q_proj"] == ("q", False) and ref.params["embed_tokens"] == ("emb", False)
    assert ref.spec["num_layers"] == 1 and ref.spec["intermediate_size"] == 64 and ref.spec["rms_norm_eps"] == 1e-5
    fwd = ref.mod["forward"]
    assert [str(d) for d in fwd.params[0].ty.shape] == [str(fwd.params[0].ty.shape[0])] and \
        fwd.params[0].ty.dtype == "int32"
    assert fwd.ret_ty.ndim == 2 and fwd.ret_ty.dtype == "float32"


@pytest.mark.parametrize("kw, message", [
    (dict(mask="none"), "no causal mask on the scores"),
    (dict(rope=False), "no rotary embedding"),
    (dict(bias=True), "not from Q @ K^T"),
    (dict(head_order="swapped"), "heads reach RoPE in an order kiln does not use"),
])
def test_attention_that_is_not_kiln_attention_is_refused(kw, message):
    _, mod, weights = imported(**kw)
    with pytest.raises(PassError, match="recognize_attention: the attention at .* does not match") as e:
        recognise(mod, weights)
    assert message in str(e.value)


def test_a_gelu_mlp_is_refused_by_name():
    _, mod, weights = imported(mlp="gelu")
    with pytest.raises(PassError, match="neither MLP linear goes through SiLU"):
        recognize_model(recognise(mod, weights))


@pytest.mark.parametrize("rope", [True, "interleaved"])
def test_tiny_decoder_compiles_and_decodes_like_torch(rope, zoo, tmp_path, one_torch_thread):
    """The whole way: .pt2 -> recognition -> fusion -> paged attention -> greedy decoding, against
    torch recomputing the full sequence at every step."""
    from kiln.compiler import CompileConfig, compile_model
    from kiln.runtime import LLM, SamplingParams

    model = TinyLM(rope=rope).eval()
    ids = torch.randint(0, V, (1, 9))
    seq = torch.export.Dim("seq", min=2, max=512)
    path = tmp_path / "tiny.pt2"
    torch.export.save(torch.export.export(model, (ids, torch.ones_like(ids)), dynamic_shapes=({1: seq}, {1: seq})), path)
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    for f in zoo.hf("llama")[0].iterdir():  # a tokenizer (no config.json: the graph alone defines the model)
        if f.name.startswith(("tokenizer", "special_tokens")):
            (tok_dir / f.name).write_bytes(f.read_bytes())
    compile_model(path, tmp_path / "art", CompileConfig(tokenizer=tok_dir, context_len=64))
    prompt = [3, 17, 42, 8, 23]
    [res] = LLM(tmp_path / "art").generate([prompt], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(24):
            tokens.append(int(model(torch.tensor([tokens]), None)[0, -1].argmax()))
    assert res.token_ids == tokens[len(prompt):]


# ------------------------------------------------------------------------------------------ Before/Expected

BE_V, BE_H, BE_HQ, BE_HKV, BE_D = 10, 8, 2, 1, 4  # head_dim 4: the scale 1/sqrt(4) is exact in float32
BE_SPEC = ModelSpec("LlamaForCausalLM", vocab_size=BE_V, hidden_size=BE_H, intermediate_size=8, num_layers=1,
                    num_q_heads=BE_HQ, num_kv_heads=BE_HKV, head_dim=BE_D, rms_norm_eps=1e-5, context_len=32)


def _be_module(attend, composite: ModelSpec | None = None) -> IRModule:
    """main(input_ids [1, s], attention_mask [1, s], emb, wq, wk, wv) -> attend(bb, s, q, k, v, gv): [1, s, HQ * D],
    with q, k, v the projections [1, s, heads * D] of the embedded tokens and gv the attention composite of
    layer 0 built from ``composite`` (None: no composite)."""
    s = tirx.Var("s", "int64")
    ids = relax.Var("input_ids", relax.TensorType([1, s], "int64"))
    mask = relax.Var("attention_mask", relax.TensorType([1, s], "int64"))
    w = {name: relax.Var(name, relax.TensorType(list(shape), "float32")) for name, shape in
         (("emb", (BE_V, BE_H)), ("wq", (BE_HQ * BE_D, BE_H)), ("wk", (BE_HKV * BE_D, BE_H)),
          ("wv", (BE_HKV * BE_D, BE_H)))}
    bb = relax.BlockBuilder()
    gv = None if composite is None else build_attention_function(bb, composite, 0)
    with bb.function("main", [ids, mask, *w.values()], attrs={"num_input": 2}):
        with bb.dataflow():
            x = bb.emit(relax.op.take(w["emb"], ids, axis=0))  # [1, s, H]
            q, k, v = (bb.emit(relax.op.matmul(x, bb.emit(relax.op.permute_dims(w[n])))) for n in ("wq", "wk", "wv"))
            out = bb.emit_output(attend(bb, s, q, k, v, gv))
        bb.emit_func_output(out)
    return bb.get()


def _be_exported_attention(bb, s, q, k, v, _gv):
    """What transformers' Llama attention exports to: heads split and moved forward, rotate-half RoPE from
    cos/sin tables of arange(s), the kv head repeated for GQA, scores scaled and masked with where(i >= j),
    softmax, P @ V, heads merged back."""
    f32 = "float32"

    def heads(t, h):  # [1, s, h * D] -> [1, h, s, D]
        return bb.emit(relax.op.permute_dims(bb.emit(relax.op.reshape(t, [1, s, h, BE_D])), [0, 2, 1, 3]))

    t = bb.emit(relax.op.arange(0, s, 1, f32))
    inv = relax.const(np.asarray(RopeSpec().inv_freq(BE_D), dtype=f32))
    f = bb.emit(relax.op.multiply(bb.emit(relax.op.expand_dims(t, 1)), inv))  # [s, D/2]
    f = bb.emit(relax.op.concat([f, f], axis=-1))  # [s, D]
    cos, sin = bb.emit(relax.op.cos(f)), bb.emit(relax.op.sin(f))

    def rope(x):
        lo = bb.emit(relax.op.strided_slice(x, axes=[3], begin=[0], end=[BE_D // 2]))
        hi = bb.emit(relax.op.strided_slice(x, axes=[3], begin=[BE_D // 2], end=[BE_D]))
        rot = bb.emit(relax.op.concat([bb.emit(relax.op.negative(hi)), lo], axis=-1))
        return bb.emit(relax.op.add(bb.emit(relax.op.multiply(x, cos)), bb.emit(relax.op.multiply(rot, sin))))

    group = BE_HQ // BE_HKV
    qh = rope(heads(q, BE_HQ))
    kh = bb.emit(relax.op.repeat(rope(heads(k, BE_HKV)), group, axis=1))
    vh = bb.emit(relax.op.repeat(heads(v, BE_HKV), group, axis=1))
    scores = bb.emit(relax.op.matmul(qh, bb.emit(relax.op.permute_dims(kh, [0, 1, 3, 2]))))
    scores = bb.emit(relax.op.multiply(scores, relax.const(0.5, f32)))
    i = bb.emit(relax.op.arange(0, s, 1, "int64"))
    allowed = bb.emit(relax.op.greater_equal(bb.emit(relax.op.expand_dims(i, 1)), bb.emit(relax.op.expand_dims(i, 0))))
    scores = bb.emit(relax.op.where(allowed, scores, relax.const(float("-inf"), f32)))
    o = bb.emit(relax.op.matmul(bb.emit(relax.op.nn.softmax(scores, axis=-1)), vh))  # [1, HQ, s, D]
    o = bb.emit(relax.op.permute_dims(o, [0, 2, 1, 3]))
    return relax.op.reshape(o, [1, s, BE_HQ * BE_D])


def test_recognize_attention_before_expected():
    def composite(bb, s, q, k, v, gv):  # the heads of each projection, the composite, the heads merged
        q = bb.emit(relax.op.reshape(q, [s, BE_HQ, BE_D]))
        k = bb.emit(relax.op.reshape(k, [s, BE_HKV, BE_D]))
        v = bb.emit(relax.op.reshape(v, [s, BE_HKV, BE_D]))
        o = bb.emit(relax.Call(gv, [q, k, v]))
        return relax.op.reshape(o, [1, s, BE_HQ * BE_D])

    got = recognize_attention(_be_module(_be_exported_attention), {})
    assert relax.analysis.check_well_formed(got)
    tvm.ir.assert_structural_equal(got, _be_module(composite, BE_SPEC), map_free_vars=True)
