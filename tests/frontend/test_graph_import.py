"""kiln compile MODEL.pt2|MODEL.onnx --tokenizer DIR: recognised graphs generate what transformers generates.

A random-weight transformers Llama (GQA, untied) and Qwen2 (q/k/v bias, tied embeddings) are exported
with torch.export (.pt2) and with the dynamo ONNX exporter; each file is compiled for the CPU through
the recognition passes and must produce, token for token, the greedy continuation of the same model
compiled from its Hugging Face checkpoint (kiln's hand-written frontend) and of transformers' own
``generate`` — alone and in a batch. The ModelSpec read off the graph must equal the config's, and the
artifact's parameters must carry kiln's names. An ONNX export with past_key_values inputs and present
outputs (ONNX Runtime GenAI's layout) compiles too. User errors are one-line CLI errors.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import fused_param_shapes

from kiln.artifact import load_artifact
from kiln.cli import main
from kiln.compiler import CompileConfig, compile_model
from kiln.frontend.hf import load_spec
from kiln.runtime import LLM, SamplingParams

pytestmark = pytest.mark.cpu
VARIANTS = ("llama", "qwen2")
FORMATS = ("pt2", "onnx")
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def compiled(zoo, tmp_path_factory):
    """(variant, fmt) -> artifact compiled from the exported graph."""
    out = {}

    def get(variant: str, fmt: str):
        if (variant, fmt) not in out:
            model_dir, _ = zoo.hf(variant)
            art = tmp_path_factory.mktemp("graph-art") / f"{variant}-{fmt}"
            compile_model(zoo.graph(variant, fmt), art, CompileConfig(tokenizer=model_dir))
            out[variant, fmt] = art
        return out[variant, fmt]

    return get


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_graph_generates_like_transformers_and_the_hf_frontend(variant, fmt, zoo, compiled, one_torch_thread):
    _, hf = zoo.hf(variant)
    graph_llm = LLM(compiled(variant, fmt))
    hf_llm = LLM(zoo.artifact(variant))
    rng = np.random.default_rng(7)
    prompts = [rng.integers(3, 320, size=n).tolist() for n in (5, 23, 40)]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    batch = graph_llm.generate(prompts, params)  # continuous batching: all three together
    reference = hf_llm.generate(prompts, params)
    for prompt, got, ref in zip(prompts, batch, reference):
        assert got.token_ids == ref.token_ids, f"{variant} {fmt}: differs from the Hugging Face frontend"
        assert got.token_ids == hf_greedy(hf, prompt, NEW_TOKENS), f"{variant} {fmt}: differs from transformers"
    [alone] = graph_llm.generate([prompts[1]], params)
    assert alone.token_ids == batch[1].token_ids


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_spec_and_parameter_names_read_off_the_graph(variant, fmt, zoo, compiled):
    model_dir, _ = zoo.hf(variant)
    art = load_artifact(compiled(variant, fmt))
    want = load_spec(model_dir)
    got = art.spec
    ignore = {"architecture"}
    diff = {f.name: (getattr(got, f.name), getattr(want, f.name)) for f in dataclasses.fields(want)
            if f.name not in ignore and getattr(got, f.name) != getattr(want, f.name)}
    assert not diff, diff
    assert got.architecture == {"pt2": "torch.export graph", "onnx": "onnx graph"}[fmt]
    manifest = json.loads((compiled(variant, fmt) / "manifest.json").read_text())
    assert manifest["param_names"] == list(fused_param_shapes(want))  # kiln's names, merged by fusion
    assert {k: v[0] for k, v in manifest["param_shapes"].items()} == \
        {k: list(s) for k, s in fused_param_shapes(want).items()}
    assert manifest["options"]["source_format"] == {"pt2": "torch.export", "onnx": "onnx"}[fmt]


@pytest.mark.parametrize("variant", ["llama3-tied", "llama-linear", "mistral", "qwen3"])
def test_more_architectures_from_onnx(variant, zoo, tmp_path, one_torch_thread):
    """llama3 RoPE scaling (parameters checked against the config beside the tokenizer), linear scaling, Mistral
    (its 4096 window longer than the context: global) and Qwen3's q/k norm, each from an ONNX export."""
    model_dir, hf = zoo.hf(variant)
    compile_model(zoo.graph(variant, "onnx"), tmp_path / "art", CompileConfig(tokenizer=model_dir, dtype="float32"))
    prompt = [5, 6, 7, 11, 13, 17, 19]
    [res] = LLM(tmp_path / "art").generate([prompt], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    assert res.token_ids == hf_greedy(hf, prompt, 16)


def test_quantized_graph_compile(zoo, tmp_path):
    """--quant applies to a recognised graph as to a checkpoint: the same linears, the same names."""
    model_dir, _ = zoo.hf("llama")
    art = tmp_path / "q"
    compile_model(zoo.graph("llama", "onnx"), art, CompileConfig(tokenizer=model_dir, quant="rtn-w4g128"))
    ref = zoo.artifact("llama", quant="rtn-w4g128")
    layout = [{k: json.loads((a / "manifest.json").read_text())[k] for k in ("param_names", "param_shapes")}
              for a in (art, ref)]
    assert layout[0] == layout[1]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    assert LLM(art).generate([[5, 6, 7]], params)[0].token_ids == LLM(ref).generate([[5, 6, 7]], params)[0].token_ids


def test_dump_ir_shows_each_recognition_step(zoo, tmp_path):
    model_dir, _ = zoo.hf("qwen2")
    compile_model(zoo.graph("qwen2", "onnx"), tmp_path / "a", CompileConfig(tokenizer=model_dir,
                                                                              dump_ir=tmp_path / "ir"))
    names = sorted(p.name for p in (tmp_path / "ir").iterdir())
    # one numbering for every step: the import and recognition first, then the passes every compile runs
    assert names[:7] == ["01-import_graph.py", "02-recognize_rms_norm.py", "03-recognize_swiglu.py",
                         "04-recognize_attention.py", "05-recognize_model.py", "06-verify_reference.py",
                         "07-fuse_dequant_matmul.py"]
    assert names[-2:] == [f"{len(names) - 1:02d}-lower_paged_kv.py", f"{len(names):02d}-dead_code_elimination.py"]
    assert "R.nn.softmax" in (tmp_path / "ir" / "03-recognize_swiglu.py").read_text()
    assert "R.nn.softmax" not in (tmp_path / "ir" / "04-recognize_attention.py").read_text().split("def main")[1]
    assert "def forward" in (tmp_path / "ir" / "05-recognize_model.py").read_text()


def export_with_past(model, path):
    """ONNX Runtime GenAI's layout: forward(input_ids, attention_mask [1, past + seq], position_ids,
    past_key_values.{i}.key/value [1, kv, past, d]) -> (logits, present.{i}.key/value), dynamo export."""
    import warnings

    from transformers import DynamicCache

    layers, kv, d = model.config.num_hidden_layers, model.config.num_key_value_heads, model.config.head_dim

    class WithPast(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, input_ids, attention_mask, position_ids, past):
            cache = DynamicCache(config=self.m.config)
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.m(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
            return (out.logits, *(t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)))

    p, s = 3, 5
    past = tuple(torch.randn(1, kv, p, d) for _ in range(2 * layers))
    args = (torch.randint(0, 320, (1, s)), torch.ones(1, p + s, dtype=torch.long), torch.arange(p, p + s)[None], past)
    seq, pl, tot = (torch.export.Dim(n, min=1, max=128) for n in ("seq", "past", "total"))
    names = [f"past_key_values.{i // 2}.{('key', 'value')[i % 2]}" for i in range(2 * layers)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(WithPast().eval(), args, str(path), dynamo=True, verbose=False,
                          dynamic_shapes=({1: seq}, {1: tot}, {1: seq}, tuple({2: pl} for _ in past)),
                          input_names=["input_ids", "attention_mask", "position_ids", *names],
                          output_names=["logits", *(n.replace("past_key_values", "present") for n in names)])
    return path


def test_onnx_with_past_key_values_generates_like_transformers(zoo, tmp_path, one_torch_thread):
    """The past inputs are specialised to an empty cache (kiln's paged cache replaces them), the presents
    dropped; attention reads through the concatenation with the empty past."""
    model_dir, hf = zoo.hf("llama")
    path = export_with_past(hf, tmp_path / "llama-kv.onnx")
    compile_model(path, tmp_path / "art", CompileConfig(tokenizer=model_dir))
    prompt = [5, 6, 7, 11, 13]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    [res] = LLM(tmp_path / "art").generate([prompt], params)
    assert res.token_ids == hf_greedy(hf, prompt, NEW_TOKENS)


def test_float16_onnx_generates_like_the_float16_checkpoint(zoo, tmp_path, one_torch_thread):
    """A half-precision export: the RoPE tables are checked before their cast to float16 (transformers
    computes them in float32), the mask's lowest value is fp16's; tokens equal kiln's fp16 checkpoint build."""
    from transformers import AutoModelForCausalLM

    model_dir, _ = zoo.hf("llama")
    half = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float16).eval()
    path = zoo.root / "graph-llama-fp16.onnx"
    if not path.exists():
        from conftest import export_graph

        export_graph(half, path)
    compile_model(path, tmp_path / "art", CompileConfig(tokenizer=model_dir))
    assert load_artifact(tmp_path / "art").spec.dtype == "float16"
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    prompts = [[5, 6, 7, 11, 13], list(range(40, 70))]
    got = LLM(tmp_path / "art").generate(prompts, params)
    want = LLM(zoo.artifact("llama", dtype="float16")).generate(prompts, params)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]


