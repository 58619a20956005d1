"""kiln's command line: compile, generate, inspect, serve, bench, chat, calibrate, eval.

Errors a user can cause (KilnError) print one line and exit 1, without a traceback.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
import sys
import time
from functools import wraps
from pathlib import Path

import click

from .errors import KilnError, RequestError


def _user_errors(fn):
    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            result = fn(*args, **kwargs)
            sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at the interpreter's exit
            return result
        except KilnError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except BrokenPipeError:  # the reader left (`kiln inspect ART | head -1`): stop quietly, as Unix tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush must not fail again
            sys.exit(141)  # 128 + SIGPIPE, what a shell reports for a tool SIGPIPE ended
        except OSError as e:  # a path the user named cannot be read or written (permissions, disk full, ...)
            where = f": {e.filename}" if e.filename else ""
            click.echo(f"error: {e.strerror or e}{where}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


class _Progress:
    """One line per stage on stderr with the time the previous stage took."""

    def __init__(self, quiet: bool = False):
        self.quiet, self.t0, self.t = quiet, time.perf_counter(), None

    def __call__(self, stage: str) -> None:
        if self.quiet:
            return
        now = time.perf_counter()
        click.echo(f"[{now - self.t0:6.1f}s] {stage} ...", err=True)
        self.t = now


class _ProgressLines(logging.Handler):
    """Prints the long steps' progress lines (kiln/progress.py) on stderr, timed as _Progress's."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.t0 = time.perf_counter()

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"[{time.perf_counter() - self.t0:6.1f}s]   {record.getMessage()}", err=True)


def _show_progress(on: bool = True) -> None:
    """Route the ``kiln.progress`` logger to stderr (one handler, however many commands one process runs)."""
    log = logging.getLogger("kiln.progress")
    for h in [h for h in log.handlers if isinstance(h, _ProgressLines)]:
        log.removeHandler(h)
    log.addHandler(_ProgressLines())
    log.setLevel(logging.INFO if on else logging.WARNING)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kiln")
def main():
    """kiln: compile an LLM once with TVM, then serve or generate from the artifact."""
    _show_progress()


def _sharing_map(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise KilnError(f"--kv-sharing {text!r}: expected comma-separated layer indices, one per layer") from None


def _warn_unused_calib(model_dir: Path, quant: str | None, calib: Path | None) -> None:
    """--calib with a scheme that reads no activation statistics: one warning line (the user expected it to count).
    A pre-quantized checkpoint gets none: the compile refuses its --calib with its own error."""
    if calib is None:
        return
    from .errors import KilnError
    from .frontend.hf import prequantized
    from .quant.schemes import SCHEMES, get_scheme

    if quant is not None and get_scheme(quant).needs_calib:
        return
    try:
        if quant is None and Path(model_dir).is_dir() and prequantized(model_dir) is not None:
            return
    except KilnError:
        return  # the compile says what is wrong with the checkpoint
    readers = ", ".join(name for name, s in SCHEMES.items() if s.needs_calib)
    what = f"--quant {quant}" if quant else "a compile without --quant"
    click.echo(f"warning: --calib {calib} is ignored: {what} reads no activation statistics (only {readers} do)",
               err=True)


@main.command("compile")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="artifact directory")
@click.option("--target", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--arch", default=None,
              help="cuda: sm_80, sm_86, sm_89, sm_90 (default), sm_90a; cpu: native (default: this machine's CPU, "
                   "as -march=native), x86-64 (any x86-64 CPU), x86-64-v3 (AVX2), x86-64-v4 (AVX-512)")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="weights and activations; default: the checkpoint's")
@click.option("--context-len", type=click.IntRange(min=16), default=None,
              help="longest sequence served; default: the model's max_position_embeddings")
@click.option("--dump-ir", type=click.Path(path_type=Path), default=None, help="write the module after every pass")
@click.option("--config-only", is_flag=True,
              help="compile from config.json alone: no weights are read or stored (run with random weights, "
                   "for benchmarks); without a tokenizer a placeholder one is written")
@click.option("--quant", default=None, metavar="SCHEME",
              help="quantize the decoder linears: rtn-w4g128, awq-w4g128, rtn-w3g128, awq-w3g128, w4a8, w8a8")
@click.option("--calib", type=click.Path(path_type=Path), default=None,
              help="activation statistics from `kiln calibrate` (awq-*, w4a8, w8a8 need them)")
