"""One float linear ``y = x @ W^T`` (as kiln's CPU pipeline legalizes and schedules it) timed per row count.

    python tools/bench_cpu_linear.py [--shape 9728x896 896x4864 1152x896] [--rows 1 8 512] [--arch native]
                                     [--schedules kiln gemv rows panel] [--cpu-time]
    python tools/bench_cpu_linear.py --quant w4a8 rtn-w4g128 [--shape ...] [--rows ...]

Each shape ``NxK`` (W is [N, K], the model's [out, in]) is compiled once per schedule of
kiln/codegen/cpu_schedule.py with a symbolic row count, the way a model's linears are: ``kiln`` is what a
model gets (the branch on the row count), ``gemv`` / ``rows`` / ``panel`` each branch alone for every row
count. Each is then called with each ``--rows`` count, the schedules taking turns; prints the median time,
GFLOP/s and weight bytes read per second, one JSON line per (shape, rows, schedule). The shapes default to
the Qwen2.5-0.5B decoder's gate/up, down and fused q/k/v projections. ``TVM_NUM_THREADS`` sets the threads;
``--cpu-time`` times the calling thread's CPU time (with ``TVM_NUM_THREADS=1``: steadier on a busy machine).
``--quant SCHEME ...`` times the fused quantized linears of those schemes instead, taking turns
(kiln/passes/quantize_linears.py's emitter on the scheme's packing of random weights, built by kiln's CPU pipeline:
schedule ``kiln`` only), reporting the packed weight bytes read per second.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


def linear_func(n: int, k: int):
    """The legalized PrimFunc of ``x @ W^T`` over a symbolic row count (W: [n, k], float32)."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from kiln.ir.tvm import Target, relax, tirx, tvm

    m = tirx.Var("m", "int64")
    x = relax.Var("x", relax.TensorType((m, k), "float32"))
    w = relax.Var("w", relax.TensorType((n, k), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, w]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.matmul(x, relax.op.permute_dims(w))))
        bb.emit_func_output(out)
    target = Target({"kind": "llvm"})
    with target:
        mod = tvm.transform.Sequential([relax.transform.FuseTransposeMatmul()] + cpu.legalize_passes(target))(bb.get())
    return next(f for _, f in mod.functions_items() if isinstance(f, tirx.PrimFunc))


def build(func, arch: str | None, schedule: str = "kiln"):
    from kiln.codegen import cpu_schedule as cs
    from kiln.codegen.targets import resolve_target
    from kiln.ir.tvm import tvm

    target = resolve_target("cpu", arch).tvm_target()
    rule = {"kiln": cs.schedule_func, "gemv": cs._schedule, "rows": cs._schedule_rows, "panel": cs._schedule_panel}
    with target:
        scheduled = rule[schedule](func, cs.vector_lanes(target))
    assert scheduled is not None, f"kiln's CPU schedule {schedule!r} declined the linear"
    return tvm.compile(tvm.IRModule({"main": scheduled.with_attr("global_symbol", "main")}), target=target)


