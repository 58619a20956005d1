"""kiln.passes.lower_paged_attention: reference form -> serving form on TVM's paged KV cache.

Structure of the output (the ABI of kiln/ir/abi.py), numerical equivalence of every serving entry
point with the reference ``forward`` (compiled together with keep_reference=True and run in-process
on the llvm target) and the rejected inputs, each with a PassError that names what did not match.
"""

from __future__ import annotations

import numpy as np
import pytest

from kiln.errors import PassError
from kiln.frontend.reference import build_reference, param_shapes
from kiln.ir.abi import ENTRY_POINTS, REFERENCE_ENTRY
from kiln.ir.attention import is_attention
from kiln.ir.spec import ModelSpec, RopeSpec
from kiln.ir.tvm import IRModule, Target, relax, tvm
from kiln.ir.verify import verify_serving
from kiln.passes.lib.serving import KV_ATTENTION_BUILTIN
from kiln.passes.lower_paged_attention import lower_paged_attention

pytestmark = pytest.mark.cpu

LLVM = {"kind": "llvm"}
TOL = 1e-4
PAGE = 16

# Tiny specs: GQA with plain RoPE; and multi-head with q/k norm, q/k/v and o bias, tied embeddings
# and linear RoPE scaling (head_dim != hidden / heads); and GQA with llama3 RoPE scaling.
SPECS = {
    "gqa": ModelSpec("LlamaForCausalLM", vocab_size=101, hidden_size=64, intermediate_size=96, num_layers=2,
                     num_q_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, context_len=128),
    "qknorm-bias": ModelSpec("Qwen3ForCausalLM", vocab_size=101, hidden_size=64, intermediate_size=96,
                             num_layers=2, num_q_heads=4, num_kv_heads=4, head_dim=32, rms_norm_eps=1e-6,
                             context_len=128, rope=RopeSpec(theta=1e6, type="linear", factor=2.0), qk_norm=True,
                             attention_bias=True, o_bias=True, tie_word_embeddings=True),
    "gqa-llama3": ModelSpec("LlamaForCausalLM", vocab_size=101, hidden_size=64, intermediate_size=96,
                            num_layers=3, num_q_heads=4, num_kv_heads=1, head_dim=16, rms_norm_eps=1e-5,
                            context_len=128, rope=RopeSpec(theta=5e5, type="llama3", factor=8.0,
                                                           original_max_position_embeddings=16)),
}
SPEC = SPECS["gqa"]


def _target():
    return Target(LLVM)


def _public(mod: IRModule) -> dict:
    return {gv.name_hint: f for gv, f in mod.functions_items()
            if isinstance(f, relax.Function) and f.attrs is not None and "global_symbol" in f.attrs}


def _calls(func) -> list:
    found = []
    relax.analysis.post_order_visit(func.body, lambda e: found.append(e) if isinstance(e, relax.Call) else None)
    return found


def _kv_layer_ids(func) -> list[int]:
    """Layer ids of the paged-attention builtin calls in ``func``, in order."""
    ids = []
    for c in _calls(func):
        if isinstance(c.op, tvm.ir.Op) and c.op.name == "relax.call_dps_packed" and \
                str(c.args[0].global_symbol) == KV_ATTENTION_BUILTIN:
            ids.append(int(c.args[1].fields[1].value))
    return ids


def _shape(v) -> list:
    """A Var's or TensorType's shape, ints for constants and names for symbolic dims."""
    ty = v.ty if isinstance(v, relax.Var) else v
    return [int(s) if isinstance(s, tvm.tirx.IntImm) else str(s) for s in ty.shape]


# ------------------------------------------------------------------------------------------ structure


@pytest.fixture(scope="module")
def lowered():
    return lower_paged_attention(build_reference(SPEC), _target())


@pytest.fixture(scope="module")
def lowered_keep():
    return lower_paged_attention(build_reference(SPEC), _target(), keep_reference=True)


