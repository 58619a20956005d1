"""The serving engine's own CPU time per step, model time excluded, at several batch sizes.

    python tools/bench_engine.py ARTIFACT [--batch 1 32 128] [--steps 50] [--sampling greedy|random]

For each batch size B, B requests (16-token prompts, ignore_eos) are admitted and prefilled, then
``--steps`` decode steps are timed. Each step is split into: scheduling, input preparation (host
arrays and their copy to the device), the model (the VM calls), taking the logits (a view; the greedy
rows' argmax runs where they are and only the other rows are copied to the host, inside sampling),
and sampling + detokenization + stop checks. "engine" is the step's wall time less the model's (so it
does not depend on how a version splits its step). Prints one JSON object with the medians in
milliseconds. The script runs on older kilns too (PYTHONPATH=OLD_CHECKOUT), for before/after pairs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from kiln.runtime.engine import Engine, EngineConfig
from kiln.runtime.outputs import Request
from kiln.runtime.sampler import SamplingParams

PARTS = ("schedule", "inputs", "model", "outputs", "sample_detok")


def measure(artifact: str, batch: int, steps: int, sampling: str) -> dict:
    eng = Engine(artifact, EngineConfig(max_num_seqs=batch, max_batched_tokens=max(512, batch),
                                        kv_cache_memory=64 << 20, prefix_cache=False))
    base = eng.tokenizer.encode(open(__file__).read())
    if sampling == "greedy":
        params = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)
    else:
        params = SamplingParams(max_tokens=steps + 8, temperature=0.8, top_p=0.95, top_k=50, ignore_eos=True,
                                frequency_penalty=0.1)
    for i in range(batch):
        eng.add_request(Request(f"b{i}", base[i:i + 16], params))
    while any(s.remaining > 1 for s in eng.scheduler.running) or eng.scheduler.num_waiting:
        eng.step()  # prefill
    eng.step_times.clear()
    walls = []
    for _ in range(steps):
        t = time.perf_counter()
        eng.step()
        walls.append(time.perf_counter() - t)
    rows = [t for t in eng.step_times if t[0] == batch]
    assert len(rows) == len(walls), "every timed step runs the whole batch"
    med = {name: statistics.median(t[1 + i] for t in rows) * 1e3 for i, name in enumerate(PARTS)}
    engine_ms = statistics.median(w - t[3] for w, t in zip(walls, rows)) * 1e3  # the step's wall time less the model's
    return {"batch": batch, "steps": len(rows), "engine_ms": round(engine_ms, 3),
            **{k: round(v, 3) for k, v in med.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32, 128])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--sampling", choices=["greedy", "random"], default="greedy")
    args = ap.parse_args()
    results = [measure(args.artifact, b, args.steps, args.sampling) for b in args.batch]
    print(json.dumps({"sampling": args.sampling, "results": results}, indent=1))


if __name__ == "__main__":
    main()
