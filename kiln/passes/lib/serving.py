"""Building serving entry points from the reference form: the analysis of ``forward`` (its attention calls,
embedding and token-wise tail), the cloner that copies it into each entry point with attention replaced,
and the embedding function. Shared by lower_paged_attention and lower_paged_groups. Not a pass.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import PassError
from ...ir.abi import ENTRY_POINTS, REFERENCE_ENTRY
from ...ir.attention import is_attention
from ...ir.tvm import IRModule, PyExprMutator, mutator, relax, te, tirx, tvm

KV_ATTENTION_BUILTIN = "vm.builtin.attention_kv_cache_attention_with_fused_qkv"
_TOKENWISE_UNARY = {"relax.astype", "relax.nn.silu"}
_TOKENWISE_WITH_PARAM = {"relax.matmul", "relax.add", "relax.multiply", "relax.nn.rms_norm"}


def _attr(func, key):
    v = func.attrs[key]
    return v.value if hasattr(v, "value") else v


@dataclass
class AttentionCall:
    var: relax.Var  # the binding's var in forward
    layer_id: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    sm_scale: float
    window: int = -1  # sliding window (-1: global)
    kv_source: int | None = None  # share_kv: the layer whose K/V this one reads


class Analysis:
    """Locates the pieces of the reference form the rewrite needs; raises PassError if one is missing."""

    def __init__(self, mod: IRModule, grouped: bool = False):
        self.grouped = grouped  # kiln's grouped cache (paged_groups.py) takes sliding windows and shared KV
        gvs = {gv.name_hint: gv for gv in mod.get_global_vars()}
        if REFERENCE_ENTRY.name not in gvs:
            raise PassError(f"paged_attention: no '{REFERENCE_ENTRY.name}' function (the reference form's entry)")
        f = mod[gvs[REFERENCE_ENTRY.name]]
        if len(f.params) != 2:
            raise PassError("paged_attention: forward must take (input_ids, params)")
        self.mod, self.ref = mod, f
        self.ids, self.packed = f.params
        ids_shape = self.ids.ty.shape
        if len(ids_shape) != 1 or not isinstance(ids_shape[0], tirx.Var):
            raise PassError("paged_attention: forward's input_ids must be [seq_len] with a symbolic seq_len")
        self.seq_var = ids_shape[0]
        self.bindings = [b for blk in f.body.blocks for b in blk.bindings]
        self.value_of = {b.var: b.value for b in self.bindings}
        self.uses: dict[relax.Var, int] = {}
        for b in self.bindings:
            relax.analysis.post_order_visit(b.value, lambda e: self._count(e))
        relax.analysis.post_order_visit(f.body.body, lambda e: self._count(e))

        self.param_derived = {self.packed}
        for b in self.bindings:  # vars computed from parameters alone (weights, transposed weights)
            fv = relax.analysis.free_vars(b.value)
            if fv and all(v in self.param_derived for v in fv):
                self.param_derived.add(b.var)

        self.embed = self._find_embed()
        self.attentions = self._find_attentions()
        self.gather_var = self._find_gather_point()
        a0 = self.attentions[0]
        self.num_layers = len(self.attentions)
        self.num_q_heads, self.num_kv_heads, self.head_dim = a0.num_q_heads, a0.num_kv_heads, a0.head_dim
        self.hidden = int(self.embed.value.args[0].ty.shape[1])
        self.dtype = str(self.embed.value.args[0].ty.dtype)

    def _count(self, e):
        if isinstance(e, relax.Var):
            self.uses[e] = self.uses.get(e, 0) + 1

    def _find_embed(self):
        takes = [b for b in self.bindings if isinstance(b.value, relax.Call) and self.ids in list(b.value.args)]
        ok = (len(takes) == 1 and isinstance(takes[0].value.op, tvm.ir.Op) and takes[0].value.op.name == "relax.take"
              and takes[0].value.args[1].same_as(self.ids) and int(takes[0].value.attrs.axis) == 0)
        if not ok:
            raise PassError("paged_attention: input_ids must be used only by take(embed_weight, input_ids, axis=0) "
                            "(did LegalizeOps run before this pass?)")
        w = takes[0].value.args[0]
        if w not in self.param_derived or not isinstance(self.value_of.get(w), relax.TupleGetItem):
            raise PassError("paged_attention: the embedding weight must be one of the packed parameters")
        return takes[0]

    def _find_attentions(self) -> list[AttentionCall]:
        found = []
        for b in self.bindings:
            v = b.value
            if isinstance(v, relax.Call) and isinstance(v.op, relax.GlobalVar) and is_attention(self.mod[v.op]):
                fn = self.mod[v.op]
                if int(_attr(fn, "kiln.causal")) != 1:
                    raise PassError(f"paged_attention: {v.op.name_hint} is not causal; only causal attention is paged")
                window = int(_attr(fn, "kiln.sliding_window"))
                source = int(fn.attrs["kiln.kv_source"]) if "kiln.kv_source" in fn.attrs else None
                if window > 0 and not self.grouped:
                    raise PassError(f"paged_attention: {v.op.name_hint} has a sliding window; TVM's paged cache "
                                    "evicts whole pages for all layers at once (tools/spikes/tvm_sliding_cache.py), "
                                    "so sliding windows are lowered by paged_groups to kiln's grouped cache")
                if source is not None and not self.grouped:
                    raise PassError(f"paged_attention: {v.op.name_hint} attends to layer {source}'s KV (share_kv); "
                                    "shared KV is lowered by paged_groups to kiln's grouped cache")
                if str(_attr(fn, "kiln.rope")) != "normal":
                    raise PassError(f"paged_attention: {v.op.name_hint} uses RoPE {_attr(fn, 'kiln.rope')!r}; "
                                    "only rotate-half ('normal') RoPE is supported")
                found.append(AttentionCall(b.var, int(_attr(fn, "kiln.layer_id")), int(_attr(fn, "kiln.num_q_heads")),
                                        int(_attr(fn, "kiln.num_kv_heads")), int(_attr(fn, "kiln.head_dim")),
                                        float(_attr(fn, "kiln.sm_scale")), window, source))
                self._check_operands(v, found[-1])
                self.rope_fn = fn
        if not found:
            raise PassError("paged_attention: forward calls no kiln attention composite (kiln.op='attention'); "
                            "run the recognition passes first for imported graphs")
        ids = sorted(a.layer_id for a in found)
        if ids != list(range(len(found))):
            raise PassError(f"paged_attention: attention layer ids must be 0..{len(found) - 1}, got {ids}")
        a0 = found[0]
        for a in found:
            if (a.num_q_heads, a.num_kv_heads, a.head_dim) != (a0.num_q_heads, a0.num_kv_heads, a0.head_dim):
                raise PassError(f"paged_attention: layer {a.layer_id} has a head configuration different from "
                                "layer 0; one paged KV cache needs it uniform")
        rope_keys = [k for k in self.mod[self.value_of[a0.var].op].attrs.keys() if str(k).startswith("kiln.rope")]
        for a in found:
            fa = self.mod[self.value_of[a.var].op].attrs
            fb = self.mod[self.value_of[a0.var].op].attrs
            if any(str(fa[k]) != str(fb[k]) for k in rope_keys):
                raise PassError(f"paged_attention: layer {a.layer_id} uses different RoPE parameters than layer 0")
        return found

    @staticmethod
    def _check_operands(call: relax.Call, a: AttentionCall) -> None:
        """q must be [s, num_q_heads, head_dim] and k, v [s, num_kv_heads, head_dim]: the cache is sized
        from the attributes, the fused qkv from the operands."""
        want = ((a.num_q_heads, a.head_dim), (a.num_kv_heads, a.head_dim), (a.num_kv_heads, a.head_dim))
        ok = len(call.args) == 3
        for arg, (h, d) in zip(call.args, want):
            shape = arg.ty.shape if isinstance(arg.ty, relax.TensorType) else None
            ok = ok and shape is not None and len(shape) == 3 and \
                [int(x) if isinstance(x, tirx.IntImm) else None for x in (shape[1], shape[2])] == [h, d]
        if not ok:
            got = ", ".join(str(getattr(x.ty, "shape", x.ty)) for x in call.args)
            raise PassError(f"paged_attention: {call.op.name_hint} is called with q, k, v of shapes ({got}) but its "
                            f"attributes say [s, {a.num_q_heads}, {a.head_dim}], [s, {a.num_kv_heads}, {a.head_dim}] "
                            "for q and k/v")

    def _find_gather_point(self) -> relax.Var:
        """The earliest var of the token-wise tail ``out = f_k(...f_1(x))``: logits rows depend on x rows only."""
        out = self.ref.body.body
        x = out
        while isinstance(x, relax.Var):
            alias = self.value_of.get(x)
            if isinstance(alias, relax.Var) and self.uses.get(alias, 0) == 1 and alias not in self.param_derived:
                x = alias  # ``gv = lv`` (a dataflow block's output binding): the rows of gv are lv's
                continue
            if not isinstance(alias, relax.Call):
                break
            call = alias
            if not isinstance(call.op, tvm.ir.Op) or not call.args or not isinstance(call.args[0], relax.Var):
                break
            src, rest = call.args[0], list(call.args[1:])
            tokenwise = call.op.name in _TOKENWISE_UNARY or (
                call.op.name in _TOKENWISE_WITH_PARAM and rest and all(r in self.param_derived for r in rest))
            if not tokenwise or src in self.param_derived or self.uses.get(src, 0) != 1 or src == self.embed.var:
                break
            x = src
        return x

    def kv_rope(self) -> dict:
        fn = self.rope_fn
        rtype = str(_attr(fn, "kiln.rope_type"))
        factor = float(_attr(fn, "kiln.rope_factor"))
        scaling = {}
        if rtype == "llama3":
            scaling = {"rope_type": "llama3", "factor": factor,
                       "low_freq_factor": float(_attr(fn, "kiln.rope_low_freq_factor")),
                       "high_freq_factor": float(_attr(fn, "kiln.rope_high_freq_factor")),
                       "original_max_position_embeddings": int(_attr(fn, "kiln.rope_original_max_position_embeddings"))}
        return {"theta": float(_attr(fn, "kiln.rope_theta")),
                "scale": 1.0 / factor if rtype == "linear" else 1.0,  # the cache multiplies positions by it
                "scaling": scaling}


@mutator
class Cloner(PyExprMutator):
    """Copies forward's bindings into a new function with fresh vars, some bindings replaced."""

    def __init__(self, mod: IRModule):
        super().__init__(mod)
        # PyExprMutator.builder_ read back from C++ loses the Python-side function stack: keep our own.
        self.bb = relax.BlockBuilder(mod)
        self.builder_ = self.bb

    def clone(self, bindings, special: dict):
        for b in bindings:
            if b.var in special:
                new = special[b.var](self, b)
            else:
                new = self.bb.emit(self.visit_expr(b.value), name_hint=b.var.name)
            self.set_var_remap(b.var, new)