def test_emits_exactly_the_abi_entry_points(lowered):
    pub = _public(lowered)
    assert set(pub) == set(ENTRY_POINTS)
    for name, entry in ENTRY_POINTS.items():
        f = pub[name]
        assert int(f.attrs["num_input"]) == entry.num_input, name
        assert len(f.params) == len(entry.inputs), name
        assert str(f.attrs["global_symbol"]) == name
    verify_serving(lowered)


def test_signatures_follow_the_abi(lowered):
    H, V = SPEC.hidden_size, SPEC.vocab_size
    pub = _public(lowered)
    assert _shape(pub["embed"].params[0]) == ["seq_len"] and pub["embed"].params[0].ty.dtype == "int32"
    assert _shape(pub["embed"].ret_ty) == ["seq_len", H]
    assert _shape(pub["prefill"].params[0]) == [1, "seq_len", H]
    assert _shape(pub["decode"].params[0]) == [1, 1, H]
    assert _shape(pub["batch_prefill"].params[0]) == [1, "seq_len", H]
    assert _shape(pub["batch_prefill"].params[1]) == ["batch_size"]
    assert pub["batch_prefill"].params[1].ty.dtype == "int32"
    assert _shape(pub["batch_decode"].params[0]) == ["batch_size", 1, H]
    for name, rows in (("prefill", [1, 1]), ("decode", [1, 1]), ("batch_prefill", [1, "batch_size"]),
                       ("batch_decode", ["batch_size", 1])):
        ret = pub[name].ret_ty
        assert isinstance(ret, relax.TupleType) and len(ret.fields) == 2, name
        assert _shape(ret.fields[0]) == rows + [V], name
        assert ret.fields[0].dtype == "float32"
        # the cache comes in and goes out (threaded through)
        f = pub[name]
        result = {b.var: b.value for blk in f.body.blocks for b in blk.bindings}[f.body.body]
        assert isinstance(result, relax.Tuple) and result.fields[1].same_as(f.params[-2]), name


def test_every_attention_becomes_one_kv_cache_call(lowered):
    pub = _public(lowered)
    for name in ("prefill", "decode", "batch_prefill", "batch_decode"):
        assert _kv_layer_ids(pub[name]) == list(range(SPEC.num_layers)), name
    assert _kv_layer_ids(pub["embed"]) == []


def test_no_attention_composite_survives(lowered):
    assert REFERENCE_ENTRY.name not in {gv.name_hint for gv in lowered.get_global_vars()}
    assert not [gv.name_hint for gv, f in lowered.functions_items() if is_attention(f)]
    for gv, f in lowered.functions_items():
        if isinstance(f, relax.Function):
            called = [c.op.name_hint for c in _calls(f) if isinstance(c.op, relax.GlobalVar)]
            assert not [n for n in called if n.startswith("attention_L")], gv.name_hint


def test_keep_reference_keeps_forward_and_its_composites(lowered_keep):
    pub = _public(lowered_keep)
    assert set(pub) == set(ENTRY_POINTS) | {REFERENCE_ENTRY.name}
    assert int(pub["forward"].attrs["num_input"]) == REFERENCE_ENTRY.num_input
    composites = sorted(gv.name_hint for gv, f in lowered_keep.functions_items() if is_attention(f))
    assert composites == [f"attention_L{i}" for i in range(SPEC.num_layers)]
    # only forward calls them; the serving entries call the cache
    for name, f in pub.items():
        called = {c.op.name_hint for c in _calls(f) if isinstance(c.op, relax.GlobalVar)}
        assert (called >= set(composites)) if name == "forward" else not (called & set(composites)), name
    verify_serving(lowered_keep)


def test_prefills_gather_before_the_final_norm_and_lm_head(lowered):
    """On the reference form as the frontends build it (its output bound as ``gv = lv``), the prefills compute the
    final norm and lm_head for the wanted rows only, never a [seq_len, vocab] logits tensor."""
    for name in ("prefill", "batch_prefill"):
        text = lowered[name].script()
        assert f"(seq_len, {SPEC.vocab_size})" not in text, name
        lines = text.splitlines()
        at = lambda part: next(i for i, line in enumerate(lines) if part in line)
        gather = at("R.call_tir(take_last_row" if name == "prefill" else "R.take(")
        final_norm = max(i for i, line in enumerate(lines) if "R.nn.rms_norm(" in line)
        assert gather < final_norm < at("R.permute_dims(lm_head"), name


