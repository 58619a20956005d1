"""How many 2,000-token sequences the engine holds at once under one KV memory budget: the MixAttention
model (Character.AI's 13-layer map: 1 global KV owner, 4 sliding owners, window 64) against the same
model with every layer global and owning its KV — measured on the real engine and caches, not computed.

    python tools/bench_kv_admission.py [--prompt-len 2000] [--max-tokens 100] [--budget-seqs 2] [--speed] [--json FILE]

Both models get ``--budget-seqs`` x (prompt + output) tokens of the all-global model's KV bytes. Each
engine is sent more requests than it can hold (random prompts, greedy, no prefix reuse); the figure is
the largest number of running sequences that held the KV of their whole prompt at the same step. The
all-global model runs on TVM's paged cache, the MixAttention one on kiln's grouped cache (runtime/kv_groups.py).
``--speed`` adds both models' decode tokens/s (not the same computation: the MixAttention model skips
8 layers' K/V projections; its attention kernels are kiln's plain loops, the other's TVM's).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def build(workdir: Path, window: int, context_len: int) -> dict:
    """Checkpoints and CPU artifacts of the MixAttention model and its all-global twin."""
    import mixattention_reference as ref
    from conftest import save_tokenizer

    from kiln.compiler import CompileConfig, compile_model

    mix = ref.character_ai_spec(window, context_len)
    plain = dataclasses.replace(mix, layer_types=("global",) * mix.num_layers, kv_sources=(), sliding_window=None)
    out = {}
    for name, spec in (("mixattention", mix), ("all-global", plain)):
        ck, art = workdir / f"ck-{name}", workdir / f"art-{name}"
        ref.save_checkpoint(spec, ref.random_weights(spec, seed=3, std=0.2), ck)
        save_tokenizer(ck, spec.vocab_size)
        compile_model(ck, art, CompileConfig())
        out[name] = (art, spec)
    return out


def peak_resident(artifact: Path, budget: int, requests: int, prompt_len: int, max_tokens: int) -> dict:
    import torch

    from kiln.runtime.engine import Engine, EngineConfig
    from kiln.runtime.outputs import Request
    from kiln.runtime.sampler import SamplingParams

    eng = Engine(artifact, EngineConfig(max_num_seqs=64, max_batched_tokens=512, kv_cache_memory=budget,
                                        prefix_cache=False))
    g = torch.Generator().manual_seed(1)
    for i in range(requests):
        eng.add_request(Request(f"r{i}", torch.randint(3, eng.spec.vocab_size, (prompt_len,), generator=g).tolist(),
                                SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)))
    best, steps, t = 0, 0, time.perf_counter()
    while eng.has_unfinished():
        eng.step()
        steps += 1
        best = max(best, sum(1 for s in eng.scheduler.running if s.num_computed >= prompt_len))
    return {"peak_resident_sequences": best, "requests": requests, "steps": steps,
            "preemptions": eng.stats().preemptions, "kv_pages_total": eng.kv_pages_total,
            "seconds": round(time.perf_counter() - t, 1)}


def decode_speed(artifact: Path, batch: int, context: int = 256, steps: int = 32, repeats: int = 3) -> float:
    """Decode tokens/s of ``batch`` sequences at ``context`` tokens (best of ``repeats``), model runner only."""
    import numpy as np

    from kiln.artifact import load_artifact
    from kiln.runtime.kv_cache import KVCacheConfig
    from kiln.runtime.model_runner import ModelRunner

    r = ModelRunner(load_artifact(artifact), kv_config=KVCacheConfig(
        max_num_seqs=batch, max_total_tokens=batch * (context + steps * repeats + 16), prefill_chunk_size=context))
    ids = list(range(batch))
    rng = np.random.default_rng(0)
    for s in ids:
        r.kv.add_sequence(s)
        r.forward([s], [rng.integers(3, r.spec.vocab_size, context).tolist()])
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(steps):
            logits = r.forward(ids, [[7]] * batch)
        assert logits.shape[0] == batch
        best = max(best, batch * steps / (time.perf_counter() - t))
    return best


def measure(workdir: Path, prompt_len: int = 2000, max_tokens: int = 100, window: int = 64, budget_seqs: int = 2,
            requests: tuple[int, int] = (24, 3), speed: bool = False) -> dict:
    models = build(workdir, window, prompt_len + max_tokens + 16)
    plain = models["all-global"][1]
    budget = budget_seqs * (prompt_len + max_tokens) * plain.kv_bytes_per_token
    result = {"prompt_len": prompt_len, "max_tokens": max_tokens, "window": window, "kv_cache_memory": budget}
    for (name, (art, spec)), n in zip(models.items(), requests):
        result[name] = {**peak_resident(art, budget, n, prompt_len, max_tokens),
                        "kv_bytes_per_token_at_prompt_len": sum(spec.kv_bytes(prompt_len).values()) // prompt_len}
    peaks = [result[m]["peak_resident_sequences"] for m in ("mixattention", "all-global")]
    result["ratio"] = peaks[0] / peaks[1]
    if speed:  # the price of kiln's plain-loop kernels next to TVM's, side by side in one run
        for name, (art, _) in models.items():
            result[name]["decode_tok_s_at_256"] = {b: round(decode_speed(art, b)) for b in (1, 16)}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt-len", type=int, default=2000)
    ap.add_argument("--max-tokens", type=int, default=100)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--budget-seqs", type=int, default=2, help="the budget in all-global sequences")
    ap.add_argument("--speed", action="store_true", help="also decode tokens/s of both (batch 1 and 16, 256 tokens)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        r = measure(Path(d), a.prompt_len, a.max_tokens, a.window, a.budget_seqs,
                    (12 * a.budget_seqs, a.budget_seqs + 1), a.speed)
    print(json.dumps(r, indent=1))
    if a.json:
        a.json.write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
