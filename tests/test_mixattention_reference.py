"""tests/mixattention_reference.py, the PyTorch MixAttention forward, checked against transformers.

With every layer global and owning its KV it must be a Llama (transformers' LlamaForCausalLM, same
weights); with every layer sliding it must be a Mistral with that window (transformers'
MistralForCausalLM, sequences longer than the window); a window at least the sequence long changes
nothing; and a layer sharing another's KV must attend to exactly that layer's keys and values.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import mixattention_reference as ref
from conftest import BASE_CONFIG
from kiln.frontend import import_hf
from kiln.frontend.hf import load_spec

pytestmark = pytest.mark.cpu


def test_all_global_owners_is_transformers_llama(zoo, one_torch_thread):
    model_dir, hf = zoo.hf("llama")
    imp = import_hf(model_dir, with_tokenizer=False)
    ids = torch.randint(3, 320, (37,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ref.forward(imp.spec, imp.params, ids), want, atol=1e-4, rtol=0)


def test_all_sliding_is_transformers_mistral(tmp_path, one_torch_thread):
    import transformers

    from conftest import save_tokenizer

    cfg = transformers.MistralConfig(**{**BASE_CONFIG, "sliding_window": 8, "head_dim": 16})
    torch.manual_seed(0)
    hf = transformers.MistralForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.15)
    hf.save_pretrained(tmp_path)
    save_tokenizer(tmp_path)
    spec = load_spec(tmp_path)
    assert spec.layer_types == ("sliding", "sliding") and spec.sliding_window == 8
    imp = import_hf(tmp_path, with_tokenizer=False)
    ids = torch.randint(3, 320, (30,), generator=torch.Generator().manual_seed(1)).tolist()  # > 3 windows
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0]
    got = ref.forward(spec, imp.params, ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # and the window matters: as global attention the late positions differ
    glob = ref.forward(dataclasses.replace(spec, layer_types=("global", "global")), imp.params, ids)
    assert (glob[20:] - want[20:]).abs().max() > 1e-2


def test_a_window_as_long_as_the_sequence_changes_nothing(zoo):
    model_dir, _ = zoo.hf("llama")
    imp = import_hf(model_dir, with_tokenizer=False)
    ids = list(range(3, 23))
    sliding = dataclasses.replace(imp.spec, sliding_window=20, layer_types=("sliding", "sliding"))
    torch.testing.assert_close(ref.forward(sliding, imp.params, ids), ref.forward(imp.spec, imp.params, ids))


def test_a_sharing_layer_attends_to_its_source_kv(zoo):
    """Layer 1 shares layer 0's KV: its output must not depend on any K/V weight of its own (it has none),
    and equals layer 0's K/V used with layer 1's queries — checked by giving an owner model layer 1
    projections that reproduce layer 0's K/V on the same input (layer 1 reads layer 0's input here because
    layer 0's attention and MLP are zeroed, so both layers see the embedding)."""
    model_dir, _ = zoo.hf("llama")
    imp = import_hf(model_dir, with_tokenizer=False)
    w = {k: v.clone() for k, v in imp.params.items()}
    w["layers.0.o_proj"].zero_()
    w["layers.0.down_proj"].zero_()  # layer 0 passes x through: both layers' inputs are the embeddings
    w["layers.1.input_norm"] = w["layers.0.input_norm"].clone()
    owner = {**w, "layers.1.k_proj": w["layers.0.k_proj"], "layers.1.v_proj": w["layers.0.v_proj"]}
    shared_spec = dataclasses.replace(imp.spec, kv_sources=(0, 0))
    shared = {k: v for k, v in w.items() if k not in ("layers.1.k_proj", "layers.1.v_proj")}
    assert set(ref.weight_shapes(shared_spec)) == set(shared)
    ids = list(range(5, 30))
    torch.testing.assert_close(ref.forward(shared_spec, shared, ids), ref.forward(imp.spec, owner, ids))
