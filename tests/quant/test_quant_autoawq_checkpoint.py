"""`kiln compile AWQ_DIR`: a pre-quantized AutoAWQ GEMM checkpoint loads as awq-w4g128, with no calibration.

The tests write the checkpoint themselves, as AutoAWQ lays it out: a random-weight Llama (hidden 128,
intermediate 256: AutoAWQ needs every linear's inputs to be a multiple of the group of 128) whose
decoder linears are quantized round-to-nearest (4 bits, groups of 128, fp16 scales) and stored as
``...q_proj.qweight`` / ``.qzeros`` / ``.scales`` in AutoAWQ's packing (``pack_autoawq``, checked
against AutoAWQ's own loops in test_quant_autoawq.py), everything else in fp16, and config.json with
AutoAWQ's ``quantization_config``. The compiled artifact must give the logits of transformers running
the float model with every linear replaced by AutoAWQ's dequantized weight ``(q - z) * s``, and the
other tensors rounded to fp16 as stored. Unsupported quantized checkpoints fail with one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import BASE_CONFIG, VOCAB, save_tokenizer, unfuse_params

pytestmark = pytest.mark.cpu

GROUP = 128
# config.json's quantization_config as AutoAWQ (save_quantized) writes it
AUTOAWQ_CONFIG = {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm",
                  "modules_to_not_convert": None}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_autoawq_checkpoint(path: Path, quant_config: dict = AUTOAWQ_CONFIG, seed: int = 0):
    """Write an AutoAWQ GEMM checkpoint to ``path``; return (the transformers model, the float32 state
    dict it must run to be the checkpoint's dequantized reference)."""
    import transformers
    from safetensors.torch import save_file

    from kiln.quant.autoawq import pack_autoawq
    from kiln.quant.formats import quantize_weight_only

    cfg = transformers.LlamaConfig(**{**BASE_CONFIG, "hidden_size": 128, "intermediate_size": 256})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    stored, reference = {}, {}
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if p.dim() == 1 and "norm" in name:  # as conftest's zoo: weights large enough for non-flat logits
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
            base = name.removesuffix(".weight")
            if base.rpartition(".")[2] not in LINEARS:
                stored[name] = p.half()
                reference[name] = p.half().float()
                continue
            q, scales, zeros = quantize_weight_only(p, 4, GROUP, scale_dtype=torch.float16)  # [out, in], [out, in/g]
            packed = pack_autoawq(q, zeros, scales)  # [in, out/8], [in/g, out/8], [in/g, out]
            stored.update({f"{base}.{suffix}": t for suffix, t in zip(("qweight", "qzeros", "scales"), packed)})
            z, s = (t.float().repeat_interleave(GROUP, dim=1) for t in (zeros, scales))  # [out, in]
            reference[name] = (q.float() - z) * s  # AutoAWQ's dequantization (q - z) * s
    path.mkdir(parents=True, exist_ok=True)
    save_file(stored, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = cfg.to_dict()
    config.pop("dtype", None)
    config.update(architectures=["LlamaForCausalLM"], torch_dtype="float16", quantization_config=quant_config)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    save_tokenizer(path)
    return model, reference


@pytest.fixture(scope="module")
def awq_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("autoawq") / "tiny-llama-awq"
    model, reference = write_autoawq_checkpoint(path)
    return path, model, reference


def kiln_logits(artifact, ids) -> np.ndarray:
    from kiln.artifact import load_artifact
    from kiln.runtime.model_runner import ModelRunner

    runner = ModelRunner(load_artifact(artifact))
    runner.kv.add_sequence(0)
    return np.stack([runner.forward([0], [[t]])[0].copy() for t in ids])  # every position's logits


@pytest.mark.parametrize("dtype", ["float32", None])
def test_autoawq_checkpoint_matches_dequantized_transformers(awq_checkpoint, tmp_path, dtype):
    from safetensors.torch import load_file

    from kiln.artifact import load_artifact
    from kiln.compiler import CompileConfig, compile_model

    path, model, reference = awq_checkpoint
    art = tmp_path / "art"
    compile_model(path, art, CompileConfig(dtype=dtype))  # no --quant, no --calib: the checkpoint implies them

    options = load_artifact(art).manifest.options
    assert options.quant == "awq-w4g128" and options.source_format == "autoawq"
    assert options.dtype == (dtype or "float16")  # by default the checkpoint's
    params = unfuse_params(load_file(str(art / "params.safetensors")), load_artifact(art).spec)
    assert "layers.0.q_proj" not in params and params["layers.0.q_proj.qweight"].dtype == torch.int32
    assert params["layers.0.q_proj.scales"].dtype == getattr(torch, options.dtype)  # fp16 scales, cast
    assert params["layers.1.down_proj.zeros"].shape == (128, 256 // GROUP)

    ids = torch.randint(3, VOCAB, (24,), generator=torch.Generator().manual_seed(1)).tolist()
    model.load_state_dict(reference)
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    got = kiln_logits(art, ids)
    assert np.abs(want).max() > 1.0  # the comparison is not between near-zero logits
    if dtype == "float32":
        np.testing.assert_allclose(got, want, atol=2e-3, rtol=1e-3)
    else:  # fp16 activations on the CPU (measured: max error 0.017 on logits up to 6.3, every argmax equal)
        assert np.abs(got - want).max() < 0.01 * np.abs(want).max() and (got.argmax(-1) == want.argmax(-1)).all()


def test_params_convert_exactly_in_the_checkpoint_dtype(awq_checkpoint):
    """Without --dtype the model is the checkpoint's fp16; the converted weights are AutoAWQ's exactly."""
    from kiln.codegen.targets import resolve_target
    from kiln.frontend import open_checkpoint
    from kiln.passes.pipeline import Quantization, build_pipeline, run_pipeline
    from kiln.quant.schemes import SCHEMES, dequantize_linear, quantized_linears

    path, _, reference = awq_checkpoint
    source = open_checkpoint(path, with_tokenizer=False)
    assert source.spec.dtype == "float16" and source.prequantized.scheme == "awq-w4g128"
    quant = Quantization(SCHEMES["awq-w4g128"], None, source.prequantized)
    steps = build_pipeline(resolve_target("cpu"), source.spec, source=source, quant=quant, fuse=False)
    assert [s.name for s in steps[:3]] == ["import_checkpoint", "verify_reference", "quantize_linears"]
    model = run_pipeline(steps[:3])  # the packed params as the compile makes them
    layout, params, imported = model.layout, model.params, source
    assert list(params) == list(layout)
    assert all(str(params[k].dtype).removeprefix("torch.") == dt for k, (_, dt) in layout.items())
    assert params["layers.0.q_proj.scales"].dtype == torch.float16
    for name in quantized_linears(imported.spec):
        i, proj = name.split(".")[1:]
        module = "self_attn" if proj in LINEARS[:4] else "mlp"
        assert torch.equal(dequantize_linear(params, name, "awq-w4g128"),
                           reference[f"model.layers.{i}.{module}.{proj}.weight"]), name


def test_a_linear_left_unquantized_is_a_checkpoint_error(awq_checkpoint):
    from kiln.errors import CheckpointError
    from kiln.frontend import import_hf
    from kiln.quant.autoawq import from_autoawq

    imported = import_hf(awq_checkpoint[0], with_tokenizer=False)
    params = dict(imported.params)
    params["layers.1.o_proj"] = torch.zeros(128, 128, dtype=torch.float16)
    with pytest.raises(CheckpointError, match="layers.1.o_proj is not quantized"):
        from_autoawq(params, imported.spec)
    params = dict(imported.params)
    params["layers.0.k_proj.qzeros"] = params["layers.0.k_proj.qzeros"][:, :1]
    with pytest.raises(CheckpointError, match="layers.0.k_proj: inconsistent AutoAWQ GEMM shapes"):
        from_autoawq(params, imported.spec)


def test_autoawq_config_spellings():
    from kiln.errors import UnsupportedModelError
    from kiln.frontend.hf import AUTOAWQ_GEMM, prequantized_of

    assert prequantized_of({}) is None
    for qc in (AUTOAWQ_CONFIG, {"quant_method": "awq", "w_bit": 4, "q_group_size": 128, "zero_point": True,
                                "version": "GEMM"},
               {**AUTOAWQ_CONFIG, "backend": "autoawq"}, {"quant_method": "awq", "format": "gemm", "backend": "auto"}):
        assert prequantized_of({"quantization_config": qc}) == AUTOAWQ_GEMM, qc
    for qc, what in (({**AUTOAWQ_CONFIG, "bits": 3}, "bits=3"),
                     ({**AUTOAWQ_CONFIG, "version": "gemv"}, "version='gemv'"),
                     ({**AUTOAWQ_CONFIG, "version": "exllama"}, "version='exllama'"),
                     ({**AUTOAWQ_CONFIG, "version": "marlin"}, "version='marlin'"),
                     ({**AUTOAWQ_CONFIG, "group_size": 64}, "group_size=64"),
                     ({**AUTOAWQ_CONFIG, "zero_point": False}, "zero_point=False"),
                     ({**AUTOAWQ_CONFIG, "backend": "llm-awq"}, "backend='llm-awq'"),
                     ({"quant_method": "gptq", "bits": 4}, "quant_method='gptq'")):
        with pytest.raises(UnsupportedModelError, match=what):
            prequantized_of({"quantization_config": qc})


@pytest.mark.parametrize("quant_config, extra, message", [
    ({**AUTOAWQ_CONFIG, "bits": 3}, [], "bits=3"),
    ({**AUTOAWQ_CONFIG, "version": "gemv"}, [], "version='gemv'"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128}, [], "quant_method='gptq'"),
    (AUTOAWQ_CONFIG, ["--quant", "w4a8"], "without --quant"),
    (AUTOAWQ_CONFIG, ["--calib", "x.calib"], "needs no --calib"),
])
def test_unsupported_autoawq_checkpoints_are_one_line_errors(awq_checkpoint, tmp_path, quant_config, extra, message):
    from click.testing import CliRunner

    from kiln.cli import main

    src = tmp_path / "awq"
    src.mkdir()
    config = json.loads((awq_checkpoint[0] / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "quantization_config": quant_config}))
    r = CliRunner().invoke(main, ["compile", str(src), "-o", str(tmp_path / "art"), *extra])
    assert r.exit_code == 1, r.output
    assert len(r.output.strip().splitlines()) == 1 and message in r.output and "Traceback" not in r.output, r.output
