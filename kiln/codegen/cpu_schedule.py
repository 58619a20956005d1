"""CPU schedule for the linear layers: ``C[m, n] = sum_k A[m, k] * W[n, k]`` (+ an elementwise epilogue).

After legalization and fusion every linear of the model is an unscheduled TE loop nest (``NT_matmul*``,
``fused_NT_matmul*_add``, ``fused_NT_matmul*_silu*_multiply*``): scalar, single-threaded, and each output
row reads all of W again. ``ScheduleCPUMatmul`` rewrites exactly those PrimFuncs:

* columns are split into tiles of ``NJ`` rows of W, and the tiles run in parallel (TVM's thread pool);
* inside a tile, the rows of A (``m``, which may be symbolic: batch size or sequence length) loop over
  the same ``NJ x k`` block of W, which stays in cache;
* the reduction is split ``k = ko * vk + kv`` and rfactor'd on ``kv``: the ``NJ x vk`` partial sums are
  accumulated with ``kv`` vectorized (``k`` is contiguous in both A and W), then summed per output.
  ``vk`` is the target's fp32 vector width: 4 for kiln's plain ``llvm`` target (LLVM's generic x86-64,
  i.e. SSE2), 8 / 16 when the target enables AVX / AVX-512;
* an elementwise epilogue (bias add, residual add, SiLU * up) is inlined into one block computed right
  after each output element, so the ``[m, n]`` intermediate is never materialised.

That is the one-row (GEMV) schedule: at memory speed for decode, but each row re-reads the tile of W.
A float linear over a symbolic row count branches on it (``schedule_func``):

* 2 .. ``PANEL_ROWS - 1`` rows (batched decode): ``_schedule_rows`` pads the rows to a multiple of 4
  (``pad_einsum``) and keeps a 4 x 4 block of vector partial sums in registers, so every vector load of
  W or x feeds four FMAs (measured 1.2-1.7x the GEMV schedule at 8 rows, one thread);
* ``PANEL_ROWS`` rows and more (prefill): ``_schedule_panel``, the outer-product kernel of BLAS
  libraries — each task copies a panel of 32 output columns of W k-major once per call, then for 8
  rows at a time keeps 8 x 2 vectors of outputs in registers, each step one broadcast of ``x[i, k]``
  times two vectors of the panel (measured 1.6-2.5x at 512 rows: ~140 GFLOP/s on one AVX-512 core).

``tools/bench_cpu_linear.py --schedules kiln gemv rows panel`` times each against the others.

The w4a8 linear goes first to kiln/codegen/cpu_int8.py: on a target with 8-bit dot products (AVX2, AVX-512BW,
AVX-512 VNNI) and 128-column groups it is replaced by a kernel that multiplies the 4-bit weights with the int8
activations on those instructions; otherwise it is scheduled below like the others.

The quantized linears of kiln/ir/quant_kernels.py (``dequant_matmul``, ``int_matmul``: the weight is
dequantized inside the sum) get the same tiling and a branch on the row count: one row unpacks the
weight inline in the sum, more rows take the register-blocked schedule below with the weight stage computed
once per tile of 4 output channels, in a buffer of the task's own, for every row (never the whole weight). The plain form's whole-weight ``dequantize_*`` kernels
(``--no-fuse``) run their rows in parallel.

The same pass swaps TVM's CPU decode and ragged-prefill attention kernels for kiln/codegen/cpu_attention.py's
(same signature; TVM's are serial and scalar). Anything else (the other attention kernels, norms, RoPE, KV-cache
copies, or a matmul in a shape the rule does not expect) passes through untouched: the rule matches the matmul
block structurally and gives up on the whole function (keeping the original) if any schedule step is refused.
"""

from __future__ import annotations

from ..ir.quant_kernels import WEIGHT_STAGES
from ..ir.tvm import tirx, tvm
from .cpu_attention import schedule_decode_attention, schedule_prefill_attention
from .cpu_int8 import schedule_w4a8
from .cuda_gemv import row_var

NJ = 8  # output columns (rows of W) per tile; each has its own vector accumulator
TILED_WEIGHT_ROWS = 1  # a quantized linear over more rows than this dequantizes its weight per tile, not inline
ROW_BLOCK = (4, 4)  # float linears over 2 .. PANEL_ROWS - 1 rows: rows x columns of vector accumulators
PANEL_ROWS = 64  # float linears over this many rows or more: the packed-panel outer-product kernel