def test_half_precision_pt2_is_refused_with_the_reason(zoo, tmp_path):
    from kiln.errors import UnsupportedModelError
    from kiln.frontend.graph import load_graph

    model_dir, model = zoo.hf("llama")
    ids = torch.randint(0, 320, (1, 12))
    seq = torch.export.Dim("seq", min=2, max=128)
    half = type(model).from_pretrained(model_dir, dtype=torch.float16).eval()
    half.config.use_cache = False
    ep = torch.export.export(half, (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                             dynamic_shapes={"input_ids": {1: seq}, "attention_mask": {1: seq}})
    torch.export.save(ep, tmp_path / "half.pt2")
    with pytest.raises(UnsupportedModelError, match="float16 torch.export graph.*export the model in float32"):
        load_graph(tmp_path / "half.pt2")


# ------------------------------------------------------------------------------------------ user errors


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("fmt", FORMATS)
def test_kiln_compile_cli_builds_a_graph_that_generates_like_transformers(fmt, zoo, tmp_path, one_torch_thread):
    """The command a user runs, not only compile_model: `kiln compile MODEL.pt2|.onnx --tokenizer DIR -o ART`."""
    model_dir, hf = zoo.hf("qwen2")
    r = _cli("compile", zoo.graph("qwen2", fmt), "--tokenizer", model_dir, "-o", tmp_path / "art", "-q")
    assert r.exit_code == 0, r.output
    assert "build:" not in r.stderr  # -q: no progress lines
    assert json.loads((tmp_path / "art" / "manifest.json").read_text())["options"]["source_format"] == \
        {"pt2": "torch.export", "onnx": "onnx"}[fmt]
    prompt = [5, 6, 7, 11, 13]
    [res] = LLM(tmp_path / "art").generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert res.token_ids == hf_greedy(hf, prompt, 8)


def test_graph_without_tokenizer_is_a_user_error(zoo, tmp_path):
    r = _cli("compile", zoo.graph("llama", "onnx"), "-o", tmp_path / "a")
    assert r.exit_code == 1 and "--tokenizer" in r.output and "Traceback" not in r.output


def test_context_beyond_the_models_maximum_is_a_user_error(zoo, tmp_path):
    model_dir, _ = zoo.hf("llama")  # config.json beside the tokenizer: max_position_embeddings 256
    r = _cli("compile", zoo.graph("llama", "pt2"), "--tokenizer", model_dir, "--context-len", 1024, "-o", tmp_path / "a")
    assert r.exit_code == 1 and "--context-len 1024 is beyond the model's max_position_embeddings (256" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "a").exists()


