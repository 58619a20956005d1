"""The w4a8 linear on the CPU's integer dot-product instructions.

kiln/ir/quant_kernels.py's ``w4a8_matmul`` is ``acc[i, o] = sum_k x8[i, k] * w8[o, k]`` with the int8 weight
``w8 = (q - z[o, g]) * s_g[o, g]`` rebuilt from 4-bit ``q`` (group ``g = k // 128``), then
``y = float(acc) * s_x[i] * s_c[o]``. Scheduled like the float linears it unpacks every weight to an int32 and
multiplies in 32-bit lanes: slower than the 4-bit weight-only kernel. Here the same sum is taken a group at a
time on 8-bit multiply-adds, the way llama.cpp's Q4_0 x Q8_0 dot works:

    acc[i, o] = sum_g s_g[o, g] * (sum_{k in g} q[o, k] * x8[i, k]  -  z[o, g] * sum_{k in g} x8[i, k])

The 4-bit ``q`` are unsigned and ``x8`` signed, which is what ``vpdpbusd`` (AVX-512 VNNI: 64 byte products,
summed by fours into 16 int32 lanes) multiplies; without VNNI, ``vpmaddubsw`` then ``vpmaddwd`` by ones does
the same in two steps (AVX-512BW on 64 bytes, AVX2 on 32; no overflow: 2 * 15 * 127 fits an int16). Everything
is integer, so the result is bit-equal to the reference's int32 sum.

Layout. One vector load of ``qweight`` (``4 * lanes`` bytes: ``8 * lanes`` columns of one output channel,
column ``k`` in the nibble ``k % 8`` of word ``k // 8``) gives the even columns as its low nibbles and the odd
ones as its high nibbles (``& 0x0F`` and ``>> 4 & 0x0F``). So the kernel first copies ``x8`` into a buffer
whose every chunk of ``8 * lanes`` columns holds the chunk's even columns, then its odd ones (and the per-group
sums of ``x8``), zero-padding the rows to the row block; both dot products then read ``x`` contiguously. The
packed weights stay as kiln/quant/formats.py stores them.

Loops. Tasks split the output channels (``NJ`` each, in parallel); inside one, a block of ``rows`` rows x
``cols`` channels keeps one int32 vector per (row, channel) in registers: for each group, every weight vector
is unpacked once and multiplied with every row of the block. A group's dot products are scaled by ``s_g`` and
added to the vector; the zero-point term is a scalar sum beside it; one horizontal add per output at the end.
One row (decode) takes ``ONE_ROW`` blocks, more rows ``MANY_ROWS``.

Two TVM 0.27 traps shape the TVMScript: a buffer in ``"local"`` scope, and every ``name = expr`` (a mutable
one-element buffer), is allocated from the workspace pool once per task, not on the stack; so the accumulators
are plain block buffers under 1 KB (stack) and named expressions are ``T.meta_var`` (before, ``perf`` put
TVM's workspace alloc/free at about 10% of a w4a8 decode step of Qwen2.5-0.5B).

Invariant: the replacement has the original PrimFunc's parameters and writes the same values (integer sums,
the same float epilogue); a function that is not exactly kiln's w4a8 linear with 128-column groups, or a target
without AVX2, is left to kiln/codegen/cpu_schedule.py.
"""

from __future__ import annotations

from ..ir.tvm import tirx, tvm

GROUP = 128
NJ = 8  # output channels per parallel task
ONE_ROW = (1, 4)  # (rows, channels) of the register block for one row
MANY_ROWS = (4, 2)  # ... and for more rows (x padded to a multiple of its rows)


def dot_isa(target) -> str | None:
    """The 8-bit dot product the target has: ``vnni512``, ``avx512bw``, ``avx2``, or None."""
    from tvm.target import codegen

    if target is None or target.kind.name != "llvm":
        return None
    has = lambda f: codegen.llvm_cpu_has_features(f, target)  # noqa: E731
    if has("avx512vnni") and has("avx512bw"):
        return "vnni512"
    if has("avx512bw"):
        return "avx512bw"
    if has("avx2"):
        return "avx2"
    return None