def emit_entry_function(cl: Cloner, an: Analysis, name: str) -> None:
    """One entry point on TVM's paged cache: every attention becomes the fused-qkv builtin on ``kv``."""
    kv = relax.Var("paged_kv_cache", relax.AnyType())
    bb = cl.bb

    def attend(c, b, a, n, values):
        fused = _fused_qkv(values, b.value.args)
        if fused is not None:  # q, k, v are slices of one projection (passes/fuse_qkv.py): no concat
            qkv = bb.emit(relax.op.reshape(c.visit_expr(fused), [n, a.num_q_heads + 2 * a.num_kv_heads, a.head_dim]),
                          name_hint=f"qkv{a.layer_id}")
        else:
            q, k, v = [c.visit_expr(x) for x in b.value.args]
            qkv = bb.emit(relax.op.concat([q, k, v], axis=1), name_hint=f"qkv{a.layer_id}")  # [n, hq + 2 hkv, d]
        return bb.emit(relax.call_dps_packed(
            KV_ATTENTION_BUILTIN, [kv, relax.prim_value(a.layer_id), relax.prim_value(a.sm_scale), qkv],
            out_ty=relax.TensorType([n, a.num_q_heads, a.head_dim], an.dtype)), name_hint=f"attn{a.layer_id}")

    emit_serving_function(cl, an, name, ENTRY_POINTS[name], lambda n: [kv], attend, lambda: kv)


