"""kiln on the CPU side by side with the engines a CPU user would pick instead: llama.cpp (through
llama-cpp-python), ONNX Runtime GenAI and transformers, all on one checkpoint converted for each.

    python tools/bench_peers.py --shape qwen2.5-0.5b --peers-python /work/peers-venv/bin/python \\
        --work /tmp/peers-work --out /tmp/peers-run/results.json

Per engine and variant (kiln fp32 / rtn-w4g128 / w4a8, llama.cpp fp32 / q4_0, ORT GenAI fp32 / int4,
transformers fp32) it measures prefill tok/s of one --prompt-len prompt, batch-1 decode tok/s over
--decode-steps greedy steps after that prefill, batch-8 decode tok/s (8 prompts of prompt-len/8 tokens;
null for llama-cpp-python, whose high-level API is batch-1), load seconds, peak RSS, and the fraction
of the first 32 greedy tokens equal to transformers fp32's. Each measurement is a fresh process with
--threads threads (TVM_NUM_THREADS, OMP_NUM_THREADS with OMP_WAIT_POLICY=PASSIVE, ORT's
intra_op_num_threads, torch.set_num_threads), timed around the engine's own calls after a short
warm-up; every decode timing starts after one untimed step. Rounds interleave the engines (the machine
may be shared) and the report takes medians. Each round also measures the machine's memory read
bandwidth (a NumPy sum over 1 GiB, best of 5) and reports fp32 batch-1 decode as a fraction of it
(weight bytes read per token x tok/s / bandwidth). On the 2-core machine measured, the probe read 13-15
GB/s (two processes at once read no more) while the fastest fp32 decode rounds imply about 21 GB/s, so
fractions above 1 occur: compare them between engines rather than against 1.

The checkpoint: --shape demo is the bundled trained model; the other shapes are transformers models of
that published shape with seeded random weights (norms 1 + 0.1 randn, the rest normal(0, 0.05): at
transformers' 0.02 a 24-layer model's greedy output falls into a two-token loop; 0.05 keeps it varied)
and a byte-level BPE tokenizer of 32000 tokens (bytes and byte pairs), cached under --work. kiln's
artifacts are cached per hash of kiln's sources; the peers' conversions once per checkpoint.

The peers are optional and live in a venv of their own (--peers-python); one that is missing or fails
to convert is skipped with its reason in the JSON:

    python3 -m venv /work/peers-venv
    /work/peers-venv/bin/pip install torch==2.13.0          # first: unpinned torch pulls CUDA wheels
    /work/peers-venv/bin/pip install onnxruntime-genai onnx_ir transformers
    CMAKE_ARGS="-DGGML_NATIVE=ON" /work/peers-venv/bin/pip install llama-cpp-python   # builds, ~13 min
    mkdir -p /work/peers-venv/src && cd /work/peers-venv/src && \\
        /work/peers-venv/bin/pip download --no-deps --no-binary :all: llama-cpp-python && tar xzf llama_cpp*.tar.gz

(the unpacked sdist supplies llama.cpp's convert_hf_to_gguf.py and gguf-py; --llama-cpp-src points
elsewhere). On a CPU with AMX, GGML_NATIVE builds ggml's AMX kernels, whose Q4_0 matmul segfaulted here
(llama-cpp-python 0.3.36): build instead with CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON
-DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON
-DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON" (AMX off) and pip's --force-reinstall --no-deps.

Writes --out (JSON), a markdown table beside it (also printed) and a PNG plot beside it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = ROOT / "models" / "kiln-demo"
VOCAB = 32000
SEED = 0
GREEDY_TOKENS = 32  # greedy agreement is counted over this many tokens
BATCH = 8

COMMON_CONFIG = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True,
                     max_position_embeddings=2048)
SHAPES: dict[str, tuple[str, dict]] = {  # shape -> (transformers config class, its published sizes)
    "qwen2.5-0.5b": ("Qwen2Config", dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                                         num_key_value_heads=2, intermediate_size=4864, rope_theta=1e6,
                                         rms_norm_eps=1e-6)),
    "llama-3.2-1b": ("LlamaConfig", dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                                         num_key_value_heads=8, head_dim=64, intermediate_size=8192,
                                         rms_norm_eps=1e-5, rope_scaling={
                                             "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 8192})),
}
VARIANTS = {"kiln": ("fp32", "rtn-w4g128", "w4a8"), "llama.cpp": ("fp32", "q4_0"), "ort": ("fp32", "int4"),
            "transformers": ("fp32",)}
FOUR_BIT = {"rtn-w4g128", "w4a8", "q4_0", "int4"}
METRICS = {"prefill_tok_s": "prefill tok/s", "decode1_tok_s": "decode tok/s, batch 1",
           "decode8_tok_s": f"decode tok/s, batch {BATCH}", "load_s": "load s", "peak_rss_mb": "peak RSS MB"}


class PeerUnavailable(Exception):
    """A peer that cannot be measured here (not installed, conversion failed): skipped with this reason."""


# -- the checkpoint --------------------------------------------------------------------------------------


def save_bpe_tokenizer(path: Path) -> None:
    """A byte-level BPE tokenizer of VOCAB tokens: 3 specials, the 256 byte symbols, then byte pairs."""
    from itertools import product

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    pairs = [(a, b) for a, b in product(alphabet, repeat=2)][:VOCAB - 3 - len(alphabet)]
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", *alphabet, *(a + b for a, b in pairs)])}
    tok = Tokenizer(models.BPE(vocab, pairs))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<pad>") \
        .save_pretrained(path)


def build_checkpoint(shape: str, work: Path) -> Path:
    """The checkpoint of ``shape``, made once under ``work`` with seeded random weights."""
    if shape == "demo":
        return DEMO_MODEL
    path = work / f"hf-{shape}"
    if (path / "model.safetensors").exists():
        return path
    import torch
    import transformers

    cls_name, sizes = SHAPES[shape]
    config = getattr(transformers, cls_name)(**COMMON_CONFIG, **sizes)
    torch.manual_seed(SEED)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.05)
    model.save_pretrained(path)
    save_bpe_tokenizer(path)
    return path


def weight_bytes_fp32(checkpoint: Path) -> int:
    """Bytes of every stored weight at 4 bytes a value: what an fp32 decode step reads (tied embeddings once)."""
    total = 0
    for f in checkpoint.glob("*.safetensors"):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        total += sum(4 * math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


def context_len(checkpoint: Path) -> int:
    return json.loads((checkpoint / "config.json").read_text())["max_position_embeddings"]


# -- converting the checkpoint for each engine ----------------------------------------------------------


def kiln_source_hash() -> str:
    h = hashlib.sha256()
    for f in sorted((ROOT / "kiln").rglob("*.py")):
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def run_tool(cmd: list, what: str, env: dict | None = None) -> None:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env={**os.environ, **(env or {})})
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise PeerUnavailable(f"{what} failed (exit {res.returncode}): {tail[0][:300]}")


def prepare_kiln(checkpoint: Path, variant: str, args) -> Path:
    arch = ["--arch", args.arch] if args.arch else []
    art = args.work / f"kiln-{checkpoint.name}-{variant}-{args.arch or 'default'}-{kiln_source_hash()}"
    if (art / "manifest.json").exists():
        return art
    quant = [] if variant == "fp32" else ["--quant", variant]
    if variant == "w4a8":
        calib = args.work / f"calib-{checkpoint.name}.safetensors"
        if not calib.exists():  # a small calibration: the scales' quality does not change the speed
            run_tool([sys.executable, "-m", "kiln.cli", "calibrate", checkpoint, "-o", calib, "--num-samples", 16,
                      "--seq-len", 256], "kiln calibrate")
        quant += ["--calib", calib]
    run_tool([sys.executable, "-m", "kiln.cli", "compile", checkpoint, "-o", art, "--target", "cpu", "-q", *arch,
              *quant], "kiln compile")
    return art


# llama.cpp's converter, with the BPE pre-tokenizer check answered: the random checkpoint's tokenizer is no
# published one, and llama.cpp only uses it to tokenize text (the benchmark feeds token ids).
CONVERT_GGUF = """import runpy, sys
src = sys.argv[1]
sys.path[:0] = [src, src + "/gguf-py"]
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = [src + "/convert_hf_to_gguf.py", *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
QUANTIZE_GGUF = """import sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype, p.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, int(sys.argv[3])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))
"""


def llama_cpp_source(args) -> Path:
    if args.llama_cpp_src:
        return args.llama_cpp_src
    venv = Path(args.peers_python).absolute().parents[1]  # not resolved: a venv's python links out of it
    found = sorted(venv.glob("src/*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    if not found:
        raise PeerUnavailable("llama.cpp's convert_hf_to_gguf.py not found: unpack the llama-cpp-python sdist under "
                              "the peers venv's src/ or pass --llama-cpp-src")
    return found[-1].parent


def prepare_llama_cpp(checkpoint: Path, variant: str, args) -> Path:
    f32 = args.work / f"gguf-{checkpoint.name}-f32.gguf"
    if not f32.exists():
        run_tool([args.peers_python, "-c", CONVERT_GGUF, llama_cpp_source(args), checkpoint, "--outtype", "f32",
                  "--outfile", f32], "convert_hf_to_gguf")
    if variant == "fp32":
        return f32
    q4 = args.work / f"gguf-{checkpoint.name}-q4_0.gguf"
    if not q4.exists():
        run_tool([args.peers_python, "-c", QUANTIZE_GGUF, f32, q4, args.threads], "llama_model_quantize")
    return q4


def prepare_ort(checkpoint: Path, variant: str, args) -> Path:
    out = args.work / f"ort-{checkpoint.name}-{variant}"
    if not (out / "genai_config.json").exists():
        extra = ["--extra_options", "accuracy_level=4"] if variant == "int4" else []  # int8 activations
        run_tool([args.peers_python, "-m", "onnxruntime_genai.models.builder", "-i", checkpoint, "-o", out,
                  "-p", variant, "-e", "cpu", "-c", args.work / "ort-cache", *extra], "onnxruntime_genai builder")
    config_file = out / "genai_config.json"
    config = json.loads(config_file.read_text())
    config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = args.threads
    config_file.write_text(json.dumps(config, indent=2))
    return out


PREPARE = {"kiln": prepare_kiln, "llama.cpp": prepare_llama_cpp, "ort": prepare_ort,
           "transformers": lambda checkpoint, variant, args: checkpoint}
IMPORTS = {"kiln": "kiln", "llama.cpp": "llama_cpp", "ort": "onnxruntime_genai", "transformers": "transformers"}


def engine_python(engine: str, args) -> str:
    return sys.executable if engine == "kiln" else args.peers_python


def check_installed(engine: str, args) -> None:
    python = engine_python(engine, args)
    try:
        res = subprocess.run([python, "-c", f"import {IMPORTS[engine]}"], capture_output=True, text=True)
    except OSError as e:
        raise PeerUnavailable(f"cannot run {python}: {e.strerror}") from None
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["?"])[-1]
        raise PeerUnavailable(f"{IMPORTS[engine]} is not importable in {python}: {last}")


# -- one measurement, in a fresh process ----------------------------------------------------------------


def argmax_rows(logits) -> list[int]:
    import numpy as np

    return [int(i) for i in np.asarray(logits).reshape(len(logits), -1).argmax(-1)]


class KilnEngine:
    max_batch = BATCH

    def __init__(self, model: str, threads: int, context: int):
        from kiln.artifact import load_artifact
        from kiln.runtime.kv_cache import KVCacheConfig
        from kiln.runtime.model_runner import ModelRunner

        artifact = load_artifact(model)
        spec = artifact.spec
        kv = KVCacheConfig.for_model(spec.context_len, spec.kv_bytes_per_token, max_num_seqs=BATCH)
        self.runner, self.seq_ids = ModelRunner(artifact, kv_config=kv), []

    def prefill(self, prompts: list[list[int]]) -> list[int]:
        for s in self.seq_ids:
            self.runner.kv.remove_sequence(s)
        self.seq_ids = list(range(len(prompts)))
        for s in self.seq_ids:
            self.runner.kv.add_sequence(s)
        return argmax_rows(self.runner.forward(self.seq_ids, prompts))

    def decode(self, tokens: list[int]) -> list[int]:
        return argmax_rows(self.runner.forward(self.seq_ids, [[t] for t in tokens]))


class LlamaCppEngine:
    max_batch = 1  # llama-cpp-python's Llama runs one sequence

    def __init__(self, model: str, threads: int, context: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=model, n_ctx=context, n_batch=512, n_ubatch=512, n_threads=threads,
                         n_threads_batch=threads, verbose=False)

    def prefill(self, prompts: list[list[int]]) -> list[int]:
        (prompt,) = prompts
        self.llm.reset()
        return self.decode(prompt)

    def decode(self, tokens: list[int]) -> list[int]:
        import llama_cpp
        import numpy as np

        self.llm.eval(tokens)
        row = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)  # the last token's logits
        return [int(np.ctypeslib.as_array(row, shape=(self.llm.n_vocab(),)).argmax())]


class OrtEngine:
    max_batch = BATCH

    def __init__(self, model: str, threads: int, context: int):
        import onnxruntime_genai as og

        self.og, self.model, self.context = og, og.Model(model), context

    def prefill(self, prompts: list[list[int]]) -> list[int]:
        import numpy as np

        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.context, batch_size=len(prompts), do_sample=False)
        self.gen = self.og.Generator(self.model, params)
        self.gen.append_tokens(np.asarray(prompts, dtype=np.int32))  # runs the prompt
        return self.decode([])

    def decode(self, tokens: list[int]) -> list[int]:
        self.gen.generate_next_token()  # runs the last chosen tokens (none after a prefill), then picks greedily
        return [int(t) for t in self.gen.get_next_tokens()]