def _as_int(e):
    return int(e) if isinstance(e, tirx.IntImm) else None


def _load(e):
    """(buffer, indices) of a buffer load, else None (TVM 0.27: a ``TensorLoad`` whose ``source`` is the buffer)."""
    if isinstance(e, tvm.ir.expr.TensorLoad):
        return e.source, list(e.indices)
    return None


def _same(xs, ys) -> bool:
    return len(xs) == len(ys) and all(x.same_as(y) for x, y in zip(xs, ys))


def _match_nt_matmul(block):
    """True if ``block`` is ``C[i, j] = 0; C[i, j] += A[i, k] * W[j, k]`` in float32 (A, W, C distinct)."""
    iv = block.iter_vars
    if len(iv) != 3 or [int(v.iter_type) for v in iv] != [tirx.IterVar.DataPar, tirx.IterVar.DataPar,
                                                            tirx.IterVar.CommReduce]:
        return False
    vi, vj, vk = (v.var for v in iv)
    body, init = block.body, block.init
    if not isinstance(body, tirx.BufferStore) or not isinstance(init, tirx.BufferStore):
        return False
    c, out_idx = body.buffer, list(body.indices)
    if not _same(out_idx, [vi, vj]):
        return False
    if not (init.buffer.same_as(c) and _same(list(init.indices), out_idx)
            and isinstance(init.value, tirx.FloatImm) and init.value.value == 0.0):
        return False
    if not isinstance(body.value, tirx.Add) or not isinstance(body.value.b, tirx.Mul):
        return False
    acc, mul = _load(body.value.a), body.value.b
    if acc is None or not acc[0].same_as(c) or not _same(acc[1], out_idx):
        return False
    a, w = _load(mul.a), _load(mul.b)
    if a is None or w is None:
        return False
    if _same(a[1], [vj, vk]):
        a, w = w, a
    if not (_same(a[1], [vi, vk]) and _same(w[1], [vj, vk])):
        return False
    if a[0].same_as(c) or w[0].same_as(c):
        return False
    return all(x.dtype == "float32" for x in (c, a[0], w[0]))


def _is_quant_matmul(block) -> bool:
    """kiln/ir/quant_kernels.py's reductions (weights dequantized inside the sum): the same i, j, k nest."""
    iv = block.iter_vars
    return block.name_hint in ("dequant_matmul", "int_matmul") and len(iv) == 3 and \
        [int(v.iter_type) for v in iv] == [tirx.IterVar.DataPar, tirx.IterVar.DataPar, tirx.IterVar.CommReduce]


def _first_nest(func: tirx.PrimFunc, index: int = 0):
    """(loops, realize) of statement ``index`` under the root block when it is a perfect loop nest
    around one block; else None."""
    stmt = func.body.block.body
    if isinstance(stmt, tirx.SeqStmt):
        stmt = stmt.seq[index]
    elif index:
        return None
    loops = []
    while isinstance(stmt, tirx.For):
        loops.append(stmt)
        stmt = stmt.body
    if not isinstance(stmt, tvm.s_tir.SBlockRealize):
        return None
    return loops, stmt


def _largest_divisor(n: int, cap: int) -> int:
    d = cap
    while d > 1 and n % d:
        d //= 2
    return d


