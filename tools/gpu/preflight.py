"""The first part of a GPU run: can this machine run the bundle at all? (tools/gpu/run_all.sh stops on failure.)

    python tools/gpu/preflight.py BUNDLE --device cuda --out preflight.json

Checks, in order, each timed: this Python can load the bundle's ``tvm_ffi`` (its compiled core is built for one
CPython version); ``tvm_ffi`` is imported from the bundle, not from elsewhere; TVM's runtime loads for the
device; the demo artifact loads and one prefill of its prompt gives finite logits. The first failure prints a
one-screen diagnosis — the failed check and its error, the interpreter, the paths and libraries in play, what
torch sees — and exits 1, so the run loses seconds, not its window, to a broken bundle.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path


def check_python(bundle: Path, device: str) -> str:
    tag = f"cpython-{sys.version_info.major}{sys.version_info.minor}"
    cores = sorted(p.name for p in (bundle / "py" / "tvm_ffi").glob("core.*.so"))
    if not cores:
        raise RuntimeError(f"the bundle has no py/tvm_ffi/core.*.so (was it built by tools/gpu/build_bundle.sh?)")
    if not any(tag in c for c in cores):
        raise RuntimeError(f"the bundle's tvm_ffi is built for {', '.join(cores)}; this is Python "
                           f"{sys.version.split()[0]} ({tag})")
    return f"Python {sys.version.split()[0]}"


def check_tvm_ffi(bundle: Path, device: str) -> str:
    import tvm_ffi

    where = Path(tvm_ffi.__file__).resolve()
    if (bundle / "py").resolve() not in where.parents:
        raise RuntimeError(f"tvm_ffi came from {where}, not from the bundle's py/ (PYTHONPATH order?)")
    return str(where.parent)


def check_runtime(bundle: Path, device: str) -> str:
    from kiln.runtime.tvm_runtime import load_runtime

    load_runtime(device)
    return f"TVM runtime loaded for {device}"


def check_forward(bundle: Path, device: str) -> str:
    import numpy as np

    from kiln.artifact import load_artifact
    from kiln.runtime.model_runner import ModelRunner

    art = load_artifact(bundle / "artifacts" / "demo")
    runner = ModelRunner(art, device=device)
    runner.kv.add_sequence(0)
    logits = runner.forward([0], [[1, 2, 3, 4]])
    runner.kv.remove_sequence(0)
    if not np.isfinite(logits).all():
        raise RuntimeError("the demo's logits are not finite")
    return f"demo prefill of 4 tokens on {runner.device}: logits {tuple(logits.shape)}"


CHECKS = {"python": check_python, "tvm_ffi": check_tvm_ffi, "runtime": check_runtime, "forward": check_forward}


def diagnosis(name: str, error: str) -> str:
    lines = [f"PREFLIGHT FAILED at {name!r}: the rest of the run is skipped.", "", error.rstrip()[-1500:], "",
             f"python      {sys.executable} {sys.version.split()[0]}",
             f"PYTHONPATH  {os.environ.get('PYTHONPATH', '')}",
             f"TVM libs    KILN_TVM_LIB_DIR={os.environ.get('KILN_TVM_LIB_DIR', '')}",
             f"LD_LIBRARY_PATH={os.environ.get('LD_LIBRARY_PATH', '')}"]
    try:
        import torch

        lines.append(f"torch       {torch.__version__}, cuda available: {torch.cuda.is_available()}, "
                     f"built for CUDA {torch.version.cuda}")
    except Exception as e:  # (the diagnosis must not fail itself)
        lines.append(f"torch       does not import: {e}")
    try:
        gpus = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=5).stdout.strip()
        lines.append(f"nvidia-smi  {gpus or '(no GPU listed)'}")
    except (OSError, subprocess.TimeoutExpired) as e:
        lines.append(f"nvidia-smi  unavailable: {e}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    result: dict = {"device": args.device, "checks": {}}
    for name, check in CHECKS.items():
        t = time.perf_counter()
        try:
            what = check(args.bundle, args.device)
        except Exception:
            result["error"] = traceback.format_exc()
            result["failed"] = name
            args.out.write_text(json.dumps(result, indent=2) + "\n")
            print(diagnosis(name, result["error"]), flush=True)
            sys.exit(1)
        result["checks"][name] = {"ok": what, "seconds": round(time.perf_counter() - t, 2)}
        print(f"{name}: {what} ({result['checks'][name]['seconds']}s)", flush=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