def test_verify_serving_rejects_a_missing_entry_point(lowered):
    broken = IRModule({gv: f for gv, f in lowered.functions_items() if gv.name_hint != "decode"})
    with pytest.raises(PassError, match="decode"):
        verify_serving(broken)


def test_pass_output_is_well_formed_and_pass_is_pure():
    ref = build_reference(SPEC)
    before = ref.script()
    out = lower_paged_attention(ref, _target())
    assert relax.analysis.check_well_formed(out)
    assert ref.script() == before  # the input module is not mutated


# ------------------------------------------------------------------------------------------ numerics


class Paged:
    """The in-process VM of a module compiled with keep_reference=True, plus the KV-cache builtins."""

    def __init__(self, spec: ModelSpec, seed: int = 0):
        target = _target()
        mod = lower_paged_attention(build_reference(spec), target, keep_reference=True)
        ex = tvm.compile(mod, target=target, relax_pipeline=relax.backend.cpu_generic.get_default_pipeline(target))
        self.spec, self.dev = spec, tvm.cpu()
        self.vm = relax.VirtualMachine(ex, self.dev)
        rng = np.random.default_rng(seed)
        self.params = []
        for name, shape in param_shapes(spec).items():
            a = 1.0 + 0.1 * rng.standard_normal(shape) if "norm" in name else 0.15 * rng.standard_normal(shape)
            self.params.append(tvm.runtime.tensor(a.astype("float32"), self.dev))
        g = tvm.get_global_func
        self._add, self._begin = g("vm.builtin.kv_state_add_sequence"), g("vm.builtin.kv_state_begin_forward")
        self._end, self._reshape = g("vm.builtin.kv_state_end_forward"), g("vm.builtin.reshape")
        self._seqlen = g("vm.builtin.attention_kv_cache_get_sequence_length")
        self.rng = rng

    def tokens(self, n: int) -> list[int]:
        return [int(t) for t in self.rng.integers(0, self.spec.vocab_size, n)]

    def _t(self, a, dtype="int32"):
        return tvm.runtime.tensor(np.asarray(a, dtype), self.dev)

    def forward(self, ids) -> np.ndarray:
        return self.vm["forward"](self._t(ids), self.params).numpy()  # [n, V]

    def new_cache(self):
        S = tvm.runtime.ShapeTuple
        return self.vm["create_paged_kv_cache"](S([4]), S([512]), S([64]), S([PAGE]), S([0]))

    def _embed(self, ids, shape):
        e = self.vm["embed"](self._t(ids), self.params)
        return self._reshape(e, tvm.runtime.ShapeTuple(shape))

    def _step(self, kv, seqs, lens, fn, *args):
        S = tvm.runtime.ShapeTuple
        self._begin(kv, S(seqs), S(lens))
        logits, kv2 = self.vm[fn](*args, kv, self.params)
        self._end(kv)
        assert kv2.same_as(kv)
        return logits.numpy()

    def add(self, kv, seq):
        self._add(kv, seq)

    def seq_len(self, kv, seq) -> int:
        return int(self._seqlen(kv, seq))

    def prefill(self, kv, seq, ids) -> np.ndarray:  # -> [V], the last token's logits
        H = self.spec.hidden_size
        out = self._step(kv, [seq], [len(ids)], "prefill", self._embed(ids, [1, len(ids), H]))
        assert out.shape == (1, 1, self.spec.vocab_size)
        return out[0, 0]

    def decode(self, kv, seq, tok) -> np.ndarray:
        out = self._step(kv, [seq], [1], "decode", self._embed([tok], [1, 1, self.spec.hidden_size]))
        return out[0, 0]

    def batch_prefill(self, kv, seqs, prompts) -> np.ndarray:  # -> [b, V]
        flat = [t for p in prompts for t in p]
        last = np.cumsum([len(p) for p in prompts]) - 1
        out = self._step(kv, seqs, [len(p) for p in prompts], "batch_prefill",
                         self._embed(flat, [1, len(flat), self.spec.hidden_size]), self._t(last))
        assert out.shape == (1, len(seqs), self.spec.vocab_size)
        return out[0]

    def batch_decode(self, kv, seqs, toks) -> np.ndarray:  # -> [b, V]
        out = self._step(kv, seqs, [1] * len(seqs), "batch_decode",
                         self._embed(toks, [len(toks), 1, self.spec.hidden_size]))
        assert out.shape == (len(seqs), 1, self.spec.vocab_size)
        return out[:, 0]


