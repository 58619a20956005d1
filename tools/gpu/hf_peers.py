"""Hugging Face transformers on a model shape with random weights: the peers kiln is compared with.

    python tools/gpu/hf_peers.py --config tools/gpu/configs/llama-3-8b --out hf.json        (on the GPU)
    python tools/gpu/hf_peers.py --small --device cpu --compile-backend eager --out hf.json   (a CPU smoke test)

The model is built from config.json alone (``AutoModelForCausalLM.from_config``, seeded, fp16 by
default) on the device; prompts are random token ids of ``--prompt-len`` tokens. Measured, greedy
with every token forced (``min_new_tokens``), each after an untimed warm-up:

- ``eager``: ``generate`` at batch 1 (dynamic cache).
- ``static_compile``: the gpt-fast recipe in transformers, static KV cache + ``torch.compile`` of the
  forward (``mode="reduce-overhead"``, fullgraph), batch 1; the compile time is reported apart.
- ``batched``: ``generate`` over ``--batches`` equal-length prompts at once (no padding needed).
- ``continuous_batching``: transformers' own continuous-batching ``generate_batch`` over the largest
  batch's prompts, where this transformers has it.

Decode tokens/s is ``batch * (N - 1) / (t(N tokens) - t(1 token))``, which removes the prefill (the
same formula as tools/bench_decode.py); the median of ``--repeats`` runs. Continuous batching reports
output tokens/s over its whole run (its prefill included). Each measurement is guarded: a failure is
logged under "errors" and the rest still run; the JSON is rewritten after each one.
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

# A 2-layer Llama for smoke tests on the CPU (--small).
SMALL_CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=512, hidden_size=64,
                    intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=512, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def load_model(args):
    import transformers

    if args.small:
        config = transformers.LlamaConfig(**{k: v for k, v in SMALL_CONFIG.items() if k != "architectures"})
    else:
        config = transformers.AutoConfig.from_pretrained(str(args.config))
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval(), config


class Timer:
    def __init__(self, device: str):
        self.device = device

    def __call__(self, fn) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t


def decode_rate(timer: Timer, run, batch: int, new_tokens: int, repeats: int, warmup: tuple[int, ...] = (2,)) -> dict:
    """Decode tokens/s from ``run(n)`` (generates n tokens per sequence): prefill removed by differencing."""
    for n in warmup:
        run(n)
    rates, full = [], []
    for _ in range(repeats):
        t_n = timer(lambda: run(new_tokens))
        t_1 = timer(lambda: run(1))
        if t_n > t_1:  # else noise swamped the decode time (tiny smoke-test sizes): no rate from this run
            rates.append(batch * (new_tokens - 1) / (t_n - t_1))
        full.append(t_n)
    return {"batch": batch, "new_tokens": new_tokens,
            "decode_tokens_per_s": round(statistics.median(rates), 1) if rates else None,
            "runs_decode_tokens_per_s": [round(r, 1) for r in rates], "seconds_for_new_tokens": statistics.median(full)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, help="a directory holding config.json")
    ap.add_argument("--small", action="store_true", help="a 2-layer toy config instead of --config")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32, 64])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager: a quick smoke test)")
    ap.add_argument("--skip", nargs="*", default=[],
                    choices=["eager", "static_compile", "batched", "continuous_batching"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if not args.small and args.config is None:
        ap.error("give --config DIR or --small")

    import transformers

    result: dict = {"config": "small" if args.small else str(args.config), "device": args.device, "dtype": args.dtype,
                    "prompt_len": args.prompt_len, "torch": torch.__version__, "transformers": transformers.__version__,
                    "results": {}, "errors": {}}

    def save():
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    def guarded(name: str, fn) -> None:
        if name in args.skip:
            return
        t = time.perf_counter()
        try:
            result["results"][name] = fn()
            print(f"{name}: {json.dumps(result['results'][name])}", flush=True)
        except Exception:
            result["errors"][name] = traceback.format_exc(limit=6)
            print(f"{name} failed:\n{result['errors'][name]}", flush=True)
        result.setdefault("part_seconds", {})[name] = round(time.perf_counter() - t, 1)
        if args.device == "cuda":
            torch.cuda.empty_cache()
        save()

    try:
        t = time.perf_counter()
        model, config = load_model(args)
        result["model_build_seconds"] = round(time.perf_counter() - t, 1)
        result["num_params"] = sum(p.numel() for p in model.parameters())
    except Exception:
        result["errors"]["load"] = traceback.format_exc()
        save()
        raise SystemExit(1)
    save()
    vocab = config.vocab_size
    gen = torch.Generator().manual_seed(args.seed)
    timer = Timer(args.device)

    def prompts(batch: int) -> torch.Tensor:
        return torch.randint(3, vocab, (batch, args.prompt_len), generator=gen).to(args.device)

    @torch.no_grad()
    def generate(ids, n, **kw):
        return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                              min_new_tokens=n, pad_token_id=0, **kw)

    one = prompts(1)
    guarded("eager", lambda: decode_rate(timer, lambda n: generate(one, n), 1, args.new_tokens, args.repeats))

    def static_compile() -> dict:
        from transformers import CompileConfig

        cc = CompileConfig(fullgraph=True, mode="reduce-overhead", backend=args.compile_backend)
        if args.device != "cuda":
            cc._compile_all_devices = True  # transformers compiles only on accelerators unless told
        run = lambda n: generate(one, n, cache_implementation="static", compile_config=cc)  # noqa: E731
        # The static cache is sized by the prompt plus n (transformers 5 keeps the largest length it has seen,
        # so the n = 1 runs reuse the first compiled graph); warm both up twice (CUDA graphs are recorded on
        # a later call) before timing. (run_all.sh gives this part 240 s for the 8B's compile.)
        compile_s = timer(lambda: run(args.new_tokens)) + timer(lambda: run(1))
        return {"compile_and_first_runs_seconds": round(compile_s, 1), "backend": args.compile_backend,
                **decode_rate(timer, run, 1, args.new_tokens, args.repeats,
                              warmup=(args.new_tokens, 1, args.new_tokens, 1))}

    guarded("static_compile", static_compile)

    def batched() -> dict:
        out = {}
        for b in args.batches:
            ids = prompts(b)
            out[str(b)] = decode_rate(timer, lambda n: generate(ids, n), b, args.new_tokens, args.repeats)
        return out

    guarded("batched", batched)

    def continuous_batching() -> dict:
        from transformers import GenerationConfig

        b = max(args.batches)
        inputs = prompts(b).tolist()
        gc = GenerationConfig(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                              pad_token_id=0)
        outs = {}
        with torch.no_grad():
            model.generate_batch(inputs=inputs[:2], generation_config=gc, progress_bar=False)  # warm-up
            sec = timer(lambda: outs.update(model.generate_batch(inputs=inputs, generation_config=gc,
                                                                 progress_bar=False)))
        produced = sum(len(o.generated_tokens) for o in outs.values())
        return {"num_requests": b, "new_tokens": args.new_tokens, "output_tokens": produced, "seconds": sec,
                "output_tokens_per_s": round(produced / sec, 1)}

    guarded("continuous_batching", continuous_batching)
    print(json.dumps({k: result[k] for k in ("config", "device", "errors")}, indent=2))
    if result["errors"]:  # the measurements that ran stay in the JSON; the part still failed
        sys.exit(1)


if __name__ == "__main__":
    main()