def quant_linear(n: int, k: int, scheme: str, rng):
    """(the fused quantized linear ``x @ W^T`` as a Relax module, its packed weight tensors, packed bytes) for
    a random [n, k] weight quantized with ``scheme``."""
    import torch

    from kiln.ir.tvm import relax, tirx
    from kiln.passes.lib.quantized_linear import emit_quantized_linear, mark_opaque
    from kiln.quant.schemes import get_scheme, quantize_linear

    sch = get_scheme(scheme)
    w = torch.from_numpy(0.05 * rng.standard_normal((n, k)).astype("float32"))
    parts = {name: t.numpy() for name, t in quantize_linear(w, sch, torch.float32).items()}
    m = tirx.Var("m", "int64")
    x = relax.Var("x", relax.TensorType((m, k), "float32"))
    p = {name: relax.Var(name, relax.TensorType(a.shape, str(a.dtype))) for name, a in parts.items()}
    bb = relax.BlockBuilder()
    with bb.function("main", [x, *p.values()]):
        with bb.dataflow():
            y = emit_quantized_linear(bb, sch.kind, x, p, sch.group_size, "float32", {}, "y")
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return mark_opaque(bb.get()), parts, sum(a.nbytes for a in parts.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", nargs="+", default=["9728x896", "896x4864", "1152x896"])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 512])
    ap.add_argument("--arch", default=None, help="kiln's --arch for the CPU (default: native)")
    ap.add_argument("--schedules", nargs="+", default=["kiln"], choices=["kiln", "gemv", "rows", "panel"])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--cpu-time", action="store_true", help="the calling thread's CPU time instead of wall time")
    ap.add_argument("--quant", nargs="+", default=None,
                    help="time these schemes' fused quantized linears (rtn-w4g128, w4a8, ...), taking turns")
    args = ap.parse_args()
    if args.quant:
        return bench_quant(args)

    from kiln.ir.tvm import tvm

    clock = time.thread_time if args.cpu_time else time.perf_counter
    dev = tvm.cpu()
    rng = np.random.default_rng(0)
    for shape in args.shape:
        n, k = (int(v) for v in shape.split("x"))
        func = linear_func(n, k)
        libs = {name: build(func, args.arch, name) for name in args.schedules}
        w = tvm.runtime.tensor(rng.standard_normal((n, k)).astype("float32"), dev)
        for m in args.rows:
            xs = rng.standard_normal((m, k)).astype("float32")
            x = tvm.runtime.tensor(xs, dev)
            y = tvm.runtime.tensor(np.zeros((m, n), "float32"), dev)
            errs, times = {}, {name: [] for name in libs}
            for name, lib in libs.items():
                lib["main"](x, w, y)
                errs[name] = float(np.abs(y.numpy() - xs @ w.numpy().T).max())
            for _ in range(args.repeats):
                for name, lib in libs.items():
                    t = clock()
                    lib["main"](x, w, y)
                    times[name].append(clock() - t)
            for name in libs:
                sec = statistics.median(times[name])
                print(json.dumps({"shape": shape, "rows": m, "schedule": name, "ms": round(sec * 1e3, 3),
                                  "gflops": round(2 * m * n * k / sec / 1e9, 1),
                                  "weight_gbs": round(4 * n * k / sec / 1e9, 1), "max_abs_err": errs[name]}),
                      flush=True)


def bench_quant(args) -> None:
    from kiln.codegen.build import build as kiln_build
    from kiln.codegen.targets import resolve_target
    from kiln.ir.tvm import relax, tvm

    clock = time.thread_time if args.cpu_time else time.perf_counter
    dev = tvm.cpu()
    rng = np.random.default_rng(0)
    for shape in args.shape:
        n, k = (int(v) for v in shape.split("x"))
        built = {}  # scheme -> (vm, weight tensors, packed bytes)
        for scheme in args.quant:
            mod, parts, packed_bytes = quant_linear(n, k, scheme, rng)
            built[scheme] = (relax.VirtualMachine(kiln_build(mod, resolve_target("cpu", args.arch)), dev),
                             [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in parts.values()], packed_bytes)
        for m in args.rows:
            x = tvm.runtime.tensor(rng.standard_normal((m, k)).astype("float32"), dev)
            times = {scheme: [] for scheme in built}
            for vm, weights, _ in built.values():
                vm["main"](x, *weights)
            for _ in range(args.repeats):  # the schemes take turns, so a noisy moment hits them alike
                for scheme, (vm, weights, _) in built.items():
                    t = clock()
                    vm["main"](x, *weights)
                    times[scheme].append(clock() - t)
            for scheme, (_, _, packed_bytes) in built.items():
                sec = statistics.median(times[scheme])
                print(json.dumps({"shape": shape, "rows": m, "quant": scheme, "ms": round(sec * 1e3, 3),
                                  "gflops": round(2 * m * n * k / sec / 1e9, 1),
                                  "packed_gbs": round(packed_bytes / sec / 1e9, 2)}), flush=True)

if __name__ == "__main__":
    main()