def _close(got, want, what):
    err = float(np.abs(np.asarray(got) - np.asarray(want)).max())
    assert err <= TOL, f"{what}: max |delta logit| {err:.3g} > {TOL}"
    return err


@pytest.fixture(scope="module", params=list(SPECS))
def paged(request) -> Paged:
    return Paged(SPECS[request.param])


def test_reference_logits_are_not_degenerate(paged):
    ids = paged.tokens(20)
    ref = paged.forward(ids)
    assert ref.shape == (20, paged.spec.vocab_size) and np.isfinite(ref).all()
    assert ref.std() > 0.5  # far above TOL, so the comparisons below mean something
    # causal: a prefix's logits do not depend on later tokens
    _close(paged.forward(ids[:7]), ref[:7], "forward on a prefix")
    assert np.abs(paged.forward(ids[:6] + [(ids[6] + 1) % paged.spec.vocab_size])[6] - ref[6]).max() > 1e-2


def test_prefill_then_decode_matches_forward(paged):
    ids = paged.tokens(40)  # prefill 21 tokens (crosses a page), then decode 19 (crosses two more)
    ref = paged.forward(ids)
    kv = paged.new_cache()
    paged.add(kv, 0)
    _close(paged.prefill(kv, 0, ids[:21]), ref[20], "prefill")
    for i in range(21, 40):
        _close(paged.decode(kv, 0, ids[i]), ref[i], f"decode at position {i}")
    assert paged.seq_len(kv, 0) == 40


def test_batch_prefill_of_ragged_new_sequences(paged):
    prompts = [paged.tokens(n) for n in (5, 19, 11)]
    kv = paged.new_cache()
    for s in (0, 1, 2):
        paged.add(kv, s)
    out = paged.batch_prefill(kv, [0, 1, 2], prompts)
    for s, p in enumerate(prompts):
        _close(out[s], paged.forward(p)[-1], f"batch_prefill row {s} (length {len(p)})")
        assert paged.seq_len(kv, s) == len(p)
    # the rows really differ (each row is its own sequence, not one broadcast row)
    assert np.abs(out[0] - out[1]).max() > 1e-2


def test_batch_decode_of_sequences_at_different_lengths(paged):
    kv = paged.new_cache()
    seqs = {3: paged.tokens(9), 0: paged.tokens(17), 5: paged.tokens(2)}
    for s in seqs:
        paged.add(kv, s)
    paged.batch_prefill(kv, list(seqs), list(seqs.values()))
    order = [0, 5, 3]  # a different order than at prefill
    for step in range(4):
        toks = paged.tokens(len(order))
        out = paged.batch_decode(kv, order, toks)
        for row, (s, t) in enumerate(zip(order, toks)):
            seqs[s].append(t)
            _close(out[row], paged.forward(seqs[s])[-1], f"batch_decode step {step} seq {s} (len {len(seqs[s])})")
    assert [paged.seq_len(kv, s) for s in order] == [len(seqs[s]) for s in order]


