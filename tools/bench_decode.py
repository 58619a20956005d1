"""Decode speed of a kiln artifact next to transformers' own ``generate`` on the same model and prompts.

    python tools/bench_decode.py MODEL_DIR ARTIFACT [--batch 1 8] [--new-tokens 64] [--repeats 3]

Both engines run greedy decoding of the same prompts (equal-length prompts, so transformers needs no
padding) on the same machine, alternating, in one process. Decode tokens/s is measured as
``batch * (N - 1) / (t(N tokens) - t(1 token))``, which removes the prefill; the median of
``--repeats`` runs is reported. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("artifact")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from kiln.runtime import LLM, SamplingParams

    llm = LLM(args.artifact)
    hf = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    vocab = llm.spec.vocab_size
    result = {"model": args.model_dir, "artifact": args.artifact, "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "torch_threads": torch.get_num_threads(), "batches": {}}

    def kiln_time(prompts, n):
        t = time.perf_counter()
        llm.generate(prompts, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        return time.perf_counter() - t

    @torch.no_grad()
    def hf_time(prompts, n):
        ids = torch.tensor(prompts)
        t = time.perf_counter()
        hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                    min_new_tokens=n, pad_token_id=0)
        return time.perf_counter() - t

    for b in args.batch:
        prompts = rng.integers(3, vocab, size=(b, args.prompt_len)).tolist()
        kiln_time(prompts, 2), hf_time(prompts, 2)  # warm up
        runs = {"kiln": [], "transformers": []}
        for _ in range(args.repeats):
            for name, fn in (("kiln", kiln_time), ("transformers", hf_time)):
                dt = fn(prompts, args.new_tokens) - fn(prompts, 1)
                runs[name].append(b * (args.new_tokens - 1) / dt)
        med = {k: round(statistics.median(v), 1) for k, v in runs.items()}
        result["batches"][str(b)] = {"decode_tokens_per_s": med,
                                     "kiln_over_transformers": round(med["kiln"] / med["transformers"], 2)}
        print(f"batch {b}: kiln {med['kiln']} tok/s, transformers {med['transformers']} tok/s", flush=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
