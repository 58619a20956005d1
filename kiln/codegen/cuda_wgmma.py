"""A Hopper (sm_90a) GEMM on ``wgmma``: the candidate to replace mma.sync for prefill on H100/H200.

TVM 0.27's schedules reach tensor cores only through ``mma.sync`` (cuda_matmul.py), which cannot use
Hopper's warpgroup MMA. This module writes kiln's own CUDA kernel for the prefill-shaped linear

    D[m, N] = A[m, K] @ W[N, K]^T        fp16 or bf16 in, fp32 accumulate, out in the input's type,
                                         m any, N % BN == K % BK == 0

(and ``D = T(A @ W^T) + R``, the residual epilogue TVM fuses into o_proj and down_proj) and compiles
it with nvcc to a cubin holding the four kernels of ``KERNELS`` (each dtype, with and without R). In
the compiler it serves the targets whose ``CudaArch`` says ``wgmma`` (``--arch sm_90a``; sm_90 stays
on mma.sync): ``WgmmaLinear`` turns a fused linear that
``match_linear`` recognises into a host function launching the kernel (the large-count branch of
cuda_gemv.py's dispatch), and ``attach_kernels`` puts the cubin in the IRModule's ``external_mods``,
so it travels inside model.so. It has not run on a GPU yet: ``tools/gpu/gemm.py`` checks it against
torch and times it next to the mma.sync GEMM, ``tools/gpu/same_logits.py`` compares an sm_90a
artifact's logits with the sm_90 one's; until those pass, sm_90 is the default arch.

The kernel. A block of two warpgroups (256 threads) computes a BM x BN = 128 x 256 tile; warpgroup
``g`` owns rows ``64 g .. 64 g + 63`` and issues ``wgmma.mma_async.m64n256k16`` with both operands in
shared memory. Every thread fills shared memory with 16-byte ``cp.async`` copies (rows past ``m``
zero-filled) in a ``STAGES``-deep ring of BK = 64 slices. Each operand tile is K-major with the 128-byte
swizzle the wgmma descriptors name: row ``r`` of a tile is 128 bytes (64 halves) at ``r * 128``, its
16-byte chunk ``c`` stored at chunk ``c ^ (r % 8)``; tiles are 1024-byte aligned; a descriptor holds
the start address >> 4, the stride between 8-row groups (1024 bytes) and swizzle mode 1 (128B), and the
four k16 steps of a slice advance its start by 32 bytes. Per slice: wait for its copies,
``fence.proxy.async`` (cp.async writes are generic-proxy, wgmma reads async-proxy), barrier, start the
copy of the slice ``STAGES - 1 - MMA_IN_FLIGHT`` ahead into the ring slot whose wgmmas are known
complete, then four wgmmas, commit, and wait until at most ``MMA_IN_FLIGHT`` groups still run (0: the
slice's own; 1: the tensor cores start slice kt + 1 without draining slice kt, for one slice less of
copies in flight; gemm.py times both). The accumulator fragment of thread ``t`` (warp ``w``, lane ``l``) holds, for register
``i``, row ``16 w + l / 4 + 8 ((i / 2) % 2)`` and column ``8 (i / 4) + 2 (l % 4) + i % 2``; the epilogue
stores them as half2 pairs, guarded by ``row < m``.

Invariant: for every m >= 0, D equals the fp32-accumulated product rounded to D's type (plus R), rows >= m
untouched (checked on the GPU by gemm.py against torch; here the SASS and the host launch are checked);
``match_linear`` accepts only functions that compute exactly that.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

KERNEL = "kiln_wgmma_gemm_f16"
KERNEL_ADD = "kiln_wgmma_gemm_f16_add"  # D = fp16(A @ W^T) + R, the residual epilogue TVM fuses into o/down
# TVM dtype -> (PTX type, C type, its float pair maker)
DTYPES = {"float16": ("f16", "half", "__floats2half2_rn"),
          "bfloat16": ("bf16", "__nv_bfloat16", "__floats2bfloat162_rn")}
KERNELS = {(dtype, residual): f"kiln_wgmma_gemm_{ptx}{'_add' if residual else ''}"
           for dtype, (ptx, _, _) in DTYPES.items() for residual in (False, True)}
assert KERNELS[("float16", False)] == KERNEL and KERNELS[("float16", True)] == KERNEL_ADD


@dataclass(frozen=True)
class WgmmaConfig:
    bn: int = 256  # the tile's N; one wgmma m64nBNk16 per warpgroup and k16 step (8 <= BN <= 256, BN % 8 == 0)
    stages: int = 4  # cp.async ring depth
    mma_in_flight: int = 0  # wgmma groups left running while the next slice's are issued (0: wait for each)

    bm = 128  # two warpgroups of 64 rows
    bk = 64  # one 128-byte swizzle row of halves
    threads = 256

    @property
    def smem_bytes(self) -> int:
        return self.stages * (self.bm + self.bn) * self.bk * 2 + 1024  # + room to align the ring to 1024


def source(cfg: WgmmaConfig = WgmmaConfig()) -> str:
    """The kernel's CUDA source for ``cfg``."""
    bm, bn, bk, stages, threads = cfg.bm, cfg.bn, cfg.bk, cfg.stages, cfg.threads
    if bn % 8 or not 8 <= bn <= 256:
        raise ValueError(f"wgmma's N must be a multiple of 8 in [8, 256], got {bn}")
    inflight = cfg.mma_in_flight
    if not 0 <= inflight <= stages - 2:
        raise ValueError(f"mma_in_flight must be in [0, stages - 2] = [0, {stages - 2}], got {inflight}")
    ahead = stages - 1 - inflight  # slices whose copies run ahead of the one being multiplied
    regs = bn // 2  # fp32 accumulators per thread for m64nBNk16
    outs = ", ".join(f"%{i}" for i in range(regs))
    bind = ", ".join(f'"+f"(d[{i}])' for i in range(regs))
    a_chunks, b_chunks = bm * bk // 8, bn * bk // 8  # 16-byte chunks per slice
    assert a_chunks % threads == 0 and b_chunks % threads == 0
    traits = "".join(f"""template <> struct kiln_type<{c}> {{
  using pair = {c}2;
  static __device__ __forceinline__ pair make(float a, float b) {{ return {make}(a, b); }}
  static __device__ __forceinline__ void wgmma(float* d, uint64_t da, uint64_t db) {{
    asm volatile(
      "{{\\n.reg .pred p;\\nsetp.ne.b32 p, 1, 0;\\n"
      "wgmma.mma_async.sync.aligned.m64n{bn}k16.f32.{ptx}.{ptx} {{{outs}}}, %{regs}, %{regs + 1}, p, 1, 1, 0, 0;\\n}}\\n"
      : {bind}
      : "l"(da), "l"(db));
  }}
}};
""" for ptx, c, make in DTYPES.values())
    return f"""// generated by kiln/codegen/cuda_wgmma.py: BM={bm} BN={bn} BK={bk} STAGES={stages} MMA_IN_FLIGHT={inflight}
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ uint64_t kiln_desc(uint32_t smem_addr) {{
  uint64_t d = 0;
  d |= (uint64_t)((smem_addr & 0x3FFFF) >> 4);        // start address
  d |= (uint64_t)(16 >> 4) << 16;                      // leading byte offset (unused: swizzled K-major)
  d |= (uint64_t)(1024 >> 4) << 32;                    // stride byte offset: 8 rows of 128 bytes
  d |= (uint64_t)1 << 62;                              // 128-byte swizzle
  return d;
}}

__device__ __forceinline__ void kiln_cp_async16(uint32_t dst, const void* src, int src_bytes) {{
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\\n" :: "r"(dst), "l"(src), "r"(src_bytes));
}}

// per element type: the wgmma instruction, and the pair the epilogue stores
template <typename T> struct kiln_type;
{traits}
// tile row r (128 bytes), 16-byte chunk c -> byte offset in the swizzled tile
__device__ __forceinline__ uint32_t kiln_swz(int r, int c) {{ return r * 128 + ((c ^ (r & 7)) << 4); }}

template <typename T, bool kResidual>
__device__ __forceinline__ void kiln_wgmma_gemm(const T* __restrict__ A, const T* __restrict__ W,
                                                const T* __restrict__ R, T* __restrict__ D, int M, int N, int K) {{
  using P = typename kiln_type<T>::pair;
  extern __shared__ __align__(1024) unsigned char kiln_smem[];
  uint32_t base = (uint32_t)__cvta_generic_to_shared(kiln_smem);
  base = (base + 1023) & ~1023u;
  const uint32_t a_bytes = {bm * bk * 2}, b_bytes = {bn * bk * 2}, stage_bytes = a_bytes + b_bytes;
  const int tid = threadIdx.x, wg = tid / 128, warp = (tid % 128) / 32, lane = tid % 32;
  const int m0 = blockIdx.y * {bm}, n0 = blockIdx.x * {bn};
  const int kt_count = K / {bk};

  auto load = [&](int kt) {{
    if (kt < kt_count) {{
      const uint32_t sa = base + (kt % {stages}) * stage_bytes, sb = sa + a_bytes;
      const int k0 = kt * {bk};
      #pragma unroll
      for (int i = 0; i < {a_chunks // threads}; ++i) {{
        const int c = tid + i * {threads}, r = c / 8, ch = c % 8;
        const bool in = m0 + r < M;
        kiln_cp_async16(sa + kiln_swz(r, ch), A + (size_t)(in ? m0 + r : 0) * K + k0 + ch * 8, in ? 16 : 0);
      }}
      #pragma unroll
      for (int i = 0; i < {b_chunks // threads}; ++i) {{
        const int c = tid + i * {threads}, r = c / 8, ch = c % 8;
        kiln_cp_async16(sb + kiln_swz(r, ch), W + (size_t)(n0 + r) * K + k0 + ch * 8, 16);
      }}
    }}
    asm volatile("cp.async.commit_group;\\n" ::);  // (an empty group past the end keeps the count uniform)
  }};

  float d[{regs}];
  #pragma unroll
  for (int i = 0; i < {regs}; ++i) d[i] = 0.f;

  #pragma unroll
  for (int s = 0; s < {ahead}; ++s) load(s);

  for (int kt = 0; kt < kt_count; ++kt) {{
    asm volatile("cp.async.wait_group {ahead - 1};\\n" ::);
    asm volatile("fence.proxy.async.shared::cta;\\n" ::: "memory");
    __syncthreads();  // slice kt is in shared memory, and every wgmma of slice kt - {1 + inflight} has completed
    load(kt + {ahead});  // into that slice's ring slot
    const uint32_t sa = base + (kt % {stages}) * stage_bytes + wg * (64 * 128), sb = base + (kt % {stages}) * stage_bytes + a_bytes;
    asm volatile("wgmma.fence.sync.aligned;\\n" ::: "memory");
    #pragma unroll
    for (int kk = 0; kk < {bk // 16}; ++kk) kiln_type<T>::wgmma(d, kiln_desc(sa + kk * 32), kiln_desc(sb + kk * 32));
    asm volatile("wgmma.commit_group.sync.aligned;\\n" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned {inflight};\\n" ::: "memory");
  }}
  asm volatile("wgmma.wait_group.sync.aligned 0;\\n" ::: "memory");

  #pragma unroll
  for (int i = 0; i < {regs}; i += 2) {{
    const int row = m0 + wg * 64 + warp * 16 + lane / 4 + 8 * ((i / 2) % 2);
    const int col = n0 + 8 * (i / 4) + 2 * (lane % 4);
    if (row < M) {{
      P v = kiln_type<T>::make(d[i], d[i + 1]);  // the result in T, then (as the fused epilogue does) + R
      if (kResidual) v = __hadd2(v, *reinterpret_cast<const P*>(R + (size_t)row * N + col));
      *reinterpret_cast<P*>(D + (size_t)row * N + col) = v;
    }}
  }}
}}

""" + "".join(f"""
extern "C" __global__ void __launch_bounds__({threads}, 1)
{KERNELS[(dtype, False)]}(const {c}* __restrict__ A, const {c}* __restrict__ W, {c}* __restrict__ D,
    int M, int N, int K) {{
  kiln_wgmma_gemm<{c}, false>(A, W, nullptr, D, M, N, K);
}}

extern "C" __global__ void __launch_bounds__({threads}, 1)
{KERNELS[(dtype, True)]}(const {c}* __restrict__ A, const {c}* __restrict__ W, const {c}* __restrict__ R,
    {c}* __restrict__ D, int M, int N, int K) {{
  kiln_wgmma_gemm<{c}, true>(A, W, R, D, M, N, K);
}}
""" for dtype, (_, c, _) in DTYPES.items())