def _dot4(isa: str):
    """``f(acc, u8, s8)``: ``acc`` (int32 x lanes) plus the sums of four adjacent products of unsigned bytes ``u8``
    and signed bytes ``s8`` (both given as int32 x lanes)."""
    from tvm.script import tirx as T

    if isa == "vnni512":
        from tvm.target import codegen

        # LLVM 22 takes the byte operands as <64 x i8> (earlier releases as <16 x i32>)
        byte = (lambda v: T.reinterpret(v, dtype="int8x64")) if codegen.llvm_version_major() >= 22 else (lambda v: v)
        return lambda acc, a, b: T.call_llvm_pure_intrin(
            "int32x16", T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"), acc, byte(a), byte(b))
    lanes = 16 if isa == "avx512bw" else 8
    ubsw, madd = ("avx512.pmaddubs.w.512", "avx512.pmaddw.d.512") if lanes == 16 else ("avx2.pmadd.ub.sw",
                                                                                      "avx2.pmadd.wd")
    i16, i8 = f"int16x{2 * lanes}", f"int8x{4 * lanes}"

    def dot4(acc, a, b):
        pairs = T.call_llvm_pure_intrin(i16, T.llvm_lookup_intrinsic_id(f"llvm.x86.{ubsw}"),
                                        T.reinterpret(a, dtype=i8), T.reinterpret(b, dtype=i8))
        return acc + T.call_llvm_pure_intrin(f"int32x{lanes}", T.llvm_lookup_intrinsic_id(f"llvm.x86.{madd}"), pairs,
                                             T.broadcast(T.int16(1), 2 * lanes))
    return dot4


def w4a8_kernel(O: int, K: int, out_dtype: str, isa: str):  # noqa: N803 (the kernel's shapes)
    """The PrimFunc ``(x8 [n, K] int8, s_x [n], qweight [O, K/8], s_g [O, G], z [O, G], s_c [O], y [n, O])``."""
    from tvm.script import tirx as T

    lanes = 16 if isa in ("vnni512", "avx512bw") else 8
    chunk = 8 * lanes  # columns per vector load of qweight
    loads = GROUP // chunk  # vector loads per group and channel
    G, W = K // GROUP, K // 8
    vi32 = f"int32x{lanes}"
    dot4 = _dot4(isa)
    rows_max = max(ONE_ROW[0], MANY_ROWS[0])

    rp = rows_max  # x is padded to a multiple of the larger row block

    @T.macro(hygienic=False)
    def dot(rows, cols, dot4, vi32, loads, chunk):
        for jo in T.parallel(O // NJ):
            with T.sblock("w4a8_dot"):
                vjo = T.axis.spatial(O // NJ, jo)
                T.reads(xp[0:(n + rp - 1) // rp * rp, 0:K], xsum[0:(n + rp - 1) // rp * rp, 0:G],
                        qweight[vjo * NJ:vjo * NJ + NJ, 0:W], gscale[vjo * NJ:vjo * NJ + NJ, 0:G],
                        zeros[vjo * NJ:vjo * NJ + NJ, 0:G], sx[0:n], cscale[vjo * NJ:vjo * NJ + NJ])
                T.writes(y[0:n, vjo * NJ:vjo * NJ + NJ])
                acc = T.sblock_alloc_buffer((rows * cols * lanes,), "int32")
                part = T.sblock_alloc_buffer((rows * cols * lanes,), "int32")
                corr = T.sblock_alloc_buffer((rows * cols,), "int32")
                for ib in T.serial((n + rows - 1) // rows):
                    for cb in T.serial(NJ // cols):
                        for rc in T.unroll(rows * cols):
                            acc[T.ramp(rc * lanes, 1, lanes)] = T.broadcast(T.int32(0), lanes)
                            corr[rc] = 0
                        for g in T.serial(G):
                            for rc in T.unroll(rows * cols):
                                part[T.ramp(rc * lanes, 1, lanes)] = T.broadcast(T.int32(0), lanes)
                            for c in T.unroll(cols):
                                for ld in T.unroll(loads):
                                    w = T.meta_var(qweight[vjo * NJ + cb * cols + c, T.ramp(g * 16 + ld * lanes, 1, lanes)])
                                    lo = T.meta_var(T.bitwise_and(w, T.broadcast(T.int32(0x0F0F0F0F), lanes)))
                                    hi = T.meta_var(T.bitwise_and(T.shift_right(w, T.broadcast(T.int32(4), lanes)),
                                                       T.broadcast(T.int32(0x0F0F0F0F), lanes)))
                                    for r in T.unroll(rows):
                                        base = T.meta_var(g * GROUP + ld * chunk)
                                        xe = T.meta_var(T.reinterpret(xp[ib * rows + r, T.ramp(base, 1, 4 * lanes)], dtype=vi32))
                                        xo = T.meta_var(T.reinterpret(xp[ib * rows + r, T.ramp(base + 4 * lanes, 1, 4 * lanes)],
                                                           dtype=vi32))
                                        part[T.ramp((r * cols + c) * lanes, 1, lanes)] = dot4(dot4(
                                            part[T.ramp((r * cols + c) * lanes, 1, lanes)], lo, xe), hi, xo)
                            for c in T.unroll(cols):
                                for r in T.unroll(rows):
                                    o = T.meta_var(vjo * NJ + cb * cols + c)
                                    acc[T.ramp((r * cols + c) * lanes, 1, lanes)] = \
                                        acc[T.ramp((r * cols + c) * lanes, 1, lanes)] + \
                                        part[T.ramp((r * cols + c) * lanes, 1, lanes)] * \
                                        T.broadcast(T.Cast("int32", gscale[o, g]), lanes)
                                    corr[r * cols + c] = corr[r * cols + c] + T.Cast("int32", zeros[o, g]) * \
                                        T.Cast("int32", gscale[o, g]) * xsum[ib * rows + r, g]
                        for c in T.unroll(cols):
                            for r in T.unroll(rows):
                                if ib * rows + r < n:
                                    o = T.meta_var(vjo * NJ + cb * cols + c)
                                    total = T.meta_var(T.call_llvm_pure_intrin(
                                        "int32", T.llvm_lookup_intrinsic_id(f"llvm.vector.reduce.add.v{lanes}i32"),
                                        acc[T.ramp((r * cols + c) * lanes, 1, lanes)]) - corr[r * cols + c])
                                    y[ib * rows + r, o] = T.Cast(out_dtype, T.Cast("float32", total) *
                                                                 sx[ib * rows + r] * cscale[o])

    @T.prim_func(private=True, s_tir=True)
    def w4a8_dot(var_x8: T.handle, var_sx: T.handle, qweight: T.Buffer((O, W), "int32"),
                 gscale: T.Buffer((O, G), "uint8"), zeros: T.Buffer((O, G), "uint8"),
                 cscale: T.Buffer((O,), "float32"), var_y: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        n = T.int64()
        x8 = T.match_buffer(var_x8, (n, K), "int8")
        sx = T.match_buffer(var_sx, (n,), "float32")
        y = T.match_buffer(var_y, (n, O), out_dtype)
        xp = T.sblock_alloc_buffer(((n + rp - 1) // rp * rp, K), "int8")
        xsum = T.sblock_alloc_buffer(((n + rp - 1) // rp * rp, G), "int32")
        for r in T.parallel((n + rp - 1) // rp * rp):
            with T.sblock("x_even_odd"):
                vr = T.axis.spatial((n + rp - 1) // rp * rp, r)
                T.reads(x8[0:n, 0:K])
                T.writes(xp[vr, 0:K], xsum[vr, 0:G])
                for g in T.serial(G):
                    xsum[vr, g] = 0
                    for c in T.serial(loads):
                        for j in T.serial(4 * lanes):
                            ev = T.meta_var(T.if_then_else(vr < n, x8[T.min(vr, n - 1), g * GROUP + c * chunk + 2 * j], T.int8(0)))
                            od = T.meta_var(T.if_then_else(vr < n, x8[T.min(vr, n - 1), g * GROUP + c * chunk + 2 * j + 1],
                                                T.int8(0)))
                            xp[vr, g * GROUP + c * chunk + j] = ev
                            xp[vr, g * GROUP + c * chunk + 4 * lanes + j] = od
                            xsum[vr, g] = xsum[vr, g] + T.Cast("int32", ev) + T.Cast("int32", od)
        if n == 1:
            dot(ONE_ROW[0], ONE_ROW[1], dot4, vi32, loads, chunk)
        else:
            dot(MANY_ROWS[0], MANY_ROWS[1], dot4, vi32, loads, chunk)

    return w4a8_dot


def match_w4a8(func: tirx.PrimFunc):
    """``(O, K, out dtype)`` when ``func`` is kiln/ir/quant_kernels.py's ``w4a8_matmul`` over a symbolic row
    count with 128-column groups and ``O`` a multiple of ``NJ``, parameters in the emitter's order
    ``(x8, s_x, qweight, s_g, z, s_c, y)``; else None."""
    body = func.body
    if not (isinstance(body, tvm.s_tir.SBlockRealize) and body.block.name_hint == "root") or len(func.params) != 7:
        return None
    sch = tvm.s_tir.Schedule(func)
    blocks = [sch.get(b) for b in sch.get_child_blocks(sch.get_sblock("root"))]
    if [b.name_hint for b in blocks] != ["w4a8_weight", "int_matmul", "int_matmul_dequant"]:
        return None
    x8, sx, qw, gs, z, cs, y = func.params  # TVM 0.27: buffer parameters are the buffers
    sources = lambda block: [r.source for r in block.reads]  # noqa: E731
    if not (_same_buffers(sources(blocks[0]), [qw, z, gs]) and _same_buffers(sources(blocks[1])[:1], [x8])
            and _same_buffers(sources(blocks[2])[1:], [sx, cs]) and blocks[2].writes[0].source.same_as(y)):
        return None
    if len(x8.shape) != 2 or not isinstance(x8.shape[0], tirx.Var) or len(qw.shape) != 2:
        return None
    O, K = int(qw.shape[0]), int(qw.shape[1]) * 8
    dtypes = [b.dtype for b in (x8, sx, qw, gs, z, cs)]
    if dtypes != ["int8", "float32", "int32", "uint8", "uint8", "float32"] or int(x8.shape[1]) != K:
        return None
    if K % GROUP or O % NJ or [int(v) for v in gs.shape] != [O, K // GROUP] or \
            [int(v) for v in z.shape] != [O, K // GROUP]:
        return None
    return O, K, str(y.dtype)


def _same_buffers(xs, ys) -> bool:
    return len(xs) == len(ys) and all(x.same_as(y) for x, y in zip(xs, ys))


def schedule_w4a8(func: tirx.PrimFunc, target) -> tirx.PrimFunc | None:
    """The integer-dot kernel in place of ``func`` (same parameters) where the target has one and ``func`` is
    kiln's w4a8 linear (``match_w4a8``); else None."""
    isa, shape = dot_isa(target), match_w4a8(func)
    if isa is None or shape is None:
        return None
    new = w4a8_kernel(*shape, isa)
    for key, value in (func.attrs or {}).items():  # the caller's attributes (symbol, op pattern) carry over
        if key not in new.attrs:
            new = new.with_attr(key, value)
    return new
