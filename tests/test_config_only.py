"""``kiln compile --config-only``: a model compiled from its config.json alone, without weights.

The artifact holds no params.safetensors, records ``"weights": "none"`` and every parameter's shape and
dtype, gets a placeholder tokenizer when the directory has none, runs with random weights only, and
refuses to load without them with a message that says so.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DEMO_MODEL
from kiln.artifact import load_artifact
from kiln.errors import ArtifactError, KilnError
from kiln.frontend.placeholder_tokenizer import placeholder_vocab, write_placeholder_tokenizer
from kiln.ir.spec import ModelSpec

KILN = Path(sys.executable).with_name("kiln")


def kiln(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(KILN), *map(str, args)], capture_output=True, text=True, timeout=600)


def one_line_error(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr and res.stdout == "", res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and res.stderr.rstrip().splitlines()[-1] == errors[0], res.stderr
    return errors[0]


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory) -> Path:
    """The demo model's config.json alone: no weights, no tokenizer."""
    d = tmp_path_factory.mktemp("config-only") / "kiln-demo-config"
    d.mkdir()
    shutil.copyfile(DEMO_MODEL / "config.json", d / "config.json")
    return d


@pytest.fixture(scope="module")
def art(config_dir) -> Path:
    from kiln.compiler import CompileConfig, compile_model

    out = config_dir.parent / "art"
    compile_model(config_dir, out, CompileConfig(config_only=True))
    return out


# -- the artifact ------------------------------------------------------------------------------------------


@pytest.mark.cpu
def test_manifest_records_no_weights_the_layout_and_a_placeholder_tokenizer(art):
    from conftest import fused_param_shapes

    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["weights"] == "none" and manifest["tokenizer"] == "placeholder"
    assert manifest["options"]["config_only"] is True
    assert set(manifest["files"]) == {"model.so", "tokenizer.json", "tokenizer_config.json"}
    assert not (art / "params.safetensors").exists()
    a = load_artifact(art)  # verifies every listed file's sha256
    assert not a.has_weights and a.placeholder_tokenizer
    want = {name: (shape, "float32") for name, shape in fused_param_shapes(a.spec).items()}
    assert a.param_layout == want
    assert list(manifest["param_shapes"]) == manifest["param_names"]


@pytest.mark.cpu
def test_a_full_artifact_records_its_layout_too(zoo):
    from safetensors import safe_open

    a = load_artifact(zoo.artifact("llama", dtype="float32"))
    assert a.has_weights and not a.placeholder_tokenizer and a.manifest.weights == "included"
    with safe_open(str(a.params_file), framework="pt") as f:
        stored = {k: (tuple(f.get_slice(k).get_shape()), "float32") for k in f.keys()}
    assert a.param_layout == stored


@pytest.mark.cpu
def test_runs_with_random_weights_and_generates(art):
    from kiln.runtime.engine import Engine, EngineConfig
    from kiln.runtime.outputs import Request
    from kiln.runtime.sampler import SamplingParams

    engine = Engine(art, EngineConfig(random_weights=0, kv_cache_memory=1 << 24))
    assert engine.tokenizer.vocab_size == engine.spec.vocab_size == 4096
    prompt = engine.tokenizer.encode("def main():")
    assert len(prompt) == len("def main():")  # one token per byte
    outs = engine.generate([Request("r", prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))])["r"]
    tokens = [t for o in outs for c in o.outputs for t in c.token_ids]
    assert len(tokens) == 8 and all(0 <= t < 4096 for t in tokens)
    assert outs[-1].finished


@pytest.mark.cpu
def test_loading_without_random_weights_is_a_clear_error(art):
    from kiln.runtime.engine import Engine
    from kiln.runtime.model_runner import ModelRunner

    with pytest.raises(ArtifactError, match=r"holds no weights \(compiled with --config-only\): pass random weights"):
        ModelRunner(load_artifact(art))
    with pytest.raises(ArtifactError, match="random weights"):
        Engine(art)
    msg = one_line_error(kiln("generate", art, "--prompt", "hi"))
    assert "--random-weights" in msg and "no weights" in msg


@pytest.mark.cpu
def test_inspect_says_so(art):
    res = kiln("inspect", art)
    assert res.returncode == 0, res.stderr
    assert "weights     none" in res.stdout and "tokenizer   placeholder" in res.stdout
    assert "params.safetensors" not in res.stdout
    info = json.loads(kiln("inspect", art, "--json").stdout)
    assert info["weights"] == "none" and info["tokenizer"] == "placeholder"


@pytest.mark.cpu
def test_bad_weights_field_is_refused(art, fresh_copy):
    copy = fresh_copy(art)
    m = json.loads((copy / "manifest.json").read_text())
    m["weights"] = "some"
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match='unknown "weights"'):
        load_artifact(copy)
    m["weights"] = "included"  # a weightless artifact claiming weights
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="lists no params.safetensors"):
        load_artifact(copy)