@click.option("--tokenizer", type=click.Path(path_type=Path), default=None,
              help="for a .pt2/.onnx graph: the directory with tokenizer.json (and ideally the model's config.json)")
@click.option("--no-fuse", is_flag=True, help="skip the fusion passes (to measure what they bring)")
@click.option("--kv-sharing", default=None, metavar="MAP",
              help="cross-layer KV sharing for a model trained with it: per layer, comma-separated, the layer whose "
                   "K/V it attends to (its own index for a KV owner), e.g. 0,1,1,3,3,3,0,7,7,9,9,9,0; overrides "
                   "the config's kv_sources")
@click.option("--max-batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="cuda: the most sequences one decode step runs; the decode CUDA graphs' memory is planned for "
                   "it and serving refuses more (--max-num-seqs)")
@click.option("--no-cuda-graph", is_flag=True, help="cuda: launch every decode kernel from the VM (no CUDA graphs)")
@click.option("-q", "--quiet", is_flag=True)
@_user_errors
def compile_cmd(model_dir, out, target, arch, dtype, context_len, dump_ir, config_only, quant, calib, tokenizer,
                no_fuse, kv_sharing, max_batch_size, no_cuda_graph, quiet):
    """Compile MODEL_DIR into an artifact: a Hugging Face checkpoint directory, or a model graph exported with
    torch.export (.pt2) or to ONNX (.onnx), whose structure kiln recognises (needs --tokenizer)."""
    from .compiler import CompileConfig, compile_model

    _show_progress(not quiet)
    _warn_unused_calib(model_dir, quant, calib)
    progress = _Progress(quiet)
    report = compile_model(model_dir, out, CompileConfig(target=target, arch=arch, dtype=dtype,
                                                         context_len=context_len, dump_ir=dump_ir,
                                                         config_only=config_only, quant=quant, calib=calib,
                                                         tokenizer=tokenizer, fuse=not no_fuse,
                                                         kv_sharing=_sharing_map(kv_sharing),
                                                         cuda_graph=not no_cuda_graph,
                                                         max_batch_size=max_batch_size),
                           progress)
    secs = ", ".join(f"{k} {v:.1f}s" for k, v in report.seconds.items())
    click.echo(f"wrote {out} ({report.artifact_bytes / 1e6:.1f} MB; {secs})")


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="the text to continue")
@click.option("--max-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0.0, max=100.0), default=0.0, show_default=True,
              help="0 is greedy")
@click.option("--top-p", type=click.FloatRange(min=0.0, max=1.0, min_open=True), default=1.0, show_default=True)
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="0 is no limit")
@click.option("--seed", type=int, default=None)
@click.option("--ignore-eos", is_flag=True, help="keep going past the end-of-sequence token")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object with token ids and text")
@_user_errors
def generate(artifact, prompt, max_tokens, temperature, top_p, top_k, seed, ignore_eos, as_json):
    """Generate a completion of PROMPT with ARTIFACT."""
    from .runtime import LLM, SamplingParams

    llm = LLM(artifact)
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                            ignore_eos=ignore_eos)
    t = time.perf_counter()
    (res,) = llm.generate([prompt], params)
    secs = time.perf_counter() - t
    if as_json:
        click.echo(json.dumps({"prompt": prompt, "prompt_token_ids": res.prompt_token_ids,
                               "token_ids": res.token_ids, "text": res.text, "finish_reason": res.finish_reason}))
    else:
        click.echo(prompt + res.text)
        click.echo(f"[{len(res.token_ids)} tokens in {secs:.2f}s, finish: {res.finish_reason}]", err=True)


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
@click.option("--seq-len", type=click.IntRange(min=1), default=None,
              help="also report one sequence's KV bytes at this length (default: the context length)")
