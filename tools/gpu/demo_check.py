"""Greedy tokens of the demo model on the GPU against the CPU's, recorded at bundle time.

    python tools/gpu/demo_check.py record CPU_ARTIFACT --out cpu_greedy.json     (here, by build_bundle.sh)
    python tools/gpu/demo_check.py check GPU_ARTIFACT --expect cpu_greedy.json --out demo_check.json

Both run the same loop on the runtime's ModelRunner: prefill the prompt, then ``--max-tokens``
greedy decode steps (fp32 artifacts, so the two devices should pick the same tokens). ``record``
keeps the tokens, the first step's full logits row and each step's top-1 margin (top-1 minus top-2
logit, to tell a real divergence from a near tie). ``check`` compares free-running greedy tokens,
the first logits row, and (teacher-forced on the CPU's tokens) whether each step's argmax agrees.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import numpy as np

PROMPT = "def read_config(path):"


def _runner(artifact: Path):
    from kiln.artifact import load_artifact
    from kiln.runtime.model_runner import ModelRunner
    from kiln.runtime.tokenizer import Tokenizer

    art = load_artifact(artifact)
    return ModelRunner(art), Tokenizer(art.path)


def greedy(runner, prompt_ids: list[int], max_tokens: int, forced: list[int] | None = None, seq_id: int = 0):
    """(tokens, logits rows [steps, V]): free-running greedy, or feeding ``forced`` tokens instead."""
    runner.kv.add_sequence(seq_id)
    try:
        rows = [runner.forward([seq_id], [prompt_ids])[0].copy()]
        tokens = []
        for step in range(max_tokens):
            tokens.append(int(np.argmax(rows[-1])))
            if step + 1 < max_tokens:
                feed = forced[step] if forced is not None else tokens[-1]
                rows.append(runner.forward([seq_id], [[feed]])[0].copy())
        return tokens, np.stack(rows)
    finally:
        runner.kv.remove_sequence(seq_id)


def margins(rows: np.ndarray) -> list[float]:
    top2 = np.sort(rows, axis=1)[:, -2:]
    return [round(float(m), 5) for m in top2[:, 1] - top2[:, 0]]


def record(args) -> dict:
    runner, tok = _runner(args.artifact)
    prompt_ids = tok.encode(args.prompt)
    tokens, rows = greedy(runner, prompt_ids, args.max_tokens)
    return {"artifact": str(args.artifact), "device": runner.device, "prompt": args.prompt,
            "prompt_ids": prompt_ids, "tokens": tokens, "text": tok.decode(tokens),
            "margins": margins(rows), "first_logits": [round(float(x), 6) for x in rows[0]]}


def check(args) -> dict:
    expect = json.loads(args.expect.read_text())
    runner, tok = _runner(args.artifact)
    n = len(expect["tokens"])
    tokens, rows = greedy(runner, expect["prompt_ids"], n)
    forced_tokens, _ = greedy(runner, expect["prompt_ids"], n, forced=expect["tokens"], seq_id=1)
    mismatch = next((i for i, (a, b) in enumerate(zip(tokens, expect["tokens"])) if a != b), None)
    first = np.asarray(expect["first_logits"], dtype=np.float32)
    return {
        "artifact": str(args.artifact), "device": runner.device, "reference_device": expect["device"],
        "match": tokens == expect["tokens"], "first_mismatch": mismatch,
        "reference_margin_at_mismatch": None if mismatch is None else expect["margins"][mismatch],
        "teacher_forced_argmax_agree": sum(a == b for a, b in zip(forced_tokens, expect["tokens"])),
        "num_tokens": n,
        "first_logits_max_abs_diff": float(np.abs(rows[0] - first).max()),
        "tokens": tokens, "reference_tokens": expect["tokens"],
        "text": tok.decode(tokens), "reference_text": expect["text"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("artifact", type=Path)
    rec.add_argument("--prompt", default=PROMPT)
    rec.add_argument("--max-tokens", type=int, default=64)
    rec.add_argument("--out", type=Path, required=True)
    chk = sub.add_parser("check")
    chk.add_argument("artifact", type=Path)
    chk.add_argument("--expect", type=Path, required=True)
    chk.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    try:
        import torch  # first: on a GPU machine it loads the CUDA runtime TVM's CUDA library links against

        torch.set_num_threads(1)
        result = record(args) if args.cmd == "record" else check(args)
    except Exception:
        result = {"error": traceback.format_exc()}
    args.out.write_text(json.dumps(result) + "\n")
    short = {k: v for k, v in result.items() if k not in ("first_logits", "margins", "tokens", "reference_tokens")}
    print(json.dumps(short, indent=2))
    sys.exit(1 if "error" in result or result.get("match") is False else 0)  # a mismatch fails the part too


if __name__ == "__main__":
    main()
