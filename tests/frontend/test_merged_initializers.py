"""An ONNX export whose exporter merged identical tensors into one initializer imports as an unmerged one.

A freshly initialised Qwen2 (zero q/k/v biases, all-ones norms, tied embeddings) with random matrices is
exported with the dynamo ONNX exporter, which keeps one initializer for each set of identical tensors: one
zero bias serves every k and v projection, one all-ones vector every norm. Recognition must give each role
its own parameter under kiln's name — the same names, order and values as kiln's Hugging Face frontend reads
from the checkpoint — and the reference form must compute transformers' logits.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import BASE_CONFIG, export_graph, save_tokenizer

from kiln.codegen.targets import resolve_target
from kiln.frontend import import_hf
from kiln.frontend.graph import open_graph
from kiln.ir.abi import REFERENCE_ENTRY
from kiln.ir.tvm import tvm
from kiln.passes.pipeline import build_pipeline, run_pipeline

from test_torch_export_import import compile_llvm

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript")

pytestmark = pytest.mark.cpu


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """(model_dir, transformers model, merged .onnx) of a Qwen2 with its initial biases and norms."""
    import transformers

    root = tmp_path_factory.mktemp("merged")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.Qwen2Config(**BASE_CONFIG, tie_word_embeddings=True)).eval()
    with torch.no_grad():  # matrices large enough for non-flat logits; 1-D tensors keep their zeros and ones
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.15)
    model.save_pretrained(root / "hf")
    save_tokenizer(root / "hf")
    return root / "hf", model, export_graph(model, root / "fresh.onnx")


def test_the_export_merges_identical_tensors(fresh):
    """The premise: fewer 1-D initializers than the model has biases and norms, and one read by several nodes."""
    _, model, path = fresh
    graph = onnx.load(str(path)).graph
    vectors = [i.name for i in graph.initializer if len(i.dims) == 1 and i.dims[0] == model.config.hidden_size]
    norms = [n for n, p in model.named_parameters() if "norm" in n]
    assert len(vectors) < len(norms)
    readers = {name: sum(name in node.input for node in graph.node) for name in vectors}
    assert max(readers.values()) > 1, readers


@pytest.fixture(scope="module")
def graph(fresh):
    """The compile pipeline's steps up to recognize_model: the reference form, its params and spec."""
    model_dir, _, path = fresh
    steps = build_pipeline(resolve_target("cpu"), source=open_graph(path, model_dir))
    return run_pipeline(steps[:[s.name for s in steps].index("recognize_model") + 1])


def test_each_role_gets_its_own_parameter_as_from_the_checkpoint(fresh, graph):
    model_dir = fresh[0]
    hf = import_hf(model_dir)
    assert graph.spec.tie_word_embeddings and graph.spec.attention_bias
    assert list(graph.params) == list(graph.layout) == list(hf.params)
    for name, want in hf.params.items():
        torch.testing.assert_close(graph.params[name], want, rtol=0, atol=0, msg=name)


def test_the_reference_form_computes_transformers_logits(fresh, graph, one_torch_thread):
    model = fresh[1]
    vm = compile_llvm(graph.mod)
    params = [tvm.runtime.tensor(t.numpy(), tvm.cpu()) for t in graph.params.values()]
    ids = torch.randint(3, model.config.vocab_size, (1, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].numpy()
    got = vm[REFERENCE_ENTRY.name](tvm.runtime.tensor(ids[0].numpy().astype(np.int32), tvm.cpu()), params).numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
