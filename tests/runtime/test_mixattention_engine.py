"""MixAttention served end to end: the Character.AI 13-layer map (1 global KV owner, 4 sliding owners,
window 64) compiled from a checkpoint trained that way (no K/V weights for the sharing layers) and run by
the engine on kiln's grouped KV cache, against the PyTorch reference (tests/mixattention_reference.py):
greedy tokens identical over 300 tokens alone, batched with chunked prefill (chunks longer than the
window), under preemption and with prefix reuse; and the admission measurement of
tools/bench_kv_admission.py (at least 8x more resident 2,000-token sequences than the all-global model
in the same KV memory)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import mixattention_reference as ref
from conftest import ROOT, save_tokenizer
from kiln.runtime.engine import Engine, EngineConfig
from kiln.runtime.outputs import Request
from kiln.runtime.sampler import SamplingParams

pytestmark = pytest.mark.cpu

SPEC = ref.character_ai_spec(window=64, context_len=1024)
W = ref.random_weights(SPEC, seed=3, std=0.2)


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    from kiln.compiler import CompileConfig, compile_model

    root = tmp_path_factory.mktemp("mixattention")
    ref.save_checkpoint(SPEC, W, root / "ck")
    save_tokenizer(root / "ck", SPEC.vocab_size)
    compile_model(root / "ck", root / "art", CompileConfig())
    return root / "art"


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, SPEC.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def run_together(engine, reqs, stagger: int = 2) -> dict[str, list[int]]:
    pending = list(reqs)
    got: dict[str, list[int]] = {r.request_id: [] for r in reqs}
    step = 0
    while pending or engine.has_unfinished():
        if pending and step % stagger == 0:
            engine.add_request(pending.pop(0))
        for o in engine.step():
            got[o.request_id] += o.outputs[0].token_ids
        step += 1
    return got


# prompts shorter and longer than the window, outputs well past it
WORKLOAD = [(150, 300, 1), (90, 200, 2), (37, 150, 3), (5, 300, 4)]


@pytest.fixture(scope="module")
def expected(one_torch_thread):
    return {f"r{seed}": ref.greedy(SPEC, W, prompt(n, seed), m) for n, m, seed in WORKLOAD}


def requests(tag=""):
    return [Request(f"r{seed}{tag}", prompt(n, seed), greedy(m)) for n, m, seed in WORKLOAD]


def test_manifest_and_kv_layout(mix):
    from kiln.artifact import load_artifact

    art = load_artifact(mix)
    assert art.spec.kv_sources == ref.CHARACTER_AI_SOURCES and art.spec.grouped_kv
    names = set(art.param_names)  # owners' q, k, v fused into one projection; a sharing layer keeps only q
    assert {"layers.1.qkv_proj", "layers.2.q_proj"} <= names
    assert not {"layers.2.qkv_proj", "layers.2.k_proj", "layers.2.v_proj"} & names
    eng = Engine(mix, EngineConfig(max_num_seqs=2, kv_cache_memory=64 << 20))
    assert eng.kv.owners == [0, 1, 3, 7, 9] and eng.kv.sliding.tolist() == [False, True, True, True, True]


def test_alone_300_tokens_equal_the_reference(mix, one_torch_thread):
    ids = prompt(20, 0)
    eng = Engine(mix, EngineConfig(max_num_seqs=1, max_batched_tokens=64, kv_cache_memory=64 << 20))
    out = eng.generate([Request("a", ids, greedy(300))])["a"]
    got = [t for o in out for t in o.outputs[0].token_ids]
    assert got == ref.greedy(SPEC, W, ids, 300)


def test_batched_with_chunked_prefill_equals_the_reference(mix, expected):
    # a step carries up to 100 tokens: prompt chunks longer than the window, next to running decodes
    eng = Engine(mix, EngineConfig(max_num_seqs=8, max_batched_tokens=100, kv_cache_memory=64 << 20))
    assert run_together(eng, requests()) == expected
    s = eng.stats()  # what is left is the prefix cache's
    assert s.kv_sequences == s.cached_sequences and s.kv_pages_total - s.kv_pages_free == s.kv_pages_cached
    eng.clear_prefix_cache()
    assert eng.kv.num_free_pages == eng.kv_pages_total


def test_preemption_keeps_outputs(mix, expected):
    # room for about two of the four sequences at their full length: the newest get preempted and recomputed
    eng = Engine(mix, EngineConfig(max_num_seqs=8, max_batched_tokens=64, prefix_cache=False,
                                   kv_cache_memory=400 * SPEC.kv_bytes_per_token))
    assert run_together(eng, requests("p"), stagger=1) == {k + "p": v for k, v in expected.items()}
    assert eng.stats().preemptions > 0
    assert eng.kv.num_free_pages == eng.kv_pages_total


def test_prefix_reuse_forks_at_a_page_and_keeps_outputs(mix, one_torch_thread):
    eng = Engine(mix, EngineConfig(max_num_seqs=4, max_batched_tokens=64, kv_cache_memory=64 << 20))
    first = prompt(100, 7)
    out = eng.generate([Request("a", first, greedy(20))])["a"]
    second = first + [t for o in out for t in o.outputs[0].token_ids] + prompt(10, 8)
    before = eng.stats()
    got = eng.generate([Request("b", second, greedy(30))])["b"]
    after = eng.stats()
    # "a" holds 119 computed tokens: the fork lands on the page boundary below (112), and the sliding
    # owners still hold the window of pages a query at 112 reads
    assert got[-1].cached_tokens == 112 and after.prefix_cache_hits == before.prefix_cache_hits + 1
    assert after.prefill_tokens_computed - before.prefill_tokens_computed == len(second) - 112
    assert [t for o in got for t in o.outputs[0].token_ids] == ref.greedy(SPEC, W, second, 30)


def test_a_shared_prefix_behind_the_window_is_reused(mix, one_torch_thread):
    """Two requests share a 200-token prefix; the first goes on 38 tokens more. The second forks at 192:
    its window (positions 129..191) slid out of the first's sliding owners, whose released blocks are
    taken back while no other sequence was given them; only the new tokens are computed."""
    eng = Engine(mix, EngineConfig(max_num_seqs=4, max_batched_tokens=64, kv_cache_memory=64 << 20))
    shared = prompt(200, 21)
    eng.generate([Request("a", shared + prompt(30, 22), greedy(8))])
    second = shared + prompt(10, 23)
    before = eng.stats()
    got = eng.generate([Request("b", second, greedy(40))])["b"]
    after = eng.stats()
    assert got[-1].cached_tokens == 192
    assert after.prefill_tokens_computed - before.prefill_tokens_computed == len(second) - 192
    assert [t for o in got for t in o.outputs[0].token_ids] == ref.greedy(SPEC, W, second, 40)


def test_inspect_reports_the_formula(mix):
    from click.testing import CliRunner

    from kiln.cli import main

    per = SPEC.kv_bytes_per_token_per_layer  # 2 x kv heads x head_dim x 4 bytes
    for L in (10, 64, 2000):
        r = CliRunner().invoke(main, ["inspect", str(mix), "--json", "--seq-len", str(L)])
        assert r.exit_code == 0, r.output
        info = json.loads(r.output)
        assert {g: (tuple(v["owners"]), v["bytes_per_token"]) for g, v in info["kv_groups"].items()} == \
            {"global": ((0,), per), "sliding": ((1, 3, 7, 9), 4 * per)}
        b = info["kv_bytes_per_sequence"]
        assert b["global"] + b["sliding"] == per * (1 * L + 4 * min(L, 64))  # global owners x L + sliding x min(L, W)


def test_admits_8x_more_2000_token_sequences_than_all_global(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    import bench_kv_admission

    r = bench_kv_admission.measure(tmp_path, prompt_len=2000, max_tokens=100, window=64, budget_seqs=2,
                                   requests=(24, 3))
    assert r["all-global"]["peak_resident_sequences"] == 2
    assert r["ratio"] >= 8, r


def test_mistral_sliding_window_matches_transformers_past_the_window(zoo, one_torch_thread):
    """A transformers Mistral checkpoint with a 16-token window: greedy tokens equal transformers'
    ``generate`` for 100 tokens, alone and batched with chunked prefill; without the window transformers
    itself would say otherwise, so the window is what is being matched."""
    import copy

    model_dir, model = zoo.hf("mistral-sliding")
    art = zoo.artifact("mistral-sliding")
    prompts = [prompt(n, 20 + n) for n in (10, 40, 3)]

    def hf_greedy(m, ids):
        out = m.generate(torch.tensor([ids]), max_new_tokens=100, do_sample=False, min_new_tokens=100)
        return out[0, len(ids):].tolist()

    want = {f"m{i}": hf_greedy(model, ids) for i, ids in enumerate(prompts)}
    unwindowed = copy.deepcopy(model)
    unwindowed.config.sliding_window = None
    assert hf_greedy(unwindowed, prompts[0]) != want["m0"]

    alone = Engine(art, EngineConfig(max_num_seqs=1, max_batched_tokens=32, kv_cache_memory=16 << 20))
    got = alone.generate([Request("m0", prompts[0], greedy(100))])["m0"]
    assert [t for o in got for t in o.outputs[0].token_ids] == want["m0"]
    batched = Engine(art, EngineConfig(max_num_seqs=4, max_batched_tokens=24, kv_cache_memory=16 << 20))
    assert run_together(batched, [Request(f"m{i}", ids, greedy(100)) for i, ids in enumerate(prompts)]) == want


def test_mistral_graph_export_finds_the_window_and_matches_transformers(zoo, one_torch_thread):
    """The same Mistral exported with torch.export: recognition reads the 16-token window off the graph's
    mask, and the compiled model (kiln's grouped cache) generates transformers' tokens past it."""
    from kiln.artifact import load_artifact
    from kiln.compiler import CompileConfig, compile_model

    model_dir, model = zoo.hf("mistral-sliding")
    art = zoo.root / "art-mistral-sliding-pt2"
    compile_model(zoo.graph("mistral-sliding", "pt2"), art, CompileConfig(tokenizer=model_dir))
    spec = load_artifact(art).spec
    assert spec.sliding_window == 16 and spec.layer_types == ("sliding", "sliding") and spec.grouped_kv
    ids = prompt(40, 5)
    want = model.generate(torch.tensor([ids]), max_new_tokens=60, do_sample=False, min_new_tokens=60)[0, 40:].tolist()
    eng = Engine(art, EngineConfig(max_num_seqs=1, max_batched_tokens=32, kv_cache_memory=16 << 20))
    out = eng.generate([Request("g", ids, greedy(60))])["g"]
    assert [t for o in out for t in o.outputs[0].token_ids] == want


def test_kv_sharing_map_on_the_command_line(tmp_path, one_torch_thread):
    """``kiln compile --kv-sharing MAP`` applies the map to a checkpoint whose config does not carry it."""
    from click.testing import CliRunner

    from kiln.artifact import load_artifact
    from kiln.cli import main

    ck = tmp_path / "ck"
    ref.save_checkpoint(SPEC, W, ck)
    save_tokenizer(ck, SPEC.vocab_size)
    config = json.loads((ck / "config.json").read_text())
    del config["kv_sources"]
    (ck / "config.json").write_text(json.dumps(config))
    bad = CliRunner().invoke(main, ["compile", str(ck), "-o", str(tmp_path / "bad"), "--kv-sharing", "0,0,1"])
    assert bad.exit_code == 1 and "--kv-sharing 0,0,1" in bad.output and "Traceback" not in bad.output
    bad = CliRunner().invoke(main, ["compile", str(ck), "-o", str(tmp_path / "bad"),
                                    "--kv-sharing", "0,0,1,3,3,3,0,7,7,9,9,9,0"])  # sliding 1 -> global 0
    assert bad.exit_code == 1 and "shares the KV of layer 0" in bad.output
    sharing = ",".join(map(str, ref.CHARACTER_AI_SOURCES))
    r = CliRunner().invoke(main, ["compile", str(ck), "-o", str(tmp_path / "art"), "--kv-sharing", sharing, "-q"])
    assert r.exit_code == 0, r.output
    assert load_artifact(tmp_path / "art").spec.kv_sources == ref.CHARACTER_AI_SOURCES
    ids = prompt(30, 9)
    out = Engine(tmp_path / "art", EngineConfig(max_num_seqs=1, kv_cache_memory=16 << 20)).generate(
        [Request("k", ids, greedy(90))])["k"]
    assert [t for o in out for t in o.outputs[0].token_ids] == ref.greedy(SPEC, W, ids, 90)


def test_quantized_mixattention_matches_its_dequantized_reference(tmp_path, one_torch_thread):
    """``--quant rtn-w4g128`` on the MixAttention model: the sharing layers keep no K/V projection
    (packed or not), and greedy tokens past the window equal the PyTorch reference run with every
    quantized linear replaced by its dequantized weight."""
    from safetensors.torch import load_file

    from conftest import unfuse_params
    from kiln.artifact import load_artifact
    from kiln.compiler import CompileConfig, compile_model
    from kiln.quant.schemes import dequantize_linear, quantized_linears

    ref.save_checkpoint(SPEC, W, tmp_path / "ck")
    save_tokenizer(tmp_path / "ck", SPEC.vocab_size)
    compile_model(tmp_path / "ck", tmp_path / "art", CompileConfig(quant="rtn-w4g128"))
    art = load_artifact(tmp_path / "art")
    assert art.spec.kv_sources == ref.CHARACTER_AI_SOURCES
    assert not {n for n in art.param_names if n.startswith(("layers.2.k", "layers.2.v", "layers.2.qkv"))}
    qparams = unfuse_params(load_file(str(art.params_file)), art.spec)
    wq = dict(W)
    for name in quantized_linears(SPEC):
        if name in W:  # (the sharing layers' K/V are not in the checkpoint)
            wq[name] = dequantize_linear(qparams, name, "rtn-w4g128")
    ids = prompt(90, 2)
    out = Engine(art.path, EngineConfig(max_num_seqs=2, max_batched_tokens=64)).generate(
        [Request("q", ids, greedy(120))])["q"]
    assert [t for o in out for t in o.outputs[0].token_ids] == ref.greedy(SPEC, wq, ids, 120)


def test_a_graph_with_kv_sharing_is_refused_in_one_line(tmp_path):
    from click.testing import CliRunner

    from kiln.cli import main

    save_tokenizer(tmp_path, SPEC.vocab_size)
    graph = tmp_path / "m.onnx"
    graph.write_bytes(b"x")
    r = CliRunner().invoke(main, ["compile", str(graph), "-o", str(tmp_path / "b"), "--tokenizer", str(tmp_path),
                                  "--kv-sharing", "0,1"])
    assert r.exit_code == 1 and "--kv-sharing applies to a Hugging Face" in r.output and "Traceback" not in r.output


@pytest.mark.cuda_compile
def test_cuda_build_holds_the_grouped_kernels_as_machine_code(tmp_path):
    """The grouped cache's kernels cross-compile for sm_90 (thread-bound loops; not run on a GPU yet)."""
    from kiln.artifact import load_artifact
    from kiln.compiler import CompileConfig, compile_model

    ck = tmp_path / "ck"
    ref.save_checkpoint(SPEC, W, ck)
    save_tokenizer(ck, SPEC.vocab_size)
    compile_model(ck, tmp_path / "art", CompileConfig(target="cuda", arch="sm_90"))
    lib = (tmp_path / "art" / "model.so").read_bytes()
    assert (0xBA55ED50).to_bytes(4, "little") in lib  # a fatbin (codegen/build.py refuses CUDA source)
    assert b"kv_attention_o1_w64" in lib and b"kv_append_o0" in lib and b"__global__" not in lib
    art = load_artifact(tmp_path / "art")
    assert art.spec.grouped_kv
    # no decode entry point, so no decode graphs and no batch bound (codegen/cuda_graph.py)
    assert art.manifest.options.max_batch_size is None
    assert b"_cuda_graph_capture" not in lib


def test_n_choices_fork_at_a_page_and_recompute_the_rest(mix, one_torch_thread):
    ids = prompt(45, 11)  # the prompt ends inside a page: each child recomputes tokens 32..44 itself
    eng = Engine(mix, EngineConfig(max_num_seqs=4, max_batched_tokens=64, kv_cache_memory=64 << 20,
                                   prefix_cache=False))
    p = SamplingParams(max_tokens=80, temperature=0.0, ignore_eos=True, n=2)
    out = eng.generate([Request("n", ids, p)])["n"]
    by = {}
    for o in out:
        for c in o.outputs:
            by.setdefault(c.index, []).extend(c.token_ids)
    want = ref.greedy(SPEC, W, ids, 80)
    assert by == {0: want, 1: want}
    assert eng.kv.num_free_pages == eng.kv_pages_total


def test_float16_logits_within_half_precision_of_the_reference(tmp_path, one_torch_thread):
    """In float16 the grouped path's logits stay within half-precision error of the float32 reference."""
    import numpy as np

    from kiln.artifact import load_artifact
    from kiln.compiler import CompileConfig, compile_model
    from kiln.runtime.kv_cache import KVCacheConfig
    from kiln.runtime.model_runner import ModelRunner

    ck = tmp_path / "ck"
    ref.save_checkpoint(SPEC, W, ck)
    save_tokenizer(ck, SPEC.vocab_size)
    compile_model(ck, tmp_path / "art", CompileConfig(dtype="float16"))
    ids = prompt(100, 12)
    r = ModelRunner(load_artifact(tmp_path / "art"),
                    kv_config=KVCacheConfig(max_num_seqs=1, max_total_tokens=512, prefill_chunk_size=48))
    r.kv.add_sequence(0)
    got = np.concatenate([r.prefill_rows(0, ids[i:i + 48], np.arange(len(ids[i:i + 48]))) for i in (0, 48, 96)])
    want = ref.forward(SPEC, W, ids).numpy()
    assert np.abs(got - want).max() < 0.15
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.95