def test_prefill_and_batch_prefill_on_a_cache_with_history(paged):
    """New sequences prefilled next to a running one; decode of the old one is unaffected."""
    kv = paged.new_cache()
    old = paged.tokens(13)
    paged.add(kv, 0)
    paged.prefill(kv, 0, old)
    new = [paged.tokens(6), paged.tokens(3)]
    paged.add(kv, 1)
    paged.add(kv, 2)
    out = paged.batch_prefill(kv, [1, 2], new)
    for r, p in enumerate(new):
        _close(out[r], paged.forward(p)[-1], f"batch_prefill next to a running sequence, row {r}")
    tok = paged.tokens(1)[0]
    _close(paged.decode(kv, 0, tok), paged.forward(old + [tok])[-1], "decode of the running sequence")


def test_chunked_prefill_equals_unchunked(paged):
    ids = paged.tokens(30)
    nxt = paged.tokens(2)
    ref = paged.forward(ids + nxt)
    kv = paged.new_cache()
    paged.add(kv, 0)  # unchunked
    paged.add(kv, 1)  # the same prompt in two chunks (the split is not page-aligned)
    whole = paged.prefill(kv, 0, ids)
    first = paged.prefill(kv, 1, ids[:11])
    second = paged.prefill(kv, 1, ids[11:])
    _close(first, ref[10], "first chunk")
    _close(second, whole, "chunked vs unchunked prefill")
    _close(whole, ref[29], "unchunked prefill vs forward")
    assert paged.seq_len(kv, 0) == paged.seq_len(kv, 1) == 30
    # the caches hold the same keys/values: decoding continues identically on both
    for i, t in enumerate(nxt):
        a, b = paged.batch_decode(kv, [0, 1], [t, t])
        _close(a, b, f"decode {i} after chunked vs unchunked prefill")
        _close(a, ref[30 + i], f"decode {i} vs forward")


# ------------------------------------------------------------------------------------------ rejected


def _with_attr(mod: IRModule, layer: int, key: str, value) -> IRModule:
    gv = mod.get_global_var(f"attention_L{layer}")
    mod[gv] = mod[gv].with_attr(key, value)
    return mod


def _lower(mod):
    return lower_paged_attention(mod, _target())


def test_reference_module_is_accepted():
    """The unmodified module the rejection cases start from goes through (so they fail for their reason)."""
    assert set(_public(_lower(build_reference(SPEC)))) == set(ENTRY_POINTS)


def test_rejects_module_without_forward():
    ref = build_reference(SPEC)
    mod = IRModule({gv: f for gv, f in ref.functions_items() if gv.name_hint != "forward"})
    with pytest.raises(PassError, match="no 'forward' function"):
        _lower(mod)


def _tiny_forward(layers: list[ModelSpec]) -> IRModule:
    """A minimal reference-form module: embed, then per layer q/k/v projections, a composite built
    from that layer's spec (so attributes and operand types agree), o projection; then lm_head."""
    from kiln.ir.attention import build_attention_function

    V, H = 31, 32
    bb = relax.BlockBuilder()
    gvs = [build_attention_function(bb, s, i) for i, s in enumerate(layers)]
    shapes = [[V, H]]
    for s in layers:
        qd, kvd = s.num_q_heads * s.head_dim, s.num_kv_heads * s.head_dim
        shapes += [[H, qd], [H, kvd], [H, kvd], [qd, H]]
    shapes.append([H, V])
    n = tvm.tirx.Var("seq_len", "int64")
    ids = relax.Var("input_ids", relax.TensorType([n], "int32"))
    params = relax.Var("params", relax.TupleType([relax.TensorType(sh, "float32") for sh in shapes]))
    with bb.function("forward", [ids, params], attrs={"num_input": 1}):
        with bb.dataflow():
            w = [bb.emit(relax.TupleGetItem(params, i)) for i in range(len(shapes))]
            x = bb.emit(relax.op.take(w[0], ids, axis=0))
            for i, (s, gv) in enumerate(zip(layers, gvs)):
                wq, wk, wv, wo = w[1 + 4 * i:5 + 4 * i]
                q = bb.emit(relax.op.reshape(relax.op.matmul(x, wq), [n, s.num_q_heads, s.head_dim]))
                k = bb.emit(relax.op.reshape(relax.op.matmul(x, wk), [n, s.num_kv_heads, s.head_dim]))
                v = bb.emit(relax.op.reshape(relax.op.matmul(x, wv), [n, s.num_kv_heads, s.head_dim]))
                o = bb.emit(relax.Call(gv, [q, k, v]))
                o = bb.emit(relax.op.reshape(o, [n, s.num_q_heads * s.head_dim]))
                x = bb.emit(relax.op.add(x, relax.op.matmul(o, wo)))
            out = bb.emit_output(relax.op.matmul(x, w[-1]))
        bb.emit_func_output(out)
    return bb.get()


