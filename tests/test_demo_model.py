"""The bundled demo model: its files, its size, and that kiln's artifact of it models Python source.

The perplexity check runs through kiln's own runtime (teacher forcing one token per step) on a
held-out standard-library file the model never saw (the training script's split), so it checks the
model and kiln's execution of it together.
"""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest

from conftest import DEMO_MODEL, ROOT

pytestmark = pytest.mark.cpu
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


def _training_script():
    spec = importlib.util.spec_from_file_location("train_demo_model", ROOT / "tools" / "train_demo_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_hugging_face_layout_and_size():
    for f in FILES:
        assert (DEMO_MODEL / f).is_file(), f
    assert sum(p.stat().st_size for p in DEMO_MODEL.iterdir()) <= 20 * 1024 * 1024
    cfg = json.loads((DEMO_MODEL / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    tok_cfg = json.loads((DEMO_MODEL / "tokenizer_config.json").read_text())
    assert "chat_template" in tok_cfg and "{% for" in tok_cfg["chat_template"]


def test_chat_template_renders():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|user|>\nhi<|end|>\n<|assistant|>\n"


def _nll_kiln(llm, ids: list[int]) -> float:
    """Sum of -log p(ids[t] | ids[:t]) for t >= 1, one decode step per token through kiln's runtime."""
    llm.kv.add_sequence(0)
    try:
        nll = 0.0
        logits = llm.runner.forward([0], [ids[:1]])[0]
        for t in range(1, len(ids)):
            z = logits.astype(np.float64)
            nll += np.log(np.exp(z - z.max()).sum()) + z.max() - z[ids[t]]
            logits = llm.runner.forward([0], [[ids[t]]])[0]
    finally:
        llm.kv.remove_sequence(0)
    return nll


def test_held_out_perplexity_through_kiln(zoo):
    import sysconfig
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM

    from kiln.runtime import LLM

    train = _training_script()
    _, held = train.corpus_files(Path(sysconfig.get_paths()["stdlib"]))
    llm = LLM(zoo.artifact("demo"))
    hf = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()
    windows = [ids[200:328] for ids in (llm.tokenizer.encode(t) for t in train.read(held)) if len(ids) >= 328][:4]
    assert len(windows) == 4
    nll_kiln = sum(_nll_kiln(llm, w) for w in windows)
    with torch.no_grad():
        nll_hf = 0.0
        for w in windows:
            x = torch.tensor([w])
            nll_hf += torch.nn.functional.cross_entropy(hf(x).logits[0, :-1].double(), x[0, 1:], reduction="sum").item()
    n = sum(len(w) - 1 for w in windows)
    ppl, ppl_hf = math.exp(nll_kiln / n), math.exp(nll_hf / n)
    assert abs(ppl - ppl_hf) < 1e-3 * ppl_hf, (ppl, ppl_hf)
    # A uniform guess over the 4096-token vocabulary scores 4096; training.json reports the model's
    # perplexity over 200 held-out windows (12.0 for the committed model).
    assert ppl < 30, f"held-out perplexity {ppl:.1f}: the bundled model does not model Python source"


def test_greedy_continuation_looks_like_python(zoo):
    import keyword

    from kiln.runtime import LLM, SamplingParams

    llm = LLM(zoo.artifact("demo"))
    (res,) = llm.generate(["import os\n\n\ndef main("], SamplingParams(max_tokens=48, temperature=0))
    words = set(res.text.replace("(", " ").replace(")", " ").replace(":", " ").split())
    python_words = words & (set(keyword.kwlist) | {"self"})
    assert python_words and res.text.count("\n") >= 2, res.text
