"""Tensor-core GEMMs for sm_80+: a dlight rule with ldmatrix + mma.sync + a cp.async pipeline.

TVM 0.27's stock dlight gives tensor cores only through WMMA (no cp.async, no bf16: kiln registers
the bf16 ldmatrix/mma intrinsics TVM lacks, see ``register_bf16_intrinsics``); this rule
schedules the same normalized matmul ``C[S, I, J] += A[S, I, K] * B[S, J, K]`` onto
``mma.sync.aligned.m16n8k16`` with ``ldmatrix`` fragment loads from dynamic shared memory filled by
a multi-stage ``cp.async`` pipeline. A symbolic M (prefill's token count) is padded to the block
tile; the padded rows are loaded as predicated zero-fill copies and never stored. Epilogues the
fuser put after the matmul (cast, bias/residual add, SiLU...) are inlined into the store from the
shared-memory staging tile.

The rule applies where tensor cores pay: fp16 or bf16 inputs with fp32 accumulation (the reference form
emits half-precision linears that way), K and N static multiples of the tile, and an M that is
symbolic or at least one block tile. Batch-1 decode has a static M of 1 and stays on dlight's GEMV.
kiln's states are token-major ``[n, H]``, so the batched-decode linears are structurally the same
PrimFunc as prefill's (TVM deduplicates them); cuda_gemv.py puts a low-batch GEMV in front of this
rule for small ``n``, where one 128-row tile would leave most SMs idle.

Three TVM 0.27 traps are handled here (shared/notes/tensor-cores.md 3.3): CSE must be off before
LowerWarpMemory, ``tirx.use_async_copy`` must be on or the pipeline silently gets no cp.async, and
LowerWarpMemory rewrites only the first warp buffer of a statement sequence, so the ``kiln_mma``
TIR pipeline runs it until nothing is left to lower.

Invariant: a function this rule returns a schedule for computes exactly the matmul it was given
(tests compare the PTX's instructions; numerics are checked on a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..ir.tvm import dlight, tirx, tvm

PASS_CONFIG = {"tirx.disable_cse_tir": True, "tirx.use_async_copy": True}
TIR_PIPELINE = "kiln_mma"


def _register_pipeline() -> None:
    from tvm.s_tir.pipeline import default_s_tir_pipeline
    from tvm.tirx.compilation_pipeline import PIPELINE_MAP, register_tir_pipeline

    if TIR_PIPELINE in PIPELINE_MAP:
        return

    def finalize_device():
        # LowerWarpMemory lowers one warp buffer per statement sequence and stops (0.27); lowered buffers
        # become "local", so repeating it is idempotent. 16 covers A, B and C fragments with room to spare.
        return tvm.ir.transform.Sequential([tirx.transform.LowerWarpMemory() for _ in range(16)]
                                           + [tirx.transform.StmtSimplify(), tirx.transform.LowerIntrin()])

    def pipeline(**kwargs):
        main, finalize_host, _ = default_s_tir_pipeline(**kwargs)
        return main, finalize_host, finalize_device

    register_tir_pipeline(TIR_PIPELINE, pipeline)


_register_pipeline()


def import_tensor_intrinsics() -> None:
    """Import TVM's CUDA tensor intrinsics (ldmatrix, mma, wmma) in ~2 s instead of ~12-30 s.

    Each of their ~500 ``@T.prim_func`` definitions calls ``inspect.stack()``, and ``inspect.getmodule``
    rescans ``sys.modules`` for every frame whose module it cannot find (the frozen importlib frames):
    the same failed lookups, thousands of times. Remembering the failures during this one import is
    enough; ``inspect.getmodule`` is restored afterwards.
    """
    import inspect
    import sys

    if "tvm.s_tir.tensor_intrin.cuda" in sys.modules:
        return
    original, unknown = inspect.getmodule, set()

    def getmodule(obj, _filename=None):
        code = getattr(obj, "f_code", None) or (obj if inspect.iscode(obj) else None)
        key = _filename or (code.co_filename if code is not None else None)
        if key is not None and key in unknown:
            return None
        module = original(obj, _filename)
        if module is None and key is not None:
            unknown.add(key)
        return module

    inspect.getmodule = getmodule
    try:
        import tvm.s_tir.tensor_intrin.cuda  # noqa: F401
    finally:
        inspect.getmodule = original


BF16_INTRINSICS = {"load_a": "kiln_ldmatrix_bf16_a_dyn", "load_b": "kiln_ldmatrix_bf16_b_trans_dyn",
                   "compute": "kiln_mma_bf16bf16f32_trans_b"}


def register_bf16_intrinsics() -> None:
    """Register bf16 ldmatrix and mma.sync intrinsics, which TVM 0.27 lacks.

    TVM's generators for them are dtype-generic except for two lines: ``get_ldmatrix_intrin`` asserts
    fp16 for 16-wide k, and ``get_mma_intrin``'s PTX type table has no bf16 (the C++ mma codegen does).
    kiln takes both functions' source, relaxes those two lines, and loads the result as a module from
    kiln's cache directory: TVMScript parses a prim_func from its source file, so it must be a real file.
    """
    import hashlib
    import importlib.util
    import inspect
    import os
    from pathlib import Path

    from tvm.s_tir import TensorIntrin

    try:
        TensorIntrin.get(BF16_INTRINSICS["compute"])
        return
    except Exception:  # noqa: BLE001 — not registered yet
        pass
    import_tensor_intrinsics()
    import tvm.s_tir.tensor_intrin.cuda as cuda

    ld, mma = inspect.getsource(cuda.get_ldmatrix_intrin), inspect.getsource(cuda.get_mma_intrin)
    patches = [(ld, 'assert dtype == "float16"', 'assert dtype in ("float16", "bfloat16")'),
               (mma, '"float16": "fp16",', '"float16": "fp16",\n        "bfloat16": "bf16",')]
    for src, old, _ in patches:
        if old not in src:
            raise RuntimeError(f"TVM's tensor intrinsics changed: {old!r} not found; bf16 needs a new patch")
    ld, mma = (src.replace(old, new) for src, old, new in patches)
    code = ("# generated by kiln/codegen/cuda_matmul.py from TVM's tensor_intrin/cuda.py: bf16 enabled\n"
            "import tvm.s_tir.tensor_intrin.cuda as _cuda\n"
            "globals().update({k: v for k, v in vars(_cuda).items() if not k.startswith('__')})\n\n"
            f"{ld}\n\n{mma}\n")
    cache = Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln")) / "tvm-intrinsics"
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"bf16_{hashlib.sha256(code.encode()).hexdigest()[:16]}.py"
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(code)
        tmp.replace(path)
    spec = importlib.util.spec_from_file_location(f"kiln_bf16_intrin_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    TensorIntrin.register(BF16_INTRINSICS["load_a"],
                          *module.get_ldmatrix_intrin(16, "bfloat16", "A", False, "shared.dyn"))
    TensorIntrin.register(BF16_INTRINSICS["load_b"],
                          *module.get_ldmatrix_intrin(16, "bfloat16", "B", True, "shared.dyn"))
    TensorIntrin.register(BF16_INTRINSICS["compute"],
                          *module.get_mma_intrin(16, "bfloat16", "bfloat16", "float32", False, True))


@dataclass(frozen=True)
class MMAConfig:
    warps_m: int = 2  # warps along M and N in a block
    warps_n: int = 2
    frags_m: int = 4  # 16x16 fragments per warp along M and N
    frags_n: int = 4
    k_chunks: int = 2  # 16-wide k steps per shared-memory stage (block K = 16 * k_chunks)
    stages: int = 3  # cp.async pipeline depth

    @property
    def block_m(self) -> int:
        return 16 * self.warps_m * self.frags_m

    @property
    def block_n(self) -> int:
        return 16 * self.warps_n * self.frags_n

    @property
    def block_k(self) -> int:
        return 16 * self.k_chunks


class MatmulMMA(dlight.gpu.Matmul.__base__):  # GPUScheduleRule, without importing dlight internals
    """ldmatrix + mma.sync (f32 accumulate) + cp.async pipelining for fp16 and bf16 matmuls on sm_80+."""

    def __init__(self, config: MMAConfig = MMAConfig()):
        self.config = config

    def apply(self, func, target, _):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        if "dlight.do_not_tensorize" in func.attrs.keys():
            return None
        arch = str(target.attrs.get("arch", ""))
        if not arch.startswith("sm_") or int(arch[3:5]) < 80:
            return None
        try:
            return self._schedule(func)
        except Exception:  # noqa: BLE001 — any failure falls through to the next rule (WMMA, then SIMT)
            return None

    def _schedule(self, func):
        import_tensor_intrinsics()
        from tvm import s_tir
        from tvm.s_tir.dlight.analysis import get_root_block
        from tvm.s_tir.dlight.gpu.matmul import (auto_inline_consumer_chain, auto_inline_producers, get_index_map,
                                                 get_reduction_blocks)
        from tvm.s_tir.tensor_intrin.cuda import get_mma_intrin_group, shared_16x16_to_ldmatrix_32x8_layout

        cfg = self.config
        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(get_root_block(sch))
        reduction = get_reduction_blocks(sch, blocks)
        if reduction is None or len(reduction) != 1:
            return None
        main = reduction[0]
        stmt = sch.get(main)
        in_dtype = str(stmt.reads[0].source.dtype)
        if in_dtype not in ("float16", "bfloat16") or len(stmt.reads) != 2 \
                or str(stmt.reads[1].source.dtype) != in_dtype:
            return None
        out_dtype = str(stmt.writes[0].source.dtype)
        if out_dtype not in ("float16", "float32"):
            return None

        # 1. C[S, I, J] += A[S, I, K] * B[S, J, K]
        ra = sch.reindex(main, ("read", 0))
        rb = sch.reindex(main, ("read", 1))
        rc = sch.reindex(main, ("write", 0))
        maps = get_index_map(sch.get(main))
        if maps is None:
            return None
        matmul_map, a_map, b_map, c_map = maps
        sch.transform_layout(ra, ("write", 0), a_map)
        sch.transform_layout(rb, ("write", 0), b_map)
        sch.transform_layout(rc, ("read", 0), c_map)
        sch.transform_block_layout(main, matmul_map)

        s_ext, m_ext, n_ext, k_ext = [lp.extent for lp in (sch.get(x) for x in sch.get_loops(main))]
        for ext, tile in ((n_ext, cfg.block_n), (k_ext, cfg.block_k)):
            if not isinstance(ext, tirx.IntImm) or int(ext) % tile:
                return None  # weights are static; a ragged N or K is not worth the padding
        if isinstance(m_ext, tirx.IntImm) and int(m_ext) < cfg.block_m:
            return None  # a static small M is a GEMV
        if not isinstance(s_ext, tirx.IntImm) or int(s_ext) != 1:
            return None

        # 2. pad M to the block tile (a symbolic M becomes ceil(m / BM) blocks)
        sch.pad_einsum(main, [1, cfg.block_m, cfg.block_n, cfg.block_k])

        # 3. 16x16x16 tiles, then block / warp / fragment levels
        batch, i, j, k = sch.get_loops(main)
        i, i_tc = sch.split(i, factors=[None, 16])
        j, j_tc = sch.split(j, factors=[None, 16])
        k, k_tc = sch.split(k, factors=[None, 16])
        sch.reorder(i, j, k, i_tc, j_tc, k_tc)
        inner = main
        outer = sch.blockize(i_tc)
        i0, i1, i2 = sch.split(i, factors=[None, cfg.warps_m, cfg.frags_m])
        j0, j1, j2 = sch.split(j, factors=[None, cfg.warps_n, cfg.frags_n])
        k0, k1 = sch.split(k, factors=[None, cfg.k_chunks])
        sch.reorder(j0, i0, i1, j1, k0, k1, i2, j2)  # N-major grid: consecutive blocks share the A tile
        sch.bind(batch, "blockIdx.z")
        sch.bind(j0, "blockIdx.x")
        sch.bind(i0, "blockIdx.y")
        warp = sch.fuse(i1, j1)
        sch.bind(warp, "threadIdx.y")
        num_warps = cfg.warps_m * cfg.warps_n

        # 4. global -> shared.dyn, 16-byte vectors, padded rows against bank conflicts
        def to_shared(index):
            block = sch.cache_read(outer, index, "shared.dyn")
            sch.compute_at(block, k0)
            fused = sch.fuse(*sch.get_loops(block)[-2:])
            _, ty, tx, vec = sch.split(fused, factors=[None, num_warps, 32, 8])
            sch.bind(ty, "threadIdx.y")
            sch.bind(tx, "threadIdx.x")
            sch.vectorize(vec)
            sch.storage_align(block, 0, axis=-2, factor=32, offset=8)
            return block

        a_shared = to_shared(0)
        b_shared = to_shared(1)
        auto_inline_producers(sch, a_shared)
        auto_inline_producers(sch, b_shared)

        # 5. shared -> warp fragments in ldmatrix layout; accumulators warp -> shared.dyn -> global
        a_warp = sch.cache_read(outer, 0, "warp")
        b_warp = sch.cache_read(outer, 1, "warp")
        sch.compute_at(a_warp, k1)
        sch.compute_at(b_warp, k1)
        c_staged = sch.cache_write(outer, 0, "shared.dyn")
        sch.storage_align(c_staged, 0, axis=-2, factor=32, offset=4)
        c_warp = sch.cache_write(outer, 0, "warp")
        sch.reverse_compute_at(c_warp, warp)
        sch.reverse_compute_at(c_staged, warp)

        def fragment_loops(block):
            a, b = sch.get_loops(block)[-2:]
            a0, a1 = sch.split(a, factors=[None, 16])
            b0, b1 = sch.split(b, factors=[None, 16])
            sch.reorder(a0, b0, a1, b1)
            return a1

        loop_a = fragment_loops(a_warp)
        loop_b = fragment_loops(b_warp)
        loop_c = fragment_loops(c_warp)

        def ldmatrix_layout(s, i, j):  # fragments [S, I, J] -> per 16x16 tile, (lane, 8 values) as ldmatrix loads them
            return (s, i // 16, j // 16, *shared_16x16_to_ldmatrix_32x8_layout(i % 16, j % 16))

        sch.transform_layout(a_warp, ("write", 0), ldmatrix_layout)
        sch.transform_layout(b_warp, ("write", 0), ldmatrix_layout)
        sch.transform_layout(c_warp, ("read", 0), ldmatrix_layout)

        init = sch.decompose_reduction(outer, k0)
        init_inner = sch.get_child_blocks(init)[0]
        group = get_mma_intrin_group(load_scope="shared.dyn", store_scope="shared.dyn", in_dtype="float16",
                                     out_dtype="float32", trans_a=False, trans_b=True)
        if in_dtype == "bfloat16":  # the same fill and fp32 store; bf16 fragment loads and mma
            register_bf16_intrinsics()
            group = {**group, **BF16_INTRINSICS}
        sch.tensorize(loop_a, group["load_a"])
        sch.tensorize(loop_b, group["load_b"])
        sch.tensorize(sch.get_loops(inner)[-3], group["compute"])
        sch.tensorize(sch.get_loops(init_inner)[-2], group["init"])
        sch.tensorize(loop_c, group["store"])

        # 6. the epilogue rides the store from shared memory to global, 4 elements per thread-step
        auto_inline_consumer_chain(sch, c_staged)
        fused = sch.fuse(*sch.get_loops(c_staged)[-2:])
        _, tx, vec = sch.split(fused, factors=[None, 32, 4])
        sch.bind(tx, "threadIdx.x")
        sch.vectorize(vec)

        # 7. cp.async pipeline over k0: the shared-memory fills run `stages - 1` iterations ahead
        sch.annotate(k0, "software_pipeline_stage", [0, 0, cfg.stages - 1])
        sch.annotate(k0, "software_pipeline_order", [0, 1, 2])
        sch.annotate(k0, "software_pipeline_async_stages", [0])
        return sch