def test_tiny_forward_is_accepted():
    """The hand-built module of the next tests is valid reference form when its layers agree."""
    layer = SPEC.replace(hidden_size=32)
    out = _lower(_tiny_forward([layer, layer]))
    assert set(_public(out)) == set(ENTRY_POINTS)
    assert _kv_layer_ids(_public(out)["decode"]) == [0, 1]


def test_rejects_forward_without_attention_composite():
    with pytest.raises(PassError, match="calls no kiln attention composite"):
        _lower(_tiny_forward([]))


@pytest.mark.parametrize("ids", [(0, 0), (0, 2), (1, 2)])
def test_rejects_layer_ids_not_0_to_L_minus_1(ids):
    mod = build_reference(SPEC)
    for layer, lid in enumerate(ids):
        mod = _with_attr(mod, layer, "kiln.layer_id", lid)
    with pytest.raises(PassError, match=r"layer ids must be 0\.\.1, got \[%d, %d\]" % tuple(sorted(ids))):
        _lower(mod)


@pytest.mark.parametrize("change", [{"num_q_heads": 8}, {"num_kv_heads": 4}, {"num_kv_heads": 1},
                                    {"head_dim": 32}])
def test_rejects_composites_disagreeing_on_heads(change):
    layer0 = SPEC.replace(hidden_size=32)
    mod = _tiny_forward([layer0, layer0.replace(**change)])
    with pytest.raises(PassError, match="layer 1 has a head configuration different from layer 0"):
        _lower(mod)


@pytest.mark.parametrize("key,value", [("kiln.num_q_heads", 8), ("kiln.num_kv_heads", 1), ("kiln.head_dim", 32)])
def test_rejects_attributes_that_contradict_the_operands(key, value):
    """Every layer says the same (so they agree with each other), but not what q/k/v are."""
    mod = build_reference(SPEC)
    for layer in range(SPEC.num_layers):
        mod = _with_attr(mod, layer, key, value)
    with pytest.raises(PassError, match=r"attention_L0 is called with q, k, v of shapes .* but its attributes say"):
        _lower(mod)


def test_rejects_composites_disagreeing_on_rope():
    mod = _with_attr(build_reference(SPEC), 1, "kiln.rope_theta", 500000.0)
    with pytest.raises(PassError, match="layer 1 uses different RoPE parameters"):
        _lower(mod)


def test_rejects_non_causal_attention():
    mod = _with_attr(build_reference(SPEC), 0, "kiln.causal", 0)
    with pytest.raises(PassError, match="attention_L0 is not causal"):
        _lower(mod)


def test_rejects_sliding_window():
    mod = _with_attr(build_reference(SPEC), 1, "kiln.sliding_window", 32)
    with pytest.raises(PassError, match="attention_L1 has a sliding window"):
        _lower(mod)
    # a window the model was built with is rejected the same way
    with pytest.raises(PassError, match="sliding window"):
        _lower(build_reference(SPEC.replace(sliding_window=64)))


def test_rejects_rope_other_than_rotate_half():
    mod = _with_attr(build_reference(SPEC), 0, "kiln.rope", "gptj")
    with pytest.raises(PassError, match="uses RoPE 'gptj'; only rotate-half"):
        _lower(mod)


def test_rejects_legalized_module():
    mod = relax.transform.LegalizeOps()(build_reference(SPEC))
    with pytest.raises(PassError, match="did LegalizeOps run before this pass"):
        _lower(mod)