@_user_errors
def inspect(artifact, as_json, seq_len):
    """Show an artifact's model spec, target, sizes and KV bytes per token."""
    from .artifact import load_artifact

    art = load_artifact(artifact)
    spec = art.spec
    seq_len = seq_len or spec.context_len
    sizes = art.file_sizes()
    info = {
        "path": str(art.path), "kiln_version": art.manifest.kiln_version,
        "tvm_version": art.manifest.tvm_version, "target": art.target, "spec": spec.to_json(),
        # the model's parameters (elements, as transformers counts them; a quantized linear counts its weight's
        # elements, not its packed words) and the tensors the artifact stores
        "num_params": _num_model_params(spec), "num_tensors": len(art.param_names),
        "files": sizes, "total_bytes": sum(sizes.values()),
        "kv_bytes_per_token": spec.kv_bytes_per_token,
        # per attention group: its KV-owning layers and the bytes one token costs in each of them; a sliding
        # group keeps only the last sliding_window tokens of a sequence
        "kv_groups": {t: {"owners": list(o), "bytes_per_token": len(o) * spec.kv_bytes_per_token_per_layer,
                          "window": spec.sliding_window if t == "sliding" else None}
                      for t, o in spec.kv_owners.items() if o},
        # one sequence of seq_len tokens: global owners x L + sliding owners x min(L, W), per group
        "kv_bytes_per_sequence": {"seq_len": seq_len, **spec.kv_bytes(seq_len)},
        "weights": "included" if art.has_weights else "none",
        "tokenizer": "placeholder" if art.placeholder_tokenizer else "included",
        "quant": art.manifest.options.quant,
    }
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    t = art.target
    click.echo(f"artifact    {art.path}  (kiln {info['kiln_version']}, TVM {info['tvm_version']})")
    click.echo(f"target      {t['name']}{' ' + t['arch'] if t.get('arch') else ''}")
    click.echo(f"model       {spec.architecture}, {spec.dtype}: {spec.num_layers} layers, hidden {spec.hidden_size}, "
               f"heads {spec.num_q_heads}/{spec.num_kv_heads} kv x {spec.head_dim}, ffn {spec.intermediate_size}, "
               f"vocab {spec.vocab_size}")
    rope = spec.rope
    click.echo(f"attention   context {spec.context_len}, rope {rope.type} theta {rope.theta:g}"
               f"{f' factor {rope.factor:g}' if rope.type != 'default' else ''}, "
               f"{'sliding window ' + str(spec.sliding_window) if spec.sliding_window else 'global'}"
               f"{', qkv bias' if spec.attention_bias else ''}{', q/k norm' if spec.qk_norm else ''}"
               f"{', tied embeddings' if spec.tie_word_embeddings else ''}")
    per = f"2 x {spec.num_kv_heads} kv heads x {spec.head_dim} x {spec.dtype_bytes} B"
    for t, g in info["kv_groups"].items():
        n = len(g["owners"])
        keeps = f", kept for the last {g['window']} tokens" if g["window"] else ""
        click.echo(f"kv cache    {t}: {g['bytes_per_token']} bytes per token ({per} x {n} KV-owning "
                   f"layer{'s' if n != 1 else ''}{keeps})")
    b = info["kv_bytes_per_sequence"]
    click.echo(f"kv cache    one {seq_len}-token sequence: {b['global'] + b['sliding']} bytes "
               f"(global {b['global']}, sliding {b['sliding']})")
    if len(set(spec.kv_sources)) < spec.num_layers:
        click.echo(f"kv sharing  {sum(src != i for i, src in enumerate(spec.kv_sources))} layers attend to an "
                   f"earlier layer's KV: {', '.join(f'{i}->{s}' for i, s in enumerate(spec.kv_sources) if s != i)}")
    if info["quant"]:
        src = art.manifest.options.source_format
        click.echo(f"quant       {info['quant']} (decoder linears; embedding and lm_head in {spec.dtype})"
                   f"{', from an AutoAWQ checkpoint' if src == 'autoawq' else ''}")
    if not art.has_weights:
        click.echo("weights     none (compiled from config.json alone): runs only with random weights, for benchmarks")
    if art.placeholder_tokenizer:
        click.echo(f"tokenizer   placeholder (byte-level, {spec.vocab_size} ids, no merges): its text is meaningless")
    for name, size in sorted(sizes.items()):
        click.echo(f"  {name:<24} {size / 1e6:9.2f} MB")
    click.echo(f"  {'total':<24} {info['total_bytes'] / 1e6:9.2f} MB")


def _num_model_params(spec) -> int:
    """The model's parameter count: the elements of its weights in the reference form, a tied lm_head once, no
    K/V projections for a layer that reads another layer's KV."""
    from .frontend.reference import param_shapes
    from .ir.spec import shared_kv_params

    shared = shared_kv_params(spec.kv_sources)
    return sum(math.prod(shape) for name, shape in param_shapes(spec).items() if name not in shared)