def build_cubin(out: Path, cfg: WgmmaConfig = WgmmaConfig(), arch: str = "sm_90a", nvcc: str = "nvcc") -> Path:
    """nvcc ``source(cfg)`` into ``out`` (a cubin for ``arch``); the .cu is kept next to it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cu = out.with_suffix(".cu")
    cu.write_text(source(cfg))
    proc = subprocess.run([nvcc, "-cubin", f"-arch={arch}", "-O3", "-std=c++17", "-o", str(out), str(cu)],
                          capture_output=True, text=True)
    if proc.returncode != 0:  # e.g. a CUDA toolkit older than 12.0, which has no sm_90a
        from ..errors import TargetError

        raise TargetError(f"nvcc could not build kiln's wgmma kernel for {arch} (it needs CUDA 12.0 or newer; "
                          f"--arch sm_90 avoids it): {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}")
    return out


# ------------------------------------------------------------------------------------- in the compiler

ARG_TYPES = {name: ["handle"] * (4 if residual else 3) + ["int32"] * 3 for (_, residual), name in KERNELS.items()}
LAUNCH_TAGS = ["blockIdx.x", "blockIdx.y", "threadIdx.x", "tirx.use_dyn_shared_memory"]
KERNEL_ATTR = "kiln.external_kernel"  # on a PrimFunc that launches one of them (cuda_gemv.specialize keeps it)


@dataclass(frozen=True)
class Linear:
    """What ``match_linear`` read off a PrimFunc: its parameters in the kernel's roles, the row count."""

    a: object
    w: object
    r: object | None  # the residual added after the cast, or None
    d: object
    rows: object  # the symbolic row count (A's second-to-last dimension)
    n: int
    k: int
    dtype: str = "float16"  # of A, W, R and D: a key of DTYPES

    @property
    def kernel(self) -> str:
        return KERNELS[(self.dtype, self.r is not None)]