# ------------------------------------------------------------------------------------------ Before/Expected

BE = ModelSpec("LlamaForCausalLM", vocab_size=10, hidden_size=8, intermediate_size=8, num_layers=1, num_q_heads=2,
               num_kv_heads=1, head_dim=4, rms_norm_eps=1e-6, context_len=32)
BE_SHAPES = {"embed_tokens": (10, 8), "q_proj": (8, 8), "k_proj": (4, 8), "v_proj": (4, 8), "o_proj": (8, 8),
             "final_norm": (8,)}
BE_PARAMS = relax.TupleType([relax.TensorType(list(s), "float32") for s in BE_SHAPES.values()])


def _be_layer(bb, x, w, n, attend):
    """One layer on x [n, 8] with weights w: q/k/v linears, ``attend(q, k, v)``, o linear and residual add.
    Returns the residual stream after the layer."""
    def linear(x, name):
        return bb.emit(relax.op.matmul(x, bb.emit(relax.op.permute_dims(w[name]))))

    q = bb.emit(relax.op.reshape(linear(x, "q_proj"), [n, 2, 4]))
    k = bb.emit(relax.op.reshape(linear(x, "k_proj"), [n, 1, 4]))
    v = bb.emit(relax.op.reshape(linear(x, "v_proj"), [n, 1, 4]))
    o = attend(q, k, v)
    return bb.emit(relax.op.add(x, linear(bb.emit(relax.op.reshape(o, [n, 8])), "o_proj")))


def _be_tail(bb, x, w):
    h = bb.emit(relax.op.nn.rms_norm(x, w["final_norm"], axes=[-1], epsilon=1e-6))
    return relax.op.matmul(h, bb.emit(relax.op.permute_dims(w["embed_tokens"])))  # tied lm_head


def _be_before() -> IRModule:
    """forward: embed, one GQA layer (2 q heads, 1 kv head, head_dim 4), final norm, tied lm_head."""
    from kiln.ir.attention import build_attention_function

    bb = relax.BlockBuilder()
    gv = build_attention_function(bb, BE, 0)
    n = tvm.tirx.Var("seq_len", "int64")
    ids = relax.Var("input_ids", relax.TensorType([n], "int32"))
    packed = relax.Var("params", BE_PARAMS)
    with bb.function("forward", [ids, packed], attrs={"num_input": 1}):
        with bb.dataflow():
            w = {name: bb.emit(relax.TupleGetItem(packed, i)) for i, name in enumerate(BE_SHAPES)}
            x = bb.emit(relax.op.take(w["embed_tokens"], ids, axis=0))
            x = _be_layer(bb, x, w, n, lambda q, k, v: bb.emit(relax.Call(gv, [q, k, v])))
            out = bb.emit_output(_be_tail(bb, x, w))
        bb.emit_func_output(out)
    return bb.get()


