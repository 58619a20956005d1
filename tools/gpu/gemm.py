"""kiln's linear kernels on their own: build them here, time them on the GPU against torch.matmul.

    python tools/gpu/gemm.py build OUT_DIR [--arch sm_90]     # on the CPU host (needs TVM + nvcc)
    python tools/gpu/gemm.py run OUT_DIR --json FILE           # on the GPU machine (TVM runtime + torch)

``build`` compiles ``D[1, m, N] = (A[1, m, K] @ W[N, K]^T)`` (fp16 in, fp32 accumulate, fp16 out, symbolic m)
with ``kiln.codegen.cuda_matmul.MatmulMMA`` into ``gemm_<arch>.so``. ``run`` loads it with the TVM runtime
alone, checks it against torch (fp32 reference of the same fp16 inputs), and times it and
``torch.matmul`` at m = 4096 (and a few prefill sizes) with CUDA events, reporting TFLOP/s of each and
kiln's fraction of torch's (cuBLAS) speed. The fraction of the device's peak comes from run_all's
measured matmul peak.

The tile configurations of ``MMA_CONFIGS`` are built next to the default one and timed at the large
m, so that one run says which ``MMAConfig`` the compiler should use on this GPU.

kiln's wgmma GEMM for sm_90a (``kiln/codegen/cuda_wgmma.py``, what ``--arch sm_90a`` artifacts launch for
prefill) is built as one cubin per ``WGMMA_VARIANTS`` entry and launched through the CUDA driver API
(ctypes, no TVM): checked against torch and timed at the same m, it says whether it beats the mma.sync
GEMM and which ``WgmmaConfig`` the compiler should use.

The low-batch part (``lowbatch_<arch>.so``) is the decode side: for the Llama-3-8B linear shapes
(``LOW_BATCH_SHAPES``) it builds the MMA GEMM alone, dlight's ``LowBatchGEMV`` at each bucket alone,
and ``kiln`` (what the compiler emits: cuda_gemv.py's dispatch), checks each at every small m and
times them with torch.matmul, reporting the weight's bytes per second. That table is what should set
cuda_gemv.LOW_BATCH.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

N = K = 4096
LOW_BATCH_SHAPES = ((4096, 4096), (28672, 4096), (4096, 14336))  # Llama-3-8B: o_proj, gate_up, down (N, K)
LOW_BATCH_MS = (1, 2, 3, 4, 8, 12, 16, 24, 32)
# MMAConfig fields other than the default's (2x2 warps of 4x4 fragments, block K 32, 3 stages); none spill (ptxas -v)
MMA_CONFIGS = {
    "w2x4": {"warps_n": 4},                                   # 128x256 tile, 8 warps
    "w4x2": {"warps_m": 4},                                   # 256x128 tile, 8 warps
    "k64": {"k_chunks": 4},                                   # block K 64
    "s4": {"stages": 4},                                      # 4-stage cp.async pipeline
    "w2x4k64": {"warps_n": 4, "k_chunks": 4},
    "w4x4f2": {"warps_m": 4, "warps_n": 4, "frags_m": 2},     # 128x256 tile, 16 warps of 2x4 fragments
}
CONFIG_MS = (4096, 2048, 512)
# WgmmaConfig fields per variant: "wait" (the default) drains each k-slice's wgmmas before the next,
# "inflight1" keeps one slice's running while it issues the next (one slice less of copies ahead),
# "n128s6" does that on 128 x 128 tiles with a 6-deep ring (half the accumulators, four slices ahead);
# each is timed in fp16 and, as "<name>-bf16", in bf16
WGMMA_VARIANTS = {"wait": {}, "inflight1": {"mma_in_flight": 1}, "n128s6": {"bn": 128, "stages": 6, "mma_in_flight": 1}}


def linear(n: int, k: int):
    """The linear as kiln's CUDA pipeline sees it: fp16 ``[1, m, k] x [n, k]^T`` -> fp16, fp32 accumulate."""
    from kiln.ir.tvm import te, tirx

    i64 = lambda v: tirx.IntImm("int64", v)  # noqa: E731 — every extent int64 (shared/notes/tensor-cores.md 1.4)
    m = tirx.Var("seq_len", "int64")
    A = te.placeholder((i64(1), m, i64(k)), "float16", name="A")
    W = te.placeholder((i64(n), i64(k)), "float16", name="W")
    r = te.reduce_axis((i64(0), i64(k)), name="k")
    C = te.compute((i64(1), m, i64(n)), lambda b, i, j: te.sum(A[b, i, r].astype("float32") * W[j, r].astype("float32"),
                                                               axis=r), name="C")
    D = te.compute(C.shape, lambda b, i, j: C[b, i, j].astype("float16"), name="D")
    return te.create_prim_func([A, W, D])


