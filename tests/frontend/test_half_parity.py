"""Half-precision parity with transformers, per supported architecture: kiln's float16 and bfloat16 CPU artifacts.

Every CUDA artifact kiln ships is fp16 or bf16, and the float32 parity tests (test_hf_parity.py) say nothing
about half precision. Here each conftest variant is compiled for the CPU in both half dtypes and run teacher
forced (an 8-token prefill, then 15 decode steps over fixed tokens); transformers runs the same checkpoint in
the same dtype and in float32 on the same tokens.

The tolerance, derived rather than picked: in half precision neither engine can match float32 beyond its own
rounding, and kiln rounds at the same places transformers does (weights, activations between ops), only in
another order. So kiln's logit error against float32 must be of the size of transformers' own error in that
dtype: its root mean square within ``RMS_RATIO`` (1.25) times transformers' (measured 0.79-1.09x across the
variants and dtypes, 2026-12-07), its largest within ``MAX_RATIO`` (2.5) times (measured 0.53-1.71x: one
logit's rounding can land either way). Greedy
tokens: a logit error of ``e`` can only swap two candidates within ``2e`` of each other, so wherever float32's
top-two margin exceeds twice kiln's error, kiln's argmax must be float32's (and transformers' in the same dtype
is checked the same way, as a control).
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import MODELS, VOCAB

pytestmark = [pytest.mark.cpu, pytest.mark.usefixtures("one_torch_thread")]

RMS_RATIO, MAX_RATIO = 1.25, 2.5
PREFILL, TOKENS = 8, 24


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("variant", list(MODELS))
def test_half_precision_artifact_within_transformers_rounding(zoo, variant, dtype):
    import torch
    import transformers

    from kiln.runtime import LLM

    model_dir, hf32 = zoo.hf(variant)
    hf_half = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    llm = LLM(zoo.artifact(variant, dtype=dtype))
    assert llm.spec.dtype == dtype
    ids = np.random.default_rng(sum(map(ord, variant))).integers(3, VOCAB, TOKENS).tolist()
    llm.kv.add_sequence(1)
    try:
        rows = [llm.runner.forward([1], [ids[:PREFILL]])[0]]
        for t in ids[PREFILL:-1]:
            rows.append(llm.runner.forward([1], [[t]])[0])
    finally:
        llm.kv.remove_sequence(1)
    kiln = np.stack(rows).astype(np.float64)  # the logits after each of positions PREFILL-1 .. TOKENS-2
    with torch.no_grad():
        ref = hf32(torch.tensor([ids])).logits[0, PREFILL - 1:TOKENS - 1].double().numpy()
        half = hf_half(torch.tensor([ids])).logits[0, PREFILL - 1:TOKENS - 1].double().numpy()
    assert kiln.shape == ref.shape and np.isfinite(kiln).all()
    err_kiln, err_hf = np.abs(kiln - ref).max(), np.abs(half - ref).max()
    rms_kiln, rms_hf = np.sqrt(((kiln - ref) ** 2).mean()), np.sqrt(((half - ref) ** 2).mean())
    assert rms_kiln <= RMS_RATIO * rms_hf, f"{variant} {dtype}: rms error kiln {rms_kiln:.4g}, transformers {rms_hf:.4g}"
    assert err_kiln <= MAX_RATIO * err_hf, f"{variant} {dtype}: max error kiln {err_kiln:.4g}, transformers {err_hf:.4g}"
    top2 = np.sort(ref, axis=1)[:, -2:]
    for name, got, err in (("kiln", kiln, err_kiln), ("transformers", half, err_hf)):
        clear = top2[:, 1] - top2[:, 0] > 2 * err  # steps whose float32 choice no such error can change
        assert (got.argmax(1) == ref.argmax(1))[clear].all(), f"{variant} {dtype}: {name} greedy token differs"