_BYTE_UNITS = {"": 1, "b": 1,  # k, kb: 1000; ki, kib: 1024 (and so on up to t)
               **{p + s: 1000 ** (i + 1) for i, p in enumerate("kmgt") for s in ("", "b")},
               **{p + s: 1024 ** (i + 1) for i, p in enumerate("kmgt") for s in ("i", "ib")}}


def parse_memory(text: str) -> int | float:
    """``--kv-cache-memory``: a fraction of the device's memory (``0.5``, ``1.0``: it has a decimal point)
    or a byte count (``1000000``, ``512MiB``, ``2GiB``, ``1.5GB``)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _BYTE_UNITS:
        raise KilnError(f"--kv-cache-memory {text!r} is neither a fraction (0.5) nor a size (1000000, 512MiB, 2GiB)")
    number = m.group(1)
    if not m.group(2) and "." in number:
        fraction = float(number)
        if not 0.0 < fraction <= 1.0:
            raise KilnError(f"--kv-cache-memory {text!r}: a fraction of device memory must be in (0, 1]")
        return fraction
    size = int(float(number) * _BYTE_UNITS[unit])
    if size <= 0:
        raise KilnError(f"--kv-cache-memory {text!r}: the size must be positive")
    return size


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to listen on (0.0.0.0 for every interface)")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0 picks a free port")
@click.option("--api-key", default=None, envvar="KILN_API_KEY",
              help="require 'Authorization: Bearer KEY' on the /v1/ routes (or set KILN_API_KEY)")
@click.option("--policy", type=click.Choice(["fcfs", "vtc"]), default=None,
              help="fcfs: first come, first served (default); vtc: a fair share per user")
@click.option("--max-num-seqs", type=click.IntRange(min=1), default=None,
              help="sequences running at once (default 64)")
@click.option("--max-batched-tokens", type=click.IntRange(min=1), default=None,
              help="tokens computed per step: prefill chunks plus decodes (default 512)")
@click.option("--kv-cache-memory", default=None,
              help="KV cache size: bytes (1000000, 512MiB, 2GiB) or a fraction of device memory (default 0.25)")
@_user_errors
def serve(artifact, host, port, api_key, policy, max_num_seqs, max_batched_tokens, kv_cache_memory):
    """Serve ARTIFACT over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions)."""
    # options first: a bad value fails before the slow imports and the model load
    given = {"policy": policy, "max_num_seqs": max_num_seqs, "max_batched_tokens": max_batched_tokens,
             "kv_cache_memory": None if kv_cache_memory is None else parse_memory(kv_cache_memory)}
    import asyncio
    import socket

    import uvicorn

    from .runtime.engine import AsyncEngine, Engine, EngineConfig
    from .server import build_app

    config = EngineConfig(**{k: v for k, v in given.items() if v is not None})
    sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    engine = Engine(artifact, config)
    if engine.decode_graph_bound is not None:  # capture now, not in the first clients' steps
        t = time.perf_counter()
        sizes = engine.capture_decode_graphs()
        click.echo(f"kiln: captured decode CUDA graphs at {len(sizes)} batch sizes in {time.perf_counter() - t:.1f}s")
    app = build_app(AsyncEngine(engine), api_key=api_key)
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5))
    bound = sock.getsockname()[1]
    url = f"http://{f'[{host}]' if ':' in host else host}:{bound}"

    async def run():
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started:
            click.echo(f"kiln: serving {engine.model_name} at {url}/v1 (Ctrl-C stops)")
        await task

    asyncio.run(run())


def _bench_parser(module: str, name: str):
    """A click callback running ``kiln.bench.<module>.<name>(text)`` (imported when used); its ValueError
    becomes a one-line usage error (exit code 2)."""

    def callback(ctx, param, value):
        from importlib import import_module

        if value is None:
            return None
        try:
            return getattr(import_module(f"kiln.bench.{module}"), name)(value)
        except ValueError as e:
            raise click.BadParameter(str(e)) from None

    return callback


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--mode", type=click.Choice(["latency", "throughput", "serving", "all"]), default="all",
              show_default=True)
@click.option("--batch-sizes", default="1,8,32", show_default=True, metavar="N,N,...",
              callback=_bench_parser("workload", "parse_positive_ints"), help="latency: batch sizes to time")
@click.option("--input-len", type=click.IntRange(min=1), default=32, show_default=True, help="latency: prompt tokens")
@click.option("--output-len", type=click.IntRange(min=1), default=128, show_default=True,
              help="latency: decode steps timed")
@click.option("--num-prompts", type=click.IntRange(min=1), default=200, show_default=True,
              help="throughput, serving: requests (ShareGPT-like lengths)")
@click.option("--request-rates", default="1,4,16,inf", show_default=True, metavar="RATE,...",
              callback=_bench_parser("workload", "parse_rates"), help="serving: requests/s (Poisson arrivals)")
@click.option("--slo", default=None, metavar="KIND:MS,...", callback=_bench_parser("metrics", "parse_slo"),
              help="serving: goodput counts requests meeting all of ttft:MS,tpot:MS,e2el:MS")
@click.option("--seed", type=int, default=0, show_default=True, help="prompts, lengths and arrivals")
@click.option("--max-num-seqs", type=click.IntRange(min=1), default=None,
              help="sequences running at once (default 64, or the largest batch size)")
@click.option("--max-batched-tokens", type=click.IntRange(min=1), default=None,
              help="tokens computed per step (default 512, or the largest batch size)")
@click.option("--kv-cache-memory", default=None,
              help="KV cache size: bytes (1000000, 512MiB, 2GiB) or a fraction of device memory (default 0.25)")
@click.option("--random-weights", type=int, is_flag=False, flag_value=0, default=None, metavar="[SEED]",
              help="seeded random weights instead of the artifact's (seed 0 when none is given)")
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="write all results as one JSON object")
@click.option("--plot", "plot_dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="write PNG plots into this directory")
@click.option("--no-progress", is_flag=True, help="no progress bars on stderr")
@_user_errors
def bench(artifact, mode, batch_sizes, input_len, output_len, num_prompts, request_rates, slo, seed, max_num_seqs,
          max_batched_tokens, kv_cache_memory, random_weights, json_path, plot_dir, no_progress):
    """Benchmark ARTIFACT on the serving engine: offline latency per batch size, offline throughput,
    online serving at several request rates (TTFT, TPOT, ITL, E2EL, goodput). Summary on stdout."""
    from .bench import BenchConfig, engine_config, run_bench
    from .bench.report import summary, write_json

    options = click.get_current_context().params
    if json_path is not None and not json_path.parent.is_dir():  # fail now, not after the benchmark
        raise KilnError(f"--json {json_path}: the directory {json_path.parent} does not exist")
    config = BenchConfig(modes=("latency", "throughput", "serving") if mode == "all" else (mode,),
                         batch_sizes=tuple(batch_sizes), input_len=input_len, output_len=output_len,
                         num_prompts=num_prompts, request_rates=tuple(request_rates), slo_ms=slo or {}, seed=seed,
                         progress=not no_progress)
    engine_cfg = engine_config(config, max_num_seqs, max_batched_tokens,
                               None if kv_cache_memory is None else parse_memory(kv_cache_memory), random_weights)
    result = run_bench(artifact, config, engine_cfg)
    result["options"] = dict(options)
    click.echo(summary(result))
    if json_path is not None:
        write_json(result, json_path)
        click.echo(f"wrote {json_path}", err=True)
    if plot_dir is not None:
        from .bench.plots import write_plots

        for path in write_plots(result, plot_dir):
            click.echo(f"wrote {path}", err=True)


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--system", default=None, help="a system message that opens the conversation")
@click.option("--max-tokens", type=click.IntRange(min=1), default=256, show_default=True, help="per reply")
@click.option("--temperature", type=click.FloatRange(min=0.0, max=100.0), default=0.7, show_default=True,
              help="0 is greedy")
@click.option("--seed", type=int, default=None)
@_user_errors
def chat(artifact, system, max_tokens, temperature, seed):
    """Chat with ARTIFACT in the terminal, through its chat template.

    Replies stream as they are generated; the conversation is kept. /reset clears it, /exit or EOF
    (Ctrl-D) quits, Ctrl-C cuts a reply short."""
    from .runtime.chat_template import template_source
    from .runtime.engine import Engine, EngineConfig

    engine = Engine(artifact, EngineConfig(max_num_seqs=1))
    if template_source(engine.tokenizer) is None:
        raise KilnError(f"{artifact} has no chat template; use 'kiln generate' for plain text")
    opening = [{"role": "system", "content": system}] if system else []
    history = list(opening)
    click.echo(f"chatting with {engine.model_name}: /reset clears the conversation, /exit or Ctrl-D quits", err=True)
    for turn in itertools.count():
        click.echo("> ", nl=False)
        line = sys.stdin.readline()
        if not line:  # EOF
            click.echo()
            return
        text = line.strip()
        if text == "/exit":
            return
        if text == "/reset":
            history = list(opening)
            click.echo("(conversation cleared)", err=True)
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        try:
            reply = _chat_reply(engine, history, f"chat-{turn}", max_tokens, temperature, seed)
        except RequestError as e:  # e.g. the conversation outgrew the context window: this turn only
            history.pop()
            click.echo(f"error: {e}", err=True)
            continue
        history.append({"role": "assistant", "content": reply})


def _chat_reply(engine, history: list[dict], request_id: str, max_tokens: int, temperature: float,
                seed: int | None) -> str:
    """Generate the assistant's reply to ``history`` on the synchronous engine, echoing it as it comes."""
    from .runtime.chat_template import encode_chat, render_chat
    from .runtime.outputs import Request
    from .runtime.sampler import SamplingParams

    prompt_ids = encode_chat(engine.tokenizer, render_chat(engine.tokenizer, history))
    room = engine.spec.context_len - len(prompt_ids)
    if room < 1:
        raise RequestError("the conversation fills the model's context window; /reset to start over")
    params = SamplingParams(max_tokens=min(max_tokens, room), temperature=temperature, seed=seed)
    engine.add_request(Request(request_id, prompt_ids, params))
    parts = []
    try:
        while engine.has_unfinished():
            for out in engine.step():
                for o in out.outputs:
                    click.echo(o.text, nl=False)
                    parts.append(o.text)
    except KeyboardInterrupt:  # cut this reply short, keep the conversation
        engine.abort_request(request_id)
        while engine.has_unfinished():
            engine.step()
        click.echo(" [interrupted]", nl=False)
    click.echo()
    return "".join(parts)


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="calibration text (UTF-8); default: the shipped data/calibration.txt")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="calibration file to write (safetensors, provenance in its header)")
@click.option("--num-samples", type=click.IntRange(min=1), default=128, show_default=True,
              help="blocks of calibration text")
