"""The attention kernels of the paged KV cache on the CPU (decode, and prefill of new tokens), scheduled.

TVM's paged KV cache brings its own CPU kernel for decode attention (``batch_decode_paged_kv_cpu``: one query
token per sequence against that sequence's pages). It runs on one thread, one query head and one key at a time,
scalar, rescaling the output after every key; at a 512-token context it was ~18% of a 4-bit Qwen2.5-0.5B decode
step, with the second thread idle (measured with ``perf``). This module gives the same function (same parameters,
same outputs: the attention output and its log2-sum-exp ``lse``) a kernel that

* runs one task per (sequence, KV head) in parallel;
* keeps the query heads that share a KV head (GQA) together, so each key and value row is read once for all of
  them;
* takes a page of keys at a time: the page's K transposed once (``[D, page]``), so each query head's scores for
  the page are one vector, built from one broadcast-multiply-add per head dimension, every head of the group an
  independent chain; one max and one rescale of the output per page (online softmax), ``exp2`` as an inline
  vector polynomial (``vector_exp2``; LLVM would call libm once per lane), then the weighted values in vectors
  of the target's float32 width along the head dimension.

TVM's ragged prefill kernel (``batch_prefill_ragged_kv``: each sequence's new queries against its new keys) is
as serial, and computes every key of every query, masked or not. ``prefill_kernel`` replaces it the same way:
tasks over (block of queries, sequence, KV head), 8 (query, head) rows scored together against a transposed
block of keys, and no work past a block's causal limit.

The scores are in log2 units (``q . k * sm_scale * log2(e)``) and the running max starts at -5e4 with a
denominator of 1, as TVM's kernel does, so an empty sequence gives the same zeros and ``lse`` (-5e4).

Invariant: on every input with ``rotary_mode == 0`` each replacement writes what TVM's kernel writes, up to the
order of float32 sums and ``exp2``'s last bit (the polynomial is within 1e-7 of it). kiln creates its caches
with ``RopeMode.NORMAL`` (RoPE applied when K is appended, never inside attention), so ``rotary_mode`` is always
0; the kernels refuse any other value with an error, rather than compute something else. The sliding-window variants and the paged prefill kernel (queries against cached pages)
stay TVM's.
"""

from __future__ import annotations

import math

from ..ir.tvm import tirx

SYMBOL = "batch_decode_paged_kv_cpu"
LOG2E = math.log2(math.e)
MASKED = -3.0e38  # the score of a key a query does not see: its weight is exactly 0


def _exp2_coefficients(degree: int = 5):
    """A least-squares polynomial for 2^f on [0, 1) (Chebyshev nodes): relative error 1.0e-7, float32's own."""
    import numpy as np

    f = np.cos(np.pi * (np.arange(200) + 0.5) / 200) * 0.5 + 0.5
    return [float(c) for c in np.polyfit(f, np.exp2(f), degree)]


EXP2_POLY = _exp2_coefficients()


def vector_exp2(x, lanes: int):
    """``2^x`` for a float32 vector, inline (LLVM turns ``exp2`` of a vector into one libm call per lane):
    ``2^floor(x)`` built in the exponent bits times a polynomial of the fraction; exactly 0 below -126 (masked
    scores are -3e38)."""
    from tvm.script import tirx as T

    f32, i32 = f"float32x{lanes}", f"int32x{lanes}"
    xc = T.max(x, T.broadcast(T.float32(-127), lanes))
    whole = T.floor(xc)
    frac = xc - whole
    poly = T.broadcast(T.float32(EXP2_POLY[0]), lanes)
    for c in EXP2_POLY[1:]:
        poly = poly * frac + T.broadcast(T.float32(c), lanes)
    scale = T.reinterpret(T.shift_left(T.Cast(i32, whole) + T.broadcast(T.int32(127), lanes),
                                       T.broadcast(T.int32(23), lanes)), dtype=f32)
    return T.Select(x < T.broadcast(T.float32(-126), lanes), T.broadcast(T.float32(0), lanes), poly * scale)


