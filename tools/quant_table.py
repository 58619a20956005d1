"""The quantization table: perplexity, weight bytes and CPU decode speed of every scheme, one run.

    python tools/quant_table.py MODEL_DIR --out DIR [--window 256] [--json FILE]

Calibrates MODEL_DIR on data/calibration.txt (kiln calibrate's defaults), compiles it for the CPU in
fp32 and with every scheme, and for each artifact measures: perplexity on data/heldout.txt (disjoint
from the calibration text; sliding windows of ``--window`` tokens, stride window/2 — kiln eval's
definition), the bytes of the weights (params.safetensors: the quantized linears plus the fp32
embedding, norms and lm_head, which stay unquantized) and of the decoder linears alone, and batch-1
greedy decode tokens/s (a 16-token prompt, then ``--decode-steps`` steps, median of 3 runs, each scheme
measured in the same process one after another). Prints a Markdown table and, with ``--json``, the numbers.
AWQ's gap to fp32 as a fraction of RTN's is reported per bit width (the AWQ paper's Llama-2-7B figure
is about 0.5).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCHEMES = ["fp32", "rtn-w4g128", "awq-w4g128", "rtn-w3g128", "awq-w3g128", "w4a8", "w8a8"]


def decode_tokens_per_s(artifact: Path, steps: int) -> float:
    from kiln.artifact import load_artifact
    from kiln.runtime.model_runner import ModelRunner

    runner = ModelRunner(load_artifact(artifact))
    runs = []
    for r in range(3):
        runner.kv.add_sequence(r)
        logits = runner.forward([r], [list(range(10, 26))])
        t0 = time.perf_counter()
        for _ in range(steps):
            logits = runner.forward([r], [[int(logits[0].argmax())]])
        runs.append(steps / (time.perf_counter() - t0))
        runner.kv.remove_sequence(r)
    return statistics.median(runs)


def linear_bytes(artifact: Path) -> int:
    manifest = json.loads((artifact / "manifest.json").read_text())
    size = {"float32": 4, "float16": 2, "bfloat16": 2, "int32": 4, "int8": 1, "uint8": 1}
    total = 0
    for name, (shape, dtype) in manifest["param_shapes"].items():
        if "_proj" in name:
            n = 1
            for d in shape:
                n *= d
            total += n * size[dtype]
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="a scratch directory for the calibration and artifacts")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--arch", default=None, help="CPU arch for every artifact (x86-64-v3: AVX2, whose per-lane shifts "
                                                  "the 4-bit unpacking needs; default: the portable baseline)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from kiln.compiler import CompileConfig, compile_model
    from kiln.quant.calibrate import CalibrateConfig, calibrate, save_calibration
    from kiln.runtime.perplexity import evaluate_perplexity

    args.out.mkdir(parents=True, exist_ok=True)
    calib = args.out / "calib.safetensors"
    t0 = time.perf_counter()
    save_calibration(*calibrate(args.model_dir, ROOT / "data" / "calibration.txt", CalibrateConfig()), calib)
    print(f"calibrated in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    heldout = (ROOT / "data" / "heldout.txt").read_text()
    rows = []
    for scheme in SCHEMES:
        art = args.out / scheme
        t0 = time.perf_counter()
        quant = {} if scheme == "fp32" else {"quant": scheme, "calib": calib}
        compile_model(args.model_dir, art, CompileConfig(arch=args.arch, **quant))
        secs = time.perf_counter() - t0
        ppl = evaluate_perplexity(art, heldout, window=args.window)
        rows.append({"scheme": scheme, "perplexity": ppl.perplexity, "tokens_scored": ppl.num_tokens_scored,
                     "weight_bytes": (art / "params.safetensors").stat().st_size, "linear_bytes": linear_bytes(art),
                     "compile_s": round(secs, 1)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    for row in rows:  # speeds last, back to back, on warm caches
        row["decode_tok_s"] = decode_tokens_per_s(args.out / row["scheme"], args.decode_steps)
    by = {r["scheme"]: r["perplexity"] for r in rows}
    gaps = {f"w{b}": (by[f"awq-w{b}g128"] - by["fp32"]) / (by[f"rtn-w{b}g128"] - by["fp32"]) for b in (4, 3)}
    result = {"model": str(args.model_dir), "arch": args.arch or "x86-64", "window": args.window, "rows": rows, "awq_gap_over_rtn_gap": gaps,
              "w4a8_over_fp32": by["w4a8"] / by["fp32"]}
    print("| scheme | perplexity | weights (MB) | linears (MB) | decode tok/s (batch 1) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scheme']} | {r['perplexity']:.2f} | {r['weight_bytes'] / 1e6:.2f} | {r['linear_bytes'] / 1e6:.2f} "
              f"| {r['decode_tok_s']:.0f} |")
    print(f"\nAWQ gap / RTN gap: 4-bit {gaps['w4']:.2f}, 3-bit {gaps['w3']:.2f}; "
          f"w4a8 / fp32 perplexity {result['w4a8_over_fp32']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