def match_linear(func, cfg: WgmmaConfig = WgmmaConfig()) -> Linear | None:
    """``func`` as ``D = T(A @ W^T)`` or ``D = T(A @ W^T) + R`` (A, W, R, D all of one type T of ``DTYPES``;
    fp32 accumulation; A ``[..., rows, K]`` with leading 1s, W ``[N, K]``, symbolic rows,
    N % BN == K % BK == 0), else None."""
    from tvm import s_tir
    from tvm.s_tir.dlight.analysis import get_root_block

    from ..ir.tvm import TensorLoad, tirx

    params = list(func.params)
    if len(params) not in (3, 4) or any(not hasattr(p, "shape") for p in params):
        return None
    try:
        sch = s_tir.Schedule(func)
        blocks = [sch.get(b) for b in sch.get_child_blocks(get_root_block(sch))]
    except Exception:  # noqa: BLE001 — not a schedulable function: not ours
        return None
    if len(blocks) != len(params) - 1:
        return None

    def load(e, dtype=None):
        return e if isinstance(e, TensorLoad) and (dtype is None or str(e.source.dtype) == dtype) else None

    def same(a, b):
        return len(a) == len(b) and all(x.same_as(y) for x, y in zip(a, b))

    # the reduction: C[.., i, j] += f32(A[.., i, k]) * f32(W[j, k])
    red = blocks[0]
    ivs = [iv.var for iv in red.iter_vars]
    kinds = [int(iv.iter_type) for iv in red.iter_vars]
    if red.init is None or len(ivs) < 3 or kinds[-3:] != [0, 0, 2] or any(kinds[:-3]):
        return None
    i, j, k = ivs[-3:]
    st, v = red.body, red.body.value
    if not (isinstance(v, tirx.Add) and load(v.a) is not None and load(v.a).source.same_as(st.buffer)
            and isinstance(v.b, tirx.Mul) and all(isinstance(x, tirx.Cast) and str(x.ty) == "float32"
                                                  for x in (v.b.a, v.b.b))):
        return None
    a, w = params[0], params[1]
    dtype = str(a.dtype)
    if dtype not in DTYPES:
        return None
    la, lw = load(v.b.a.value, dtype), load(v.b.b.value, dtype)
    if la is None or lw is None or not la.source.same_as(a) or not lw.source.same_as(w) \
            or not same(lw.indices, [j, k]) or not same(la.indices[-2:], [i, k]) or not same(st.indices[-2:], [i, j]):
        return None
    # the cast to the type of A, then (with four parameters) the residual add into the output
    cast = blocks[1].body
    if not (isinstance(cast.value, tirx.Cast) and str(cast.value.ty) == dtype
            and load(cast.value.value) is not None and load(cast.value.value).source.same_as(st.buffer)):
        return None
    d, r = params[-1], None
    if len(params) == 4:
        add = blocks[2].body
        if not (isinstance(add.value, tirx.Add) and add.buffer.same_as(d)):
            return None
        x, y = load(add.value.a, dtype), load(add.value.b, dtype)
        if x is None or y is None:
            return None
        if x.source.same_as(cast.buffer):
            x, y = y, x
        if not (y.source.same_as(cast.buffer) and x.source.same_as(params[2]) and same(x.indices, add.indices)
                and same(y.indices, add.indices)):
            return None
        r = params[2]
    elif not cast.buffer.same_as(d):
        return None
    shape_a, shape_w, shape_d = list(a.shape), list(w.shape), list(d.shape)
    rows = shape_a[-2]
    if not isinstance(rows, tirx.Var) or any(not isinstance(x, tirx.IntImm) for x in shape_w) \
            or any(not isinstance(x, tirx.IntImm) or int(x) != 1 for x in shape_a[:-2]):
        return None
    n, kk = int(shape_w[0]), int(shape_w[1])
    if not isinstance(shape_a[-1], tirx.IntImm) or int(shape_a[-1]) != kk or n % cfg.bn or kk % cfg.bk \
            or len(shape_d) != len(shape_a) or not shape_d[-2].same_as(rows) or int(shape_d[-1]) != n:
        return None
    if r is not None and [str(x) for x in r.shape] != [str(x) for x in shape_d]:
        return None
    return Linear(a, w, r, d, rows, n, kk, dtype)