def emit_serving_function(cl: Cloner, an: Analysis, name: str, entry, state_inputs, attend, state) -> None:
    """Copy ``forward`` into entry point ``name``: the embedding becomes an input, every attention
    binding ``attend(cloner, binding, AttentionCall, n, values)``, the prefills gather the wanted rows as
    early as the token-wise tail allows; ``state_inputs(n)`` (the KV state, ``n`` the step's token count)
    come between the step inputs and the params, and ``state()`` is returned next to the logits."""
    H, V_shape = an.hidden, an.ref.ret_ty.shape
    vocab = V_shape[1]
    if name == "decode":
        n = tirx.IntImm("int64", 1)
    elif name == "batch_decode":
        n = tirx.Var("batch_size", "int64")
    else:
        n = tirx.Var("seq_len", "int64")
    f = an.ref.bind_symbolic_vars({an.seq_var: n})
    bindings = [b for blk in f.body.blocks for b in blk.bindings]
    # Re-locate the special bindings in the copy by position (bind_symbolic_vars rebuilds vars).
    index = {b.var: i for i, b in enumerate(an.bindings)}
    embed_var = bindings[index[an.embed.var]].var
    attn_vars = {bindings[index[a.var]].var: a for a in an.attentions}
    gather = bindings[index[an.gather_var]].var if an.gather_var in index else None

    emb_shape = [n, 1, H] if name == "batch_decode" else [1, n, H]
    embeds = relax.Var("input_embeds" if name.startswith("batch") else "input_embed",
                       relax.TensorType(emb_shape, an.dtype))
    packed = relax.Var("params", an.packed.ty)
    params = [embeds]
    positions = None
    if name == "batch_prefill":
        b = tirx.Var("batch_size", "int64")
        positions = relax.Var("logit_positions", relax.TensorType([b], "int32"))
        params.append(positions)
    params += [*state_inputs(n), packed]
    assert len(params) == len(entry.inputs)
    bb = cl.bb

    def on_embed(c, b):
        return bb.emit(relax.op.reshape(embeds, [n, H]), name_hint="embeds")

    values = {b.var: b.value for b in bindings}

    def on_attention(c, b):
        return attend(c, b, attn_vars[b.var], n, values)

    def on_gather(c, b):
        x = bb.emit(c.visit_expr(b.value), name_hint=b.var.name)
        if name == "prefill":  # the last token's row
            return bb.emit_te(lambda t: te.compute((1, t.shape[1]), lambda i, j: t[t.shape[0] - 1, j], name="last_row"),
                              x, primfunc_name_hint="take_last_row")
        # clip, not TVM's default "fast": the host's positions are in bounds either way, and a fast take makes TVM
        # warn on every build that out-of-bounds indices segfault
        return bb.emit(relax.op.take(x, positions, axis=0, mode="clip"), name_hint="gathered")

    special = {embed_var: on_embed, **{v: on_attention for v in attn_vars}}
    if name in ("prefill", "batch_prefill"):
        if gather is None or gather == f.body.body:  # nothing token-wise to hoist past: gather the logits
            gather = f.body.body
        special[gather] = on_gather
    with bb.function(name, params, attrs={"num_input": entry.num_input}):
        with bb.dataflow():
            cl.set_var_remap(f.params[1], packed)
            cl.clone(bindings, special)
            logits = cl.visit_expr(f.body.body)
            rows = {"prefill": [1, 1, vocab], "decode": [1, 1, vocab],
                    "batch_prefill": [1, positions.ty.shape[0] if positions is not None else 1, vocab],
                    "batch_decode": [n, 1, vocab]}[name]
            logits = bb.emit(relax.op.reshape(logits, rows), name_hint="logits")
            out = bb.emit_output(relax.Tuple([logits, state()]))
        bb.emit_func_output(out)


