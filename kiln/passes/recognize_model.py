"""Turn a recognised imported graph into kiln's reference form, naming every weight by its role.

Precondition: recognize_attention (and recognize_rms_norm, recognize_swiglu) ran, so ``main(input_ids
[1, s], *other inputs, *weights)`` holds attention composites and no other op mixes tokens. This pass:

1. finds the Llama-family structure around the composites — embedding ``take``, per layer the input
   RMSNorm, q/k/v linears (optional biases, optional q/k RMSNorm), o linear and residual add, the
   post-attention RMSNorm, the SwiGLU MLP (gate, up, down) and its residual add, then the final norm
   and the lm_head (tied when it is the embedding) — and names each weight as kiln's reference form
   does (``layers.{i}.q_proj``, ... see frontend/reference.py ``param_shapes``);
2. rebuilds the function as ``forward(input_ids: [n] int32, params: Tuple) -> logits [n, V] float32``:
   the batch axis of ``[1, s, ...]`` activations dropped, the embedding reading ``input_ids`` directly
   (an exporter's index clean-up, e.g. ONNX's negative-index wrap, goes with the old input), each
   linear ``matmul(x, permute_dims(W))`` with ``W: [out, in]`` (a weight stored pre-transposed, as the
   ONNX exporter does, becomes a transposed parameter), the params packed in ``param_shapes`` order;
3. reports the ModelSpec fields the graph determines and where each parameter comes from.

A weight may serve several roles: an exporter that merges identical initializers gives the zero q/k/v
biases or the all-ones norms of a freshly initialised model one tensor, and a tied lm_head reads the
embedding. Each binding that reads a weight first gets its own copy of it (``_one_reader_per_weight``), so
each role gets its own parameter under kiln's name (the same values), as for an unmerged export; an
lm_head whose copy comes from the embedding is tied.

Anything outside that structure fails with a PassError naming the node (kiln then knows it cannot size
the KV cache or quantize the linears correctly). Inputs other than ``input_ids`` (the attention mask)
must no longer be read. Invariant: ``forward`` computes the imported graph's logits for batch 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import PassError
from ..ir.abi import REFERENCE_ENTRY
from ..ir.attention import is_attention
from ..ir.spec import RopeSpec
from ..ir.tvm import IRModule, relax, tirx, tvm
from .lib.graph_view import ENTRY, GraphView, describe, int_dims, op_name, shape_of, substitute

PASS = "recognize_model"
_PASSTHROUGH = {"reshape", "astype"}  # (and the channel permutation of interleaved RoPE, see up())


@dataclass
class _Linear:
    x: relax.Var  # the input activation (above any reshape)
    weight: relax.Var  # the weight parameter
    transposed: bool  # True: stored [in, out] (y = x @ W); kiln's parameter is its transpose
    bias: relax.Var | None
    out: relax.Var  # the var holding y (after the bias)


@dataclass
class RecognizedModel:
    """What recognize_model found besides the module."""

    mod: IRModule
    # kiln parameter name -> (source parameter name, transposed), in the packed tuple's order
    params: dict[str, tuple[str, bool]]
    spec: dict = field(default_factory=dict)  # ModelSpec fields read off the graph


class _Roles:
    def __init__(self, g: GraphView, mod: IRModule, source: dict):
        self.g, self.mod = g, mod
        self.source = source  # a weight's copy -> the imported parameter it copies (_one_reader_per_weight)
        self.names: dict = {}  # weight var -> (kiln name, transposed)
        self.spec: dict = {}

    def fail(self, where, what: str):
        node = describe(where, self.g.value.get(where)) if isinstance(where, relax.Var) else str(where)
        raise PassError(f"{PASS}: {what} (at {node}); kiln recognises Llama-family decoders (RMSNorm, "
                        "attention with RoPE, SwiGLU MLP)")

    def up(self, v):
        """v above reshapes, casts and a constant channel permutation (recognize_attention's for interleaved
        RoPE)."""
        while isinstance(v, relax.Var) and (self.g.op(v) in _PASSTHROUGH or (
                self.g.op(v) == "take" and isinstance(self.g.value[v].args[1], tvm.ir.Constant))):
            v = self.g.value[v].args[0]
        return v

    def down(self, v) -> list:
        """The users of v, looking through reshapes and casts (each user's var)."""
        out = []
        for u in self.g.users.get(v, []):
            if u is not None and self.g.op(u) in _PASSTHROUGH:
                out += self.down(u)
            elif u is not None:
                out.append(u)
        return out

    def linear(self, v) -> _Linear | None:
        g = self.g
        v = self.up(v)
        call, bias, out = g.call(v), None, v
        if op_name(call) == "add":
            for m, b in (call.args, call.args[::-1]):
                if g.is_weight(b) and len(shape_of(b)) == 1 and op_name(g.call(self.up(m))) == "matmul":
                    bias, call = b, g.call(self.up(m))
                    break
        if op_name(call) != "matmul":
            return None
        x, w = call.args
        if isinstance(w, relax.Var) and g.op(w) == "permute_dims" and g.is_weight(g.value[w].args[0]):
            return _Linear(self.up(x), g.value[w].args[0], False, bias, out)
        if g.is_weight(w) and len(shape_of(w)) == 2:
            return _Linear(self.up(x), w, True, bias, out)
        return None

    def name(self, w, name: str, transposed: bool = False):
        if w in self.names and self.names[w][0] != name:
            if {self.names[w][0], name} == {"embed_tokens", "lm_head"}:
                return  # tied
            self.fail(w, f"the weight {w.name} plays two roles ({self.names[w][0]} and {name})")
        self.names[w] = (name, transposed)

    def norm(self, v, name: str):
        """The RMSNorm producing v: its input; names its weight."""
        v = self.up(v)
        call = self.g.call(v)
        if op_name(call) != "nn.rms_norm" or not self.g.is_weight(call.args[1]):
            self.fail(v, f"expected an RMSNorm ({name})")
        self.name(call.args[1], name)
        self.spec.setdefault("eps", set()).add(float(call.attrs.epsilon))
        return self.up(call.args[0])

    def residual(self, v, branch):
        """The residual stream x of the add ``x + branch`` that consumes branch."""
        users = self.down(branch)
        adds = [u for u in users if self.g.op(u) == "add"]
        if len(users) != 1 or not adds:
            self.fail(branch, "the branch output does not go into one residual add")
        a, b = self.g.value[adds[0]].args
        return adds[0], self.up(b if self.up(a).same_as(self.up(branch)) or a.same_as(branch) else a)

    def find(self, attn_calls: list):
        g = self.g
        x = None  # the residual stream entering each layer
        for i, (var, call) in enumerate(attn_calls):
            p = f"layers.{i}."
            proj = {}
            for role, arg in zip(("q", "k", "v"), call.args):
                src = self.up(arg)
                if role in "qk" and op_name(g.call(src)) == "nn.rms_norm":  # q/k norm over the head dim
                    self.spec["qk_norm"] = True
                    src = self.norm(src, p + f"{role}_norm")
                lin = self.linear(src)
                if lin is None:
                    self.fail(src, f"layer {i}: the {role} input of attention is not a linear projection")
                proj[role] = lin
                self.name(lin.weight, p + f"{role}_proj", lin.transposed)
                if lin.bias is not None:
                    self.name(lin.bias, p + f"{role}_bias")
            h = proj["q"].x
            if not all(proj[r].x.same_as(h) for r in "kv"):
                self.fail(var, f"layer {i}: q, k and v are not projections of one input")
            biases = [proj[r].bias is not None for r in "qkv"]
            if any(biases) and not all(biases):
                self.fail(var, f"layer {i}: only some of q/k/v have a bias")
            self.spec.setdefault("attention_bias", set()).add(all(biases))
            self.spec.setdefault("qk_norm_layers", set()).add(bool(self.spec.get("qk_norm")))
            layer_in = self.norm(h, p + "input_norm")
            if x is not None and not layer_in.same_as(x):
                self.fail(layer_in, f"layer {i} does not read the residual stream of layer {i - 1}")
            x = layer_in
            outs = [u for u in self.down(var)]
            o = self.linear(outs[0]) if len(outs) == 1 else None
            if o is None:
                self.fail(var, f"layer {i}: the attention output does not go into one linear (o_proj)")
            self.name(o.weight, p + "o_proj", o.transposed)
            if o.bias is not None:
                self.name(o.bias, p + "o_bias")
            self.spec.setdefault("o_bias", set()).add(o.bias is not None)
            x1, resid = self.residual(o.out, o.out)
            if not resid.same_as(x):
                self.fail(x1, f"layer {i}: the attention residual does not add to the layer input")
            # MLP: post norm -> gate, up -> silu(gate) * up -> down -> residual
            norms = [u for u in self.down(x1) if g.op(u) == "nn.rms_norm"]
            if len(norms) != 1:
                self.fail(x1, f"layer {i}: no single RMSNorm after the attention residual")
            self.norm(norms[0], p + "post_attention_norm")
            lins = [self.linear(u) for u in self.down(norms[0])]
            if len(lins) != 2 or None in lins:
                self.fail(norms[0], f"layer {i}: the MLP input does not feed two linears (gate, up)")
            gate = next((ln for ln in lins if [g.op(u) for u in self.down(ln.out)] == ["nn.silu"]), None)
            up = next((ln for ln in lins if ln is not gate), None)
            if gate is None:
                self.fail(norms[0], f"layer {i}: neither MLP linear goes through SiLU (SwiGLU)")
            act = self.down(gate.out)[0]
            muls = self.down(act)
            if len(muls) != 1 or g.op(muls[0]) != "multiply" or muls[0] not in self.down(up.out):
                self.fail(act, f"layer {i}: SiLU(gate) is not multiplied by up (SwiGLU)")
            down_users = self.down(muls[0])
            down = self.linear(down_users[0]) if len(down_users) == 1 else None
            if down is None:
                self.fail(muls[0], f"layer {i}: the SwiGLU product does not go into one linear (down_proj)")
            for ln, nm in ((gate, "gate_proj"), (up, "up_proj"), (down, "down_proj")):
                if ln.bias is not None:
                    self.fail(ln.out, f"layer {i}: {nm} has a bias")
                self.name(ln.weight, p + nm, ln.transposed)
            self.spec["intermediate_size"] = self.spec.get("intermediate_size") or \
                shape_of(gate.weight)[1 if gate.transposed else 0]
            x2, resid = self.residual(down.out, down.out)
            if not resid.same_as(x1):
                self.fail(x2, f"layer {i}: the MLP residual does not add to the attention residual")
            x = x2
        # final norm and lm_head
        norms = [u for u in self.down(x) if g.op(u) == "nn.rms_norm"]
        if len(norms) != 1:
            self.fail(x, "no single final RMSNorm after the last layer")
        self.norm(norms[0], "final_norm")
        heads = [self.linear(u) for u in self.down(norms[0])]
        if len(heads) != 1 or heads[0] is None:
            self.fail(norms[0], "the final norm does not feed one linear (lm_head)")
        head = heads[0]
        tied = self.source.get(head.weight, head.weight)
        self.spec["tie_word_embeddings"] = any(self.source.get(w, w).same_as(tied) and n == "embed_tokens"
                                               for w, (n, _) in self.names.items())
        if head.bias is not None:
            self.fail(head.out, "the lm_head has a bias")
        self.name(head.weight, "embed_tokens" if self.spec["tie_word_embeddings"] else "lm_head", head.transposed)
        return head


def _embedding(g: GraphView):
    """(var, weight) of the embedding ``take(W, f(input_ids), axis=0)`` and the vars of f."""
    takes = [b.var for b in g.bindings if g.op(b.var) == "take" and b.var in g.token and
             g.is_weight(g.value[b.var].args[0]) and int(g.value[b.var].attrs.axis) == 0]
    if len(takes) != 1:
        raise PassError(f"{PASS}: expected one embedding lookup take(W, input_ids, axis=0), found {len(takes)}")
    var = takes[0]
    chain, stack = set(), [g.value[var].args[1]]
    while stack:  # the index clean-up between input_ids and the lookup: token-dependent, read only there
        v = stack.pop()
        if not isinstance(v, relax.Var) or v not in g.value or v not in g.token or v in chain:
            continue
        if g.op(v) not in ("astype", "reshape", "less", "add", "where", "expand_dims", "squeeze"):
            raise PassError(f"{PASS}: the token ids reach the embedding through {describe(v, g.value[v])}")
        chain.add(v)
        stack.extend(relax.analysis.free_vars(g.value[v]))
    for v in chain:
        if any(u is not None and u not in chain and not u.same_as(var) for u in g.users[v]):
            raise PassError(f"{PASS}: {describe(v, g.value[v])} reads the token ids outside the embedding")
    return var, g.value[var].args[0], chain


def _one_reader_per_weight(func: relax.Function) -> tuple[relax.Function, dict]:
    """``func`` where each weight parameter is read by one binding: every further binding that reads it reads
    a new parameter of the same name and type instead (appended to the parameters). Returns the function and
    {copy: original}."""
    num_input = int(func.attrs["num_input"])
    weights = set(func.params[num_input:])
    seen, source, bindings = set(), {}, []
    for b in func.body.blocks[0].bindings:
        fresh = {}
        for v in relax.analysis.free_vars(b.value):
            if v in weights and v in seen:
                fresh[v] = relax.Var(v.name, v.ty)
                source[fresh[v]] = v
            seen.add(v)
        bindings.append(relax.VarBinding(b.var, substitute(b.value, fresh)) if fresh else b)
    if not source:
        return func, source
    body = relax.SeqExpr([relax.DataflowBlock(bindings)], func.body.body)
    new = relax.Function([*func.params, *source], body, func.ret_ty, func.is_pure, func.attrs)
    return new, source


def recognize_model(mod: IRModule) -> RecognizedModel:
    func, source = _one_reader_per_weight(mod[ENTRY])
    g = GraphView(func)
    attn = [(b.var, b.value) for b in g.bindings if isinstance(b.value, relax.Call) and
            isinstance(b.value.op, relax.GlobalVar) and is_attention(mod[b.value.op])]
    if not attn:
        raise PassError(f"{PASS}: no attention composite; run recognize_attention first")
    emb, emb_w, index_chain = _embedding(g)
    roles = _Roles(g, mod, source)
    roles.name(emb_w, "embed_tokens")
    roles.find(attn)
    for inp in g.inputs[1:]:
        users = [u for u in g.users.get(inp, []) if u is not None]
        if users:
            raise PassError(f"{PASS}: the input {inp.name!r} is still read ({describe(users[0], g.value[users[0]])}); "
                            "kiln's attention needs no mask or positions")
    for w in g.weights:  # a copy read outside any role (by shape_of, say) reads its value under a sibling's name
        sibling = next((r for v, r in roles.names.items() if source.get(v, v).same_as(source.get(w, w))), None)
        if w not in roles.names and sibling is not None:
            roles.names[w] = sibling
    unnamed = [w.name for w in g.weights if g.users.get(w) and w not in roles.names]
    if unnamed:
        raise PassError(f"{PASS}: the weights {unnamed[:4]} have no role kiln recognises")
    for key in ("eps", "attention_bias", "o_bias", "qk_norm_layers"):
        if len(roles.spec.get(key, {0})) != 1:
            raise PassError(f"{PASS}: {key} differs between layers")

    # the packed params, in the reference form's order (frontend/reference.py param_shapes)
    by_name: dict = {}  # kiln name -> (the first weight var in that role, transposed); a tied lm_head's comes second
    for w, (name, tr) in roles.names.items():
        by_name.setdefault(name, (w, tr))
    order = ["embed_tokens"]
    for i in range(len(attn)):
        p = f"layers.{i}."
        order += [p + n for n in ("input_norm", "q_proj", "k_proj", "v_proj", "q_bias", "k_bias", "v_bias", "q_norm",
                                  "k_norm", "o_proj", "o_bias", "post_attention_norm", "gate_proj", "up_proj",
                                  "down_proj")]
    order += ["final_norm", "lm_head"]
    order = [n for n in order if n in by_name]
    types = []
    for n in order:
        w, tr = by_name[n]
        shape = shape_of(w)
        types.append(relax.TensorType(shape[::-1] if tr else shape, w.ty.dtype))
    seq = g.seq  # the imported symbolic length is forward's token count
    ids = relax.Var("input_ids", relax.TensorType([seq], "int32"))
    packed = relax.Var("params", relax.TupleType(types))

    def batched(v) -> bool:
        s = shape_of(v)
        return s is not None and len(s) >= 2 and int_dims(s[:1]) == [1] and str(s[1]) == str(seq)

    bb = relax.BlockBuilder(mod)
    remap: dict = {}
    with bb.function(REFERENCE_ENTRY.name, [ids, packed], attrs={"num_input": REFERENCE_ENTRY.num_input}):
        with bb.dataflow():
            wvar, read = {}, {}  # kiln name -> its parameter; the parameter as the graph reads it
            for i, n in enumerate(order):
                w, tr = by_name[n]
                wvar[n] = bb.emit(relax.TupleGetItem(packed, i), name_hint=n.replace(".", "_"))
                read[n] = bb.emit(relax.op.permute_dims(wvar[n])) if tr else wvar[n]
            for w, (n, _) in roles.names.items():
                remap[w] = read[n]
            for b in g.bindings:
                v, value = b.var, b.value
                if v in index_chain:
                    continue
                if v.same_as(emb):
                    remap[v] = bb.emit(relax.op.take(wvar["embed_tokens"], ids, axis=0, mode="clip"),
                                       name_hint=v.name)
                    continue
                if v not in g.token:
                    remap[v] = bb.emit(substitute(value, remap), name_hint=v.name)
                    continue
                name = op_name(value)
                want = shape_of(v)
                want = want[1:] if batched(v) else want
                if name == "reshape":
                    src = remap[value.args[0]]
                    if [str(d) for d in shape_of(src)] == [str(d) for d in want]:
                        remap[v] = src  # the reshape only moved the batch axis
                        continue
                    new = relax.op.reshape(src, want)
                elif not isinstance(value, relax.Call):
                    new = substitute(value, remap)
                else:
                    for key in ("axis", "axes"):
                        ax = getattr(value.attrs, key, None) if value.attrs is not None else None
                        ax = [ax] if isinstance(ax, int | tirx.IntImm) else (list(ax) if ax is not None else [])
                        if any(int(a) >= 0 for a in ax) and any(batched(a) for a in value.args
                                                                  if isinstance(a, relax.Var)):
                            raise PassError(f"{PASS}: {describe(v, value)} has an axis counted from the batch "
                                            "axis; kiln cannot drop the batch axis under it")
                    new = substitute(value, remap)
                nv = bb.emit(new, name_hint=v.name)
                got = shape_of(nv)
                if got is None or [str(d) for d in got] != [str(d) for d in want]:
                    raise PassError(f"{PASS}: dropping the batch axis changes {describe(v, value)} from "
                                    f"{shape_of(v)} to {got}")
                remap[v] = nv
            out = remap[func.body.body]
            if out.ty.ndim != 2:
                raise PassError(f"{PASS}: the logits are {out.ty}, not [tokens, vocab]")
            if out.ty.dtype != "float32":
                out = bb.emit(relax.op.astype(out, "float32"))
            out = bb.emit_output(out)
        bb.emit_func_output(out)
    new = bb.get()
    fwd = relax.analysis.remove_all_unused(new[REFERENCE_ENTRY.name])
    # the reference form: forward and the attention composites (their PrimFuncs come along)
    out_mod = tvm.IRModule({gv: f for gv, f in new.functions_items() if gv.name_hint != ENTRY})
    out_mod[REFERENCE_ENTRY.name] = fwd
    out_mod = relax.transform.DeadCodeElimination([REFERENCE_ENTRY.name])(out_mod)
    params = {n: (by_name[n][0].name, by_name[n][1]) for n in order}
    emb_shape = int_dims(shape_of(emb_w))
    a0 = mod[attn[0][1].op].attrs
    spec = dict(vocab_size=emb_shape[0], hidden_size=emb_shape[1], num_layers=len(attn),
                intermediate_size=int(roles.spec["intermediate_size"]),
                num_q_heads=int(a0["kiln.num_q_heads"]), num_kv_heads=int(a0["kiln.num_kv_heads"]),
                head_dim=int(a0["kiln.head_dim"]), rms_norm_eps=float(f"{roles.spec['eps'].pop():.6g}"),  # float32(1e-6) -> 1e-6
                tie_word_embeddings=roles.spec["tie_word_embeddings"],
                attention_bias=roles.spec["attention_bias"].pop(), o_bias=roles.spec["o_bias"].pop(),
                qk_norm=roles.spec["qk_norm_layers"].pop(), dtype=str(emb_w.ty.dtype),
                rope=RopeSpec(theta=float(a0["kiln.rope_theta"]), type=str(a0["kiln.rope_type"]),
                              factor=float(a0["kiln.rope_factor"]),
                              low_freq_factor=float(a0["kiln.rope_low_freq_factor"]),
                              high_freq_factor=float(a0["kiln.rope_high_freq_factor"]),
                              original_max_position_embeddings=int(a0["kiln.rope_original_max_position_embeddings"])),
                sliding_window=None if int(a0["kiln.sliding_window"]) < 0 else int(a0["kiln.sliding_window"]))
    for _, call in attn:
        a = mod[call.op].attrs
        if any(str(a[k]) != str(a0[k]) for k in a0.keys() if str(k) != "kiln.layer_id"):
            raise PassError(f"{PASS}: {call.op.name_hint} differs from attention_L0 (heads, RoPE, scale or window); "
                            "kiln's KV cache needs every layer alike")
    if abs(float(a0["kiln.sm_scale"]) - spec["head_dim"] ** -0.5) > 1e-6 * spec["head_dim"] ** -0.5:
        raise PassError(f"{PASS}: the attention scale is {float(a0['kiln.sm_scale'])}, not 1/sqrt(head_dim); "
                        "kiln's ModelSpec cannot carry another scale yet")
    return RecognizedModel(out_mod, params, spec)


__all__ = ["RecognizedModel", "recognize_model"]
