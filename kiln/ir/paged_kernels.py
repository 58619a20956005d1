"""TIR kernels of kiln's own paged KV cache (the grouped form of kiln/passes/lower_paged_groups.py).

Storage: one pool of blocks shared by every KV-owning layer, ``pool[num_blocks, 2, kv_heads, P, head_dim]``;
a block holds ``P`` consecutive tokens' K (index 0) and V (index 1) of *one* layer. The runtime's page
manager (kiln/runtime/kv_groups.py) hands out blocks and passes, every step:

    pages[owners, b, max_pages] int32   owner o, sequence s, logical page j (tokens j*P .. j*P+P-1)
                                         -> block id, -1 where the page is not held (slid out of a window)
    slots[owners, n] int32               where token t's K/V goes for owner o: block * P + offset
    token_seq[n] int32                   the batch row of token t
    token_pos[n] int32                   the absolute position of token t in its sequence

Keys are stored already rotated (RoPE at their absolute position), so attention never re-rotates and
a window only decides which positions a query reads: token t at position p attends to positions
``[max(0, p - W + 1), p]`` of its sequence (``W = -1``: ``[0, p]``). Within one step the new tokens were
appended before attention runs, so a chunk longer than the window is masked exactly as a dense
sliding-window mask would be. Softmax is accumulated online in float32.

The kernels are plain loops: parallel over tokens on the CPU; on a GPU (``gpu=True``) a thread block
per token and a thread per head (attention) or per head x channel (append) — correct by construction,
not tuned, and not yet run on a GPU.
"""

from __future__ import annotations

from tvm.script import tirx as T


LOG2E = 1.4426950408889634


def _loops(gpu: bool):
    """(token loop, inner loop): parallel + serial on the CPU; a thread block per token and a thread per
    inner index on a GPU."""
    if gpu:
        return (lambda n: T.thread_binding(n, thread="blockIdx.x"),
                lambda n: T.thread_binding(n, thread="threadIdx.x"))
    return T.parallel, T.serial


def append_kernel(owner: int, kv_heads: int, head_dim: int, page: int, dtype: str, gpu: bool = False):
    """``pool[slot // P, 0|1, h, slot % P, :] = k|v[t, h, :]`` with ``slot = slots[owner, t]`` (in place)."""
    tokens, inner = _loops(gpu)

    @T.prim_func(private=True, s_tir=True)
    def kv_append(var_pool: T.handle, var_k: T.handle, var_v: T.handle, var_slots: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        nblocks, n, owners = T.int64(), T.int64(), T.int64()
        pool = T.match_buffer(var_pool, (nblocks, 2, kv_heads, page, head_dim), dtype)
        k = T.match_buffer(var_k, (n, kv_heads, head_dim), dtype)
        v = T.match_buffer(var_v, (n, kv_heads, head_dim), dtype)
        slots = T.match_buffer(var_slots, (owners, n), "int32")
        for t in tokens(n):
            for hd in inner(kv_heads * head_dim):
                with T.sblock("append"):
                    vt = T.axis.spatial(n, t)
                    vh = T.axis.spatial(kv_heads, hd // head_dim)
                    vd = T.axis.spatial(head_dim, hd % head_dim)
                    T.reads(slots[owner, vt], k[vt, vh, vd], v[vt, vh, vd])
                    T.writes(pool[slots[owner, vt] // page, 0:2, vh, slots[owner, vt] % page, vd])
                    slot: T.int32 = slots[owner, vt]
                    pool[T.floordiv(slot, page), 0, vh, T.floormod(slot, page), vd] = k[vt, vh, vd]
                    pool[T.floordiv(slot, page), 1, vh, T.floormod(slot, page), vd] = v[vt, vh, vd]

    return kv_append


def attention_kernel(owner: int, window: int, q_heads: int, kv_heads: int, head_dim: int, page: int, dtype: str,
                     sm_scale: float, gpu: bool = False):
    """``o[t, h] = softmax(q[t, h] . K[j] * sm_scale) @ V[j]`` over positions j of token t's sequence in its
    window (see the module docstring); K/V read from ``owner``'s pages."""
    tokens, inner = _loops(gpu)
    group = q_heads // kv_heads
    scale = float(sm_scale) * LOG2E

    @T.prim_func(private=True, s_tir=True)
    def paged_attention(var_q: T.handle, var_pool: T.handle, var_pages: T.handle, var_seq: T.handle,
                        var_pos: T.handle, var_o: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        n, nblocks, owners, b, maxp = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        q = T.match_buffer(var_q, (n, q_heads, head_dim), dtype)
        pool = T.match_buffer(var_pool, (nblocks, 2, kv_heads, page, head_dim), dtype)
        pages = T.match_buffer(var_pages, (owners, b, maxp), "int32")
        seq = T.match_buffer(var_seq, (n,), "int32")
        pos = T.match_buffer(var_pos, (n,), "int32")
        o = T.match_buffer(var_o, (n, q_heads, head_dim), dtype)
        for t in tokens(n):
            for h in inner(q_heads):
                with T.sblock("attn"):
                    vt, vh = T.axis.remap("SS", [t, h])
                    T.reads(q[vt, vh, 0:head_dim], pages[owner, seq[vt], 0:maxp], pos[vt], seq[vt],
                            pool[0:nblocks, 0:2, vh // group, 0:page, 0:head_dim])
                    T.writes(o[vt, vh, 0:head_dim])
                    acc = T.sblock_alloc_buffer((head_dim,), "float32", scope="local")
                    qf = T.sblock_alloc_buffer((head_dim,), "float32", scope="local")
                    m = T.sblock_alloc_buffer((1,), "float32", scope="local")
                    den = T.sblock_alloc_buffer((1,), "float32", scope="local")
                    s = T.sblock_alloc_buffer((1,), "float32", scope="local")
                    m_new = T.sblock_alloc_buffer((1,), "float32", scope="local")
                    p: T.int32 = pos[vt]
                    row: T.int32 = seq[vt]
                    lo: T.int32 = T.max(p - window + 1, 0) if window > 0 else 0
                    m[0] = T.float32(-3.0e38)
                    den[0] = T.float32(0)
                    for d in T.serial(head_dim):
                        acc[d] = T.float32(0)
                        qf[d] = T.Cast("float32", q[vt, vh, d])
                    for j in T.serial(p + 1 - lo):
                        blk: T.int32 = pages[owner, row, (lo + j) // page]
                        off: T.int32 = (lo + j) % page
                        s[0] = T.float32(0)
                        for d in T.serial(head_dim):
                            s[0] = s[0] + qf[d] * T.Cast("float32", pool[blk, 0, vh // group, off, d])
                        s[0] = s[0] * T.float32(scale)
                        m_new[0] = T.max(m[0], s[0])
                        den[0] = den[0] * T.exp2(m[0] - m_new[0]) + T.exp2(s[0] - m_new[0])
                        for d in T.serial(head_dim):
                            acc[d] = acc[d] * T.exp2(m[0] - m_new[0]) + \
                                T.exp2(s[0] - m_new[0]) * T.Cast("float32", pool[blk, 1, vh // group, off, d])
                        m[0] = m_new[0]
                    for d in T.serial(head_dim):
                        o[vt, vh, d] = T.Cast(dtype, acc[d] / den[0])

    return paged_attention