def _schedule(func: tirx.PrimFunc, lanes: int, tiled_weight: bool = False) -> tirx.PrimFunc | None:
    if not _has_root(func):
        return None
    sch = tvm.s_tir.Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    if not blocks:
        return None
    if len(blocks) == 1 and sch.get(blocks[0]).name_hint in ("dequantize_weight_only", "dequantize_w4a8"):
        sch.parallel(sch.get_loops(blocks[0])[0])  # one output row (channel) per task
        return sch.mod["main"]
    weight_stage = None
    if sch.get(blocks[0]).name_hint in WEIGHT_STAGES and len(blocks) > 1:
        weight_stage, blocks = blocks[0], blocks[1:]
        if not tiled_weight:
            sch.compute_inline(weight_stage)
            weight_stage = None
            func = sch.mod["main"]
    quant = _is_quant_matmul(sch.get(blocks[0]))
    if weight_stage is not None and not quant:
        return None
    if not (quant or _match_nt_matmul(sch.get(blocks[0]))):
        return None
    mm, epilogue = blocks[0], list(blocks[1:])
    for b in epilogue:  # the rest must be elementwise over [m, n]: bias, residual, activation
        block = sch.get(b)
        if len(block.iter_vars) != 2 or any(int(v.iter_type) != tirx.IterVar.DataPar for v in block.iter_vars):
            return None

    # The matmul must sit alone in a perfect nest i, j, k bound 1:1 to its iter vars (T.axis.remap("SSR")).
    loops = sch.get_loops(mm)
    nest = _first_nest(func, 1 if weight_stage is not None else 0)
    if len(loops) != 3 or nest is None or not nest[1].block.same_as(sch.get(mm)):
        return None
    loop_vars = [lp.loop_var for lp in nest[0]]
    if (not _same(list(nest[1].iter_values), loop_vars) or not _is_true(nest[1].predicate)
            or any(int(lp.kind) != 0 or not _is_zero(lp.min) for lp in nest[0])):
        return None
    n, kk = _as_int(sch.get(loops[1]).extent), _as_int(sch.get(loops[2]).extent)
    if n is None or kk is None:
        return None
    # a packed int32 word holds 8 columns: with vk = 8 the word index and the nibble are plain loop vars;
    # AVX-512 takes two words per vector (one permute more: measured 1.1x for a 4-bit GEMV)
    qk = 16 if lanes >= 16 else 8
    vk, nj = (qk if quant and kk % qk == 0 else _largest_divisor(kk, lanes)), _largest_divisor(n, NJ)
    if vk < 4:
        return None

    # Epilogue: inline every block but the last into its consumer; the last one runs right after the
    # write-back of each tile, so the [m, n] matmul result is never materialised.
    for b in epilogue[:-1]:
        sch.compute_inline(b)

    i, j, k = loops
    ko, kv = sch.split(k, [None, vk])
    jo, ji = sch.split(j, [None, nj])
    sch.reorder(jo, i, ko, ji, kv)
    rf = sch.rfactor(kv, factor_axis=2)  # C_rf[i, j, kv] += A[i, ko*vk + kv] * W[j, ko*vk + kv]
    jo, i, ko, ji, kv = sch.get_loops(rf)  # rfactor leaves the write-back block on copies of the loops
    sch.reverse_compute_at(mm, i)  # C[i, j] = sum_kv C_rf[i, j, kv], per row of the tile
    if epilogue:
        sch.reverse_compute_at(epilogue[-1], i)
    sch.vectorize(kv)
    sch.unroll(ji)  # nj independent accumulators share each load of A
    sch.parallel(jo)
    if weight_stage is not None:
        # each task dequantizes its tile of output channels once (nj x k, its own buffer), then every row
        # of x reads it
        sch.compute_at(weight_stage, jo)
        sch.set_scope(weight_stage, 0, "local")
    sch.decompose_reduction(rf, ko)
    return sch.mod["main"]


def _padded_linear(func, rows: int):
    """(schedule, mm, the block written last, the weight stage or None) with the row count of a linear padded
    to a multiple of ``rows`` (``pad_einsum``: x is copied into a zero-padded buffer, the product written to a
    padded one), so the row loop splits without a tail; None where ``func`` is not a float linear or one of
    kiln/ir/quant_kernels.py's fused ones."""
    if not _has_root(func):
        return None
    sch = tvm.s_tir.Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    stage = None
    if len(blocks) > 1 and sch.get(blocks[0]).name_hint in WEIGHT_STAGES:
        stage, blocks = blocks[0], blocks[1:]
    if not blocks or not (_is_quant_matmul(sch.get(blocks[0])) if stage is not None
                          else _match_nt_matmul(sch.get(blocks[0]))):
        return None
    epilogue = blocks[1:]
    for b in epilogue:
        block = sch.get(b)
        if len(block.iter_vars) != 2 or any(int(v.iter_type) != tirx.IterVar.DataPar for v in block.iter_vars):
            return None
    mm = blocks[0]
    sch.pad_einsum(mm, [rows, 1, 1])
    padded = [b for b in sch.get_child_blocks(sch.get_sblock("root")) if stage is None or not sch.get(b).same_as(
        sch.get(stage))]
    x_pad, mm, copy = padded[:3]
    if epilogue:  # the epilogue reads the padded product directly; all but its last block inlined
        sch.compute_inline(copy)
        for b in epilogue[:-1]:
            sch.compute_inline(b)
    sch.parallel(sch.get_loops(x_pad)[0])
    return sch, mm, epilogue[-1] if epilogue else copy, stage