def _head_vectors(D: int, lanes: int):  # noqa: N803 (head dim)
    """Vectors along the head dimension: (width, vectors per head, float32 vector dtype, index ramp, broadcast);
    width 1 (scalars) when ``D`` is not a multiple of the target's lanes."""
    from tvm.script import tirx as T

    vec = lanes if D % lanes == 0 else 1
    if vec == 1:
        return 1, D, "float32", (lambda base: base), (lambda x: x)
    return vec, D // vec, f"float32x{vec}", (lambda base: T.ramp(base, 1, vec)), (lambda x: T.broadcast(x, vec))


def _key_vectors(width: int):
    """Vectors of ``width`` keys' scores: (index ramp, broadcast, max across, sum across)."""
    from tvm.script import tirx as T

    def across(op, *start):
        return lambda v: T.call_llvm_pure_intrin(
            "float32", T.llvm_lookup_intrinsic_id(f"llvm.vector.reduce.{op}.v{width}f32"), *start, v)

    return (lambda base: T.ramp(base, 1, width)), (lambda x: T.broadcast(x, width)), across("fmax"), \
        across("fadd", T.float32(0))


def decode_shape(func: tirx.PrimFunc):
    """``(q heads, kv heads, head dim, page size, dtype)`` when ``func`` is TVM's CPU decode attention kernel
    (by its symbol and its buffers' shapes), else None."""
    if (func.attrs or {}).get("global_symbol", "") != SYMBOL or len(func.params) != 13:
        return None
    q, pages = func.params[0], func.params[1]  # TVM 0.27: buffer parameters are the buffers
    if [p.name for p in func.params[:2]] != ["Q", "pages"]:
        return None
    if len(q.shape) != 3 or len(pages.shape) != 5:
        return None
    try:
        h_qo, d = int(q.shape[1]), int(q.shape[2])
        h_kv, page, d2 = int(pages.shape[2]), int(pages.shape[3]), int(pages.shape[4])
    except TypeError:
        return None
    if d != d2 or h_qo % h_kv or q.dtype != pages.dtype:
        return None
    return h_qo, h_kv, d, page, str(q.dtype)


