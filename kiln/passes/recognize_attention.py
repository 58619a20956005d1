"""Recognise attention (with its RoPE, GQA repeat, scale and causal mask) in the imported form and rewrite
each one into a call of kiln's canonical attention composite (kiln/ir/attention.py).

What it matches, anchored on every ``softmax`` over the last axis of a token-dependent tensor:

    scores = (rope(q) * a) @ (repeat(rope(k)) * b)^T * c  (+ mask | where(mask, ., -big))
    out    = nan_guard(softmax(scores)) @ repeat(v)

``q``, ``k``, ``v`` are traced up from the two matmuls through *views* (reshape, permute_dims,
expand_dims, broadcast_to, repeat, astype) and scalar multiplies to their *sources*: token-major
tensors ``[1?, s, heads * d]`` or ``[1?, s, heads, d]`` (the projections' outputs, or a q/k norm's).
RoPE is ``x * cos + rotate(x) * sin``, rotate-half or interleaved (pairs ``2i, 2i + 1``: q and k then
get their head channels permuted into rotate-half order, ``interleaved_to_half``). Nothing is trusted to the op names alone:

* every view chain is replayed on an index array and must move elements exactly as kiln's layout
  does (``[s, h, d] -> [h, s, d]``, kv heads repeated for GQA, heads merged back per token);
* the mask (at ``mask_len`` tokens) and the cos/sin tables (at LAYOUT_LEN) are *evaluated* (GraphView.evaluate) and must
  be causal (optionally a sliding window, found from the mask) and RoPE with one of kiln's frequency
  sets (default, linear; llama3 when ``rope_hint`` gives its parameters).

Emits ``o = reshape(attention_L{i}(reshape(q_src, [s, hq, d]), reshape(k_src, [s, hkv, d]),
reshape(v_src, [s, hkv, d])), <out shape>)`` in place of the merged-heads output, numbered in graph
order; the dead mask, RoPE tables and score ops go with it. A softmax whose attention does not match
raises PassError naming the node and the part that did not match.

Invariant: the function computes the same logits (the composite is the same math); the attention mask
input is no longer read by any attention (a later pass drops it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import PassError
from ..ir.attention import build_attention_function
from ..ir.spec import RopeSpec
from ..ir.tvm import IRModule, relax, tirx, tvm
from .lib.graph_view import ENTRY, GraphView, describe, op_name, rebuild, scalar_const, shape_of, with_entry

# the sequence length at which view chains are replayed and RoPE tables checked: a prime, so that it is
# never mistaken for a head count or a head dimension
LAYOUT_LEN = 67
VIEWS = {"reshape", "permute_dims", "expand_dims", "broadcast_to", "repeat", "astype", "squeeze"}


@dataclass(frozen=True)
class AttentionShape:
    """What kiln/ir/attention.py reads from a ModelSpec to build one composite."""

    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    rope: RopeSpec
    sm_scale: float
    sliding_window: int | None

    @property
    def num_groups(self) -> int:
        return self.num_q_heads // self.num_kv_heads


@dataclass
class _Path:
    """A chain of views from ``source`` up to ``end`` (ops listed source -> end), the scalar scale on it
    and, for q and k, the RoPE node on it."""

    source: relax.Var
    ops: list  # vars, source-side first, each a view, a scalar multiply or the RoPE add
    scale: float = 1.0
    rope: relax.Var | None = None
    rope_input: relax.Var | None = None
    cos: object = None
    sin: object = None
    style: str = "half"  # "half": rotate-half pairs (i, i + d/2); "interleaved": pairs (2i, 2i + 1)


class _Matcher:
    def __init__(self, g: GraphView, weights: dict, mask_len: int, rope_hint: RopeSpec | None):
        self.g, self.weights, self.mask_len, self.rope_hint = g, weights, mask_len, rope_hint
        self.n = LAYOUT_LEN
        self.analyzer = tvm.sym.Analyzer()
        self.analyzer.bind(g.seq, tirx.IntImm("int64", self.n))
        self._evaluated: dict = {}

    # ------------------------------------------------------------------------------ helpers

    def fail(self, var, what: str):
        raise PassError(f"recognize_attention: the attention at {describe(var, self.g.value.get(var))} does not "
                        f"match: {what}")

    def concrete(self, e) -> tuple[int, ...]:
        return tuple(int(self.analyzer.simplify(d)) for d in shape_of(e))

    def eval(self, e, n: int) -> np.ndarray:
        if (e, n) not in self._evaluated:
            self._evaluated[e, n] = self.g.evaluate([e], n, self.weights)[0]
        return self._evaluated[e, n]

    def scalar(self, call) -> float | None:
        """The scale of ``x * c`` / ``x / c`` with a scalar constant c, else None."""
        if op_name(call) == "multiply":
            for x, c in (call.args, call.args[::-1]):
                if scalar_const(c) is not None and x in self.g.token:
                    return scalar_const(c)
        if op_name(call) == "divide" and scalar_const(call.args[1]) not in (None, 0.0):
            return 1.0 / scalar_const(call.args[1])
        return None

    def token_arg(self, call):
        return next(a for a in call.args if isinstance(a, relax.Var) and a in self.g.token)

    # ------------------------------------------------------------------------------ walks

    def walk_up(self, var, allow_rope: bool) -> _Path:
        """From ``var`` up through views, scalar multiplies and (once) RoPE to the first other node."""
        g, ops, scale = self.g, [], 1.0
        path = _Path(var, ops)
        while True:
            call = g.call(var)
            if call is None:
                break
            s = self.scalar(call)
            if op_name(call) in VIEWS:
                nxt = call.args[0]
            elif s is not None:
                scale *= s
                nxt = self.token_arg(call)
            elif (only := self.concat_with_empty(call)) is not None:  # past KV of length 0 (specialised)
                nxt = only
            elif allow_rope and path.rope is None and (rope := self.match_rope(var)) is not None:
                path.rope, (path.rope_input, path.cos, path.sin, path.style) = var, rope
                nxt = path.rope_input
            else:
                break
            ops.append(var)
            var = nxt
        ops.reverse()
        path.source, path.scale = var, scale
        return path

    def concat_with_empty(self, call):
        """x if call = concat([..., x, ...]) where every other part is empty along the axis (a past-KV input
        specialised to length 0, see frontend/graph.py), else None."""
        if op_name(call) != "concat" or not isinstance(call.args[0], relax.Tuple):
            return None
        nd = len(shape_of(call) or [])
        axis = int(call.attrs.axis) % nd if nd else 0
        parts = list(call.args[0].fields)
        full = [p for p in parts if self.concrete(p)[axis] != 0]
        return full[0] if len(full) == 1 and full[0] in self.g.token else None

    def match_rope(self, var):
        """(x, cos, sin, style) if var = x * cos + rotate(x) * sin with non-token cos/sin, else None; rotate is
        rotate-half (style "half") or the pairwise interleaved rotation (style "interleaved")."""
        g = self.g
        call = g.call(var)
        if op_name(call) != "add":
            return None
        terms = []
        for t in call.args:
            tc = g.call(t) if isinstance(t, relax.Var) else None
            if op_name(tc) != "multiply":
                return None
            a, b = tc.args
            if a in g.token and b not in g.token:
                terms.append((a, b))
            elif b in g.token and a not in g.token:
                terms.append((b, a))
            else:
                return None
        for (x, cos), (r, sin) in (terms, terms[::-1]):
            for style, rotated in (("half", self.rotate_half_of), ("interleaved", self.rotate_interleaved_of)):
                src = rotated(r)
                if src is not None and src.same_as(x):
                    return x, cos, sin, style
        return None

    def _slice(self, e, begin: int, end: int, stride: int):
        """x if e = x[..., begin:end:stride] (over the last axis), else None."""
        c = self.g.call(e) if isinstance(e, relax.Var) else None
        if op_name(c) != "strided_slice":
            return None
        x = c.args[0]
        d, nd = self.concrete(x)[-1], len(shape_of(x))
        axes = [int(a) % nd for a in c.args[1].fields]
        got = ([int(v) for v in c.args[2].fields], [min(int(v), d) for v in c.args[3].fields],
               [int(v) for v in c.args[4].fields] if len(c.args) > 4 else [1])
        ok_end = got[1] == [end] or (stride > 1 and got[1][0] >= d - (d - begin) % stride - 1 and got[1][0] <= d)
        return x if axes == [nd - 1] and got[0] == [begin] and ok_end and got[2] == [stride] else None

    def rotate_interleaved_of(self, r):
        """x if r = stack([-x[..., 1::2], x[..., 0::2]], -1) flattened back to [..., d], else None
        (transformers' interleaved rotate: each pair (2i, 2i + 1) becomes (-x_{2i+1}, x_{2i}))."""
        g = self.g
        c = g.call(r) if isinstance(r, relax.Var) else None
        if op_name(c) != "reshape":
            return None
        st = g.call(c.args[0]) if isinstance(c.args[0], relax.Var) else None
        if op_name(st) == "stack" and isinstance(st.args[0], relax.Tuple):
            parts = list(st.args[0].fields)
        elif op_name(st) == "concat" and isinstance(st.args[0], relax.Tuple):  # stack as concat of expand_dims
            parts = [g.value[p].args[0] if isinstance(p, relax.Var) and g.op(p) == "expand_dims" else None
                     for p in st.args[0].fields]
        else:
            return None
        if len(parts) != 2 or None in parts:
            return None
        neg = g.call(parts[0]) if isinstance(parts[0], relax.Var) else None
        if op_name(neg) != "negative":
            return None
        d = self.concrete(r)[-1]
        x = self._slice(neg.args[0], 1, d, 2)
        return x if x is not None and x.same_as(self._slice(parts[1], 0, d, 2)) else None

    def rotate_half_of(self, r):
        """x if r = concat(-x[..., d/2:], x[..., :d/2]) over the last axis, else None."""
        g = self.g
        call = g.call(r) if isinstance(r, relax.Var) else None
        if op_name(call) != "concat":
            return None
        parts = list(call.args[0].fields) if isinstance(call.args[0], relax.Tuple) else None
        if parts is None or len(parts) != 2:
            return None
        neg = g.call(parts[0]) if isinstance(parts[0], relax.Var) else None
        if op_name(neg) != "negative":
            return None
        hi, lo = neg.args[0], parts[1]
        slices = []
        for sl in (lo, hi):
            c = g.call(sl) if isinstance(sl, relax.Var) else None
            if op_name(c) != "strided_slice":
                return None
            slices.append(c)
        x = slices[0].args[0]
        if not slices[1].args[0].same_as(x):
            return None
        d = self.concrete(x)[-1]
        nd = len(shape_of(x))
        for c, (b0, b1) in zip(slices, ((0, d // 2), (d // 2, d))):
            axes = [int(a) % nd for a in c.args[1].fields]
            begin = [int(v) for v in c.args[2].fields]
            end = [min(int(v), d) for v in c.args[3].fields]
            strides = [int(v) for v in c.args[4].fields] if len(c.args) > 4 else [1]
            if axes != [nd - 1] or begin != [b0] or end != [b1] or strides != [1]:
                return None
        return x

    def walk_down_views(self, var):
        """From ``var`` down through single-user views: the list of vars (var first)."""
        chain = [var]
        while True:
            u = self.g.single_user(chain[-1])
            if u is None or self.g.op(u) not in VIEWS or u in chain:
                return chain
            chain.append(u)

    # ------------------------------------------------------------------------------ index replay

    def replay(self, start: np.ndarray, ops: list) -> np.ndarray:
        """Apply the views ``ops`` (vars, in order) to the index array ``start``."""
        x = start
        for v in ops:
            call, out = self.g.call(v), self.concrete(v)
            name = op_name(call)
            if name == "permute_dims":
                axes = call.attrs.axes
                x = np.transpose(x, None if axes is None else [int(a) for a in axes])
            elif name == "broadcast_to":
                x = np.broadcast_to(x, out)
            elif name == "repeat":
                x = np.repeat(x, int(call.attrs.repeats), axis=int(call.attrs.axis) if call.attrs.axis is not None
                              else None)
            # reshape, expand_dims, squeeze: a reshape; astype, scalar multiply, RoPE: elementwise
            x = np.reshape(x, out)
        return x

    def token_major(self, var, heads: int | None = None) -> tuple[int, int] | None:
        """(heads * d, leading) if var is [1, s, X], [s, X], [1, s, h, d] or [s, h, d], else None."""
        shape = self.concrete(var)
        lead = 1 if len(shape) >= 2 and shape[0] == 1 and shape[1] == self.n else 0
        if shape[lead] != self.n or len(shape) - lead not in (2, 3):
            return None
        return int(np.prod(shape[lead + 1:])), lead

    # ------------------------------------------------------------------------------ the match

    def match(self, softmax_var):
        g = self.g
        sm = g.call(softmax_var)
        nd = len(shape_of(softmax_var))
        if int(sm.attrs.axis) % nd != nd - 1:
            self.fail(softmax_var, "softmax is not over the last axis")
        # softmax -> (guards, views) -> P @ V
        pv, frontier, seen = None, [softmax_var], set()
        while frontier:
            v = frontier.pop()
            for u in g.users.get(v, []):
                if u is None or u in seen:
                    continue
                seen.add(u)
                c, name = g.call(u), g.op(u)
                if name == "matmul" and c.args[0].same_as(v):
                    if pv is not None and not pv.same_as(u):
                        self.fail(softmax_var, "the probabilities feed two matmuls")
                    pv = u
                elif name in VIEWS or (name == "where" and not c.args[0].same_as(v)):
                    frontier.append(u)
        if pv is None:
            self.fail(softmax_var, "no matmul of the probabilities with V")
        # softmax input -> (views, scale, mask) -> Q @ K^T
        var, scale, mask = g.call(softmax_var).args[0], 1.0, None
        score_ops = []
        while True:
            call = g.call(var)
            name = op_name(call)
            s = self.scalar(call) if call is not None else None
            if name in VIEWS:
                nxt = call.args[0]
            elif s is not None:
                scale, nxt = scale * s, self.token_arg(call)
            elif name == "add" and mask is None and sum(a in g.token for a in call.args) == 1:
                nxt = self.token_arg(call)
                mask = ("add", next(a for a in call.args if not a.same_as(nxt)))
            elif name == "where" and mask is None and call.args[0] not in g.token and \
                    sum(a in g.token for a in call.args[1:]) == 1:  # where(allowed, s, -inf) / where(~allowed, -inf, s)
                keep = call.args[1] in g.token
                nxt, mask = call.args[1 if keep else 2], ("where" if keep else "where_not", call.args[0])
            else:
                break
            score_ops.append(var)
            var = nxt
        if op_name(g.call(var)) != "matmul":
            self.fail(softmax_var, f"the scores come from {describe(var, g.value.get(var))}, not from Q @ K^T")
        if mask is None:
            self.fail(softmax_var, "no causal mask on the scores")
        qk = g.call(var)
        q = self.walk_up(qk.args[0], allow_rope=True)
        k = self.walk_up(qk.args[1], allow_rope=True)
        v = self.walk_up(g.call(pv).args[1], allow_rope=False)
        for name, p in (("q", q), ("k", k)):
            if p.rope is None:
                self.fail(softmax_var, f"no rotary embedding (x * cos + rotate_half(x) * sin) on the {name} path")
        n = self.n
        d = self.concrete(q.rope)[-1]
        shapes = {}
        for name, p in (("q", q), ("k", k), ("v", v)):
            tm = self.token_major(p.source)
            if tm is None or tm[0] % d:
                self.fail(softmax_var, f"the {name} path starts at {describe(p.source, g.value.get(p.source))} "
                                       f"of shape {list(self.concrete(p.source))}, not a token-major [s, heads*{d}]")
            shapes[name] = tm[0] // d
        hq, hkv = shapes["q"], shapes["k"]
        if shapes["v"] != hkv or hq % hkv:
            self.fail(softmax_var, f"{hq} query heads, {hkv} key heads and {shapes['v']} value heads")
        grp = hq // hkv
        # index replays: every view chain moves elements as kiln's layout does
        def idx(p, h):
            """(the source's element numbers in its own shape, the same numbers as kiln's [s, h, d])"""
            return np.arange(n * h * d).reshape(self.concrete(p.source)), np.arange(n * h * d).reshape(n, h, d)

        for name, p, h in (("q", q, hq), ("k", k, hkv)):
            start, canon = idx(p, h)
            cut = p.ops.index(p.rope)
            at_rope = self.replay(start, p.ops[:cut])
            if at_rope.size != n * h * d or not np.array_equal(at_rope.reshape(-1, n, d), canon.transpose(1, 0, 2)):
                self.fail(softmax_var, f"the {name} heads reach RoPE in an order kiln does not use")
            end = self.replay(at_rope, p.ops[cut + 1:])
            want = canon.transpose(1, 0, 2) if name == "q" else np.repeat(canon.transpose(1, 2, 0), grp, axis=0)
            got = end.reshape(-1, n, d) if name == "q" else end.reshape(-1, d, n)
            if got.shape != want.shape or not np.array_equal(got, want):
                self.fail(softmax_var, f"the {name} operand of Q @ K^T is not laid out as [heads, s, d]"
                          + ("" if name == "q" else " transposed, kv heads repeated per query group"))
        start, canon = idx(v, hkv)
        end = self.replay(start, v.ops)
        want = np.repeat(canon.transpose(1, 0, 2), grp, axis=0)
        if end.size != want.size or not np.array_equal(end.reshape(-1, n, d), want):
            self.fail(softmax_var, "the V operand is not laid out as [heads, s, d] with kv heads repeated")
        # the scores: rows are queries, columns keys, up to the softmax
        qk_out = np.arange(hq * n * n).reshape(self.concrete(var))
        if not np.array_equal(self.replay(qk_out, score_ops[::-1]).reshape(-1, n, n), qk_out.reshape(-1, n, n)):
            self.fail(softmax_var, "the views between Q @ K^T and the softmax reorder the scores")
        # the output: from P @ V through views to the merged heads [1?, s, hq * d]
        o_start = np.arange(hq * n * d).reshape(self.concrete(pv))
        canon_o = o_start.reshape(hq, n, d).transpose(1, 0, 2)
        chain = self.walk_down_views(pv)
        out = None
        for i, u in enumerate(chain[1:], start=1):
            tm = self.token_major(u)
            if tm is not None and tm[0] == hq * d and len(self.concrete(u)) - tm[1] == 2:
                got = self.replay(o_start, chain[1:i + 1])
                if np.array_equal(got.reshape(n, hq, d), canon_o):
                    out = u
                    break
        if out is None:
            self.fail(softmax_var, "the attention output never becomes token-major [s, heads * d]")
        rope = self.check_rope(softmax_var, q, k, d)
        window = self.check_mask(softmax_var, mask)
        sm_scale = scale * q.scale * k.scale
        return dict(q=q.source, k=k.source, v=v.source, out=out, hq=hq, hkv=hkv, d=d, rope=rope, window=window,
                    sm_scale=sm_scale, dtype=str(q.source.ty.dtype), interleaved=q.style == "interleaved")

    # ------------------------------------------------------------------------------ evaluated checks

    def table(self, t) -> np.ndarray:
        """A cos/sin table at LAYOUT_LEN tokens, in the precision it was computed in: a cast to a half dtype
        on its way to q/k is skipped (transformers computes the tables in float32, then casts; kiln's RoPE
        kernels compute in float32 too), the views after it replayed."""
        chain, e = [], t
        while isinstance(e, relax.Var) and self.g.op(e) in ("astype", "expand_dims", "reshape", "broadcast_to"):
            chain.append(e)
            e = self.g.value[e].args[0]
        if not any(self.g.op(v) == "astype" for v in chain) or e in self.g.token:
            return self.eval(t, self.n)
        return self.replay(self.eval(e, self.n).astype(np.float64), chain[::-1])

    def check_rope(self, at, q: _Path, k: _Path, d: int) -> RopeSpec:
        n = self.n
        tables = []
        for p in (q, k):
            shape = self.concrete(p.rope)
            # the tables before a cast to a half dtype (transformers computes them in float32, then casts;
            # kiln's RoPE kernels compute in float32 too)
            cs = [np.broadcast_to(self.table(t), shape).reshape(-1, n, d)[0].astype(np.float64)
                  for t in (p.cos, p.sin)]
            tables.append(cs)
        if not all(np.allclose(t[0], tables[0][0], atol=1e-6) and np.allclose(t[1], tables[0][1], atol=1e-6)
                   for t in tables) or q.style != k.style:
            self.fail(at, "q and k are rotated with different tables")
        cos, sin = tables[0]
        if q.style == "interleaved":  # to the rotate-half layout kiln's RoPE uses (see INTERLEAVED)
            cos, sin = cos[:, interleaved_to_half(d)], sin[:, interleaved_to_half(d)]
        if not np.allclose(cos[0], 1.0, atol=1e-6) or not np.allclose(sin[0], 0.0, atol=1e-6):
            self.fail(at, "the RoPE tables are scaled (attention scaling != 1) or do not start at position 0")
        freq = np.arctan2(sin[1, :d // 2], cos[1, :d // 2])  # the rotation per position of each pair
        candidates = [self.rope_hint] if self.rope_hint is not None else []
        factor = 1.0 / freq[0] if freq[0] > 0 else 0.0
        if factor > 0 and len(freq) > 1:
            for fac in (1.0, _snap(factor)):
                theta = _snap((freq[1] * fac) ** (-d / 2))
                candidates.append(RopeSpec(theta=theta, type="default" if fac == 1.0 else "linear", factor=fac))
        t = np.arange(n, dtype=np.float64)[:, None]
        tol = 1e-5 + 1e-6 * t
        for spec in candidates:
            inv = np.asarray(spec.inv_freq(d), dtype=np.float32).astype(np.float64)
            ang = t * np.concatenate([inv, inv])[None, :]
            if np.all(np.abs(np.cos(ang) - cos) <= tol) and np.all(np.abs(np.sin(ang) - sin) <= tol):
                return spec
        self.fail(at, "the RoPE frequencies are none of kiln's (default or linear scaling; for llama3 scaling put the "
                      "model's config.json with its rope_scaling in the tokenizer directory)")

    def check_mask(self, at, mask) -> int | None:
        """The sliding window of a causal mask (None: global); fails for any other mask."""
        n = self.mask_len
        kind, m = mask
        val = self.eval(m, n)
        val = np.broadcast_to(val, val.shape[:-2] + (n, n)).reshape(-1, n, n)
        if kind == "add":  # 0 where attended; -inf or the dtype's lowest value (-65504 in fp16) where not
            if not np.all((val == 0) | (val <= -6e4)):
                self.fail(at, "the additive mask has values other than 0 and -inf (a position bias kiln cannot fold)")
            allowed = val == 0
        else:
            allowed = val.astype(bool) if kind == "where" else ~val.astype(bool)
        if not all(np.array_equal(a, allowed[0]) for a in allowed):
            self.fail(at, "the mask differs between heads")
        allowed = allowed[0]
        i, j = np.arange(n)[:, None], np.arange(n)[None, :]  # broadcast: no n x n index arrays
        if np.array_equal(allowed, j <= i):
            return None
        w = int(allowed.sum(axis=1).max())
        if np.array_equal(allowed, (j <= i) & (i - j < w)):
            return w
        self.fail(at, f"the mask is neither causal nor a causal sliding window (checked at {n} tokens)")


def interleaved_to_half(d: int) -> list[int]:
    """Channel order that turns interleaved RoPE pairs (2i, 2i + 1) into rotate-half pairs (i, i + d/2):
    new channel j reads old channel ``perm[j]``. Interleaved RoPE of x equals, channel for channel after
    this permutation, rotate-half RoPE of x permuted, and permuting q and k alike leaves q.k unchanged:
    that is how kiln runs interleaved-RoPE models on its (rotate-half) kernels."""
    return [2 * j for j in range(d // 2)] + [2 * j + 1 for j in range(d // 2)]


def _snap(x: float) -> float:
    """x rounded to 6 significant digits (theta and factors are written as short decimals in configs)."""
    if x <= 0 or not math.isfinite(x):
        return x
    return float(f"{x:.6g}")


def recognize_attention(mod: IRModule, weights: dict, mask_len: int = 257, rope_hint: RopeSpec | None = None
                        ) -> IRModule:
    """``weights``: parameter name -> array (the evaluated checks may read an ``inv_freq`` weight);
    ``mask_len``: the sequence length the mask is checked at (a sliding window at least this long reads
    as global attention: pass the context length); ``rope_hint``: RoPE parameters to try first."""
    g = GraphView(mod[ENTRY])
    m = _Matcher(g, weights, mask_len, rope_hint)
    found = [m.match(b.var) for b in g.bindings if g.op(b.var) == "nn.softmax" and b.var in g.token]
    if not found:
        raise PassError("recognize_attention: no attention in the graph (no softmax over token-dependent scores)")
    bb = relax.BlockBuilder(mod)
    gvs = []
    for i, a in enumerate(found):
        shape = AttentionShape(a["hq"], a["hkv"], a["d"], a["dtype"], a["rope"], a["sm_scale"], a["window"])
        gvs.append(build_attention_function(bb, shape, i))
    mod = bb.get()
    seq = g.seq
    replace = {}
    for a, gv in zip(found, gvs):
        def emit(bb, mp, a=a, gv=gv):
            q = bb.emit(relax.op.reshape(mp(a["q"]), [seq, a["hq"], a["d"]]))
            k = bb.emit(relax.op.reshape(mp(a["k"]), [seq, a["hkv"], a["d"]]))
            if a["interleaved"]:  # q.k is unchanged when both are permuted alike; v and o are not touched
                perm = relax.const(np.asarray(interleaved_to_half(a["d"]), dtype="int32"))
                q = bb.emit(relax.op.take(q, perm, axis=2))
                k = bb.emit(relax.op.take(k, perm, axis=2))
            v = bb.emit(relax.op.reshape(mp(a["v"]), [seq, a["hkv"], a["d"]]))
            o = bb.emit(relax.Call(gv, [q, k, v]), name_hint=f"attn{gv.name_hint.rsplit('L', 1)[1]}")
            return relax.op.reshape(o, shape_of(a["out"]))
        replace[a["out"]] = emit
    return with_entry(mod, rebuild(g.func, replace))


__all__ = ["AttentionShape", "recognize_attention"]
