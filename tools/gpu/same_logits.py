"""Two artifacts of one model, the same seeded random weights: do they compute the same logits?

    python tools/gpu/same_logits.py ART_A ART_B [--seed 0] [--prompt-len 512] [--steps 8] --out FILE

For artifacts that differ only in how they were compiled (``--arch sm_90`` against ``sm_90a``, whose
prefill linears run kiln's wgmma kernel instead of mma.sync): a prompt of random token ids is
prefilled and ``--steps`` greedy steps decoded, teacher-forced on A's tokens, with each artifact in
turn; the report gives the largest logit difference relative to the logits' scale per step and
whether the argmax agrees. fp16 kernels with other summation orders differ in the last bits, so the
check is a tolerance (``--rtol``), not equality.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import numpy as np

from demo_check import greedy


def run(artifact: Path, seed: int, ids: list[int], steps: int, forced: list[int] | None):
    from kiln.artifact import load_artifact
    from kiln.runtime.model_runner import ModelRunner

    runner = ModelRunner(load_artifact(artifact), random_weights=seed)
    try:
        return greedy(runner, ids, steps, forced=forced)
    finally:
        del runner
        gc.collect()


def compare(a: Path, b: Path, seed: int, prompt_len: int, steps: int, rtol: float) -> dict:
    from kiln.artifact import load_artifact

    vocab = load_artifact(a).spec.vocab_size
    ids = np.random.default_rng(seed).integers(3, vocab, prompt_len).tolist()
    tokens_a, rows_a = run(a, seed, ids, steps, None)
    tokens_b, rows_b = run(b, seed, ids, steps, tokens_a)
    scale = np.abs(rows_a).max(axis=1)
    rel = (np.abs(rows_a - rows_b).max(axis=1) / np.maximum(scale, 1e-6)).tolist()
    agree = (rows_a.argmax(axis=1) == rows_b.argmax(axis=1)).tolist()
    return {"a": str(a), "b": str(b), "seed": seed, "prompt_len": prompt_len, "steps": steps,
            "max_rel_diff_per_step": [round(x, 6) for x in rel], "argmax_agree_per_step": agree,
            "rtol": rtol, "ok": bool(max(rel) <= rtol)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rtol", type=float, default=2e-2)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    result = compare(args.a, args.b, args.seed, args.prompt_len, args.steps, args.rtol)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