class TransformersEngine:
    max_batch = BATCH

    def __init__(self, model: str, threads: int, context: int):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()

    def prefill(self, prompts: list[list[int]]) -> list[int]:
        self.past = None
        return self._step(prompts)

    def decode(self, tokens: list[int]) -> list[int]:
        return self._step([[t] for t in tokens])

    def _step(self, rows: list[list[int]]) -> list[int]:
        with self.torch.inference_mode():
            out = self.model(self.torch.tensor(rows), past_key_values=self.past, use_cache=True, logits_to_keep=1)
        self.past = out.past_key_values
        return argmax_rows(out.logits[:, -1])


ENGINES = {"kiln": KilnEngine, "llama.cpp": LlamaCppEngine, "ort": OrtEngine, "transformers": TransformersEngine}


def timed_decode(engine, tokens: list[int], steps: int) -> tuple[float, list[int]]:
    """Seconds for ``steps`` decode steps after one untimed step, and the first row's tokens."""
    tokens = engine.decode(tokens)
    out = [tokens[0]]
    t = time.perf_counter()
    for _ in range(steps):
        tokens = engine.decode(tokens)
        out.append(tokens[0])
    return time.perf_counter() - t, out


def measure(req: dict) -> dict:
    """Run one engine variant on the request's prompts; the result row (speeds, greedy tokens, RSS)."""
    t = time.perf_counter()
    engine = ENGINES[req["engine"]](req["model"], req["threads"], req["context"])
    load_s = time.perf_counter() - t
    prompt, steps = req["prompt"], req["decode_steps"]
    engine.decode(engine.prefill([prompt[:16]]))  # warm-up
    t = time.perf_counter()
    first = engine.prefill([prompt])
    prefill_s = time.perf_counter() - t
    decode_s, rest = timed_decode(engine, first, steps)
    row = {"load_s": load_s, "prefill_tok_s": len(prompt) / prefill_s, "decode1_tok_s": steps / decode_s,
           "greedy": (first + rest)[:GREEDY_TOKENS], "decode8_tok_s": None}
    if engine.max_batch >= BATCH:
        decode_s, _ = timed_decode(engine, engine.prefill(req["batch_prompts"]), steps)
        row["decode8_tok_s"] = BATCH * steps / decode_s
    row["peak_rss_mb"] = peak_rss_mb()
    return row


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not getrusage's ru_maxrss: a child that subprocess starts by
    vfork inherits its parent's peak through exec, and the parent holds 1 GiB for the bandwidth test."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child_env(threads: int) -> dict:
    n = str(threads)
    return {**os.environ, "TVM_NUM_THREADS": n, "OMP_NUM_THREADS": n, "OMP_WAIT_POLICY": "PASSIVE",
            "MKL_NUM_THREADS": n, "TOKENIZERS_PARALLELISM": "false"}


