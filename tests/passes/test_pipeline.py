"""kiln.passes.pipeline: the pass list runs in order, each step checked, and --dump-ir writes the
module as TVMScript before the first and after every step (API and CLI)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln.codegen.targets import resolve_target
from kiln.errors import PassError
from kiln.frontend.reference import build_reference
from kiln.ir.abi import ENTRY_POINTS
from kiln.ir.spec import ModelSpec
from kiln.passes.lib.serving import KV_ATTENTION_BUILTIN
from kiln.passes.pipeline import Model, Step, build_pipeline, run_pipeline

pytestmark = pytest.mark.cpu

SPEC = ModelSpec("LlamaForCausalLM", vocab_size=101, hidden_size=64, intermediate_size=96, num_layers=2,
                 num_q_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, context_len=128)


def _expected_files(steps, first: int = 0) -> list[str]:
    """``00-input.py`` (when the pipeline was given a module), then one file per step."""
    return (["00-input.py"] if first == 0 else []) + [f"{i:02d}-{s.name}.py" for i, s in enumerate(steps, start=1)]


def _check_dumps(d: Path, steps, first: int = 0) -> dict[str, str]:
    names = _expected_files(steps, first)
    assert sorted(p.name for p in d.iterdir()) == sorted(names)
    texts = {}
    for name in names:
        text = (d / name).read_text()
        assert text.strip(), f"{name} is empty"
        # TVMScript of a whole IRModule
        assert "from tvm.script import relax as R" in text and "@I.ir_module" in text and "class Module:" in text, name
        texts[name] = text
    return texts


def _defs(text: str) -> set[str]:
    return {line.strip()[4:].split("(")[0] for line in text.splitlines() if line.strip().startswith("def ")}


def test_pipeline_steps_in_order():
    steps = build_pipeline(resolve_target("cpu"), SPEC, fuse=False)
    assert [s.name for s in steps] == ["verify_reference", "lower_paged_attention", "dead_code_elimination"]
    assert all(s.check is not None for s in steps)


def test_pipeline_steps_are_chosen_when_it_is_built():
    """Every optional step is chosen from the source, spec, scheme and target, before anything runs."""
    cpu, cuda = resolve_target("cpu"), resolve_target("cuda", "sm_90")
    names = lambda steps: [s.name for s in steps]
    fused = ["verify_reference", "fuse_dequant_matmul", "fuse_qkv", "fuse_gate_up"]
    assert names(build_pipeline(cpu, SPEC)) == fused + ["fuse_add_rms_norm", "lower_paged_attention",
                                                        "dead_code_elimination"]
    assert names(build_pipeline(cuda, SPEC)) == fused + ["lower_paged_attention", "dead_code_elimination"]
    sliding = SPEC.replace(sliding_window=32)
    assert names(build_pipeline(cpu, sliding, fuse=False))[1] == "lower_paged_groups"
    shared = SPEC.replace(kv_sources=(0, 0))
    assert names(build_pipeline(cpu, shared, fuse=False))[:3] == ["verify_reference", "share_kv", "lower_paged_groups"]
    from kiln.passes.pipeline import Quantization
    from kiln.quant.schemes import get_scheme

    quant = names(build_pipeline(cpu, SPEC, quant=Quantization(get_scheme("rtn-w4g128")), fuse=False))
    assert quant[:2] == ["verify_reference", "quantize_linears"]


def test_run_pipeline_dumps_every_step(tmp_path):
    steps = build_pipeline(resolve_target("cpu"), SPEC, fuse=False)
    mod = build_reference(SPEC)
    out = run_pipeline(steps, mod, tmp_path / "ir").mod
    texts = _check_dumps(tmp_path / "ir", steps)
    first, last = texts["00-input.py"], texts[_expected_files(steps)[-1]]
    assert first == mod.script()
    assert last == out.script()
    # the input is the reference form; the last dump is the serving form
    assert {"forward", "attention_L0", "attention_L1"} <= _defs(first)
    assert not set(ENTRY_POINTS) & _defs(first) and KV_ATTENTION_BUILTIN not in first
    assert set(ENTRY_POINTS) <= _defs(last) and "forward" not in _defs(last)
    assert last.count(KV_ATTENTION_BUILTIN) == 4 * SPEC.num_layers  # prefill, decode, batch_prefill, batch_decode
    assert texts["02-lower_paged_attention.py"].count(KV_ATTENTION_BUILTIN) == 4 * SPEC.num_layers


def test_run_pipeline_without_dump_dir_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = run_pipeline(build_pipeline(resolve_target("cpu"), SPEC, fuse=False), build_reference(SPEC)).mod
    assert {gv.name_hint for gv in out.get_global_vars()} >= set(ENTRY_POINTS)
    assert list(tmp_path.iterdir()) == []


def test_keep_reference_pipeline_keeps_forward(tmp_path):
    steps = build_pipeline(resolve_target("cpu"), SPEC, fuse=False, keep_reference=True)
    out = run_pipeline(steps, build_reference(SPEC), tmp_path).mod
    names = {gv.name_hint for gv in out.get_global_vars()}
    assert "forward" in names and set(ENTRY_POINTS) <= names
    assert "forward" in _defs((tmp_path / _expected_files(steps)[-1]).read_text())


def test_failing_check_stops_the_pipeline_after_dumping_what_ran(tmp_path):
    def bad(_mod):
        raise PassError("step check failed")

    ran = []
    steps = [Step("first", lambda m: m), Step("broken", lambda m: m, bad), Step("never", lambda m: ran.append(1) or m)]
    with pytest.raises(PassError, match="step check failed"):
        run_pipeline(steps, Model(build_reference(SPEC)), tmp_path)
    assert not ran
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00-input.py", "01-first.py"]


def test_cli_compile_dump_ir(zoo, tmp_path):
    from click.testing import CliRunner

    from kiln.cli import main

    model_dir, _ = zoo.hf("llama")
    dump, out = tmp_path / "ir", tmp_path / "art"
    res = CliRunner().invoke(main, ["compile", str(model_dir), "-o", str(out), "--dump-ir", str(dump), "-q"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "wrote" in res.output
    steps = build_pipeline(resolve_target("cpu"), SPEC)  # the step names kiln compile runs, after the import
    assert [s.name for s in steps][1:5] == ["fuse_dequant_matmul", "fuse_qkv", "fuse_gate_up", "fuse_add_rms_norm"]
    steps = [Step("import_checkpoint", None)] + steps
    texts = _check_dumps(dump, steps, first=1)
    assert "forward" in _defs(texts["01-import_checkpoint.py"])
    assert set(ENTRY_POINTS) <= _defs(texts[_expected_files(steps)[-1]])
    assert json.loads((out / "manifest.json").read_text())["target"]["name"] == "cpu"
    assert (out / "model.so").stat().st_size > 0


def test_every_pass_has_a_before_expected_test_and_a_step():
    """Each pass file kiln/passes/<verb>_<object>.py has a TVM-style structural test named
    test_<verb>_<object>_before_expected in tests/passes, and is a step of the pipeline for some input."""
    import re

    root = Path(__file__).resolve().parents[2]
    passes = sorted(p.stem for p in (root / "kiln" / "passes").glob("*.py") if p.stem not in ("__init__", "pipeline"))
    assert len(passes) == 12, passes
    tests = "\n".join(p.read_text() for p in (root / "tests" / "passes").glob("test_*.py"))
    missing = [p for p in passes if not re.search(rf"^def test_{p}\w*before_expected\(", tests, re.M)]
    assert not missing, f"passes without a Before/Expected test: {missing}"
    pipeline = (root / "kiln" / "passes" / "pipeline.py").read_text()
    assert [p for p in passes if not re.search(rf"\b{p}\b", pipeline)] == []
