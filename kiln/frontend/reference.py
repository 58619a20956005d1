"""Build the reference form of a Llama-family model from its ModelSpec.

    forward(input_ids: [n] int32, params: Tuple[...]) -> logits: [n, V]

Hidden states are token-major ``[n, H]`` with no batch axis, every op but attention is token-wise,
and each attention is a call to a ``kiln.op = "attention"`` composite (kiln/ir/attention.py). The
module executes by itself: it is the numerical truth every later pass is checked against.
Parameters are a packed tuple in ``param_shapes(spec)`` order, weights stay parameters.
"""

from __future__ import annotations

from ..ir.abi import REFERENCE_ENTRY
from ..ir.attention import build_attention_function
from ..ir.spec import ModelSpec
from ..ir.tvm import IRModule, relax, tirx


def param_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """kiln parameter name -> shape, in the order of the packed params tuple."""
    H, I, d = spec.hidden_size, spec.intermediate_size, spec.head_dim
    qd, kvd = spec.num_q_heads * d, spec.num_kv_heads * d
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens": (spec.vocab_size, H)}
    for i in range(spec.num_layers):
        p = f"layers.{i}."
        shapes[p + "input_norm"] = (H,)
        shapes[p + "q_proj"], shapes[p + "k_proj"], shapes[p + "v_proj"] = (qd, H), (kvd, H), (kvd, H)
        if spec.attention_bias:
            shapes[p + "q_bias"], shapes[p + "k_bias"], shapes[p + "v_bias"] = (qd,), (kvd,), (kvd,)
        if spec.qk_norm:
            shapes[p + "q_norm"], shapes[p + "k_norm"] = (d,), (d,)
        shapes[p + "o_proj"] = (H, qd)
        if spec.o_bias:
            shapes[p + "o_bias"] = (H,)
        shapes[p + "post_attention_norm"] = (H,)
        shapes[p + "gate_proj"], shapes[p + "up_proj"], shapes[p + "down_proj"] = (I, H), (I, H), (H, I)
    shapes["final_norm"] = (H,)
    if not spec.tie_word_embeddings:
        shapes["lm_head"] = (spec.vocab_size, H)
    return shapes


def build_reference(spec: ModelSpec) -> IRModule:
    """Every layer owns its KV here: a model with cross-layer KV sharing (``spec.kv_sources``) is this
    form followed by passes/share_kv.py, which the compile pipeline applies. Each layer's attention has
    its own window (``spec.layer_types``)."""
    shapes = param_shapes(spec)
    names = list(shapes)
    dt, d, eps = spec.dtype, spec.head_dim, spec.rms_norm_eps
    bb = relax.BlockBuilder()
    attn = [build_attention_function(bb, spec, i) for i in range(spec.num_layers)]

    n = tirx.Var("seq_len", "int64")
    ids = relax.Var("input_ids", relax.TensorType([n], "int32"))
    packed = relax.Var("params", relax.TupleType([relax.TensorType(list(s), dt) for s in shapes.values()]))
    with bb.function(REFERENCE_ENTRY.name, [ids, packed], attrs={"num_input": REFERENCE_ENTRY.num_input}):
        with bb.dataflow():
            w = {name: bb.emit(relax.TupleGetItem(packed, i), name_hint=name.replace(".", "_"))
                 for i, name in enumerate(names)}

            def linear(x, weight, bias=None):  # x: [n, in], weight: [out, in] (HF layout)
                # half-precision weights accumulate in fp32, as cuBLAS does for transformers (tensor cores
                # take fp16/bf16 in and fp32 out at the same speed); the result is rounded back once
                wt = relax.op.permute_dims(w[weight])
                if dt in ("float16", "bfloat16"):
                    y = bb.emit(relax.op.astype(bb.emit(relax.op.matmul(x, wt, out_dtype="float32")), dt))
                else:
                    y = bb.emit(relax.op.matmul(x, wt))
                return bb.emit(relax.op.add(y, w[bias])) if bias else y

            def norm(x, weight):
                return bb.emit(relax.op.nn.rms_norm(x, w[weight], axes=[-1], epsilon=eps))

            x = bb.emit(relax.op.take(w["embed_tokens"], ids, axis=0, mode="clip"))  # [n, H]
            for i in range(spec.num_layers):
                p = f"layers.{i}."
                h = norm(x, p + "input_norm")
                b = spec.attention_bias
                q = linear(h, p + "q_proj", p + "q_bias" if b else None)
                k = linear(h, p + "k_proj", p + "k_bias" if b else None)
                v = linear(h, p + "v_proj", p + "v_bias" if b else None)
                q = bb.emit(relax.op.reshape(q, [n, spec.num_q_heads, d]))  # [n, hq, d]
                k = bb.emit(relax.op.reshape(k, [n, spec.num_kv_heads, d]))  # [n, hkv, d]
                v = bb.emit(relax.op.reshape(v, [n, spec.num_kv_heads, d]))
                if spec.qk_norm:
                    q, k = norm(q, p + "q_norm"), norm(k, p + "k_norm")
                o = bb.emit(relax.Call(attn[i], [q, k, v]), name_hint=f"attn{i}")  # [n, hq, d]
                o = bb.emit(relax.op.reshape(o, [n, spec.num_q_heads * d]))
                x = bb.emit(relax.op.add(x, linear(o, p + "o_proj", p + "o_bias" if spec.o_bias else None)))
                h = norm(x, p + "post_attention_norm")
                g = bb.emit(relax.op.nn.silu(linear(h, p + "gate_proj")))
                u = linear(h, p + "up_proj")
                x = bb.emit(relax.op.add(x, linear(bb.emit(relax.op.multiply(g, u)), p + "down_proj")))
            h = norm(x, "final_norm")
            logits = linear(h, "embed_tokens" if spec.tie_word_embeddings else "lm_head")
            if dt != "float32":
                logits = bb.emit(relax.op.astype(logits, "float32"))
            out = bb.emit_output(logits)  # [n, V] float32
        bb.emit_func_output(out)
    return bb.get()
