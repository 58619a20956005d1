"""The ``kiln`` console script end to end: compile, inspect, generate, and every user error a short
``error: ...`` line with a non-zero exit and no traceback."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.cpu

ROOT = Path(__file__).resolve().parent.parent
KILN = Path(sys.executable).with_name("kiln")  # the installed console script (project.scripts)
PROMPT = "w5 w6 w7"


def kiln(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    assert KILN.exists(), f"the kiln console script is not installed next to {sys.executable}"
    return subprocess.run([str(KILN), *map(str, args)], capture_output=True, text=True, cwd=cwd or ROOT,
                          timeout=600)


def assert_user_error(res: subprocess.CompletedProcess, *fragments: str) -> str:
    """A user error: non-zero exit, nothing on stdout, one short ``error: ...`` line, no traceback."""
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert "Traceback" not in out, out
    assert res.stdout == "", res.stdout
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, res.stderr
    msg = errors[0]
    assert res.stderr.rstrip().splitlines()[-1] == msg, res.stderr  # the message is the last thing printed
    assert len(msg) < 400, msg
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


def generate_json(art: Path, *args) -> dict:
    res = kiln("generate", art, "--prompt", PROMPT, "--json", *args)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1, res.stdout  # exactly one JSON object
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def hf_dir(zoo) -> Path:
    return zoo.hf("llama")[0]


@pytest.fixture(scope="module")
def art(zoo) -> Path:
    return zoo.artifact("llama", dtype="float32")


@pytest.fixture(scope="module")
def compiled(hf_dir, tmp_path_factory):
    """``kiln compile`` through the console script (a short context window keeps it cheap)."""
    parent = tmp_path_factory.mktemp("cli-compile")
    out = parent / "art-ctx32"
    res = kiln("compile", hf_dir, "-o", out, "--context-len", 32)
    return res, out


def kv_bytes_per_token_from_config(hf_dir: Path, dtype_bytes: int = 4) -> int:
    cfg = json.loads((hf_dir / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return 2 * cfg["num_hidden_layers"] * (cfg.get("num_key_value_heads") or heads) * head_dim * dtype_bytes


# -- compile / inspect / generate -------------------------------------------------------------------


def test_compile_writes_artifact_and_reports_progress(compiled):
    res, out = compiled
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    assert f"wrote {out}" in res.stdout
    for stage in ("importing the checkpoint", "pass verify_reference", "pass lower_paged_attention", "building for cpu",
                  "writing the artifact"):
        assert stage in res.stderr, res.stderr
    progress = [line for line in res.stderr.splitlines() if line.startswith("[") and line.endswith("...")]
    assert len(progress) >= 4, res.stderr
    names = {p.name for p in out.iterdir()}
    assert {"manifest.json", "model.so", "params.safetensors", "tokenizer.json"} <= names
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["files"]) == names - {"manifest.json"}
    assert manifest["spec"]["context_len"] == 32
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary directory left behind


def test_inspect(compiled, hf_dir):
    _, out = compiled
    res = kiln("inspect", out)
    assert res.returncode == 0, res.stdout + res.stderr
    text = res.stdout
    kv = kv_bytes_per_token_from_config(hf_dir)
    assert kv == 2 * 2 * 2 * 16 * 4
    assert "LlamaForCausalLM" in text
    assert "float32" in text
    assert "target      cpu" in text
    assert "context 32" in text
    assert f"kv cache    global: {kv} bytes per token (2 x 2 kv heads x 16 x 4 B x 2 KV-owning layers)" in text
    for name in ("model.so", "params.safetensors", "tokenizer.json", "total"):
        assert any(line.split()[0] == name and line.endswith("MB") for line in text.splitlines()), (name, text)


def test_inspect_json(compiled, hf_dir, zoo):
    _, out = compiled
    res = kiln("inspect", out, "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    info = json.loads(res.stdout)
    assert info["kv_bytes_per_token"] == kv_bytes_per_token_from_config(hf_dir)
    assert info["target"]["name"] == "cpu"
    assert info["spec"]["architecture"] == "LlamaForCausalLM"
    assert info["spec"]["num_layers"] == 2 and info["spec"]["context_len"] == 32
    assert info["files"]["model.so"] == (out / "model.so").stat().st_size
    assert info["files"]["params.safetensors"] == (out / "params.safetensors").stat().st_size
    assert info["total_bytes"] == sum(info["files"].values())
    manifest = json.loads((out / "manifest.json").read_text())
    assert info["num_tensors"] == len(manifest["param_names"])
    # parameters, not tensors: for a float model the elements stored, which transformers counts too
    assert info["num_params"] == sum(math.prod(shape) for shape, _ in manifest["param_shapes"].values())
    assert info["num_params"] == zoo.hf("llama")[1].num_parameters()


def test_compile_shows_the_build_phases_and_no_third_party_warnings(compiled):
    res, _ = compiled
    lines = res.stderr.splitlines()
    for phase in ("build: legalizing and fusing the operators",
                  "build: lowering the kernels and compiling them with LLVM"):
        assert sum(ln.endswith(phase) for ln in lines) == 1, res.stderr
    assert not [ln for ln in lines if "warning" in ln.lower()], res.stderr  # TVM's "Fast mode segfaults ..." was one


def test_inspect_into_a_pipe_closed_early_is_quiet(art):
    """`kiln inspect ART | head -1`: the reader leaves before kiln is done; no "Broken pipe", no traceback."""
    res = subprocess.run(f"'{KILN}' inspect '{art}' | head -1", shell=True, capture_output=True, text=True,
                         cwd=ROOT, timeout=600)
    assert res.stdout.startswith("artifact ") and res.stdout.count("\n") == 1 and res.stderr == "", res
    p = subprocess.Popen([str(KILN), "inspect", str(art)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    p.stdout.close()  # the reader is gone before kiln writes its first line: the write itself fails
    err = p.stderr.read().decode()
    assert p.wait(timeout=600) == 141 and err == "", err  # 128 + SIGPIPE, as a shell reports a tool SIGPIPE ended


@pytest.fixture(scope="module")
def greedy(art) -> dict:
    return generate_json(art, "--max-tokens", 8, "--ignore-eos")


def test_generate_greedy_json_is_deterministic(art, greedy):
    from tokenizers import Tokenizer

    a = greedy
    b = generate_json(art, "--max-tokens", 8, "--ignore-eos")
    assert a == b
    assert a["prompt_token_ids"] == [5, 6, 7]
    assert len(a["token_ids"]) == 8 and a["finish_reason"] == "length"
    assert all(0 <= t < 320 for t in a["token_ids"])
    # the continuation's text as it follows the prompt (the engine's incremental detokenizer, as the server's):
    # the tokens decoded alone, with the space the word-level tokenizer puts between the prompt and them
    assert a["text"] == " " + Tokenizer.from_file(str(art / "tokenizer.json")).decode(a["token_ids"])


def test_generate_plain_text(art, greedy):
    res = kiln("generate", art, "--prompt", PROMPT, "--max-tokens", 8, "--ignore-eos")
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout == PROMPT + greedy["text"] + "\n"
    assert "[8 tokens in" in res.stderr and "finish: length" in res.stderr


def test_generate_sampling_is_seeded(art, greedy):
    args = ("--max-tokens", 8, "--ignore-eos", "--temperature", 0.8, "--top-p", 0.9)
    a = generate_json(art, *args, "--seed", 1)
    b = generate_json(art, *args, "--seed", 1)
    assert a == b
    assert len(a["token_ids"]) == 8
    # The fixture's weights are fixed (seeded), so these are deterministic: sampling is really applied.
    c = generate_json(art, *args, "--seed", 2)
    assert c["token_ids"] != a["token_ids"]
    assert a["token_ids"] != greedy["token_ids"]


def test_generate_stops_at_context_window(compiled):
    _, out = compiled  # context 32
    prompt = " ".join(f"w{i}" for i in range(3, 33))  # 30 tokens
    res = kiln("generate", out, "--prompt", prompt, "--max-tokens", 8, "--ignore-eos", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    r = json.loads(res.stdout)
    assert len(r["prompt_token_ids"]) == 30
    assert len(r["token_ids"]) == 2 and r["finish_reason"] == "length"


# -- user errors: checkpoints and targets ------------------------------------------------------------


def test_compile_missing_model_dir(tmp_path):
    assert_user_error(kiln("compile", tmp_path / "nope", "-o", tmp_path / "out"), "nope", "not a directory")
    assert not (tmp_path / "out").exists()


def test_compile_dir_without_config(tmp_path):
    (tmp_path / "model").mkdir()
    assert_user_error(kiln("compile", tmp_path / "model", "-o", tmp_path / "out"), "config.json")


def test_compile_truncated_safetensors(hf_dir, fresh_copy, tmp_path):
    model = fresh_copy(hf_dir)
    st = model / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    assert_user_error(kiln("compile", model, "-o", tmp_path / "out"), "model.safetensors")
    assert not (tmp_path / "out").exists()


def test_compile_unsupported_architecture(hf_dir, fresh_copy, tmp_path):
    model = fresh_copy(hf_dir)
    cfg = json.loads((model / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (model / "config.json").write_text(json.dumps(cfg))
    msg = assert_user_error(kiln("compile", model, "-o", tmp_path / "out"), "GPT2LMHeadModel")
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert arch in msg


def test_compile_unknown_cuda_arch(hf_dir, tmp_path):
    msg = assert_user_error(kiln("compile", hf_dir, "-o", tmp_path / "out", "--target", "cuda", "--arch", "sm_12"),
                            "sm_12")
    assert "sm_90" in msg  # lists the known ones
    assert not (tmp_path / "out").exists()


def test_compile_arch_without_cuda(hf_dir, tmp_path):
    assert_user_error(kiln("compile", hf_dir, "-o", tmp_path / "out", "--arch", "sm_80"), "--arch")


def test_compile_unknown_target(hf_dir, tmp_path):
    res = kiln("compile", hf_dir, "-o", tmp_path / "out", "--target", "tpu")
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "Traceback" not in out
    assert "tpu" in res.stderr and "--target" in res.stderr and "cpu" in res.stderr
    assert not (tmp_path / "out").exists()


def test_compile_failure_inside_tvm_is_one_line(hf_dir, tmp_path, monkeypatch):
    """A compiler failure (here TVM's FuseTIR check, as a Qwen2 checkpoint with --quant once hit it) reaches the
    user as one line naming the step, the model and TVM's source file; the traceback goes to a log file."""
    from click.testing import CliRunner

    from kiln.cli import main
    from kiln.codegen import build as build_module
    from kiln.ir.tvm import tvm

    def failing_build(mod, target, max_batch_size=None):
        def inner():  # TVM's C++ checks reach Python with their source file in the traceback text
            raise tvm.error.InternalError("Check failed: (a == b) is false: Inconsistent buffers\n"
                                          '  File "/project/src/relax/transform/fuse_tir.cc", line 392')
        inner()

    monkeypatch.setattr(build_module, "build", failing_build)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    res = CliRunner().invoke(main, ["compile", str(hf_dir), "-o", str(tmp_path / "out")])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    lines = res.output.strip().splitlines()
    msg = lines[-1]
    assert msg.startswith("error: compiling ") and str(hf_dir) in msg and "build for cpu" in msg, msg
    assert "relax/transform/fuse_tir.cc" in msg and "InternalError: Check failed" in msg, msg
    log = Path(msg.rsplit("traceback in ", 1)[1].rstrip("]"))
    assert log.parent == tmp_path and "failing_build" in log.read_text()
    assert not (tmp_path / "out").exists()


def test_compile_failure_in_a_pass_names_the_pass(hf_dir, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from kiln.cli import main
    from kiln.passes import pipeline

    def broken(mod, layout, group=None):
        raise AttributeError("'NoneType' object has no attribute 'args'")

    monkeypatch.setattr(pipeline, "fuse_qkv", broken)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    res = CliRunner().invoke(main, ["compile", str(hf_dir), "-o", str(tmp_path / "out")])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    msg = res.output.strip().splitlines()[-1]
    assert "failed in pass fuse_qkv: AttributeError: 'NoneType' object has no attribute 'args'" in msg, msg


def test_compile_refuses_to_overwrite_a_non_artifact(hf_dir, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert_user_error(kiln("compile", hf_dir, "-o", out), "refusing")
    assert (out / "notes.txt").read_text() == "keep me"


def test_compile_refuses_a_context_beyond_the_model(tmp_path):
    """--context-len past max_position_embeddings is refused (it was silently capped)."""
    from conftest import DEMO_MODEL

    assert_user_error(kiln("compile", DEMO_MODEL, "-o", tmp_path / "out", "--context-len", 4096),
                      "--context-len 4096 is beyond the model's max_position_embeddings (512", "512 or less")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("quant, warned", [(None, True), ("rtn-w4g128", True), ("awq-w4g128", False)])
def test_compile_warns_when_calib_is_ignored(hf_dir, tmp_path, quant, warned):
    """--calib with a scheme that reads no activation statistics: one warning line. (Cheap: the compile then stops
    at a directory it refuses to overwrite.)"""
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    res = kiln("compile", hf_dir, "-o", out, "--calib", tmp_path / "c.calib", *(["--quant", quant] if quant else []))
    assert_user_error(res, "refusing")
    warnings = [ln for ln in res.stderr.splitlines() if ln.startswith("warning: ")]
    if not warned:
        assert warnings == [], res.stderr
        return
    what = f"--quant {quant}" if quant else "a compile without --quant"
    assert warnings == [f"warning: --calib {tmp_path / 'c.calib'} is ignored: {what} reads no activation statistics "
                        "(only awq-w4g128, awq-w3g128, w4a8, w8a8 do)"], res.stderr


# -- user errors: artifacts ----------------------------------------------------------------------------


def _edit_manifest(path: Path, **changes) -> None:
    m = json.loads((path / "manifest.json").read_text())
    m.update(changes)
    (path / "manifest.json").write_text(json.dumps(m, indent=2))


@pytest.fixture(params=["inspect", "generate"])
def load_cmd(request):
    """Both commands that load an artifact."""
    if request.param == "inspect":
        return lambda art: kiln("inspect", art)
    return lambda art: kiln("generate", art, "--prompt", PROMPT, "--max-tokens", 2)


def test_artifact_from_another_kiln_version(art, fresh_copy, load_cmd):
    copy = fresh_copy(art)
    _edit_manifest(copy, kiln_version="0.0.1")
    assert_user_error(load_cmd(copy), "kiln 0.0.1", "recompile")


def test_artifact_from_another_tvm_version(art, fresh_copy, load_cmd):
    copy = fresh_copy(art)
    _edit_manifest(copy, tvm_version="0.19.0")
    assert_user_error(load_cmd(copy), "TVM 0.19.0", "recompile")


@pytest.mark.parametrize("name", ["params.safetensors", "model.so"])
def test_tampered_artifact(art, fresh_copy, load_cmd, name):
    copy = fresh_copy(art)
    f = copy / name
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    assert_user_error(load_cmd(copy), name, "sha256")


@pytest.mark.parametrize("name", ["params.safetensors", "tokenizer.json"])
def test_artifact_missing_file(art, fresh_copy, name):
    copy = fresh_copy(art)
    (copy / name).unlink()
    assert_user_error(kiln("generate", copy, "--prompt", PROMPT), name, "missing")


def test_corrupt_manifest(art, fresh_copy):
    copy = fresh_copy(art)
    (copy / "manifest.json").write_text('{"format": "kiln-artif')
    assert_user_error(kiln("inspect", copy), "manifest.json")


def test_not_an_artifact(hf_dir, tmp_path, load_cmd):
    assert_user_error(load_cmd(hf_dir), "not a kiln artifact", "kiln compile")
    assert_user_error(load_cmd(tmp_path / "nothing-here"), "not a kiln artifact")


def test_prompt_longer_than_context(compiled):
    _, out = compiled  # context 32
    prompt = " ".join(f"w{i}" for i in range(3, 43))  # 40 tokens
    assert_user_error(kiln("generate", out, "--prompt", prompt), "40 tokens", "32")


def test_compile_to_an_unwritable_place(hf_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert_user_error(kiln("compile", hf_dir, "-o", blocker / "out"), "error: ")