@click.option("--seq-len", type=click.IntRange(min=1), default=512, show_default=True, help="tokens per block")
@click.option("--seed", type=int, default=0, show_default=True, help="which blocks and which sample rows")
@_user_errors
def calibrate(model_dir, data, out, num_samples, seq_len, seed):
    """Record the input statistics of every decoder linear of the Hugging Face checkpoint MODEL_DIR
    (run in PyTorch on the CPU, float32) over calibration text, for the quantization schemes."""
    from .quant.calibrate import DEFAULT_DATA, CalibrateConfig, calibrate as run_calibration, save_calibration

    if not out.parent.is_dir():  # fail now, not after the model has run
        raise KilnError(f"-o {out}: the directory {out.parent} does not exist")
    t = time.perf_counter()
    calib, meta = run_calibration(model_dir, data or DEFAULT_DATA,
                                  CalibrateConfig(num_samples=num_samples, seq_len=seq_len, seed=seed))
    save_calibration(calib, meta, out)
    click.echo(f"wrote {out}: {len(calib.mean_abs)} linears, {meta['num_blocks']} blocks, {meta['num_tokens']} tokens "
               f"({time.perf_counter() - t:.1f}s)")


@main.command("eval")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path, dir_okay=False), help="text to score (UTF-8)")
@click.option("--window", type=click.IntRange(min=2), default=None,
              help="tokens per window; default: the model's context, at most 512")
@click.option("--stride", type=click.IntRange(min=1), default=None,
              help="tokens between window starts; default: window/2")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@_user_errors
def eval_cmd(artifact, data, window, stride, as_json):
    """Perplexity of ARTIFACT on the text in --data through kiln's runtime: windows of --window tokens
    every --stride tokens, each scoring the tokens the previous window did not reach (docs/quantization.md)."""
    from .runtime.perplexity import evaluate_perplexity

    try:
        text = data.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise KilnError(f"--data {data} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    res = evaluate_perplexity(artifact, text, window=window, stride=stride)
    if as_json:
        click.echo(json.dumps({**res.to_json(), "artifact": str(artifact), "data": str(data)}))
    else:
        click.echo(f"perplexity {res.perplexity:.4f} over {res.num_tokens_scored} tokens of {data} "
                   f"(window {res.window}, stride {res.stride}, {res.num_windows} windows, {res.seconds:.1f}s)")


if __name__ == "__main__":
    main()