def launch_body(lin: Linear, cfg: WgmmaConfig = WgmmaConfig()):
    """The host statement that launches the kernel on ``lin``'s parameters."""
    from ..ir.tvm import tirx

    i32 = lambda e: tirx.Cast("int32", e)  # noqa: E731
    ptrs = [lin.a.data, lin.w.data] + ([lin.r.data] if lin.r is not None else []) + [lin.d.data]
    rows = lin.rows
    grid_y = (rows + (cfg.bm - 1)) // cfg.bm
    call = tirx.call_packed(lin.kernel, *ptrs, i32(rows), i32(lin.n), i32(lin.k),
                            lin.n // cfg.bn, grid_y, cfg.threads, cfg.smem_bytes)
    return tirx.Evaluate(call)


class WgmmaLinear:
    """A rule in the shape of dlight's: ``apply`` returns ``func`` as a launch of the wgmma kernel (a
    scheduled host function), or None. Only for the archs whose targets.CudaArch says ``wgmma``."""

    def __init__(self, cfg: WgmmaConfig = WgmmaConfig()):
        self.cfg = cfg

    def apply(self, func, target, _):
        from ..ir.tvm import tirx

        from .targets import CUDA_ARCHS

        arch = CUDA_ARCHS.get(str(target.attrs.get("arch", "")))
        if not isinstance(func, tirx.PrimFunc) or arch is None or not arch.wgmma:
            return None
        lin = match_linear(func, self.cfg)
        if lin is None:
            return None
        return func.with_body(launch_body(lin, self.cfg)).with_attrs(
            {"tirx.is_scheduled": True, KERNEL_ATTR: lin.kernel})


def kernel_module(cfg: WgmmaConfig = WgmmaConfig()):
    """The runtime CUDA module holding every kernel of ``KERNELS`` as sm_90a machine code, for IRModule
    ``external_mods``."""
    import json
    import tempfile

    import tvm_ffi

    with tempfile.TemporaryDirectory() as tmp:
        cubin = build_cubin(Path(tmp) / "wgmma.cubin", cfg).read_bytes()
    meta = json.dumps({"tvm_version": _tvm_version(), "func_info": {
        name: {"name": "", "arg_types": types, "launch_param_tags": LAUNCH_TAGS} for name, types in ARG_TYPES.items()}})
    fmap = tvm_ffi.get_global_func("runtime.LoadMetaDataFromJSON")(meta)
    return tvm_ffi.get_global_func("ffi.Module.create.cuda")(cubin, "cubin", fmap, {})


def _tvm_version() -> str:
    from ..ir.tvm import tvm

    return tvm.__version__


def attach_kernels(cfg: WgmmaConfig = WgmmaConfig()):
    """Module pass: where a PrimFunc launches the wgmma kernels, the IRModule carries their module."""
    from ..ir.tvm import tvm

    @tvm.transform.module_pass(opt_level=0, name="kiln.AttachWgmmaKernels")
    def transform(mod, _ctx):
        if not any(f.attrs is not None and KERNEL_ATTR in f.attrs for _, f in mod.functions_items()):
            return mod
        mods = list(mod.attrs["external_mods"]) if mod.attrs and "external_mods" in mod.attrs else []
        return mod.with_attr("external_mods", mods + [kernel_module(cfg)])

    return transform