def decode_kernel(h_qo: int, h_kv: int, D: int, page: int, dtype: str, lanes: int):  # noqa: N803 (head dim)
    """TVM's ``batch_decode_paged_kv_cpu`` signature, scheduled as the module docstring says."""
    from tvm.script import tirx as T

    group = h_qo // h_kv
    vec, chunks, f32v, ramp, bcast = _head_vectors(D, lanes)
    kpage, kfill, kmax, ksum = _key_vectors(page)  # a page of scores

    @T.prim_func(s_tir=True)
    def batch_decode_paged_kv(Q_handle: T.handle, pages_handle: T.handle, page_table_indptr_handle: T.handle,  # noqa: N803
                              page_table_values_handle: T.handle, var_length_info: T.handle,
                              k_rope_pos_offset_handle: T.handle, q_rope_position_handle: T.handle,
                              output_handle: T.handle, lse_handle: T.handle, rotary_mode: T.int32,
                              rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32):
        T.func_attr({"tirx.is_scheduled": True, "global_symbol": SYMBOL, "tirx.noalias": True})
        B, nnz_pages, max_num_pages = T.int32(), T.int32(), T.int32()
        indptr_off, values_off, k_off, q_off, len_off = T.int32(), T.int32(), T.int32(), T.int32(), T.int32()
        Q = T.match_buffer(Q_handle, (B, h_qo, D), dtype)
        pages = T.match_buffer(pages_handle, (max_num_pages, 2, h_kv, page, D), dtype)
        page_table_indptr = T.match_buffer(page_table_indptr_handle, (B + 1,), "int32", elem_offset=indptr_off)
        page_table_values = T.match_buffer(page_table_values_handle, (nnz_pages,), "int32", elem_offset=values_off)
        k_rope_pos_offset = T.match_buffer(k_rope_pos_offset_handle, (B,), "int32", elem_offset=k_off)
        q_rope_position = T.match_buffer(q_rope_position_handle, (B,), "int32", elem_offset=q_off)
        output = T.match_buffer(output_handle, (B, h_qo, D), dtype)
        lse = T.match_buffer(lse_handle, (B, h_qo), "float32")
        length_info = T.match_buffer(var_length_info, (B,), "int32", elem_offset=len_off)
        assert rotary_mode == 0, "kiln's CPU decode attention takes RoPE applied at append (RopeMode.NORMAL)"
        for task in T.parallel(B * h_kv):
            with T.sblock("attn"):
                vt = T.axis.spatial(B * h_kv, task)
                T.reads(Q[vt // h_kv, 0:h_qo, 0:D], pages[0:max_num_pages, 0:2, vt % h_kv, 0:page, 0:D],
                        page_table_indptr[vt // h_kv:vt // h_kv + 2], page_table_values[0:nnz_pages],
                        length_info[vt // h_kv])
                T.writes(output[vt // h_kv, 0:h_qo, 0:D], lse[vt // h_kv, 0:h_qo])
                q = T.sblock_alloc_buffer((group * D,), "float32")
                acc = T.sblock_alloc_buffer((group * D,), "float32")
                score = T.sblock_alloc_buffer((group * page,), "float32")
                m = T.sblock_alloc_buffer((group,), "float32")
                den = T.sblock_alloc_buffer((group,), "float32")
                dots = T.sblock_alloc_buffer((1,), "float32")
                kt = T.sblock_alloc_buffer((D * page,), "float32")
                b = T.meta_var(vt // h_kv)
                hk = T.meta_var(vt % h_kv)
                first = T.meta_var(page_table_indptr[vt // h_kv])
                npages = T.meta_var(page_table_indptr[vt // h_kv + 1] - page_table_indptr[vt // h_kv])
                for g in T.serial(group):
                    m[g] = T.float32(-5e4)
                    den[g] = T.float32(1)
                    for d in T.serial(D):
                        q[g * D + d] = T.Cast("float32", Q[b, hk * group + g, d]) * sm_scale * T.float32(LOG2E)
                        acc[g * D + d] = T.float32(0)
                for p in T.serial(npages):
                    # keys in this page: every page is full but the last, which holds length_info[b]
                    n = T.meta_var(T.if_then_else(p == npages - 1, length_info[b], page))
                    blk = T.meta_var(page_table_values[first + p])
                    for j in T.serial(page):  # the page's keys transposed: one vector of scores per query head
                        for d in T.serial(D):
                            kt[d * page + j] = T.if_then_else(j < n, T.Cast("float32", pages[blk, 0, hk, T.min(j, n - 1), d]),
                                                              T.float32(0))
                    for g in T.unroll(group):
                        score[kpage(g * page)] = kfill(T.float32(0))
                    for d in T.serial(D):
                        for g in T.unroll(group):
                            score[kpage(g * page)] = score[kpage(g * page)] + kfill(q[g * D + d]) * kt[kpage(d * page)]
                    for g in T.serial(group):
                        score[kpage(g * page)] = T.Select(T.ramp(0, 1, page) < kfill(n), score[kpage(g * page)],
                                                          kfill(T.float32(MASKED)))
                        dots[0] = T.max(m[g], kmax(score[kpage(g * page)]))
                        den[g] = den[g] * T.exp2(m[g] - dots[0])
                        for c in T.serial(chunks):
                            acc[ramp(g * D + c * vec)] = acc[ramp(g * D + c * vec)] * bcast(T.exp2(m[g] - dots[0]))
                        m[g] = dots[0]
                        score[kpage(g * page)] = vector_exp2(score[kpage(g * page)] - kfill(m[g]), page)
                        den[g] = den[g] + ksum(score[kpage(g * page)])
                    for j in T.serial(n):
                        for g in T.serial(group):
                            for c in T.serial(chunks):
                                acc[ramp(g * D + c * vec)] = acc[ramp(g * D + c * vec)] + \
                                    bcast(score[g * page + j]) * T.Cast(f32v, pages[blk, 1, hk, j, ramp(c * vec)])
                for g in T.serial(group):
                    for d in T.serial(D):
                        output[b, hk * group + g, d] = T.Cast(dtype, acc[g * D + d] / den[g])
                    lse[b, hk * group + g] = m[g] + T.log2(den[g])

    return batch_decode_paged_kv


PREFILL_PARAMS = ["q", "q_indptr", "k", "v", "kv_indptr", "q_rope_position", "k_rope_pos_offset", "output", "lse",
                  "causal", "rotary_mode", "rope_scale", "rope_theta", "sm_scale"]
QUERY_BLOCK = 16  # query rows per prefill task
ROW_BLOCK = 8  # (query, head) rows whose scores are computed together, each a vector of keys


def prefill_shape(func: tirx.PrimFunc):
    """``(q heads, kv heads, head dim, dtype)`` when ``func`` is TVM's CPU ragged prefill attention kernel (its
    parameters by name, equal q/k/v head dims), else None."""
    if [getattr(p, "name", None) for p in func.params] != PREFILL_PARAMS:
        return None
    body = func.body
    inner = getattr(getattr(body, "block", None), "body", None)
    if not (isinstance(inner, tirx.For) and getattr(inner.body, "block", None) is not None
            and inner.body.block.name_hint == "attn"):
        return None
    q, k, v = func.params[0], func.params[2], func.params[3]
    try:
        h_qo, d, h_kv, dk, dv = int(q.shape[1]), int(q.shape[2]), int(k.shape[1]), int(k.shape[2]), int(v.shape[2])
    except TypeError:
        return None
    if not (d == dk == dv) or h_qo % h_kv or not (q.dtype == k.dtype == v.dtype):
        return None
    return h_qo, h_kv, d, str(q.dtype)


def prefill_kernel(h_qo: int, h_kv: int, D: int, dtype: str, lanes: int):  # noqa: N803 (head dim)
    """TVM's ``batch_prefill_ragged_kv`` (CPU) signature: each sequence's new queries against its new keys
    (causal or not). One task per (block of ``QUERY_BLOCK`` queries, sequence, KV head), the blocks of a
    sequence dealt out first-last-second-... so a contiguous split of the tasks over threads gets equal causal
    work; keys taken ``lanes`` at a time (a block of K transposed once per task, so each query head's scores
    for the block are one vector of products and no horizontal sums), masked keys skipped past the causal limit
    and given weight 0 inside it (TVM's kernel gives them exp2(-5e4 * log2(e) * sm_scale - max), which is 0 in
    float32)."""
    from tvm.script import tirx as T

    group, kb = h_qo // h_kv, lanes
    QB, RB = QUERY_BLOCK, ROW_BLOCK  # noqa: N806
    rows = (QB * group + RB - 1) // RB * RB  # a task's query rows (query x head), padded to the row block
    vec, chunks, f32v, dramp, dbcast = _head_vectors(D, lanes)
    kramp, kbcast, fmax, fsum = _key_vectors(kb)

    @T.prim_func(s_tir=True)
    def batch_prefill_ragged_kv(var_q: T.handle, var_q_indptr: T.handle, var_k: T.handle, var_v: T.handle,
                                var_kv_indptr: T.handle, var_q_rope_position: T.handle,
                                var_k_rope_pos_offset: T.handle, var_output: T.handle, var_lse: T.handle,
                                causal: T.int32, rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32,
                                sm_scale: T.float32):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        batch_size, qo_len, kv_len = T.int32(), T.int32(), T.int32()
        q_off, kv_off, qr_off, kr_off = T.int32(), T.int32(), T.int32(), T.int32()
        q = T.match_buffer(var_q, (qo_len, h_qo, D), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_off)
        k = T.match_buffer(var_k, (kv_len, h_kv, D), dtype)
        v = T.match_buffer(var_v, (kv_len, h_kv, D), dtype)
        kv_indptr = T.match_buffer(var_kv_indptr, (batch_size + 1,), "int32", elem_offset=kv_off)
        q_rope_position = T.match_buffer(var_q_rope_position, (qo_len,), "int32", elem_offset=qr_off)
        k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=kr_off)
        output = T.match_buffer(var_output, (qo_len, h_qo, D), dtype)
        lse = T.match_buffer(var_lse, (qo_len, h_qo), "float32")
        assert rotary_mode == 0, "kiln's CPU prefill attention takes RoPE applied at append (RopeMode.NORMAL)"
        nqb = T.meta_var((qo_len + QB - 1) // QB)
        for task in T.parallel(nqb * batch_size * h_kv):
            with T.sblock("attn"):
                vt = T.axis.spatial(nqb * batch_size * h_kv, task)
                T.reads(q[0:qo_len, 0:h_qo, 0:D], k[0:kv_len, 0:h_kv, 0:D], v[0:kv_len, 0:h_kv, 0:D],
                        q_indptr[0:batch_size + 1], kv_indptr[0:batch_size + 1])
                T.writes(output[0:qo_len, 0:h_qo, 0:D], lse[0:qo_len, 0:h_qo])
                qs = T.sblock_alloc_buffer((rows * D,), "float32")
                acc = T.sblock_alloc_buffer((rows * D,), "float32")
                kt = T.sblock_alloc_buffer((D * kb,), "float32")
                m = T.sblock_alloc_buffer((rows,), "float32")
                den = T.sblock_alloc_buffer((rows,), "float32")
                sc = T.sblock_alloc_buffer((RB * kb,), "float32")
                mx = T.sblock_alloc_buffer((1,), "float32")
                seq = T.meta_var(vt // nqb // h_kv)
                hk = T.meta_var(vt // nqb % h_kv)
                # the sequence's query blocks in the order 0, last, 1, last - 1, ...
                nb = T.meta_var((q_indptr[vt // nqb // h_kv + 1] - q_indptr[vt // nqb // h_kv] + QB - 1) // QB)
                rank = T.meta_var(vt % nqb)
                qb = T.meta_var(T.if_then_else(rank % 2 == 0, rank // 2, nb - 1 - rank // 2))
                qlen = T.meta_var(q_indptr[vt // nqb // h_kv + 1] - q_indptr[vt // nqb // h_kv])
                klen = T.meta_var(kv_indptr[vt // nqb // h_kv + 1] - kv_indptr[vt // nqb // h_kv])
                if rank < nb:
                    nq = T.meta_var(T.min(QB, qlen - qb * QB))
                    # keys any query of the block sees: all of them, or up to the last query's causal limit
                    kmax = T.meta_var(T.if_then_else(causal > 0, T.min(klen, klen - qlen + qb * QB + nq), klen))
                    for r in T.serial((nq * group + RB - 1) // RB * RB):  # rows past nq * group: zeros
                        m[r] = T.float32(-5e4)
                        den[r] = T.float32(1)
                        for d in T.serial(D):
                            qs[r * D + d] = T.if_then_else(r < nq * group, T.Cast("float32", q[
                                q_indptr[seq] + qb * QB + T.min(r, nq * group - 1) // group,
                                hk * group + r % group, d]), T.float32(0)) * sm_scale * T.float32(LOG2E)
                            acc[r * D + d] = T.float32(0)
                    for blk in T.serial((kmax + kb - 1) // kb):
                        for j in T.serial(kb):
                            for d in T.serial(D):
                                kt[d * kb + j] = T.if_then_else(
                                    blk * kb + j < kmax,
                                    T.Cast("float32", k[kv_indptr[seq] + T.min(blk * kb + j, kmax - 1), hk, d]),
                                    T.float32(0))
                        for rb in T.serial((nq * group + RB - 1) // RB):
                            for rr in T.unroll(RB):  # RB rows' scores: RB independent chains of products
                                sc[kramp(rr * kb)] = kbcast(T.float32(0))
                            for d in T.serial(D):
                                for rr in T.unroll(RB):
                                    sc[kramp(rr * kb)] = sc[kramp(rr * kb)] + kbcast(qs[(rb * RB + rr) * D + d]) * \
                                        kt[kramp(d * kb)]
                            for rr in T.serial(T.min(RB, nq * group - rb * RB)):
                                # keys past the end or the causal limit weigh 0
                                sc[kramp(rr * kb)] = T.Select(
                                    T.ramp(blk * kb, 1, kb) < kbcast(T.if_then_else(
                                        causal > 0, T.min(klen, klen - qlen + qb * QB + (rb * RB + rr) // group + 1),
                                        klen)),
                                    sc[kramp(rr * kb)], kbcast(T.float32(MASKED)))
                                mx[0] = T.max(m[rb * RB + rr], fmax(sc[kramp(rr * kb)]))
                                den[rb * RB + rr] = den[rb * RB + rr] * T.exp2(m[rb * RB + rr] - mx[0])
                                for c in T.serial(chunks):
                                    acc[dramp((rb * RB + rr) * D + c * vec)] = acc[dramp((rb * RB + rr) * D + c * vec)] \
                                        * dbcast(T.exp2(m[rb * RB + rr] - mx[0]))
                                m[rb * RB + rr] = mx[0]
                                sc[kramp(rr * kb)] = vector_exp2(sc[kramp(rr * kb)] - kbcast(mx[0]), kb)
                                den[rb * RB + rr] = den[rb * RB + rr] + fsum(sc[kramp(rr * kb)])
                                for j in T.serial(T.min(kb, kmax - blk * kb)):
                                    for c in T.serial(chunks):
                                        acc[dramp((rb * RB + rr) * D + c * vec)] = \
                                            acc[dramp((rb * RB + rr) * D + c * vec)] + dbcast(sc[rr * kb + j]) * \
                                            T.Cast(f32v, v[kv_indptr[seq] + blk * kb + j, hk, dramp(c * vec)])
                    for r in T.serial(nq * group):
                        for d in T.serial(D):
                            output[q_indptr[seq] + qb * QB + r // group, hk * group + r % group, d] = \
                                T.Cast(dtype, acc[r * D + d] / den[r])
                        lse[q_indptr[seq] + qb * QB + r // group, hk * group + r % group] = m[r] + T.log2(den[r])

    return batch_prefill_ragged_kv


def schedule_prefill_attention(func: tirx.PrimFunc, lanes: int) -> tirx.PrimFunc | None:
    """kiln's kernel in place of TVM's CPU ragged prefill attention (``prefill_shape``), else None."""
    shape = prefill_shape(func)
    if shape is None or lanes < 4:
        return None
    return _keep_attrs(prefill_kernel(*shape, lanes), func)


def _keep_attrs(new, old):
    for key, value in (old.attrs or {}).items():
        if key not in new.attrs:
            new = new.with_attr(key, value)
    return new


def schedule_decode_attention(func: tirx.PrimFunc, lanes: int) -> tirx.PrimFunc | None:
    """kiln's kernel in place of TVM's CPU decode attention (``decode_shape``), else None."""
    shape = decode_shape(func)
    if shape is None:
        return None
    return _keep_attrs(decode_kernel(*shape, lanes), func)
