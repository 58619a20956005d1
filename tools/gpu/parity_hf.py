"""kiln's half-precision logits against transformers' on the same seeded weights (the GPU run's fp16 parity part).

    python tools/gpu/parity_hf.py ARTIFACT --config CONFIG_DIR [--device cuda] [--prompt-len 128] [--steps 8]
                                  --out parity.json

transformers builds the model of CONFIG_DIR (the config ARTIFACT was compiled from, with ``--config-only``) in the
artifact's dtype, on the device, with seeded weights: each matrix normal with std ``STD``, norms around 1, so
logits are neither flat nor saturated. kiln's runner takes those very tensors, mapped into the artifact's fused
layout (q/k/v and gate/up stacked row-wise, kiln/frontend/registry.py's names); nothing goes through a file.
Both run the same token ids: kiln a prefill of ``--prompt-len`` tokens then ``--steps`` teacher-forced decode
steps, transformers one forward over all of them. Reported per row: the largest logit difference relative to
the largest logit, and whether the argmax agrees.

The tolerance: both engines compute in half precision and round at the same places in another order, so their
logits differ by rounding only. On the CPU, kiln's fp16 and bf16 artifacts stay within transformers' own
rounding error of float32 (tests/frontend/test_half_parity.py); here float32 is not run (it would need the
memory twice more), so the check is direct: every row's largest difference within ``RTOL`` of the largest logit
(2% for float16, 8% for bfloat16: its 8-bit mantissa) and the argmax equal wherever transformers' top-two margin
exceeds twice that difference. Exit 1 when a row fails.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import traceback
from pathlib import Path

import numpy as np

STD = 0.02
RTOL = {"float16": 0.02, "bfloat16": 0.08, "float32": 1e-4}
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "qkv_bias": ("q_bias", "k_bias", "v_bias"),
         "gate_up_proj": ("gate_proj", "up_proj")}


def kiln_params(state: dict, artifact) -> dict:
    """transformers' ``state_dict`` as the artifact's parameters (same tensors; fused ones stacked row-wise)."""
    import torch

    from kiln.frontend.registry import ARCHITECTURES

    names = ARCHITECTURES[artifact.spec.architecture].weights

    def hf(kname: str) -> str:
        m = re.match(r"layers\.(\d+)\.(\w+)$", kname)
        return names[f"layers.{{i}}.{m.group(2)}"].replace("{i}", m.group(1)) if m else names[kname]

    out = {}
    for name in artifact.param_layout:
        m = re.match(r"layers\.(\d+)\.(\w+)$", name)
        if m and m.group(2) in FUSED:
            out[name] = torch.cat([state[hf(f"layers.{m.group(1)}.{part}")] for part in FUSED[m.group(2)]], 0)
        elif name == "lm_head" and hf(name) not in state:  # tied: the embedding is the head
            out[name] = state[hf("embed_tokens")]
        else:
            out[name] = state[hf(name)]
    return out


def seeded_model(config_dir: Path, dtype: str, device: str, seed: int):
    import torch
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(config_dir)
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, STD)
    return model


def run(args) -> dict:
    import torch

    from kiln.artifact import load_artifact
    from kiln.runtime.kv_cache import KVCacheConfig
    from kiln.runtime.model_runner import ModelRunner

    art = load_artifact(args.artifact)
    dtype = art.spec.dtype
    t = time.perf_counter()
    hf = seeded_model(args.config, dtype, args.device, args.seed)
    built = time.perf_counter() - t
    n = args.prompt_len + args.steps
    kv = KVCacheConfig.for_model(min(art.spec.context_len, max(256, n)), art.spec.kv_bytes_per_token, max_num_seqs=1)
    runner = ModelRunner(art, device=args.device, kv_config=kv, params=kiln_params(hf.state_dict(), art))
    ids = np.random.default_rng(args.seed).integers(10, art.spec.vocab_size - 1, n).tolist()
    runner.kv.add_sequence(0)
    rows = [runner.forward([0], [ids[:args.prompt_len]])[0]]
    for tok in ids[args.prompt_len:-1]:
        rows.append(runner.forward([0], [[tok]])[0])
    ours = np.stack([np.asarray(r, dtype=np.float64) for r in rows])
    with torch.no_grad():
        theirs = hf(torch.tensor([ids], device=args.device)).logits[0, args.prompt_len - 1:n - 1].double().cpu().numpy()
    diff = np.abs(ours - theirs).max(axis=1)
    scale = np.abs(theirs).max(axis=1)
    top2 = np.sort(theirs, axis=1)[:, -2:]
    agree = ours.argmax(1) == theirs.argmax(1)
    decisive = top2[:, 1] - top2[:, 0] > 2 * diff
    rtol = RTOL[dtype]
    ok = bool((diff <= rtol * scale).all() and agree[decisive].all())
    return {"artifact": str(args.artifact), "dtype": dtype, "device": args.device, "prompt_len": args.prompt_len,
            "steps": args.steps, "rtol": rtol, "ok": ok, "seconds_building_transformers": round(built, 1),
            "max_rel_diff_per_row": [round(float(d / s), 5) for d, s in zip(diff, scale)],
            "argmax_agree_per_row": [bool(a) for a in agree], "decisive_rows": [bool(d) for d in decisive]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--config", type=Path, required=True, help="the config.json folder the artifact was compiled from")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    try:
        result = run(args)
    except Exception:
        result = {"error": traceback.format_exc()}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    sys.exit(0 if result.get("ok") else 1)


if __name__ == "__main__":
    main()
