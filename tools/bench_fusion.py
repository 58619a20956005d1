"""What kiln's fusion passes bring: kernel launches per decode step and CPU decode speed, fused vs not.

    python tools/bench_fusion.py MODEL [--tokenizer DIR] [--quant SCHEME [--calib CALIB]] [--batch 1 16] [--steps 64]
                                 [--repeats 5]

MODEL is a checkpoint directory or a .pt2/.onnx graph. Both artifacts are compiled in this process
(``kiln compile`` with and without ``--no-fuse``); kernel launches are counted in ``batch_decode``'s
bytecode (kiln/codegen/build.py ``kernel_calls``); decode tokens/s is measured on the runner itself
(``batch`` sequences, ``steps`` decode steps after a prefill), the two artifacts alternating, median
of ``--repeats``. With ``--quant`` both are quantized (the unfused one keeps the plain form: each weight
dequantized whole by its own kernel, then the matmul). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def decode_seconds(llm, batch: int, steps: int, rng) -> float:
    """Seconds for ``steps`` batch_decode calls of ``batch`` sequences (the KV cache already prefilled)."""
    vocab = llm.spec.vocab_size
    sids = list(range(batch))
    for sid in sids:
        llm.kv.add_sequence(sid)
        llm.runner.forward([sid], [rng.integers(3, vocab, size=16).tolist()])
    try:
        tokens = [[int(t)] for t in rng.integers(3, vocab, size=batch)]
        t = time.perf_counter()
        for _ in range(steps):
            llm.runner.forward(sids, tokens)
        return time.perf_counter() - t
    finally:
        for sid in sids:
            llm.kv.remove_sequence(sid)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--quant", default=None, help="a --quant scheme for both artifacts")
    ap.add_argument("--calib", default=None, help="the calibration file the scheme needs (awq, w4a8, w8a8)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    from kiln.artifact import load_artifact
    from kiln.compiler import CompileConfig, compile_model
    from kiln.runtime import LLM
    from kiln.runtime.kv_cache import KVCacheConfig

    tmp = Path(tempfile.mkdtemp(prefix="kiln-fusion-"))
    arts, kernels = {}, {}
    for fused in (False, True):
        name = "fused" if fused else "unfused"
        arts[name] = tmp / name
        compile_model(args.model, arts[name], CompileConfig(fuse=fused, tokenizer=args.tokenizer, quant=args.quant,
                                                            calib=args.calib))
        kernels[name] = _count(arts[name])
    spec = load_artifact(arts["fused"]).spec
    kv = KVCacheConfig.for_model(spec.context_len, spec.kv_bytes_per_token, max_num_seqs=max(args.batch))
    llms = {name: LLM(path, kv_config=kv) for name, path in arts.items()}
    result = {"model": args.model, "quant": args.quant, "steps": args.steps, "repeats": args.repeats,
              "kernels_per_decode_step": {k: sum(v.values()) for k, v in kernels.items()},
              "kernels": kernels, "decode_tokens_per_s": {}}
    rng = np.random.default_rng(0)
    for b in args.batch:
        for llm in llms.values():
            decode_seconds(llm, b, 4, rng)  # warm up
        runs = {name: [] for name in llms}
        for _ in range(args.repeats):
            for name, llm in llms.items():
                runs[name].append(b * args.steps / decode_seconds(llm, b, args.steps, rng))
        med = {name: round(statistics.median(r), 1) for name, r in runs.items()}
        result["decode_tokens_per_s"][str(b)] = {**med, "fused/unfused": round(med["fused"] / med["unfused"], 3)}
    print(json.dumps(result, indent=1))


def _count(artifact: Path) -> dict[str, int]:
    """Kernel launches per batch_decode call, read from the artifact's library."""
    from kiln.artifact import LIBRARY
    from kiln.codegen.build import kernel_calls
    from kiln.ir.tvm import relax, tvm

    ex = relax.VMExecutable(tvm.runtime.load_module(str(artifact / LIBRARY)))
    return kernel_calls(ex, "batch_decode")


if __name__ == "__main__":
    main()
