"""kiln's command line: compile, generate, inspect.

Errors a user can cause (KilnError) print one line and exit 1, without a traceback.
"""

from __future__ import annotations

import json
import sys
import time
from functools import wraps
from pathlib import Path

import click

from .errors import KilnError


def _user_errors(fn):
    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KilnError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kiln")
def main():
    """kiln: compile an LLM once with TVM, then serve or generate from the artifact."""


@main.command("compile")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="artifact directory")
@click.option("--target", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--arch", default=None,
              help="cuda: sm_80, sm_86, sm_89, sm_90 (default), sm_90a; cpu: x86-64 (default, any x86-64 CPU), "
                   "x86-64-v3 (AVX2), x86-64-v4 (AVX-512)")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="weights and activations; default: the checkpoint's")
@click.option("--context-len", type=click.IntRange(min=16), default=None,
              help="longest sequence served; default: the model's max_position_embeddings")
@click.option("--dump-ir", type=click.Path(path_type=Path), default=None, help="write the module after every pass")
@click.option("-q", "--quiet", is_flag=True)
@_user_errors
def compile_cmd(model_dir, out, target, arch, dtype, context_len, dump_ir, quiet):
    """Compile a Hugging Face checkpoint directory MODEL_DIR into an artifact."""
    from .compiler import CompileConfig, compile_model

    progress = _Progress(quiet)
    report = compile_model(model_dir, out, CompileConfig(target=target, arch=arch, dtype=dtype,
                                                         context_len=context_len, dump_ir=dump_ir), progress)
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
@_user_errors
def inspect(artifact, as_json):
    """Show an artifact's model spec, target, sizes and KV bytes per token."""
    from .artifact import load_artifact

    art = load_artifact(artifact)
    spec = art.spec
    sizes = art.file_sizes()
    info = {
        "path": str(art.path), "kiln_version": art.manifest["kiln_version"],
        "tvm_version": art.manifest["tvm_version"], "target": art.target, "spec": spec.to_json(),
        "num_params": len(art.param_names), "files": sizes, "total_bytes": sum(sizes.values()),
        "kv_bytes_per_token": spec.kv_bytes_per_token,
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
    click.echo(f"kv cache    {spec.kv_bytes_per_token} bytes per token "
               f"(2 x {spec.num_layers} layers x {spec.num_kv_heads} kv heads x {spec.head_dim} x {spec.dtype_bytes} B)")
    for name, size in sorted(sizes.items()):
        click.echo(f"  {name:<24} {size / 1e6:9.2f} MB")
    click.echo(f"  {'total':<24} {info['total_bytes'] / 1e6:9.2f} MB")


if __name__ == "__main__":
    main()