# -- the CLI ---------------------------------------------------------------------------------------------


@pytest.mark.cpu
def test_cli_config_only_keeps_a_tokenizer_it_finds_and_reads_no_weights(zoo, tmp_path):
    hf_dir, _ = zoo.hf("llama")
    src = tmp_path / "src"
    shutil.copytree(hf_dir, src)
    (src / "model.safetensors").write_bytes(b"not a safetensors file")  # never opened
    out = tmp_path / "art"
    res = kiln("compile", src, "--config-only", "-o", out, "--context-len", 32)
    assert res.returncode == 0, res.stderr
    assert "importing the config (no weights)" in res.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["weights"] == "none" and m["tokenizer"] == "included"
    assert (out / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    assert not (out / "params.safetensors").exists()


@pytest.mark.parametrize("case", ["missing-dir", "no-config", "bad-json"])
def test_cli_config_only_bad_dir_is_a_one_line_error(tmp_path, case):
    d = tmp_path / "model"
    if case != "missing-dir":
        d.mkdir()
    if case == "bad-json":
        (d / "config.json").write_text("{not json")
    msg = one_line_error(kiln("compile", d, "--config-only", "-o", tmp_path / "out"))
    assert {"missing-dir": "is not a directory", "no-config": "config.json is missing",
            "bad-json": "is not valid JSON"}[case] in msg
    assert not (tmp_path / "out").exists()


def test_without_config_only_a_missing_tokenizer_is_still_an_error(tmp_path, config_dir):
    from kiln.compiler import CompileConfig, compile_model

    with pytest.raises(KilnError, match="no tokenizer.json"):
        compile_model(config_dir, tmp_path / "out", CompileConfig())


# -- the placeholder tokenizer ---------------------------------------------------------------------------


def _spec(vocab: int, bos: int | None, eos: tuple[int, ...]) -> ModelSpec:
    return ModelSpec("LlamaForCausalLM", vocab, 64, 128, 2, 4, 2, 16, 1e-5, 256, bos_token_id=bos, eos_token_ids=eos)


@pytest.mark.parametrize("vocab,bos,eos", [(128256, 128000, (128001, 128008, 128009)), (4096, 0, (1,)),
                                           (300, None, (2,)), (100, 1, (2,))])
def test_placeholder_tokenizer_covers_the_vocabulary(tmp_path, vocab, bos, eos):
    from kiln.runtime.tokenizer import Tokenizer

    write_placeholder_tokenizer(_spec(vocab, bos, eos), tmp_path)
    tok = Tokenizer(tmp_path)
    assert tok.vocab_size == vocab
    assert tok.eos_token_id == eos[0]
    assert tok.special_token_ids == frozenset(([bos] if bos is not None else []) + list(eos))
    assert tok.token_bytes() is not None  # byte-level: the engine's fast detokenization path
    assert tok.decode([vocab - 1]) == f"<|t{vocab - 1}|>" or vocab < 300
    if vocab >= 256 + 4:
        text = "héllo, wörld\n"
        assert tok.decode(tok.encode(text)) == text
        assert len(tok.encode(text)) == len(text.encode())


def test_placeholder_vocab_puts_specials_at_their_ids():
    vocab, named = placeholder_vocab(_spec(300, 0, (1, 5)))
    assert vocab["<|bos|>"] == 0 and vocab["<|eos|>"] == 1 and vocab["<|eos_1|>"] == 5
    assert named == {"bos_token": "<|bos|>", "eos_token": "<|eos|>"}
    assert sorted(vocab.values()) == list(range(300))


# -- CUDA cross-compilation (nvcc, no GPU) -----------------------------------------------------------------


@pytest.mark.cuda_compile
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (the CUDA toolkit) is not on PATH")
def test_config_only_cuda_sm90_fp16(config_dir, tmp_path):
    """The demo's config alone, fp16, sm_90: the library holds an sm_90 cubin and the artifact no weights.
    In a subprocess, as in tests/codegen/test_cuda_compile.py: a crash inside TVM fails only this test."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("cuda_compile_helpers",
                                                  Path(__file__).parent / "codegen" / "test_cuda_compile.py")
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    out = tmp_path / "art"
    res = kiln("compile", config_dir, "--config-only", "--target", "cuda", "--arch", "sm_90", "--dtype", "float16",
               "--context-len", 128, "-o", out)
    assert res.returncode == 0, res.stderr[-4000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["weights"] == "none" and m["target"]["arch"] == "sm_90" and m["spec"]["dtype"] == "float16"
    assert {dtype for _, dtype in m["param_shapes"].values()} == {"float16"}
    (fatbin,) = helpers.fatbins((out / "model.so").read_bytes())
    entries = helpers.fatbin_entries(fatbin)
    assert {(kind, arch) for kind, arch, _ in entries} == {(helpers.FATBIN_KIND_ELF, 90)}