def _schedule_rows(func: tirx.PrimFunc, lanes: int) -> tirx.PrimFunc | None:
    """A few rows (batched decode, short chunks): dot products with a register block of ``ROW_BLOCK`` rows x
    columns, each a vector of partial sums over k (``lanes`` wide), so each vector of W loaded serves every
    row of the block and each vector of x every column; the partial sums are added across lanes at the end.
    A fused quantized linear's weight stage is computed per task, its tile of ``nr`` output channels
    dequantized once (in the task's own buffer: TVM 0.27 takes any 'local' buffer, or one of 1 KB or more, from
    its workspace pool, once per task) for every row."""
    mr, nr = ROW_BLOCK
    padded = _padded_linear(func, mr)
    if padded is None:
        return None
    sch, mm, last, stage = padded
    i, j, k = sch.get_loops(mm)
    n, kk = _as_int(sch.get(j).extent), _as_int(sch.get(k).extent)
    if n is None or kk is None or kk % lanes or n % nr:
        return None
    ko, kv = sch.split(k, [None, lanes])
    jo, ji = sch.split(j, [None, nr])
    io, ii = sch.split(i, [None, mr])
    sch.reorder(jo, io, ko, ii, ji, kv)
    rf = sch.rfactor(kv, factor_axis=2)  # C_rf[i, j, kv]: a [mr, nr, lanes] block of registers per (jo, io)
    jo, io, ko, ii, ji, kv = sch.get_loops(rf)
    sch.reverse_compute_at(mm, io)
    sch.reverse_compute_at(last, io)
    sch.set_scope(rf, 0, "local")
    sch.vectorize(kv)
    sch.unroll(ji)
    sch.unroll(ii)
    sch.parallel(jo)
    if stage is not None:
        sch.compute_at(stage, jo)
        sch.set_scope(stage, 0, "local")
    sch.decompose_reduction(rf, ko)
    return sch.mod["main"]


