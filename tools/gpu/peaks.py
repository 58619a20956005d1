"""The two ceilings of the device, measured: device-to-device copy bandwidth and dense matmul rate.

    python tools/gpu/peaks.py [--device cuda|cpu] [--small] --out peaks.json

- copy: ``dst.copy_(src)`` of a 4 GiB buffer (16 MiB with --small), GB/s counting the bytes read plus
  the bytes written (the convention of shared/notes/gpu.md: about 3000 GB/s on an H100, 4300 GB/s on an H200).
- matmul: ``torch.matmul`` of random 8192 x 8192 matrices (512 with --small) in bf16 and fp16,
  TFLOP/s = 2 n^3 / time.

Each: 3 untimed warm-ups, then the median of 10 timed runs (device events on CUDA). Random data,
never zeros. Each measurement is guarded: one that fails is logged in the JSON under "errors" and
the others still run. The JSON is rewritten after each measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch


def timed(fn, device: str, warmup: int = 3, repeats: int = 10) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def _sig(x: float) -> float:
    return float(f"{x:.4g}")  # four significant digits: readable, and a CPU's small rates do not round to 0


def copy_bandwidth(device: str, nbytes: int) -> dict:
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    sec = timed(lambda: dst.copy_(src), device)
    assert torch.equal(dst[:4096], src[:4096]) and torch.equal(dst[-4096:], src[-4096:])
    return {"bytes_per_copy": nbytes, "seconds": sec, "GBps_read_plus_write": _sig(2 * nbytes / sec / 1e9)}


def matmul_rate(device: str, n: int, dtype: torch.dtype) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=g).to(dtype)
    b = torch.randn(n, n, device=device, generator=g).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    sec = timed(lambda: torch.matmul(a, b, out=out), device)
    return {"n": n, "seconds": sec, "TFLOPs": _sig(2 * n ** 3 / sec / 1e12)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny sizes (a smoke test on the CPU)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    result: dict = {"device": args.device, "torch": torch.__version__, "errors": {}}
    if args.device == "cuda":
        result["device_name"] = torch.cuda.get_device_name(0)
    nbytes = (16 << 20) if args.small else (4 << 30)
    n = 512 if args.small else 8192
    parts = {"copy": lambda: copy_bandwidth(args.device, nbytes)}
    for dt in (torch.bfloat16, torch.float16):
        parts[f"matmul_{str(dt)[6:]}"] = lambda dt=dt: matmul_rate(args.device, n, dt)
    for name, fn in parts.items():
        try:
            result[name] = fn()
            print(f"{name}: {result[name]}", flush=True)
        except Exception:
            result["errors"][name] = traceback.format_exc(limit=3)
            print(f"{name} failed:\n{result['errors'][name]}", flush=True)
        if args.device == "cuda":
            torch.cuda.empty_cache()
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if result["errors"]:  # the rest is kept in the JSON, but the part failed: run_all.sh records its exit
        sys.exit(1)


if __name__ == "__main__":
    main()
