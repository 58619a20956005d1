"""kiln.passes.recognize_model: a hand-written recognised graph against kiln's reference form.

The Before is the imported form as the recognition passes leave it, one layer small: ``main(input_ids [1, s],
attention_mask [1, s], *weights)`` with ``[1, s, ...]`` activations, RMSNorm and SiLU as Relax ops and the
attention already a kiln composite. The Expected is ``build_reference`` of the ModelSpec the graph describes:
recognize_model must produce exactly kiln's own reference form (the batch axis dropped, the weights packed and
named, the logits returned through the block's output). Graphs exported from torch are recognised end to end
in tests/passes/test_recognize_attention.py and tests/frontend/test_graph_import.py.
"""

from __future__ import annotations

import pytest

from kiln.errors import PassError
from kiln.frontend.reference import build_reference, param_shapes
from kiln.ir.attention import build_attention_function
from kiln.ir.spec import ModelSpec, RopeSpec
from kiln.ir.tvm import IRModule, relax, tirx, tvm
from kiln.passes.recognize_model import recognize_model

pytestmark = pytest.mark.cpu
SPEC = ModelSpec("LlamaForCausalLM", vocab_size=10, hidden_size=8, intermediate_size=12, num_layers=1, num_q_heads=2,
                 num_kv_heads=1, head_dim=4, rms_norm_eps=1e-5, context_len=32)
V, H, I, HQ, HKV, D = 10, 8, 12, 2, 1, 4
WEIGHTS = {"emb": (V, H), "n1": (H,), "wq": (HQ * D, H), "wk": (HKV * D, H), "wv": (HKV * D, H), "wo": (H, HQ * D),
           "n2": (H,), "gate": (I, H), "up": (I, H), "down": (H, I), "nf": (H,), "head": (V, H)}


def before(mlp_act=relax.op.nn.silu, shared: dict[str, str] | None = None) -> IRModule:
    """The recognised imported graph of one Llama layer (weights as parameters, the batch axis kept); ``shared``:
    weight -> the weight whose parameter it reads instead (an exporter's merged initializers, a tied lm_head)."""
    bb = relax.BlockBuilder()
    attn = build_attention_function(bb, SPEC, 0)
    s = tirx.Var("s", "int64")
    ids = relax.Var("input_ids", relax.TensorType([1, s], "int64"))
    mask = relax.Var("attention_mask", relax.TensorType([1, s], "int64"))
    w = {name: relax.Var(name, relax.TensorType(list(shape), "float32")) for name, shape in WEIGHTS.items()
         if name not in (shared or {})}
    params = list(w.values())
    w.update({name: w[src] for name, src in (shared or {}).items()})
    with bb.function("main", [ids, mask, *params], attrs={"num_input": 2}):
        with bb.dataflow():
            def linear(x, name):  # [1, s, in] @ W^T
                return bb.emit(relax.op.matmul(x, bb.emit(relax.op.permute_dims(w[name]))))

            def norm(x, name):
                return bb.emit(relax.op.nn.rms_norm(x, w[name], axes=[-1], epsilon=1e-5))

            x = bb.emit(relax.op.take(w["emb"], ids, axis=0))  # [1, s, H]
            h = norm(x, "n1")
            q, k, v = linear(h, "wq"), linear(h, "wk"), linear(h, "wv")
            q = bb.emit(relax.op.reshape(q, [s, HQ, D]))
            k = bb.emit(relax.op.reshape(k, [s, HKV, D]))
            v = bb.emit(relax.op.reshape(v, [s, HKV, D]))
            o = bb.emit(relax.Call(attn, [q, k, v]))  # [s, HQ, D]
            o = bb.emit(relax.op.reshape(o, [1, s, HQ * D]))
            x = bb.emit(relax.op.add(x, linear(o, "wo")))
            h = norm(x, "n2")
            g = bb.emit(mlp_act(linear(h, "gate")))
            u = linear(h, "up")
            x = bb.emit(relax.op.add(x, linear(bb.emit(relax.op.multiply(g, u)), "down")))
            h = norm(x, "nf")
            out = bb.emit_output(relax.op.matmul(h, bb.emit(relax.op.permute_dims(w["head"]))))  # [1, s, V]
        bb.emit_func_output(out)
    return bb.get()


def test_recognize_model_before_expected():
    got = recognize_model(before())
    assert relax.analysis.check_well_formed(got.mod)
    tvm.ir.assert_structural_equal(got.mod, build_reference(SPEC), map_free_vars=True)
    assert list(got.params) == list(param_shapes(SPEC))
    assert got.params == dict(zip(param_shapes(SPEC), ((name, False) for name in WEIGHTS)))
    assert got.spec == dict(vocab_size=V, hidden_size=H, num_layers=1, intermediate_size=I, num_q_heads=HQ,
                            num_kv_heads=HKV, head_dim=D, rms_norm_eps=1e-5, tie_word_embeddings=False,
                            attention_bias=False, o_bias=False, qk_norm=False, dtype="float32", rope=RopeSpec(),
                            sliding_window=None)
    assert ModelSpec("LlamaForCausalLM", context_len=32, **got.spec) == SPEC


@pytest.mark.parametrize("shared", [{"n2": "n1", "nf": "n1"}, {"head": "emb"}], ids=["merged-norms", "tied"])
def test_a_weight_in_several_roles_gets_a_parameter_per_role(shared):
    """One parameter read in several roles: an exporter that merged identical initializers (the all-ones norms of a
    fresh model) or a tied lm_head. The reference form is the one for separate weights, each role's parameter
    read from the shared one."""
    got = recognize_model(before(shared=shared))
    spec = SPEC.replace(tie_word_embeddings="head" in shared)
    tvm.ir.assert_structural_equal(got.mod, build_reference(spec), map_free_vars=True)
    want = dict(zip(param_shapes(SPEC), WEIGHTS))  # kiln name -> the weight an unmerged graph would give it
    assert got.params == {name: (shared.get(src, src), False) for name, src in want.items() if name in param_shapes(spec)}
    assert got.spec["tie_word_embeddings"] == ("head" in shared)


def test_recognize_model_refuses_an_mlp_without_silu():
    with pytest.raises(PassError, match="neither MLP linear goes through SiLU"):
        recognize_model(before(mlp_act=relax.op.nn.gelu))