def _schedule_panel(func: tirx.PrimFunc, lanes: int) -> tirx.PrimFunc | None:
    """Many rows (prefill): the outer-product kernel of BLAS libraries. Each task copies its panel of ``2 *
    lanes`` output columns of W k-major (``W_pack[k, 0:nr]``, once per call, read by every row), then for a
    block of rows keeps ``rows x 2`` vectors of outputs in registers: for each k, ``x[i, k]`` broadcast times
    the panel's two vectors. No sums across lanes; the output is written as vectors."""
    mr, nr = (8 if lanes >= 16 else 4), 2 * lanes  # 16 accumulators with AVX-512's 32 registers, 8 of 16 else
    padded = _padded_linear(func, mr)
    if padded is None:
        return None
    sch, mm, last, stage = padded
    i, j, k = sch.get_loops(mm)
    n = _as_int(sch.get(j).extent)
    if n is None or n % nr:
        return None
    # the panel: a copy of W's tile, or a quantized linear's weight stage (the tile dequantized) written k-major
    if stage is None:  # W is the read whose rows are the output columns (a static extent; x_pad's is not)
        reads = sch.get(mm).reads
        w_index = [r for r, region in enumerate(reads) if _as_int(region.source.shape[0]) == n]
        if len(w_index) != 1:
            return None
        pack = sch.cache_read(mm, w_index[0], "global")
    else:
        pack = stage
    sch.transform_layout(pack, ("write", 0), lambda j, k: (j // nr, k, j % nr))
    acc = sch.cache_write(mm, 0, "local")
    jo, ji = sch.split(j, [None, nr])
    jv_o, jv = sch.split(ji, [None, lanes])
    io, ii = sch.split(i, [None, mr])
    sch.reorder(jo, io, k, ii, jv_o, jv)
    sch.reverse_compute_at(acc, io)
    sch.reverse_compute_at(last, io)
    sch.compute_at(pack, jo)
    pj, pk = sch.get_loops(pack)[1:]
    sch.reorder(pk, pj)  # write the panel in order
    sch.vectorize(jv)
    sch.unroll(jv_o)
    sch.unroll(ii)
    sch.parallel(jo)
    sch.decompose_reduction(mm, k)
    return sch.mod["main"]


def _branches(func, cases) -> tirx.PrimFunc:
    """One function running ``cases[i][1]``'s body where ``cases[i][0]`` (a condition on the row count) is the
    first that holds, the last case unconditionally; every case's intermediate buffers allocated once at the
    root (each schedule keeps the buffers it made; a buffer defined in two places does not lower)."""
    from tvm.s_tir.stmt import SBlock, SBlockRealize

    allocs, body = [], None
    for cond, f in reversed(cases):
        block = f.body.block
        allocs += [x for x in block.alloc_buffers if not any(x.same_as(y) for y in allocs)]
        body = block.body if body is None else tirx.IfThenElse(cond, block.body, body)
    return func.with_body(SBlockRealize([], True, SBlock([], [], [], "root", body, alloc_buffers=allocs)))


def _is_zero(e) -> bool:
    return isinstance(e, tirx.IntImm) and int(e.value) == 0


def _is_true(e) -> bool:
    return isinstance(e, tirx.IntImm) and int(e.value) == 1


def _has_root(func) -> bool:
    body = func.body
    return isinstance(body, tvm.s_tir.SBlockRealize) and body.block.name_hint == "root"


def vector_lanes(target) -> int:
    """fp32 lanes of the target's widest vector unit (4 for a plain ``llvm`` target: SSE2)."""
    from tvm.target import codegen

    if target is None or target.kind.name != "llvm":
        return 4
    if codegen.llvm_cpu_has_features("avx512f", target):
        return 16
    if codegen.llvm_cpu_has_features("avx", target):
        return 8
    return 4


def schedule_func(func: tirx.PrimFunc, lanes: int = 4) -> tirx.PrimFunc | None:
    """The scheduled function, or None when ``func`` is not a linear the rule handles.

    A float linear gets three schedules and a branch on its row count: one row (decode) the GEMV schedule
    (``_schedule``: read W once, at memory speed), 2 .. ``PANEL_ROWS - 1`` rows the register-blocked dot
    products (``_schedule_rows``), more the packed-panel outer product (``_schedule_panel``). A fused quantized
    linear (a weight stage, kiln/ir/quant_kernels.py) gets two: up to ``TILED_WEIGHT_ROWS`` rows (decode) the
    weight is dequantized inline in the sum, read once; beyond, each task dequantizes its tile of output
    channels once and every row reads it (``_schedule_rows``, else the GEMV schedule over that tile), where
    inline it would be unpacked once per row."""
    try:
        small = _schedule(func, lanes)
        n = row_var(func)
        if small is None or n is None:
            return small
        if _has_weight_stage(func):
            mid = _schedule_rows(func, lanes) or _schedule(func, lanes, tiled_weight=True)
            big = _schedule_panel(func, lanes) or mid
            if mid is None:
                return small
            return _branches(func, [(n <= TILED_WEIGHT_ROWS, small), (n < PANEL_ROWS, mid), (None, big)])
        mid = _schedule_rows(func, lanes) or small  # (a shape a schedule declines runs the one before it)
        big = _schedule_panel(func, lanes) or mid
        cases = []
        for cond, f in [(n <= 1, small), (n < PANEL_ROWS, mid), (None, big)]:
            if cases and cases[-1][1] is f:  # the conditions grow: the later one covers both
                cases[-1] = (cond, f)
            else:
                cases.append((cond, f))
        return _branches(func, cases) if len(cases) > 1 else small
    except (RuntimeError, ValueError, TypeError):  # tvm.s_tir.ScheduleError is a RuntimeError
        return None


def _has_weight_stage(func) -> bool:
    sch = tvm.s_tir.Schedule(func)
    return any(sch.get(b).name_hint in WEIGHT_STAGES for b in sch.get_child_blocks(sch.get_sblock("root")))


@tvm.transform.module_pass(opt_level=0, name="kiln.ScheduleCPUMatmul")
def ScheduleCPUMatmul(mod, _ctx):  # noqa: N802 (a pass, named like TVM's)
    target = tvm.target.Target.current(allow_none=True)
    lanes = vector_lanes(target)
    updated = {}
    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc) and (new := schedule_decode_attention(func, lanes)
                                                or schedule_prefill_attention(func, lanes)) is not None:
            updated[gv] = new  # TVM's own attention kernel, marked scheduled: kiln's replaces it
        elif isinstance(func, tirx.PrimFunc) and not (func.attrs or {}).get("tirx.is_scheduled", False):
            new = schedule_w4a8(func, target) or schedule_func(func, lanes)
            if new is not None:
                updated[gv] = new.with_attr("tirx.is_scheduled", True)
    if not updated:
        return mod
    mod = mod.clone()  # never mutate the caller's module in place
    for gv, func in updated.items():
        mod[gv] = func
    return mod