def run_child(python: str, req: dict, threads: int, timeout: int) -> dict:
    """One measurement in a fresh process: its result row, or {"error": ...}."""
    try:
        res = subprocess.run([python, __file__, "--child", json.dumps(req)], capture_output=True, text=True,
                             env=child_env(threads), timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = res.stdout.strip().splitlines()
    if res.returncode != 0 or not lines:
        tail = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit {res.returncode}: {tail[:300]}"}
    return json.loads(lines[-1])


# -- the driver ------------------------------------------------------------------------------------------


def read_bandwidth() -> float:
    """Bytes/s of a NumPy sum over 1 GiB of float32, best of 5."""
    import numpy as np

    a = np.ones(1 << 28, dtype=np.float32)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t)
    return a.nbytes / best


def make_workload(checkpoint: Path, args) -> dict:
    import numpy as np

    ctx = context_len(checkpoint)
    prompt_len = min(args.prompt_len, ctx - args.decode_steps - 8)  # the demo model's context is 512
    rng = np.random.default_rng(SEED)
    vocab = json.loads((checkpoint / "config.json").read_text())["vocab_size"]
    return {"prompt": rng.integers(3, vocab, prompt_len).tolist(), "decode_steps": args.decode_steps,
            "batch_prompts": rng.integers(3, vocab, (BATCH, max(1, prompt_len // BATCH))).tolist(),
            "context": prompt_len + args.decode_steps + 8, "threads": args.threads}


def prepare_cases(checkpoint: Path, args) -> tuple[list[dict], list[dict]]:
    """(cases to run: engine, variant, model path, python; skipped: engine, variant, reason)."""
    cases, skipped = [], []
    for engine in args.engines:
        variants = [v for v in VARIANTS[engine] if v in args.variants]
        try:
            check_installed(engine, args)
        except PeerUnavailable as e:
            skipped += [{"engine": engine, "variant": v, "reason": str(e)} for v in variants]
            continue
        for variant in variants:
            print(f"preparing {engine} {variant}", file=sys.stderr, flush=True)
            try:
                model = PREPARE[engine](checkpoint, variant, args)
            except PeerUnavailable as e:
                skipped.append({"engine": engine, "variant": variant, "reason": str(e)})
                continue
            cases.append({"engine": engine, "variant": variant, "model": str(model),
                          "python": engine_python(engine, args)})
    return cases, skipped


def median_or_none(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(case: dict, runs: list[dict], reference: list[int] | None, weight_bytes: int, bandwidth: float) -> dict:
    ok = [r for r in runs if "error" not in r]
    row = {"engine": case["engine"], "variant": case["variant"], "model": case["model"], "runs": runs,
           **{m: median_or_none([r[m] for r in ok]) for m in METRICS}}
    row["greedy_agreement"] = None
    if ok and reference and case["variant"] == "fp32":
        n = min(len(reference), len(ok[0]["greedy"]))
        row["greedy_agreement"] = sum(a == b for a, b in zip(reference, ok[0]["greedy"])) / n
    row["decode1_bandwidth_fraction"] = None
    if row["decode1_tok_s"] and case["variant"] == "fp32":
        row["decode1_bandwidth_fraction"] = weight_bytes * row["decode1_tok_s"] / bandwidth
    return row


def benchmark(args) -> dict:
    args.work.mkdir(parents=True, exist_ok=True)
    checkpoint = build_checkpoint(args.shape, args.work)
    workload = make_workload(checkpoint, args)
    cases, skipped = prepare_cases(checkpoint, args)
    runs: dict[int, list[dict]] = {i: [] for i in range(len(cases))}
    bandwidths = []
    for r in range(args.rounds):
        bandwidths.append(read_bandwidth())
        for i, case in enumerate(cases):
            req = {**workload, "engine": case["engine"], "model": case["model"]}
            runs[i].append(run_child(case["python"], req, args.threads, args.timeout))
            speed = runs[i][-1].get("decode1_tok_s") or runs[i][-1].get("error")
            print(f"round {r + 1}/{args.rounds} {case['engine']} {case['variant']}: {speed}", file=sys.stderr,
                  flush=True)
    reference = next((run["greedy"] for i, c in enumerate(cases) if c["engine"] == "transformers"
                      for run in runs[i] if "greedy" in run), None)
    bandwidth = statistics.median(bandwidths)
    weight_bytes = weight_bytes_fp32(checkpoint)
    return {"shape": args.shape, "checkpoint": str(checkpoint), "threads": args.threads, "rounds": args.rounds,
            "prompt_len": len(workload["prompt"]), "decode_steps": args.decode_steps,
            "batch_prompt_len": len(workload["batch_prompts"][0]), "read_bandwidth_bytes_s": bandwidth,
            "read_bandwidth_per_round": bandwidths,
            "weight_bytes_fp32": weight_bytes, "command": " ".join(sys.argv),
            "rows": [summarize(c, runs[i], reference, weight_bytes, bandwidth) for i, c in enumerate(cases)],
            "skipped": skipped}


# -- the report ------------------------------------------------------------------------------------------


def fmt(value, digits: int = 1) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def best_peer(rows: list[dict], kiln_row: dict, metric: str) -> dict | None:
    """The fastest non-kiln row of the same precision class (fp32, or 4-bit weights) on ``metric``."""
    four_bit = kiln_row["variant"] in FOUR_BIT
    peers = [r for r in rows if r["engine"] != "kiln" and (r["variant"] in FOUR_BIT) == four_bit and r[metric]]
    return max(peers, key=lambda r: r[metric], default=None)


def markdown(result: dict) -> str:
    rows = result["rows"]
    lines = [f"{result['shape']}, {result['threads']} threads, {result['rounds']} rounds (medians), prompt "
             f"{result['prompt_len']} tokens, {result['decode_steps']} decode steps, batch {BATCH} of "
             f"{result['batch_prompt_len']}-token prompts; read bandwidth "
             f"{result['read_bandwidth_bytes_s'] / 1e9:.1f} GB/s, fp32 weights "
             f"{result['weight_bytes_fp32'] / 1e9:.3f} GB", "",
             "| engine | variant | " + " | ".join(METRICS.values()) + " | greedy agreement | fp32 decode / bandwidth |",
             "|---|---|" + "---|" * (len(METRICS) + 2)]
    for r in rows:
        cells = [fmt(r[m], 2 if m == "load_s" else 1) for m in METRICS]
        lines.append(f"| {r['engine']} | {r['variant']} | " + " | ".join(cells) +
                     f" | {fmt(r['greedy_agreement'], 3)} | {fmt(r['decode1_bandwidth_fraction'], 3)} |")
    lines += ["", "| kiln variant | metric | kiln | best peer | kiln / best peer |", "|---|---|---|---|---|"]
    for k in (r for r in rows if r["engine"] == "kiln"):
        for metric in ("prefill_tok_s", "decode1_tok_s", "decode8_tok_s"):
            peer = best_peer(rows, k, metric)
            ratio = k[metric] / peer[metric] if peer and k[metric] else None
            name = f"{peer['engine']} {peer['variant']} {fmt(peer[metric])}" if peer else "—"
            lines.append(f"| {k['variant']} | {METRICS[metric]} | {fmt(k[metric])} | {name} | {fmt(ratio, 2)} |")
    lines += [f"- skipped {s['engine']} {s['variant']}: {s['reason']}" for s in result["skipped"]]
    lines += [f"- {r['engine']} {r['variant']} round {i + 1} failed: {run['error']}"
              for r in rows for i, run in enumerate(r["runs"]) if "error" in run]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [f"{r['engine']}\n{r['variant']}" for r in rows]
    metrics = ("prefill_tok_s", "decode1_tok_s", "decode8_tok_s", "peak_rss_mb")
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4.5))
    for ax, metric in zip(axes, metrics):
        ax.bar(range(len(rows)), [r[metric] or 0 for r in rows],
               color=["tab:red" if r["engine"] == "kiln" else "tab:gray" for r in rows])
        ax.set_xticks(range(len(rows)), labels, rotation=60, fontsize=7)
        ax.set_title(METRICS[metric])
    fig.suptitle(f"{result['shape']}, {result['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen2.5-0.5b", help="demo, " + ", ".join(SHAPES))
    ap.add_argument("--engines", default=",".join(VARIANTS), help="comma-separated: " + ",".join(VARIANTS))
    ap.add_argument("--variants", default=",".join(sorted({v for vs in VARIANTS.values() for v in vs})),
                    help="comma-separated variant names to run (fp32, rtn-w4g128, w4a8, q4_0, int4)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "bench-peers", help="checkpoints and conversions")
    ap.add_argument("--out", type=Path, default=Path("bench-peers.json"))
    ap.add_argument("--arch", help="kiln compile --arch (default: kiln's default)")
    ap.add_argument("--peers-python", default=sys.executable, help="python of the venv holding the peers")
    ap.add_argument("--llama-cpp-src", type=Path, help="llama.cpp source with convert_hf_to_gguf.py and gguf-py")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds one measurement may take")
    args = ap.parse_args(argv)
    args.engines, args.variants = args.engines.split(","), args.variants.split(",")
    known_variants = {v for vs in VARIANTS.values() for v in vs}
    if args.shape != "demo" and args.shape not in SHAPES:
        ap.error(f"unknown shape {args.shape!r}; choose demo, {', '.join(SHAPES)}")
    if bad := [e for e in args.engines if e not in VARIANTS] + [v for v in args.variants if v not in known_variants]:
        ap.error(f"unknown engine or variant {', '.join(bad)}; engines: {', '.join(VARIANTS)}; variants: "
                 f"{', '.join(sorted(known_variants))}")
    if min(args.rounds, args.threads, args.prompt_len, args.decode_steps) < 1:
        ap.error("--rounds, --threads, --prompt-len and --decode-steps must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        print(json.dumps(measure(json.loads(argv[1]))))
        return
    args = parse_args(argv)
    args.work = args.work.resolve()
    result = benchmark(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    table = markdown(result)
    args.out.with_suffix(".md").write_text(table)
    plot(result, args.out.with_suffix(".png"))
    print(table)


if __name__ == "__main__":
    main()
