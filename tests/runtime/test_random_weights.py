"""Random weights at load time (``ModelRunner(..., random_weights=SEED)``, ``EngineConfig.random_weights``):
made on the device in the artifact's own parameter layout, the same for the same seed, never read from
params.safetensors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kiln.artifact import load_artifact
from kiln.errors import ArtifactError
from kiln.runtime.model_runner import RANDOM_STD, random_parameter


def _logits(runner, prompt=(5, 6, 7, 8), nxt=9) -> np.ndarray:
    runner.kv.add_sequence(0)
    first = runner.forward([0], [list(prompt)]).copy()
    second = runner.forward([0], [[nxt]]).copy()
    runner.kv.remove_sequence(0)
    return np.concatenate([first, second])  # [2, V]


@pytest.fixture(scope="module")
def art(zoo):
    return zoo.artifact("llama", dtype="float32")


@pytest.mark.cpu
def test_same_seed_same_weights_other_seed_other_weights(art):
    from kiln.runtime.model_runner import ModelRunner

    a = load_artifact(art)
    l0, l0b, l1 = (_logits(ModelRunner(a, random_weights=s)) for s in (0, 0, 1))
    assert np.isfinite(l0).all() and l0.std() > 1e-3
    np.testing.assert_array_equal(l0, l0b)
    assert np.abs(l0 - l1).max() > 1e-2
    real = _logits(ModelRunner(a))
    assert np.abs(l0 - real).max() > 1e-2  # random weights replace the artifact's own


@pytest.mark.cpu
def test_random_weights_never_read_params_file(art, fresh_copy):
    from kiln.runtime.model_runner import ModelRunner

    copy = fresh_copy(art)
    a = load_artifact(copy)  # verified with its params file ...
    (copy / "params.safetensors").unlink()  # ... which is then gone
    runner = ModelRunner(a, random_weights=3)
    assert runner.random_weights == 3 and np.isfinite(_logits(runner)).all()
    with pytest.raises(FileNotFoundError):
        ModelRunner(a)


@pytest.mark.cpu
def test_engine_config_passes_the_seed(art):
    from kiln.runtime.engine import Engine, EngineConfig
    from kiln.runtime.model_runner import ModelRunner

    engine = Engine(art, EngineConfig(random_weights=7, kv_cache_memory=1 << 22))
    assert engine.runner.random_weights == 7
    mine = [t.clone() for t in engine.runner._keep]
    direct = ModelRunner(engine.artifact, random_weights=7)._keep
    assert all(torch.equal(x, y) for x, y in zip(mine, direct))
    assert Engine(art, EngineConfig(kv_cache_memory=1 << 22)).runner.random_weights is None


@pytest.mark.cpu
def test_an_artifact_without_recorded_shapes_cannot_get_random_weights(art, fresh_copy):
    from kiln.runtime.model_runner import ModelRunner

    copy = fresh_copy(art)
    m = json.loads((copy / "manifest.json").read_text())
    del m["param_shapes"]
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="records no parameter shapes.*recompile"):
        ModelRunner(load_artifact(copy), random_weights=0)


# -- one parameter (unit) ----------------------------------------------------------------------------------


def _gen(seed=0):
    return torch.Generator(device="cpu").manual_seed(seed)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_matrices_are_normal_norms_are_ones(dtype):
    w = random_parameter("layers.0.q_proj", (256, 512), dtype, _gen(), "cpu")
    assert w.dtype == getattr(torch, dtype) and w.shape == (256, 512)
    assert abs(w.float().std().item() - RANDOM_STD) < 0.1 * RANDOM_STD and abs(w.float().mean().item()) < 1e-3
    for name in ("layers.3.input_norm", "layers.0.post_attention_norm", "final_norm", "layers.1.q_norm"):
        n = random_parameter(name, (64,), dtype, _gen(), "cpu")
        assert torch.equal(n, torch.ones(64, dtype=getattr(torch, dtype)))
    b = random_parameter("layers.0.q_bias", (64,), dtype, _gen(), "cpu")
    assert not torch.equal(b, torch.ones_like(b))  # a bias is not a norm weight


def test_a_seeded_generator_repeats_itself():
    a = random_parameter("embed_tokens", (100, 16), "float16", _gen(5), "cpu")
    b = random_parameter("embed_tokens", (100, 16), "float16", _gen(5), "cpu")
    c = random_parameter("embed_tokens", (100, 16), "float16", _gen(6), "cpu")
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int32"])
def test_integer_layouts_get_uniform_integers(dtype):
    q = random_parameter("layers.0.q_proj_packed", (64, 64), dtype, _gen(), "cpu")
    info = torch.iinfo(getattr(torch, dtype))
    assert q.dtype == getattr(torch, dtype)
    assert q.min().item() >= info.min and q.max().item() <= info.max
    assert len(torch.unique(q)) > 50  # spread over the range, not a constant


def test_an_unknown_dtype_is_an_artifact_error():
    with pytest.raises(ArtifactError, match="int4"):
        random_parameter("w", (4, 4), "int4", _gen(), "cpu")


@pytest.mark.cpu
def test_runner_refuses_more_sequences_than_the_artifact_plans_for(art, fresh_copy):
    """A CUDA artifact with decode graphs records options.max_batch_size (its buffers hold that many rows);
    a KV cache for more sequences is a clear error, not an overflow. The manifest is edited here to carry
    such a bound on a CPU artifact: the check reads the manifest alone."""
    from kiln.errors import KilnError
    from kiln.runtime.kv_cache import KVCacheConfig
    from kiln.runtime.model_runner import ModelRunner

    copy = fresh_copy(art)
    manifest = json.loads((copy / "manifest.json").read_text())
    assert manifest["options"]["max_batch_size"] is None
    manifest["options"]["max_batch_size"] = 4
    (copy / "manifest.json").write_text(json.dumps(manifest))
    a = load_artifact(copy)
    cfg = KVCacheConfig.for_model(a.spec.context_len, a.spec.kv_bytes_per_token, max_num_seqs=8)
    with pytest.raises(KilnError, match="at most 4 sequences per decode step.*--max-num-seqs"):
        ModelRunner(a, kv_config=cfg)
    ModelRunner(a, kv_config=KVCacheConfig.for_model(a.spec.context_len, a.spec.kv_bytes_per_token, max_num_seqs=4))
