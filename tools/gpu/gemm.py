"""kiln's tensor-core GEMM on its own: build it here, time it on the GPU against torch.matmul.

    python tools/gpu/gemm.py build OUT_DIR [--arch sm_90]     # on the CPU host (needs TVM + nvcc)
    python tools/gpu/gemm.py run OUT_DIR --json FILE           # on the GPU machine (TVM runtime + torch)

``build`` compiles ``D[1, m, N] = (A[1, m, K] @ W[N, K]^T)`` (fp16 in, fp32 accumulate, fp16 out, symbolic m)
with ``kiln.codegen.cuda_matmul.MatmulMMA`` into ``gemm_<arch>.so``. ``run`` loads it with the TVM runtime
alone, checks it against torch (fp32 reference of the same fp16 inputs), and times it and
``torch.matmul`` at m = 4096 (and a few prefill sizes) with CUDA events, reporting TFLOP/s of each and
kiln's fraction of torch's (cuBLAS) speed. The fraction of the device's peak comes from run_all's
measured matmul peak.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

N = K = 4096


def build(out: Path, arch: str) -> Path:
    from kiln.codegen.cuda_matmul import PASS_CONFIG, TIR_PIPELINE, MatmulMMA
    from kiln.codegen.targets import resolve_target
    from kiln.ir.tvm import te, tirx, tvm

    i64 = lambda v: tirx.IntImm("int64", v)  # noqa: E731 — every extent int64 (shared/notes/tensor-cores.md 1.4)
    m = tirx.Var("seq_len", "int64")
    A = te.placeholder((i64(1), m, i64(K)), "float16", name="A")
    W = te.placeholder((i64(N), i64(K)), "float16", name="W")
    k = te.reduce_axis((i64(0), i64(K)), name="k")
    C = te.compute((i64(1), m, i64(N)), lambda b, i, j: te.sum(A[b, i, k].astype("float32") * W[j, k].astype("float32"),
                                                               axis=k), name="C")
    D = te.compute(C.shape, lambda b, i, j: C[b, i, j].astype("float16"), name="D")
    mod = tvm.IRModule({"gemm": te.create_prim_func([A, W, D]).with_attr("global_symbol", "gemm")})
    target = resolve_target("cuda", arch).tvm_target()
    with target, tvm.transform.PassContext(config=PASS_CONFIG):
        sch = MatmulMMA().apply(mod["gemm"], target, False)
        if sch is None:
            raise SystemExit("MatmulMMA refused the GEMM")
        ex = tvm.compile(sch.mod, target=target, tir_pipeline=TIR_PIPELINE)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gemm_{arch}.so"
    ex.export_library(str(path))
    return path


def run(out: Path, arch: str, json_path: Path | None) -> dict:
    import torch

    from kiln.runtime.tvm_runtime import load_runtime

    ffi = load_runtime("cuda")
    fn = ffi.load_module(str(out / f"gemm_{arch}.so"))["gemm"]
    gen = torch.Generator(device="cuda").manual_seed(0)
    results = {"arch": arch, "device": torch.cuda.get_device_name(), "shapes": []}
    for m in (4096, 2048, 512, 128, 17):
        a = torch.randn(1, m, K, device="cuda", dtype=torch.float16, generator=gen) * 0.1
        w = torch.randn(N, K, device="cuda", dtype=torch.float16, generator=gen) * 0.1
        d = torch.empty(1, m, N, device="cuda", dtype=torch.float16)
        args = [ffi.from_dlpack(t) for t in (a, w, d)]
        fn(*args)
        torch.cuda.synchronize()
        ref = (a.float() @ w.float().T)
        err = (d.float() - ref).abs().max().item()
        scale = ref.abs().max().item()

        def timed(f, iters=50):
            for _ in range(5):
                f()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                f()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / iters / 1e3  # seconds

        t_kiln = timed(lambda: fn(*args))
        t_torch = timed(lambda: torch.matmul(a, w.T))
        flops = 2 * m * N * K
        row = {"m": m, "n": N, "k": K, "max_abs_err": err, "ref_max_abs": scale, "ok": err <= 2e-2 * max(scale, 1),
               "kiln_tflops": flops / t_kiln / 1e12, "torch_tflops": flops / t_torch / 1e12,
               "kiln_over_torch": t_torch / t_kiln}
        results["shapes"].append(row)
        print(json.dumps(row), flush=True)
    if json_path is not None:
        json_path.write_text(json.dumps(results, indent=1))
    return results


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