def _be_expected(mod: IRModule) -> IRModule:
    """The five serving functions and create_paged_kv_cache added to ``mod`` (new PrimFuncs are numbered after
    the composites' ones, as in the pass's output); then forward and what only it reached dropped."""
    from kiln.ir.tvm import RopeMode, TIRPagedKVCache, te

    bb = relax.BlockBuilder(mod)
    idx = relax.Var("input_ids", relax.TensorType([tvm.tirx.Var("seq_len", "int64")], "int32"))
    packed = relax.Var("params", BE_PARAMS)
    with bb.function("embed", [idx, packed], attrs={"num_input": 1}):
        with bb.dataflow():
            out = bb.emit_output(relax.op.take(bb.emit(relax.TupleGetItem(packed, 0)), idx, axis=0, mode="fast"))
        bb.emit_func_output(out)

    def serving(name, n, embed_shape, rows):
        """``name``(embeds, [logit_positions,] kv, params): forward on the cache; the logits reshaped to ``rows``."""
        embeds = relax.Var("input_embeds" if name.startswith("batch") else "input_embed",
                           relax.TensorType(embed_shape, "float32"))
        positions = relax.Var("logit_positions", relax.TensorType([rows[1]], "int32"))
        kv = relax.Var("paged_kv_cache", relax.AnyType())
        packed = relax.Var("params", BE_PARAMS)
        inputs = [embeds, positions, kv, packed] if name == "batch_prefill" else [embeds, kv, packed]
        with bb.function(name, inputs, attrs={"num_input": len(inputs) - 1}):
            with bb.dataflow():
                w = {nm: bb.emit(relax.TupleGetItem(packed, i)) for i, nm in enumerate(BE_SHAPES)}
                x = bb.emit(relax.op.reshape(embeds, [n, 8]))

                def attend(q, k, v):  # RoPE, append and attention in TVM's builtin, on q|k|v heads
                    qkv = bb.emit(relax.op.concat([q, k, v], axis=1))
                    return bb.emit(relax.call_dps_packed(
                        "vm.builtin.attention_kv_cache_attention_with_fused_qkv",
                        [kv, relax.prim_value(0), relax.prim_value(0.5), qkv],
                        out_ty=relax.TensorType([n, 2, 4], "float32")))

                x = _be_layer(bb, x, w, n, attend)
                if name == "prefill":  # the last token's row, before the token-wise tail
                    x = bb.emit_te(lambda t: te.compute((1, t.shape[1]), lambda i, j: t[t.shape[0] - 1, j],
                                                        name="last_row"), x, primfunc_name_hint="take_last_row")
                elif name == "batch_prefill":  # the wanted rows
                    x = bb.emit(relax.op.take(x, positions, axis=0, mode="clip"))
                logits = bb.emit(_be_tail(bb, x, w))
                logits = bb.emit(relax.op.reshape(logits, rows))
                out = bb.emit_output(relax.Tuple([logits, kv]))
            bb.emit_func_output(out)

    seq, batch, one = tvm.tirx.Var("seq_len", "int64"), tvm.tirx.Var("batch_size", "int64"), tvm.tirx.IntImm("int64", 1)
    serving("prefill", seq, [1, seq, 8], [1, 1, 10])
    serving("decode", one, [1, 1, 8], [1, 1, 10])
    seq2, b = tvm.tirx.Var("seq_len", "int64"), tvm.tirx.Var("batch_size", "int64")
    serving("batch_prefill", seq2, [1, seq2, 8], [1, b, 10])
    serving("batch_decode", batch, [batch, 1, 8], [batch, 1, 10])

    svars = [tvm.tirx.Var(s, "int64") for s in ("max_batch_size", "max_total_seq_len", "prefill_chunk_size",
                                                "page_size", "support_sliding_window")]
    with bb.function("create_paged_kv_cache", [relax.Var(v.name + "_", relax.ShapeType([v])) for v in svars],
                     attrs={"num_input": 5}):
        cache = TIRPagedKVCache(
            attn_kind="mha", max_batch_size=svars[0], max_total_seq_len=svars[1], prefill_chunk_size=svars[2],
            page_size=svars[3], support_sliding_window=svars[4], layer_partition=relax.ShapeExpr([0, 1]),
            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, qk_head_dim=4, v_head_dim=4,
            mla_original_qk_head_dim=0, mla_original_v_head_dim=0, rope_mode=RopeMode.NORMAL, rope_scale=1.0,
            rope_theta=10000.0, rope_scaling={}, rope_ext_factors=relax.prim_value(0), rotary_dim=4,
            enable_disaggregation=False, dtype="float32", target=_target())
        bb.emit_func_output(bb.emit(cache._expr))
    out = IRModule({gv: f for gv, f in bb.get().functions_items() if gv.name_hint != "forward"})
    return relax.transform.DeadCodeElimination(list(ENTRY_POINTS))(out)


def test_lower_paged_attention_before_expected():
    mod = _be_before()
    got = _lower(mod)
    assert relax.analysis.check_well_formed(got)
    tvm.ir.assert_structural_equal(got, _be_expected(mod), map_free_vars=True)
