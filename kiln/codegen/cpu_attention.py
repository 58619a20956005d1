"""The decode attention kernel of the paged KV cache on the CPU, scheduled.

TVM's paged KV cache brings its own CPU kernel for decode attention (``batch_decode_paged_kv_cpu``: one query
token per sequence against that sequence's pages). It runs on one thread, one query head and one key at a time,
scalar, rescaling the output after every key; at a 512-token context it was ~18% of a 4-bit Qwen2.5-0.5B decode
step, with the second thread idle (measured with ``perf``). This module gives the same function (same parameters,
same outputs: the attention output and its log2-sum-exp ``lse``) a kernel that

* runs one task per (sequence, KV head) in parallel;
* keeps the query heads that share a KV head (GQA) together, so each key and value row is read once for all of
  them;
* takes a page of keys at a time: the page's scores for every query head, one max and one rescale of the
  output per page (online softmax), then the weighted values;
* multiplies in vectors of the target's float32 width along the head dimension.

The scores are in log2 units (``q . k * sm_scale * log2(e)``) and the running max starts at -5e4 with a
denominator of 1, as TVM's kernel does, so an empty sequence gives the same zeros and ``lse`` (-5e4).

Invariant: on every input with ``rotary_mode == 0`` the replacement writes what TVM's kernel writes, up to the
order of float32 sums. kiln creates its caches with ``RopeMode.NORMAL`` (RoPE applied when K is appended, never
inside attention), so ``rotary_mode`` is always 0; the kernel refuses any other value with an error, rather than
compute something else. The sliding-window variant and the prefill kernels stay TVM's.
"""

from __future__ import annotations

import math

from ..ir.tvm import tirx

SYMBOL = "batch_decode_paged_kv_cpu"
LOG2E = math.log2(math.e)


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
    vec = lanes if D % lanes == 0 else 1
    chunks = D // vec
    f32v = "float32" if vec == 1 else f"float32x{vec}"
    ramp = (lambda base: base) if vec == 1 else (lambda base: T.ramp(base, 1, vec))
    bcast = (lambda x: x) if vec == 1 else (lambda x: T.broadcast(x, vec))
    hsum = (lambda v: v) if vec == 1 else (lambda v: T.call_llvm_pure_intrin(
        "float32", T.llvm_lookup_intrinsic_id(f"llvm.vector.reduce.fadd.v{vec}f32"), T.float32(0), v))

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
                dots = T.sblock_alloc_buffer((vec,), "float32")
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
                    for g in T.serial(group):
                        for j in T.serial(n):
                            dots[ramp(0)] = bcast(T.float32(0))
                            for c in T.serial(chunks):
                                dots[ramp(0)] = dots[ramp(0)] + q[ramp(g * D + c * vec)] * \
                                    T.Cast(f32v, pages[blk, 0, hk, j, ramp(c * vec)])
                            score[g * page + j] = hsum(dots[ramp(0)])
                    for g in T.serial(group):
                        dots[0] = m[g]
                        for j in T.serial(n):
                            dots[0] = T.max(dots[0], score[g * page + j])
                        den[g] = den[g] * T.exp2(m[g] - dots[0])
                        for c in T.serial(chunks):
                            acc[ramp(g * D + c * vec)] = acc[ramp(g * D + c * vec)] * bcast(T.exp2(m[g] - dots[0]))
                        m[g] = dots[0]
                        for j in T.serial(n):
                            score[g * page + j] = T.exp2(score[g * page + j] - m[g])
                            den[g] = den[g] + score[g * page + j]
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


def schedule_decode_attention(func: tirx.PrimFunc, lanes: int) -> tirx.PrimFunc | None:
    """kiln's kernel in place of TVM's CPU decode attention (``decode_shape``), else None."""
    shape = decode_shape(func)
    if shape is None:
        return None
    new = decode_kernel(*shape, lanes)
    for key, value in (func.attrs or {}).items():
        if key not in new.attrs:
            new = new.with_attr(key, value)
    return new