def _compile(funcs: dict, arch: str, path: Path) -> Path:
    from kiln.codegen.cuda_matmul import PASS_CONFIG, TIR_PIPELINE
    from kiln.codegen.targets import resolve_target
    from kiln.ir.tvm import tvm

    target = resolve_target("cuda", arch).tvm_target()
    with target, tvm.transform.PassContext(config=PASS_CONFIG):
        mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
        ex = tvm.compile(mod, target=target, tir_pipeline=TIR_PIPELINE)
    path.parent.mkdir(parents=True, exist_ok=True)
    ex.export_library(str(path))
    return path


def build(out: Path, arch: str) -> list[Path]:
    from kiln.codegen.cuda_gemv import LOW_BATCH, specialize
    from kiln.codegen.cuda_matmul import PASS_CONFIG, MatmulMMA, MMAConfig
    from kiln.codegen.targets import resolve_target
    from kiln.ir.tvm import dlight, tvm

    target = resolve_target("cuda", arch).tvm_target()

    def scheduled(rule, func, what):
        with target, tvm.transform.PassContext(config=PASS_CONFIG):
            got = rule(func)
        if got is None:
            raise SystemExit(f"{what} refused the linear")
        return got.with_attr("tirx.is_scheduled", True)

    mma = lambda f, cfg=MMAConfig(): (s.mod["main"] if (s := MatmulMMA(cfg).apply(f, target, False))  # noqa: E731
                                      else None)
    gemms = {"gemm": scheduled(mma, linear(N, K), "MatmulMMA")}
    for name, fields in MMA_CONFIGS.items():
        gemms[f"gemm_{name}"] = scheduled(lambda f, c=MMAConfig(**fields): mma(f, c), linear(N, K), f"MatmulMMA {name}")
    paths = [_compile(gemms, arch, out / f"gemm_{arch}.so")]
    funcs = {}
    for n, k in LOW_BATCH_SHAPES:
        f = linear(n, k)
        funcs[f"mma_{n}x{k}"] = scheduled(mma, f, "MatmulMMA")
        for _, bucket in LOW_BATCH:
            rule = dlight.gpu.LowBatchGEMV(bucket)
            funcs[f"gemv{bucket}_{n}x{k}"] = scheduled(lambda f, r=rule: (s.mod["main"] if (s := r.apply(f, target, False))
                                                                           else None), f, f"LowBatchGEMV({bucket})")
        funcs[f"kiln_{n}x{k}"] = scheduled(lambda f: specialize(f, target, [MatmulMMA()]), f, "cuda_gemv.specialize")
    paths.append(_compile(funcs, arch, out / f"lowbatch_{arch}.so"))
    from kiln.codegen.cuda_wgmma import WgmmaConfig, build_cubin

    for name, fields in WGMMA_VARIANTS.items():
        paths.append(build_cubin(out / f"wgmma_{name}_sm_90a.cubin", WgmmaConfig(**fields)))
    # the run side has no TVM compiler to import cuda_gemv from: it reads the variants from here
    variants = ["mma", *(f"gemv{bucket}" for _, bucket in LOW_BATCH), "kiln"]
    (out / f"lowbatch_{arch}.json").write_text(json.dumps({"low_batch": LOW_BATCH, "variants": variants}))
    return paths


def _timed(f, iters=50) -> float:
    """Seconds per call of ``f`` on the current CUDA stream (CUDA events, after 5 warm-up calls)."""
    import torch

    for _ in range(5):
        f()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        f()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters / 1e3


def _check(d, a, w) -> tuple[float, float, bool]:
    ref = a.float() @ w.float().T
    err = (d.float() - ref).abs().max().item()
    scale = ref.abs().max().item()
    return err, scale, err <= 2e-2 * max(scale, 1)