def _fused_qkv(values: dict, args) -> relax.Var | None:
    """Y when q, k, v are ``reshape(strided_slice(Y, axis 1, [b_i, e_i]))`` with the slices tiling Y's
    columns in order (fuse_qkv's form), else None."""
    src, at = None, 0
    for arg in args:
        r = values.get(arg)
        if not (isinstance(r, relax.Call) and getattr(r.op, "name", "") == "relax.reshape"):
            return None
        sl = values.get(r.args[0])
        if not (isinstance(sl, relax.Call) and getattr(sl.op, "name", "") == "relax.strided_slice"):
            return None
        y, axes, begin, end = sl.args[:4]
        strides = [int(x) for x in sl.args[4].fields] if len(sl.args) > 4 else [1]
        if (src is not None and not y.same_as(src)) or [int(x) for x in axes.fields] not in ([1], [-1]) or \
                strides != [1] or int(begin.fields[0]) != at or len(y.ty.shape) != 2:
            return None
        src, at = y, int(end.fields[0])
    return src if at == int(src.ty.shape[1]) else None


def emit_embed_function(cl: Cloner, an: Analysis) -> None:
    n = tirx.Var("seq_len", "int64")
    ids = relax.Var("input_ids", relax.TensorType([n], "int32"))
    packed = relax.Var("params", an.packed.ty)
    idx = an.value_of[an.embed.value.args[0]].index
    bb = cl.bb
    with bb.function("embed", [ids, packed], attrs={"num_input": ENTRY_POINTS["embed"].num_input}):
        with bb.dataflow():
            w = bb.emit(relax.TupleGetItem(packed, idx))
            out = bb.emit_output(relax.op.take(w, ids, axis=0, mode=str(an.embed.value.attrs.mode)))
        bb.emit_func_output(out)


def finish_serving(out: IRModule, entries, keep_reference: bool) -> IRModule:
    """Drop ``forward`` (unless kept) and whatever the entry points no longer reach."""
    if not keep_reference:
        out = IRModule({gv: f for gv, f in out.functions_items() if gv.name_hint != REFERENCE_ENTRY.name},
                       attrs=out.attrs)
    return relax.transform.DeadCodeElimination(list(entries) + ([REFERENCE_ENTRY.name] if keep_reference else []))(out)


