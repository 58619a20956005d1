"""``kiln calibrate``: activation statistics of the demo model's decoder linears, checked against the
inputs captured straight from transformers; determinism, the saved file, the shipped texts, and the
user errors of the command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DEMO_MODEL, ROOT
from kiln.frontend.hf import load_spec
from kiln.frontend.registry import ARCHITECTURES
from kiln.quant.calibrate import (DEFAULT_DATA, CalibrateConfig, calibrate, choose_blocks, encode_text,
                                  linear_module_names, load_calibration, save_calibration)
from kiln.quant.calibration import LINEARS

# 6 blocks of 128 tokens = 768 tokens: more than the 512 sample rows, so the rows are a subset
CONFIG = CalibrateConfig(num_samples=6, seq_len=128, seed=0)


@pytest.fixture(scope="module")
def small_text(tmp_path_factory) -> Path:
    """The head of the shipped calibration text: about 9 blocks of 128 demo tokens."""
    path = tmp_path_factory.mktemp("calib-data") / "small.txt"
    path.write_text(DEFAULT_DATA.read_text()[:3200])
    return path


@pytest.fixture(scope="module")
def demo_calib(small_text):
    return calibrate(DEMO_MODEL, small_text, CONFIG)


def in_features(spec) -> dict[str, int]:
    attn = spec.num_q_heads * spec.head_dim
    return {"q_proj": spec.hidden_size, "k_proj": spec.hidden_size, "v_proj": spec.hidden_size, "o_proj": attn,
            "gate_proj": spec.hidden_size, "up_proj": spec.hidden_size, "down_proj": spec.intermediate_size}


def test_linear_names_come_from_the_registry():
    for arch in ARCHITECTURES.values():
        names = linear_module_names(arch, 2)
        assert len(names) == 2 * len(LINEARS)
        assert names["model.layers.1.self_attn.q_proj"] == "layers.1.q_proj"
        assert names["model.layers.0.mlp.down_proj"] == "layers.0.down_proj"
        assert sorted({k.split(".")[-1] for k in names.values()}) == sorted(LINEARS)


def test_choose_blocks():
    rng = lambda: np.random.default_rng(0)
    cfg = CalibrateConfig(num_samples=4, seq_len=10)
    assert choose_blocks(7, cfg, rng()) == [(0, 7)]  # shorter than a block: the whole text
    assert choose_blocks(35, cfg, rng()) == [(0, 10), (10, 20), (20, 30)]  # the remainder is dropped
    picked = choose_blocks(1000, cfg, rng())
    assert len(picked) == 4 and picked == sorted(picked) and all(e - s == 10 and s % 10 == 0 for s, e in picked)
    assert picked == choose_blocks(1000, cfg, rng())
    assert picked != choose_blocks(1000, cfg, np.random.default_rng(1))


def test_statistics_of_every_decoder_linear(demo_calib):
    calib, meta = demo_calib
    spec = load_spec(DEMO_MODEL)
    assert meta["num_blocks"] == 6 and meta["num_tokens"] == 768 and meta["num_sample_rows"] == 512
    assert meta["data_sha256"] and meta["options"]["seq_len"] == 128
    ins = in_features(spec)
    want = {f"layers.{i}.{p}" for i in range(spec.num_layers) for p in LINEARS}
    for table in (calib.mean_abs, calib.max_abs, calib.samples):
        assert set(table) == want
    for name in want:
        n = ins[name.split(".")[-1]]
        mean, mx, rows = calib.mean_abs[name], calib.max_abs[name], calib.samples[name]
        assert mean.shape == (n,) and mx.shape == (n,) and rows.shape == (512, n), name
        assert mean.dtype == mx.dtype == rows.dtype == torch.float32
        assert torch.isfinite(rows).all() and (mean > 0).all() and (mean <= mx).all(), name
        assert (rows.abs() <= mx).all(), name
    assert calib.samples["layers.2.k_proj"] is calib.samples["layers.2.q_proj"]  # one input, stored once
    calib.check(spec)  # what the quantization schemes check before using it


def test_statistics_match_the_captured_inputs(demo_calib, small_text):
    """Against every input row of two linears, captured from transformers over the same blocks."""
    from transformers import AutoModelForCausalLM

    calib, meta = demo_calib
    spec = load_spec(DEMO_MODEL)
    ids = encode_text(DEMO_MODEL / "tokenizer.json", small_text.read_text(), spec.bos_token_id)
    blocks = choose_blocks(len(ids), CONFIG, np.random.default_rng(CONFIG.seed))
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()
    captured = {"layers.1.o_proj": [], "layers.3.down_proj": []}
    mods = {"layers.1.o_proj": model.model.layers[1].self_attn.o_proj,
            "layers.3.down_proj": model.model.layers[3].mlp.down_proj}
    hooks = [m.register_forward_hook(lambda mod, inp, out, k=k: captured[k].append(inp[0][0].clone()))
             for k, m in mods.items()]
    with torch.no_grad():
        for s, e in blocks:
            model(torch.tensor([ids[s:e]]))
    for h in hooks:
        h.remove()
    for name, parts in captured.items():
        x = torch.cat(parts)  # [768, in]
        torch.testing.assert_close(calib.mean_abs[name], x.abs().mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(calib.max_abs[name], x.abs().amax(0), rtol=1e-5, atol=1e-6)
        # each sample row is one of the inputs' rows, all different, in token order
        dist = torch.cdist(calib.samples[name], x, compute_mode="donot_use_mm_for_euclid_dist")  # [512, 768]
        nearest = dist.argmin(1)
        assert (dist.min(1).values < 1e-3).all(), name
        assert (nearest.diff() > 0).all(), name


def test_deterministic_per_seed(demo_calib, small_text):
    calib, _ = demo_calib
    again, _ = calibrate(DEMO_MODEL, small_text, CONFIG)
    other, _ = calibrate(DEMO_MODEL, small_text, CalibrateConfig(num_samples=6, seq_len=128, seed=1))
    for name in calib.samples:
        assert torch.equal(again.samples[name], calib.samples[name])
        assert torch.equal(again.mean_abs[name], calib.mean_abs[name])
        assert torch.equal(again.max_abs[name], calib.max_abs[name])
    assert not torch.equal(other.samples["layers.0.q_proj"], calib.samples["layers.0.q_proj"])


def test_save_load_round_trip(demo_calib, tmp_path):
    calib, meta = demo_calib
    path = tmp_path / "demo.calib"
    save_calibration(calib, meta, path)
    loaded, loaded_meta = load_calibration(path)
    assert loaded_meta == json.loads(json.dumps(meta))
    for table in ("mean_abs", "max_abs", "samples"):
        a, b = getattr(calib, table), getattr(loaded, table)
        assert set(a) == set(b)
        for name in a:
            assert torch.equal(a[name], b[name]), (table, name)
    # q/k/v and gate/up share their input: 4 tensors per layer per table are stored, not 7
    per_layer = sum(calib.samples[f"layers.0.{p}"].numel() * 4 for p in ("q_proj", "o_proj", "gate_proj", "down_proj"))
    assert path.stat().st_size < 1.2 * load_spec(DEMO_MODEL).num_layers * per_layer


def test_shipped_texts_are_disjoint_and_sized():
    cal, held = DEFAULT_DATA, ROOT / "data" / "heldout.txt"
    assert DEFAULT_DATA == ROOT / "data" / "calibration.txt"
    for path in (cal, held):
        assert 40_000 <= path.stat().st_size <= 80_000, path
    long_lines = lambda p: {ln.strip() for ln in p.read_text().splitlines() if len(ln.strip()) >= 40}
    assert not long_lines(cal) & long_lines(held)


# ------------------------------------------------------------------------------------------------
# the command

def invoke(*args):
    from click.testing import CliRunner

    from kiln.cli import main

    return CliRunner().invoke(main, ["calibrate", *map(str, args)])


def assert_one_line_error(r, *fragments):
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), (r.output, r.exception)
    errors = [ln for ln in r.output.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in r.output, r.output
    for f in fragments:
        assert f in errors[0], (f, errors[0])


def test_command_writes_a_loadable_file(tmp_path, small_text):
    out = tmp_path / "c.calib"
    r = invoke(DEMO_MODEL, "--data", small_text, "-o", out, "--num-samples", "2", "--seq-len", "64", "--seed", "3")
    assert r.exit_code == 0, r.output
    calib, meta = load_calibration(out)
    assert meta["options"] == {"num_samples": 2, "seq_len": 64, "seed": 3, "max_sample_rows": 512}
    assert meta["num_tokens"] == 128 and calib.samples["layers.0.down_proj"].shape == (128, 688)
    assert [ln.split("]", 1)[1].strip() for ln in r.stderr.splitlines() if "calibrate: block" in ln] == \
        ["calibrate: block 1/2", "calibrate: block 2/2"]  # progress through the model runs, on stderr


def test_command_user_errors(tmp_path, small_text):
    out = tmp_path / "x.calib"
    assert_one_line_error(invoke(tmp_path / "nope", "-o", out), "nope")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    assert_one_line_error(invoke(gpt2, "-o", out), "unsupported architecture GPT2LMHeadModel")
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n")
    assert_one_line_error(invoke(DEMO_MODEL, "--data", empty, "-o", out), "empty")
    assert_one_line_error(invoke(DEMO_MODEL, "--data", tmp_path / "missing.txt", "-o", out), "does not exist")
    assert_one_line_error(invoke(DEMO_MODEL, "--data", small_text, "-o", tmp_path / "no" / "dir" / "x.calib"),
                          "does not exist")
    assert not out.exists()
