"""Cross-layer KV sharing (MixAttention): a sharing layer attends to its source layer's K and V.

Matches, in the reference form, the attention composites ``attention_L{i}(q_i, k_i, v_i)`` and a sharing
map ``kv_sources`` (``ModelSpec.kv_sources``: per layer, the earlier layer whose K/V it uses; its own
index for a KV owner). For every layer ``i`` with source ``s != i`` it emits
``attention_L{i}(q_i, k_s, v_s)`` (the composite rotates k_s itself, so it sees exactly the source's
rotated keys) with ``kiln.kv_source = s`` on the composite; layer i's K/V projections (and biases, k
norm) are then dead and leave the function and the params tuple.

Preconditions: the composites take (q, k, v) as the reference form builds them, the source precedes the
sharing layer and has the same attention type. Invariant: ``forward`` computes the MixAttention forward
(tests/mixattention_reference.py); the params tuple is the returned layout (the old one without the
sharing layers' K/V parameters).
"""

from __future__ import annotations

from ..errors import PassError
from ..ir.attention import is_attention
from ..ir.spec import shared_kv_params
from ..ir.tvm import IRModule, relax
from .lib.linears import Layout, rewrite_forward


def share_kv(mod: IRModule, layout: Layout, kv_sources: tuple[int, ...]) -> tuple[IRModule, Layout]:
    if all(src == i for i, src in enumerate(kv_sources)):
        return mod, layout
    fwd = mod["forward"]
    calls = {}
    for b in fwd.body.blocks[0].bindings:
        v = b.value
        if isinstance(v, relax.Call) and isinstance(v.op, relax.GlobalVar) and is_attention(mod[v.op]):
            calls[int(mod[v.op].attrs["kiln.layer_id"])] = (b.var, v)
    if sorted(calls) != list(range(len(kv_sources))):
        raise PassError(f"share_kv: the sharing map names {len(kv_sources)} layers, forward has attention layers "
                        f"{sorted(calls)}")
    replace, marked = {}, {}
    for i, src in enumerate(kv_sources):
        if src == i:
            continue
        if not 0 <= src < i or kv_sources[src] != src:
            raise PassError(f"share_kv: layer {i} cannot take its KV from layer {src} (an earlier KV owner)")
        mine, theirs = mod[calls[i][1].op], mod[calls[src][1].op]
        if int(mine.attrs["kiln.sliding_window"]) != int(theirs.attrs["kiln.sliding_window"]):
            raise PassError(f"share_kv: layer {i} and its KV source {src} attend over different windows")
        var, call = calls[i]
        q, (k, v) = call.args[0], calls[src][1].args[1:]
        replace[var] = lambda bb, m, param, call=call, q=q, k=k, v=v: relax.Call(call.op, [m(q), m(k), m(v)])
        marked[call.op] = src
    dropped = shared_kv_params(kv_sources)
    new_layout = {n: s for n, s in layout.items() if n not in dropped and n.rsplit(".", 1)[0] not in dropped}
    # rewire first (the sharing layers' K/V computations become dead and go), then drop their parameters
    out = rewrite_forward(rewrite_forward(mod, layout, layout, replace), layout, new_layout, {})
    for gv, src in marked.items():
        out[gv] = out[gv].with_attr("kiln.kv_source", src)
    return out, new_layout


__all__ = ["share_kv"]
