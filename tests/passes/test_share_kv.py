"""kiln.passes.share_kv: the reference form of a MixAttention model against the PyTorch reference.

The Character.AI 13-layer map (1 global KV owner, 4 sliding owners; window 64 for testing) on a small
random-weight model: the reference form is built for every layer owning its KV, share_kv rewires the
sharing layers, and the compiled ``forward`` must give the logits of tests/mixattention_reference.py over
300 tokens (well past the window) and the same greedy tokens. The sharing layers' K/V parameters leave the
params tuple; a map the pass cannot apply is refused.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import mixattention_reference as ref
from kiln.errors import PassError
from kiln.frontend.reference import build_reference, param_shapes
from kiln.ir.attention import build_attention_function
from kiln.ir.spec import ModelSpec
from kiln.ir.tvm import IRModule, Target, relax, tirx, tvm
from kiln.passes.share_kv import share_kv

pytestmark = pytest.mark.cpu

TYPES = ("global", *["sliding"] * 5, "global", *["sliding"] * 5, "global")
SOURCES = (0, 1, 1, 3, 3, 3, 0, 7, 7, 9, 9, 9, 0)
SPEC = ModelSpec("MixAttention", vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=13,
                 num_q_heads=4, num_kv_heads=1, head_dim=16, rms_norm_eps=1e-6, context_len=512,
                 sliding_window=64, layer_types=TYPES, kv_sources=SOURCES)


def owners_only(spec):
    return dataclasses.replace(spec, kv_sources=())


@pytest.fixture(scope="module")
def compiled():
    layout = {n: (s, "float32") for n, s in param_shapes(SPEC).items()}
    mod, new_layout = share_kv(build_reference(owners_only(SPEC)), layout, SOURCES)
    target = Target({"kind": "llvm"})
    ex = tvm.compile(mod, target=target, relax_pipeline=relax.backend.cpu_generic.get_default_pipeline(target))
    return mod, new_layout, relax.VirtualMachine(ex, tvm.cpu())


def run(vm, layout, weights, ids):
    ps = [tvm.runtime.tensor(weights[n].numpy(), tvm.cpu()) for n in layout]
    return vm["forward"](tvm.runtime.tensor(np.asarray(ids, dtype="int32"), tvm.cpu()), ps).numpy()


def test_sharing_layers_lose_their_kv_parameters(compiled):
    mod, layout, _ = compiled
    assert set(layout) == set(ref.weight_shapes(SPEC))
    assert "layers.2.k_proj" not in layout and "layers.6.v_proj" not in layout and "layers.1.k_proj" in layout
    srcs = {int(f.attrs["kiln.layer_id"]): int(f.attrs["kiln.kv_source"])
            for _, f in mod.functions_items() if isinstance(f, relax.Function) and "kiln.kv_source" in f.attrs}
    assert srcs == {i: s for i, s in enumerate(SOURCES) if s != i}


def test_forward_is_the_mixattention_reference_over_300_tokens(compiled, one_torch_thread):
    _, layout, vm = compiled
    w = ref.random_weights(SPEC, seed=3, std=0.2)
    ids = torch.randint(3, 97, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    want = ref.forward(SPEC, w, ids).numpy()
    got = run(vm, layout, w, ids)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)
    assert (got.argmax(-1) == want.argmax(-1)).all()
    # the windows and the sharing matter: without them the late logits differ
    plain = ref.forward(owners_only(dataclasses.replace(SPEC, layer_types=("global",) * 13, sliding_window=None)),
                        {**w, **ref.random_weights(owners_only(SPEC), seed=3, std=0.2)}, ids).numpy()
    assert np.abs(plain[100:] - want[100:]).max() > 1e-2


def test_maps_the_pass_cannot_apply_are_refused():
    layout = {n: (s, "float32") for n, s in param_shapes(owners_only(SPEC)).items()}
    mod = build_reference(owners_only(SPEC))
    with pytest.raises(PassError, match="cannot take its KV from layer 2"):
        share_kv(mod, layout, (0, 1, 1, 2) + tuple(range(4, 13)))  # layer 2 shares itself: not an owner
    with pytest.raises(PassError, match="different windows"):
        share_kv(mod, layout, (0, 0) + tuple(range(2, 13)))


def test_the_paged_lowering_refuses_shared_kv_for_now(compiled):
    from kiln.codegen.targets import resolve_target
    from kiln.passes.lower_paged_attention import lower_paged_attention

    mod, _, _ = compiled
    no_windows = dataclasses.replace(SPEC, layer_types=("global",) * 13, sliding_window=None)
    layout = {n: (s, "float32") for n, s in param_shapes(owners_only(no_windows)).items()}
    shared, _ = share_kv(build_reference(owners_only(no_windows)), layout, (0, 0) + tuple(range(2, 13)))
    with pytest.raises(PassError, match="attends to layer 0's KV"):
        lower_paged_attention(shared, resolve_target("cpu").tvm_target())


# ------------------------------------------------------------------------------------------ Before/Expected

TINY = ModelSpec("MixAttention", vocab_size=10, hidden_size=8, intermediate_size=8, num_layers=2, num_q_heads=2,
                 num_kv_heads=1, head_dim=4, rms_norm_eps=1e-6, context_len=32)


def _tiny_forward(kv_sources: tuple[int, ...]) -> tuple[IRModule, dict]:
    """forward(input_ids, params): embed, per layer q/k/v/o linears around ``attention_L{i}``, lm_head tied to
    the embedding. A layer with ``kv_sources[i] != i`` has no k/v projections and calls its composite on its
    source's k, v, and the composite carries ``kiln.kv_source``."""
    H, hq, hkv, d = TINY.hidden_size, TINY.num_q_heads, TINY.num_kv_heads, TINY.head_dim
    shapes = {"embed_tokens": (TINY.vocab_size, H)}
    for i, src in enumerate(kv_sources):
        shapes[f"layers.{i}.q_proj"] = (hq * d, H)
        if src == i:
            shapes[f"layers.{i}.k_proj"], shapes[f"layers.{i}.v_proj"] = (hkv * d, H), (hkv * d, H)
        shapes[f"layers.{i}.o_proj"] = (H, hq * d)
    bb = relax.BlockBuilder()
    gvs = [build_attention_function(bb, TINY, i) for i in range(len(kv_sources))]
    n = tirx.Var("seq_len", "int64")
    ids = relax.Var("input_ids", relax.TensorType([n], "int32"))
    packed = relax.Var("params", relax.TupleType([relax.TensorType(list(s), "float32") for s in shapes.values()]))
    with bb.function("forward", [ids, packed], attrs={"num_input": 1}):
        with bb.dataflow():
            w = {name: bb.emit(relax.TupleGetItem(packed, i)) for i, name in enumerate(shapes)}

            def linear(x, name):
                return bb.emit(relax.op.matmul(x, bb.emit(relax.op.permute_dims(w[name]))))

            x = bb.emit(relax.op.take(w["embed_tokens"], ids, axis=0))
            kv = {}
            for i, src in enumerate(kv_sources):
                p = f"layers.{i}."
                q = bb.emit(relax.op.reshape(linear(x, p + "q_proj"), [n, hq, d]))
                if src == i:
                    kv[i] = (bb.emit(relax.op.reshape(linear(x, p + "k_proj"), [n, hkv, d])),
                             bb.emit(relax.op.reshape(linear(x, p + "v_proj"), [n, hkv, d])))
                o = bb.emit(relax.Call(gvs[i], [q, *kv[src]]))
                x = bb.emit(relax.op.add(x, linear(bb.emit(relax.op.reshape(o, [n, hq * d])), p + "o_proj")))
            out = bb.emit_output(linear(x, "embed_tokens"))
        bb.emit_func_output(out)
    mod = bb.get()
    for i, src in enumerate(kv_sources):
        if src != i:
            gv = mod.get_global_var(f"attention_L{i}")
            mod[gv] = mod[gv].with_attr("kiln.kv_source", src)
    return mod, {name: (s, "float32") for name, s in shapes.items()}


def test_share_kv_before_expected():
    before, layout = _tiny_forward((0, 1))
    expected, expected_layout = _tiny_forward((0, 0))
    got, got_layout = share_kv(before, layout, (0, 0))
    assert relax.analysis.check_well_formed(got)
    tvm.ir.assert_structural_equal(got, expected, map_free_vars=True)
    assert got_layout == expected_layout
    assert "layers.1.k_proj" not in got_layout and "layers.1.q_proj" in got_layout


def test_share_kv_leaves_a_model_of_owners_alone():
    before, layout = _tiny_forward((0, 1))
    assert share_kv(before, layout, (0, 1)) == (before, layout)