def run(out: Path, arch: str, json_path: Path | None) -> dict:
    import torch

    from kiln.runtime.tvm_runtime import load_runtime

    ffi = load_runtime("cuda")
    fn = ffi.load_module(str(out / f"gemm_{arch}.so"))["gemm"]
    gen = torch.Generator(device="cuda").manual_seed(0)
    results = {"arch": arch, "device": torch.cuda.get_device_name(), "shapes": [], "configs": [], "lowbatch": []}

    def save():
        if json_path is not None:
            json_path.write_text(json.dumps(results, indent=1))

    for m in (4096, 2048, 512, 128, 17):
        a = torch.randn(1, m, K, device="cuda", dtype=torch.float16, generator=gen) * 0.1
        w = torch.randn(N, K, device="cuda", dtype=torch.float16, generator=gen) * 0.1
        d = torch.empty(1, m, N, device="cuda", dtype=torch.float16)
        args = [ffi.from_dlpack(t) for t in (a, w, d)]
        fn(*args)
        torch.cuda.synchronize()
        err, scale, ok = _check(d, a, w)
        t_kiln = _timed(lambda: fn(*args))
        t_torch = _timed(lambda: torch.matmul(a, w.T))
        flops = 2 * m * N * K
        row = {"m": m, "n": N, "k": K, "max_abs_err": err, "ref_max_abs": scale, "ok": ok,
               "kiln_tflops": flops / t_kiln / 1e12, "torch_tflops": flops / t_torch / 1e12,
               "kiln_over_torch": t_torch / t_kiln}
        results["shapes"].append(row)
        print(json.dumps(row), flush=True)
    save()

    lib = ffi.load_module(str(out / f"gemm_{arch}.so"))
    for m in CONFIG_MS:  # every tile configuration, checked and timed on the same inputs
        a = torch.randn(1, m, K, device="cuda", dtype=torch.float16, generator=gen) * 0.1
        w = torch.randn(N, K, device="cuda", dtype=torch.float16, generator=gen) * 0.1
        row = {"m": m, "n": N, "k": K, "tflops": {}, "ok": {}}
        for name in ["default", *MMA_CONFIGS]:
            f = lib["gemm" if name == "default" else f"gemm_{name}"]
            d = torch.zeros(1, m, N, device="cuda", dtype=torch.float16)
            args = [ffi.from_dlpack(t) for t in (a, w, d)]
            f(*args)
            torch.cuda.synchronize()
            row["ok"][name] = _check(d, a, w)[2]
            row["tflops"][name] = round(2 * m * N * K / _timed(lambda: f(*args)) / 1e12, 1)
        results["configs"].append(row)
        print(json.dumps(row), flush=True)
        save()

    low = out / f"lowbatch_{arch}.so"
    if low.exists():
        _run_lowbatch(ffi, low, results, save, gen)
    # last: a wgmma kernel that faults leaves the CUDA context unusable, and the rest measured already
    _run_wgmma(out, results, save, gen)
    return results