def test_tokenizer_option_on_a_checkpoint_is_a_user_error(zoo, tmp_path):
    model_dir, _ = zoo.hf("llama")
    r = _cli("compile", model_dir, "--tokenizer", model_dir, "-o", tmp_path / "a")
    assert r.exit_code == 1 and "--tokenizer is for .pt2/.onnx graphs" in r.output


def test_an_internal_failure_during_recognition_is_a_one_line_error(zoo, tmp_path, monkeypatch):
    """Whatever TVM raises on a graph kiln half-recognised reaches the user as one line naming the step."""
    import kiln.passes.pipeline as pipeline

    def broken(mod):
        raise RuntimeError("Traceback (most recent call last):\n  File \"/project/src/relax/ir/block_builder.cc\", "
                           "line 1\nInternalError: Check failed: something TVM did not like")

    monkeypatch.setattr(pipeline, "recognize_rms_norm", broken)
    model_dir, _ = zoo.hf("llama")
    r = _cli("compile", zoo.graph("llama", "onnx"), "--tokenizer", model_dir, "-o", tmp_path / "a")
    assert r.exit_code == 1 and "recognize_rms_norm failed on this graph" in r.output
    assert "something TVM did not like" in r.output and "Traceback" not in r.output and "block_builder" not in r.output


def test_graph_errors_name_the_file(zoo, tmp_path):
    model_dir, _ = zoo.hf("llama")
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not a protobuf")
    r = _cli("compile", bad, "--tokenizer", model_dir, "-o", tmp_path / "a")
    assert r.exit_code == 1 and str(bad) in r.output and "Traceback" not in r.output
    r = _cli("compile", tmp_path / "missing.pt2", "--tokenizer", model_dir, "-o", tmp_path / "b")
    assert r.exit_code == 1 and "does not exist" in r.output
    r = _cli("compile", zoo.graph("llama", "pt2"), "--tokenizer", model_dir, "--config-only", "-o", tmp_path / "c")
    assert r.exit_code == 1 and "--config-only" in r.output
    no_tok = tmp_path / "empty"
    no_tok.mkdir()
    r = _cli("compile", zoo.graph("llama", "pt2"), "--tokenizer", no_tok, "-o", tmp_path / "d")
    assert r.exit_code == 1 and "tokenizer.json" in r.output
