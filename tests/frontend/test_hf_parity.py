"""End-to-end numerical parity with transformers, per supported architecture and for the bundled demo model.

Every random-weight variant of conftest's zoo and the demo checkpoint is compiled once (float32, CPU)
and run step by step through ``LLM.runner.forward``: each prefill and decode step's logits must match
transformers' within 1e-4, greedy generation must reproduce ``model.generate`` token for token,
batching must not change what a sequence generates, and every page must be back once sequences finish.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import DEMO_MODEL, MODELS, VOCAB

pytestmark = [pytest.mark.cpu, pytest.mark.usefixtures("one_torch_thread")]

VARIANTS = [*MODELS, "demo"]
LENGTHS = (3, 9, 17, 30)  # prompt lengths of the four prompts of every model
ATOL = 1e-4
DECODE_STEPS = 16

# Text for the demo model (a Python-code model): ordinary Python source.
PY_SOURCE = '''import os
from pathlib import Path


def read_lines(path: str, strip: bool = True) -> list[str]:
    """Return the lines of a text file, optionally stripped of whitespace."""
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    if strip:
        lines = [line.strip() for line in lines]
    return [line for line in lines if line]


class Counter:
    def __init__(self):
        self.counts = {}

    def add(self, key, n=1):
        self.counts[key] = self.counts.get(key, 0) + n
        return self.counts[key]
'''


@pytest.fixture(scope="module")
def model(zoo):
    """variant -> (float32 transformers model, kiln LLM, its four prompts); one LLM per artifact per module."""
    import torch
    import transformers

    from kiln.runtime import LLM

    cache: dict = {}

    def get(variant: str):
        if variant not in cache:
            if variant == "demo":
                hf = transformers.AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()
                llm = LLM(zoo.artifact("demo"))
                ids = llm.tokenizer.encode(PY_SOURCE)
                assert len(ids) >= 2 * sum(LENGTHS), len(ids)
                starts = np.cumsum((0,) + LENGTHS[:-1]) * 2  # disjoint slices of the source
                prompts = [ids[s:s + n] for s, n in zip(starts, LENGTHS)]
            else:
                _, hf = zoo.hf(variant)
                llm = LLM(zoo.artifact(variant, dtype="float32"))
                rng = np.random.default_rng(sum(map(ord, variant)))
                prompts = [rng.integers(3, VOCAB, n).tolist() for n in LENGTHS]
            assert llm.spec.dtype == "float32", f"{variant}: expected a float32 artifact, got {llm.spec.dtype}"
            assert [len(p) for p in prompts] == list(LENGTHS)
            cache[variant] = (hf, llm, prompts)
        return cache[variant]

    return get


def hf_last_logits(hf, ids: list[int]) -> np.ndarray:
    """transformers' logits of the last token of ``ids`` (a full forward, no cache), float32 [V]."""
    import torch

    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0, -1].float().numpy()


def assert_close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert np.isfinite(got).all(), f"{what}: non-finite logits"
    err = float(np.abs(got - want).max())
    assert err <= ATOL, f"{what}: max abs error {err:.3g} > {ATOL}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_prefill_and_decode_logits_match_hf(variant, model):
    """One sequence: prefill (the ``prefill`` entry), then 16 greedy ``decode`` steps, each against HF."""
    hf, llm, prompts = model(variant)
    free = llm.kv.num_free_pages
    sid = 1000
    tokens = list(prompts[2])
    llm.kv.add_sequence(sid)
    try:
        logits = llm.runner.forward([sid], [tokens])
        assert logits.shape == (1, llm.spec.vocab_size)
        assert_close(logits[0], hf_last_logits(hf, tokens), f"{variant} prefill")
        for step in range(DECODE_STEPS):
            nxt = int(np.argmax(logits[0]))
            tokens.append(nxt)
            logits = llm.runner.forward([sid], [[nxt]])
            assert_close(logits[0], hf_last_logits(hf, tokens), f"{variant} decode step {step}")
        assert llm.kv.sequence_len(sid) == len(tokens)
    finally:
        llm.kv.remove_sequence(sid)
    assert llm.kv.num_free_pages == free


@pytest.mark.parametrize("variant", VARIANTS)
def test_batched_chunked_prefill_and_decode_logits_match_hf(variant, model):
    """Four sequences together: prompts prefilled in two chunks each (``batch_prefill``, the second
    chunk attending to cached KV), then ``batch_decode`` steps; every row against HF."""
    hf, llm, prompts = model(variant)
    free = llm.kv.num_free_pages
    sids = [2000 + i for i in range(len(prompts))]
    tokens = [list(p) for p in prompts]
    for s in sids:
        llm.kv.add_sequence(s)
    try:
        cuts = [max(1, len(p) // 2) for p in prompts]
        first = [p[:c] for p, c in zip(prompts, cuts)]
        second = [p[c:] for p, c in zip(prompts, cuts)]
        logits = llm.runner.forward(sids, first)
        for i, chunk in enumerate(first):
            assert_close(logits[i], hf_last_logits(hf, chunk), f"{variant} chunk 1 of prompt {i}")
        # a prompt of 3 tokens has a 2-token second chunk; every second chunk is non-empty
        assert all(second)
        logits = llm.runner.forward(sids, second)
        for i in range(len(sids)):
            assert_close(logits[i], hf_last_logits(hf, tokens[i]), f"{variant} chunk 2 of prompt {i}")
        for step in range(DECODE_STEPS // 2):
            nxt = [int(t) for t in np.argmax(logits, axis=-1)]
            for t, n in zip(tokens, nxt):
                t.append(n)
            logits = llm.runner.forward(sids, [[n] for n in nxt])
            for i in range(len(sids)):
                assert_close(logits[i], hf_last_logits(hf, tokens[i]), f"{variant} batch decode step {step} seq {i}")
    finally:
        for s in sids:
            llm.kv.remove_sequence(s)
    assert llm.kv.num_free_pages == free


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_generation_matches_hf_generate(variant, model):
    import torch

    from kiln.runtime import SamplingParams

    hf, llm, prompts = model(variant)
    prompt = prompts[2]
    free = llm.kv.num_free_pages
    [res] = llm.generate([prompt], SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    assert llm.kv.num_free_pages == free
    assert res.prompt_token_ids == prompt
    assert res.finish_reason == "length"
    # ignore_eos lets kiln emit EOS and go on; HF's min_new_tokens would instead *suppress* EOS (changing
    # the greedy choice at that step), so HF runs without an EOS token: plain greedy for 32 tokens.
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          do_sample=False, max_new_tokens=32, min_new_tokens=32, eos_token_id=None,
                          pad_token_id=0)
    want = out[0, len(prompt):].tolist()
    assert len(want) == 32
    assert res.token_ids == want


@pytest.mark.parametrize("variant", VARIANTS)
def test_batch_generation_equals_alone(variant, model):
    from kiln.runtime import SamplingParams

    hf, llm, prompts = model(variant)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    free = llm.kv.num_free_pages
    together = llm.generate(prompts, params)
    assert llm.kv.num_free_pages == free
    alone = [llm.generate([p], params)[0] for p in prompts]
    assert llm.kv.num_free_pages == free
    for i, (t, a) in enumerate(zip(together, alone)):
        assert t.prompt_token_ids == a.prompt_token_ids == prompts[i]
        assert len(t.token_ids) == 24
        assert t.token_ids == a.token_ids, f"{variant}: prompt {i} ({len(prompts[i])} tokens) differs when batched"