def _run_lowbatch(ffi, low: Path, results: dict, save, gen) -> None:
    import torch

    lib = ffi.load_module(str(low))
    info = json.loads(low.with_suffix(".json").read_text())
    results["low_batch"] = info["low_batch"]
    for n, k in LOW_BATCH_SHAPES:
        # as in a decode step, the weight comes from HBM: successive calls cycle through copies that
        # together exceed the L2 cache (50 MB on an H100, 60 MB on an H200) several times over
        weight_bytes = n * k * 2
        ws = [torch.randn(n, k, device="cuda", dtype=torch.float16, generator=gen) * 0.1
              for _ in range(max(1, -(-(256 << 20) // weight_bytes)))]
        names = info["variants"]
        for m in LOW_BATCH_MS:
            a = torch.randn(1, m, k, device="cuda", dtype=torch.float16, generator=gen) * 0.1
            row = {"m": m, "n": n, "k": k, "weight_copies": len(ws), "us": {}, "weight_GBps": {}, "ok": {}}
            for name in names:
                f = lib[f"{name}_{n}x{k}"]
                d = torch.zeros(1, m, n, device="cuda", dtype=torch.float16)
                calls = itertools.cycle([[ffi.from_dlpack(t) for t in (a, w, d)] for w in ws])
                f(*next(calls))
                torch.cuda.synchronize()
                row["ok"][name] = _check(d, a, ws[0])[2]
                t = _timed(lambda: f(*next(calls)))
                row["us"][name], row["weight_GBps"][name] = round(t * 1e6, 2), round(weight_bytes / t / 1e9, 1)
            mats = itertools.cycle(ws)
            t = _timed(lambda: torch.matmul(a, next(mats).T))
            row["us"]["torch"], row["weight_GBps"]["torch"] = round(t * 1e6, 2), round(weight_bytes / t / 1e9, 1)
            results["lowbatch"].append(row)
            print(json.dumps(row), flush=True)
            save()


def _run_wgmma(out: Path, results: dict, save, gen) -> None:
    import torch

    from kiln.codegen.cuda_wgmma import KERNELS, WgmmaConfig  # (plain Python: no TVM needed)

    wgmma = {}
    for name, fields in WGMMA_VARIANTS.items():
        path, cfg = out / f"wgmma_{name}_sm_90a.cubin", WgmmaConfig(**fields)
        if path.exists():
            for dtype, suffix in (("float16", ""), ("bfloat16", "-bf16")):
                wgmma[name + suffix] = (_driver_kernel(path, KERNELS[(dtype, False)], smem=cfg.smem_bytes), cfg,
                                        getattr(torch, dtype))
    if wgmma:
        results["wgmma"] = []
        for m in CONFIG_MS + (17,):  # every variant on the same inputs
            a = torch.randn(1, m, K, device="cuda", dtype=torch.float16, generator=gen) * 0.1
            w = torch.randn(N, K, device="cuda", dtype=torch.float16, generator=gen) * 0.1
            row = {"m": m, "n": N, "k": K, "ok": {}, "max_abs_err": {}, "tflops": {}}
            for name, (launch, cfg, dt) in wgmma.items():
                at, wt = a.to(dt), w.to(dt)
                d = torch.zeros(1, m, N, device="cuda", dtype=dt)
                grid = (N // cfg.bn, -(-m // cfg.bm))
                call = lambda: launch(grid, cfg.threads, at, wt, d, m, N, K)  # noqa: E731, B023
                call()
                torch.cuda.synchronize()
                err, scale, row["ok"][name] = _check(d, at, wt)
                row["max_abs_err"][name], row["ref_max_abs"] = err, scale
                row["tflops"][name] = round(2 * m * N * K / _timed(call) / 1e12, 1)
            results["wgmma"].append(row)
            print(json.dumps({"wgmma": row}), flush=True)
            save()


def _driver_kernel(cubin: Path, name: str, smem: int):
    """``launch(grid, threads, *args)`` for kernel ``name`` of ``cubin``, through libcuda (ctypes): torch
    tensors pass their device pointer, ints pass as int32. Runs on the current torch stream."""
    import ctypes

    import torch

    torch.cuda.init()
    torch.zeros(1, device="cuda")  # the primary context is current from here on
    cuda = ctypes.CDLL("libcuda.so.1")

    def check(rc, what):
        if rc != 0:
            raise RuntimeError(f"{what} failed with CUresult {rc}")

    module, fn = ctypes.c_void_p(), ctypes.c_void_p()
    data = cubin.read_bytes()
    check(cuda.cuModuleLoadData(ctypes.byref(module), ctypes.c_char_p(data)), "cuModuleLoadData")
    check(cuda.cuModuleGetFunction(ctypes.byref(fn), module, name.encode()), "cuModuleGetFunction")
    check(cuda.cuFuncSetAttribute(fn, 8, ctypes.c_int(smem)), "cuFuncSetAttribute")  # MAX_DYNAMIC_SHARED_SIZE_BYTES

    def launch(grid, threads, *args):
        vals = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else ctypes.c_int(a) for a in args]
        ptrs = (ctypes.c_void_p * len(vals))(*[ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in vals])
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        check(cuda.cuLaunchKernel(fn, grid[0], grid[1], 1, threads, 1, 1, smem, stream, ptrs, None), "cuLaunchKernel")

    launch.module = module  # keep it loaded
    return launch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["build", "run"])
    ap.add_argument("out", type=Path)
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.what == "build":
        print(build(args.out, args.arch))
    else:
        run(args.out, args.arch, args.json)


if __name__ == "__main__":
    sys.exit(main())
