"""CPU target levels: an x86-64-v3 artifact records the CPU features it needs, gives the portable
(SSE2) and the default (native: the host's own CPU) artifacts' tokens, and is refused (not crashed) on a CPU
that lacks those features; so is a native one."""

from __future__ import annotations

import pytest

from kiln.artifact import load_artifact
from kiln.errors import ArtifactError
from kiln.runtime import LLM, SamplingParams
from kiln.runtime import model_runner

pytestmark = pytest.mark.cpu
PROMPTS = [[5, 9, 33, 17], [100, 101, 7, 8, 40, 41, 42]]


def test_v3_artifact_records_flags_and_matches_baseline(zoo):
    v3 = zoo.artifact("llama", dtype="float32", arch="x86-64-v3")
    target = load_artifact(v3).target
    assert target["arch"] == "x86-64-v3" and "avx2" in target["cpu_flags"]
    host = model_runner.host_cpu_flags()
    assert host is not None and set(target["cpu_flags"]) <= host, "this test machine is expected to have AVX2"
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    base = LLM(zoo.artifact("llama", dtype="float32", arch="x86-64")).generate(PROMPTS, params)
    native = LLM(zoo.artifact("llama", dtype="float32")).generate(PROMPTS, params)
    wide = LLM(v3).generate(PROMPTS, params)
    assert [r.token_ids for r in wide] == [r.token_ids for r in base] == [r.token_ids for r in native]


def test_refused_on_a_cpu_without_the_features(zoo, monkeypatch):
    v3 = zoo.artifact("llama", dtype="float32", arch="x86-64-v3")
    monkeypatch.setattr(model_runner, "host_cpu_flags", lambda: {"sse2", "fpu"})
    with pytest.raises(ArtifactError, match="needs CPU features this machine lacks.*avx2"):
        LLM(v3)
    native = zoo.artifact("llama", dtype="float32")
    assert load_artifact(native).target["arch"] == "native"
    with pytest.raises(ArtifactError, match=r"compiled for native \([\w.-]+\), which needs CPU features this machine lacks"):
        LLM(native)
