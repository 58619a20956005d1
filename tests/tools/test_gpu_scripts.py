"""tools/gpu: the model-shape configs, and every script of the GPU run made to run here on the CPU with
tiny sizes, so that the (expensive, short) GPU run does not die of a typo.

The end-to-end test builds a stand-in bundle (``build_bundle.sh --smoke``: the demo model and the two
shapes shrunk, compiled for the CPU) and runs ``run_all.sh`` over it with ``KILN_GPU_DEVICE=cpu``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.frontend.hf import load_spec
from kiln.frontend.reference import param_shapes

ROOT = Path(__file__).resolve().parents[2]
GPU = ROOT / "tools" / "gpu"


def load_tool(name: str):
    """A tools/gpu script as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"tools_gpu_{name}", GPU / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(*cmd, env=None, timeout=600) -> subprocess.CompletedProcess:
    res = subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, **(env or {})})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


# -- the shapes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,layers,hidden,heads,kv,head_dim,ffn,tied,rope,params_b", [
    ("llama-3.2-1b", 16, 2048, 32, 8, 64, 8192, True, "llama3", 1.236),
    ("llama-3-8b", 32, 4096, 32, 8, 128, 14336, False, "default", 8.030),
])
def test_shape_configs_are_the_published_llamas(name, layers, hidden, heads, kv, head_dim, ffn, tied, rope, params_b):
    spec = load_spec(GPU / "configs" / name, dtype="float16", context_len=4096)
    assert (spec.architecture, spec.num_layers, spec.hidden_size, spec.num_q_heads, spec.num_kv_heads, spec.head_dim,
            spec.intermediate_size, spec.vocab_size) == ("LlamaForCausalLM", layers, hidden, heads, kv, head_dim, ffn,
                                                         128256)
    assert spec.tie_word_embeddings is tied and spec.rope.theta == 500000.0 and spec.rope.type == rope
    assert spec.context_len == 4096 and spec.bos_token_id == 128000 and spec.eos_token_ids == (128001,)
    if rope == "llama3":
        assert (spec.rope.factor, spec.rope.low_freq_factor, spec.rope.high_freq_factor,
                spec.rope.original_max_position_embeddings) == (32.0, 1.0, 4.0, 8192)
    assert round(sum(math.prod(s) for s in param_shapes(spec).values()) / 1e9, 3) == params_b


def test_shell_scripts_parse():
    for script in ("build_bundle.sh", "run_all.sh"):
        run("bash", "-n", GPU / script)


# -- collect.py (unit) -------------------------------------------------------------------------------------


def test_collect_keeps_failures_and_derives_the_bandwidth_fraction(tmp_path):
    collect = load_tool("collect")
    work, bundle = tmp_path / "work", tmp_path / "bundle"
    art = bundle / "artifacts" / "m"
    work.mkdir()
    art.mkdir(parents=True)
    (art / "manifest.json").write_text(json.dumps({
        "param_shapes": {"a": [[1000, 1000], "float16"], "b": [[1000], "float16"]},
        "spec": {"num_layers": 2, "num_kv_heads": 2, "head_dim": 4, "dtype": "float16"}}))

    def part(name, rc, result=None, log="ok"):
        (work / f"{name}.status.json").write_text(json.dumps({"part": name, "rc": rc, "seconds": 1}))
        (work / f"{name}.log").write_text(log)
        if result is not None:
            (work / f"{name}.json").write_text(json.dumps(result))

    part("peaks", 0, {"copy": {"GBps_read_plus_write": 1000.0}, "matmul_bfloat16": {"TFLOPs": 500.0}})
    part("kiln-m-latency", 0, {"artifact": "m", "artifact_path": str(art), "latency": [
        {"batch_size": 1, "input_len": 100, "output_len": 20, "decode_tokens_per_s": 250.0,
         "prefill_tokens_per_s": 9000.0}]})
    part("hf-m", 0, {"results": {"eager": {"decode_tokens_per_s": 50.0}}, "errors": {}})
    part("demo", 1, None, log="Traceback ...\nRuntimeError: boom")
    part("parity-llama-3-8b", 0, {"ok": True, "dtype": "float16", "rtol": 0.02, "max_rel_diff_per_row": [0.004, 0.011],
                                  "argmax_agree_per_row": [True, False], "decisive_rows": [True, False]})
    part("gemm", 0, {"shapes": [], "configs": [
        {"m": 4096, "n": 64, "k": 32, "ok": {"default": True, "w2x4": True, "k64": False},
         "tflops": {"default": 200.0, "w2x4": 250.0, "k64": 400.0}}], "lowbatch": [
        {"m": 4, "n": 64, "k": 32, "ok": {"mma": True, "kiln": True},
         "us": {"mma": 2.0, "kiln": 1.0, "torch": 1.5}, "weight_GBps": {"mma": 250.0, "kiln": 500.0, "torch": 333.3}}],
        "wgmma": [{"m": 4096, "n": 64, "k": 32, "ok": {"wait": True, "inflight1": False},
                   "tflops": {"wait": 500.0, "inflight1": 600.0}}]})
    results, logs = collect.collect(work, bundle)
    b1 = results["summary"]["kiln-m-latency"]["batch1"]
    per_token = 2 * (1000 * 1000 + 1000) + (2 * 2 * 2 * 4 * 2) * (100 + 10)
    assert b1["bytes_per_token"] == per_token
    assert b1["fraction_of_copy_bandwidth"] == round(250.0 * per_token / 1e9 / 1000.0, 4)
    assert results["summary"]["hf-m"]["kiln_over_peer"] == {"batch1_over_eager": 5.0}
    assert "boom" in results["parts"]["demo"]["log_tail"] and "log_tail" not in results["parts"]["peaks"]
    assert "===== demo" in logs
    assert results["summary"]["gemm_configs"]["4096"] == {  # k64 is fastest but wrong: not chosen
        "best": "w2x4", "tflops": {"default": 200.0, "w2x4": 250.0, "k64": 400.0}}  # (no fp16 peak measured here)
    assert results["summary"]["lowbatch"]["64x32"]["4"] == {
        "weight_GBps": {"mma": 250.0, "kiln": 500.0, "torch": 333.3}, "fastest": "kiln", "all_ok": True,
        "kiln_fraction_of_copy_bandwidth": 0.5}
    assert results["summary"]["wgmma"]["4096"] == {  # inflight1 is faster but wrong: not chosen
        "ok": {"wait": True, "inflight1": False}, "tflops": {"wait": 500.0, "inflight1": 600.0}, "best": "wait",
        "over_best_mma": 2.0}
    md = load_tool("tables").tables(results)  # every table renders; the measured cells are filled
    assert "| 4096 | 200.0 | 250.0 | 400.0 | w2x4 |" in md  # tile configurations, fastest correct one
    assert "| 4096 | 500.0 | 600.0 x | wait |  | 2.00x |" in md  # wgmma (no fp16 peak in this run: no fraction)
    assert "| 64x32 | 4 | 250 | 500 | 333 | 50.0% | True |" in md
    assert results["summary"]["recommended"] == {"MMAConfig": "w2x4", "WgmmaConfig": "wait", "low_batch": {
        "fastest_per_m": {"4": "mma"}, "LOW_BATCH": []}}
    assert "| cuda_wgmma.WgmmaConfig (gemm.py WGMMA_VARIANTS, fastest correct at m = 4096) | wait |" in md
    assert "Failed: demo." in md
    assert results["summary"]["fp16_parity_llama_3_8b"] == {"ok": True, "dtype": "float16", "rtol": 0.02,
                                                            "max_rel_diff": 0.011, "argmax_agree": "1/2"}
    assert "| Llama-3-8B | float16 | True | 1.10% | 2% | 1/2 |" in md


def test_merge_joins_the_calls_of_one_run_and_derives_the_summary_again(tmp_path):
    """Call 1 measured kiln and skipped the peers (out of time); call 2 ran the peers and failed the demo
    that call 1 passed: the merge keeps each part's good run, and kiln over the peer is derived across
    the calls, the artifact found in the bundle by name (its path was the GPU machine's)."""
    collect = load_tool("collect")
    bundle = tmp_path / "bundle"
    (bundle / "artifacts" / "m").mkdir(parents=True)
    (bundle / "artifacts" / "m" / "manifest.json").write_text(json.dumps({
        "param_shapes": {"a": [[1000, 1000], "float16"]},
        "spec": {"num_layers": 2, "num_kv_heads": 2, "head_dim": 4, "dtype": "float16"}}))

    def call(name, parts):
        work = tmp_path / name
        work.mkdir()
        for part, (status, result) in parts.items():
            (work / f"{part}.status.json").write_text(json.dumps({"part": part, **status}))
            if result is not None:
                (work / f"{part}.json").write_text(json.dumps(result))
        return collect.collect(work, bundle)[0]

    ok = {"rc": 0, "seconds": 1}
    first = call("call1", {
        "peaks": (ok, {"copy": {"GBps_read_plus_write": 1000.0}}),
        "kiln-m-latency": (ok, {"artifact": "m", "artifact_path": "/tmp/kiln-gpu.X/bundle/artifacts/m", "latency": [
            {"batch_size": 1, "input_len": 100, "output_len": 20, "decode_tokens_per_s": 250.0,
             "prefill_tokens_per_s": 9000.0}]}),
        "demo": (ok, {"match": True}),
        "hf-m": ({"skipped": "out of time (KILN_GPU_DEADLINE)"}, None)})
    assert "hf-m" not in first["summary"]
    second = call("call2", {"hf-m": (ok, {"results": {"eager": {"decode_tokens_per_s": 50.0}}, "errors": {}}),
                            "demo": ({"rc": 1, "seconds": 1}, None)})
    merged = collect.merge([first, second], bundle)
    assert merged["summary"]["hf-m"]["kiln_over_peer"] == {"batch1_over_eager": 5.0}
    assert merged["summary"]["demo_greedy_match"]["match"] is True  # call 1's good run, not call 2's failure
    assert merged["summary"]["kiln-m-latency"]["batch1"]["bytes_per_token"] == 2 * 1000 * 1000 + (2 * 2 * 2 * 4 * 2) * 110
    out = tmp_path / "out"
    (tmp_path / "r1.json").write_text(json.dumps(first))
    (tmp_path / "r2.json").write_text(json.dumps(second))
    run(sys.executable, GPU / "collect.py", "--merge", tmp_path / "r1.json", tmp_path / "r2.json", out,
        "--bundle", bundle)
    assert json.loads((out / "results.json").read_text())["summary"]["hf-m"]["kiln_over_peer"]["batch1_over_eager"] == 5.0
    assert "| Llama" in (out / "tables.md").read_text()


def test_recommend_low_batch_follows_the_fastest_correct_linear_per_m():
    collect = load_tool("collect")

    def row(m, n, us, wrong=()):
        return {"m": m, "n": n, "k": 64, "us": us, "ok": {v: v not in wrong for v in us if v != "torch"}}

    rows = [row(1, 64, {"mma": 9, "gemv1": 2, "gemv4": 3, "gemv8": 4, "kiln": 2, "torch": 1}),
            row(1, 128, {"mma": 9, "gemv1": 2, "gemv4": 3, "gemv8": 4, "kiln": 2, "torch": 1}),
            row(2, 64, {"mma": 9, "gemv1": 5, "gemv4": 3, "gemv8": 4}),
            row(2, 128, {"mma": 9, "gemv1": 2, "gemv4": 3, "gemv8": 4}),  # gemv1 wins one shape, gemv4 the sum
            row(4, 64, {"mma": 9, "gemv1": 9, "gemv4": 3, "gemv8": 1}, wrong=("gemv8",)),  # fastest but wrong
            row(8, 64, {"mma": 9, "gemv1": 9, "gemv4": 5, "gemv8": 4}),
            row(16, 64, {"mma": 3, "gemv1": 9, "gemv4": 5, "gemv8": 4}),
            row(24, 64, {"mma": 9, "gemv1": 9, "gemv4": 5, "gemv8": 1})]  # past the GEMM's first win: ignored
    got = collect.recommend_low_batch(rows)
    assert got["fastest_per_m"] == {"1": "gemv1", "2": "gemv4", "4": "gemv4", "8": "gemv8", "16": "mma", "24": "gemv8"}
    assert got["LOW_BATCH"] == [[1, 1], [4, 4], [8, 8]]
    assert collect.recommend_low_batch([]) is None


def test_tables_render_an_empty_run_with_empty_cells():
    md = load_tool("tables").tables({})
    assert md.count("| Llama-3-8B |") == 5 and "| Llama-3-8B |  |  |  |  |" in md  # every table, no value


# -- the Python parts on the CPU ---------------------------------------------------------------------------


@pytest.mark.cpu
def test_peaks_small_on_cpu(tmp_path):
    out = tmp_path / "peaks.json"
    run(sys.executable, GPU / "peaks.py", "--device", "cpu", "--small", "--out", out)
    r = json.loads(out.read_text())
    assert r["errors"] == {}
    assert r["copy"]["GBps_read_plus_write"] > 0
    assert r["matmul_bfloat16"]["TFLOPs"] > 0 and r["matmul_float16"]["TFLOPs"] > 0


@pytest.mark.cpu
def test_hf_peers_small_on_cpu(tmp_path):
    out = tmp_path / "hf.json"
    run(sys.executable, GPU / "hf_peers.py", "--small", "--device", "cpu", "--compile-backend", "eager",
        "--batches", "2", "--prompt-len", "8", "--new-tokens", "4", "--repeats", "1",
        "--skip", "continuous_batching", "--out", out)
    r = json.loads(out.read_text())
    assert r["errors"] == {}, r["errors"]
    assert set(r["results"]) == {"eager", "static_compile", "batched"}
    assert r["results"]["batched"]["2"]["batch"] == 2
    assert r["num_params"] > 0


@pytest.mark.cpu
@pytest.mark.slow
def test_hf_peers_continuous_batching_on_cpu(tmp_path):
    out = tmp_path / "hf.json"
    run(sys.executable, GPU / "hf_peers.py", "--small", "--device", "cpu", "--batches", "2", "--prompt-len", "8",
        "--new-tokens", "4", "--skip", "eager", "static_compile", "batched", "--out", out)
    r = json.loads(out.read_text())
    assert r["errors"] == {}, r["errors"]
    assert r["results"]["continuous_batching"]["output_tokens"] == 2 * 4


# what the GPU machine lacks (shared/notes/gpu.md): the smoke run makes each of them fail to import, as there
DEVICE_LACKS = ("tvm", "xgrammar", "fastapi", "pydantic", "uvicorn")


def device_like_path(tmp_path) -> str:
    """A PYTHONPATH entry whose modules shadow the ones the GPU machine lacks with ones that raise ImportError."""
    blocked = tmp_path / "device-lacks"
    blocked.mkdir()
    for name in DEVICE_LACKS:
        (blocked / f"{name}.py").write_text(f"raise ImportError('{name} is not installed on the GPU machine')\n")
    return str(blocked)


@pytest.mark.cpu
@pytest.mark.slow
def test_run_all_on_a_cpu_smoke_bundle(tmp_path):
    """build_bundle.sh --smoke, then run_all.sh over it as the device runs it — the bundle's trimmed tvm_ffi and
    runtime libraries, and the TVM compiler, xgrammar, fastapi, pydantic and uvicorn unimportable — every part
    runs, results come back in one results.json, and $OUT stays within what a GPU call returns (8 files, 2
    folders deep, plain names)."""
    bundle, out = tmp_path / "bundle", tmp_path / "out"
    env = {"PYTHON": sys.executable}
    run("bash", GPU / "build_bundle.sh", "--smoke", bundle, env=env)
    env["PYTHONPATH"] = device_like_path(tmp_path)
    record = json.loads((bundle / "bundle.json").read_text())
    assert record["artifacts"]["llama-3-8b"]["weights"] == "none"
    assert record["artifacts"]["llama-3-8b"]["tokenizer"] == "placeholder"
    assert record["artifacts"]["demo"]["weights"] == "included"
    assert not (bundle / "artifacts" / "demo-nograph" / "params.safetensors").exists()  # demo's, copied there
    packed = tmp_path / "bundle.tar.xz"  # what travels to the GPU; run_all.sh unpacks it
    assert 0 < packed.stat().st_size < record["total_bytes"]
    res = run("bash", GPU / "run_all.sh", "peaks", "demo", "demo-nograph", "wgmma-logits", "kiln", "hf", "serving",
              "graphs",
              timeout=900,
              env={**env, "OUT": str(out), "KILN_GPU_BUNDLE": str(packed), "KILN_GPU_DEVICE": "cpu",
                   "KILN_GPU_SMALL": "1"})
    results = json.loads((out / "results.json").read_text())
    parts = results["parts"]
    assert len(parts) == 17, list(parts)
    for name, p in parts.items():
        assert p["status"]["rc"] == 0, (name, p.get("log_tail"))
    assert results["summary"]["demo_greedy_match"]["match"] is True
    assert results["summary"]["demo_nograph_greedy_match"]["match"] is True
    assert set(results["summary"]["cuda_graph_decode_speedup"]) == {"1", "2"}
    assert results["summary"]["wgmma_same_logits"]["ok"] is True  # (two CPU twins here: equal logits)
    assert set(results["summary"]["wgmma_prefill_speedup"]) == {"512", "2048"}
    assert results["summary"]["kiln-llama-3-8b-latency"]["batch1"]["fraction_of_copy_bandwidth"] > 0
    assert parts["kiln-llama-3.2-1b-serving"]["result"]["serving"]
    assert parts["hf-llama-3-8b"]["result"]["results"]["eager"]["decode_tokens_per_s"] > 0
    assert "exit 0" in res.stdout
    md = (out / "tables.md").read_text()  # BENCHMARKS.md's tables, filled from this run
    row = next(line for line in md.splitlines() if line.startswith("| Llama-3-8B | ") and "%" in line)
    assert row.split(" | ")[1].replace(",", "").replace(".", "").isdigit(), row  # batch-1 decode tokens/s
    assert "| with CUDA graphs | True |" in md and "| without | True |" in md
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files
    # the quick group's parts that run on a CPU (nvidia-smi needs the card; the smoke bundle has no gemm/)
    quick = tmp_path / "quick"
    res = run("bash", GPU / "run_all.sh", "preflight", "demo", "parity-llama-3-8b", "kiln-llama-3-8b-quick",
              "hf-llama-3-8b-quick",
              timeout=600, env={**env, "OUT": str(quick), "KILN_GPU_BUNDLE": str(packed), "KILN_GPU_DEVICE": "cpu",
                                "KILN_GPU_SMALL": "1"})
    results = json.loads((quick / "results.json").read_text())
    assert list(results["parts"]) == ["preflight", "demo", "parity-llama-3-8b", "kiln-llama-3-8b-quick",
                                      "hf-llama-3-8b-quick"]
    for name, p in results["parts"].items():
        assert p["status"]["rc"] == 0, (name, p.get("log_tail"))
    assert set(results["parts"]["preflight"]["result"]["checks"]) == {"python", "tvm_ffi", "runtime", "forward"}
    parity = results["parts"]["parity-llama-3-8b"]["result"]  # kiln and transformers on the same seeded weights
    assert parity["ok"] and len(parity["max_rel_diff_per_row"]) == 4 and all(parity["argmax_agree_per_row"])
    assert results["parts"]["hf-llama-3-8b-quick"]["result"]["results"]["static_compile"]["decode_tokens_per_s"] > 0
    for f in files:
        rel = f.relative_to(out)
        assert len(rel.parts) <= 3 and all(re.fullmatch(r"[A-Za-z0-9._-]+", s) for s in rel.parts), rel


def test_a_bundle_from_other_sources_is_refused(tmp_path):
    """run_all.sh compares the bundle's recorded kiln sources with the checkout's and stops, in one line, before
    running anything; KILN_GPU_ALLOW_STALE=1 lets it through (here it then runs no part: no part named)."""
    here = load_tool("source_hash").source_hash(ROOT)
    assert len(here) == 16
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "bundle.json").write_text(json.dumps({"kiln_sources": "0123456789abcdef"}))
    env = {**os.environ, "PYTHON": sys.executable, "KILN_GPU_BUNDLE": str(bundle), "OUT": str(tmp_path / "out"),
           "KILN_GPU_DEVICE": "cpu"}
    proc = subprocess.run(["bash", str(GPU / "run_all.sh"), "nvidia-smi"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"stale bundle: built from kiln sources 0123456789abcdef, this checkout's are "
                                   f"{here}; rebuild it with tools/gpu/build_bundle.sh (or set KILN_GPU_ALLOW_STALE=1)")
    (bundle / "bundle.json").write_text(json.dumps({"kiln_sources": here}))
    ok = subprocess.run(["bash", str(GPU / "run_all.sh"), "no-such-part"], env=env, capture_output=True, text=True,
                        timeout=120)
    assert "stale bundle" not in ok.stderr and "unknown part no-such-part" in ok.stderr


def test_bytes_per_token_gather_one_row_of_an_untied_embedding(tmp_path):
    """A decode step reads every weight whole but an untied embedding table, of which each token gathers one row;
    a tied table is read whole by the lm_head."""
    collect = load_tool("collect")
    untied, tied = tmp_path / "untied", tmp_path / "tied"
    for art, head in ((untied, {"lm_head": [[32000, 64], "float16"]}), (tied, {})):
        art.mkdir()
        (art / "manifest.json").write_text(json.dumps({"param_shapes": {
            "embed_tokens": [[32000, 64], "float16"], "layers.0.qkv_proj": [[192, 64], "float16"], **head}}))
    assert collect.weight_bytes(untied) == 2 * (64 + 192 * 64 + 32000 * 64)
    assert collect.weight_bytes(tied) == 2 * (32000 * 64 + 192 * 64)


def test_a_part_with_errors_in_its_result_does_not_count_as_run():
    """--merge keeps a part from the call where it ran well: exit 0 in time and no error in its result."""
    collect = load_tool("collect")
    ok = {"status": {"rc": 0}, "result": {"copy": {}, "errors": {}}}
    assert collect._ran(ok)
    assert not collect._ran({"status": {"rc": 0}, "result": {"errors": {"copy": "Traceback"}}})
    assert not collect._ran({"status": {"rc": 0}, "result": {"error": "Traceback"}})
    assert not collect._ran({"status": {"rc": 1}, "result": {}})
    assert not collect._ran({"status": {"rc": 0, "timed_out": True}, "result": {}})
    assert not collect._ran({"status": {"skipped": "out of time"}})
    merged = collect.merge([{"parts": {"peaks": ok}}, {"parts": {"peaks": {"status": {"rc": 0}, "result": {
        "errors": {"copy": "boom"}}}}}], Path("no-bundle"))
    assert merged["parts"]["peaks"] is ok


def test_quick_group_fits_one_gpu_call():
    """The default group's parts, in order, with limits that add up to the 480 s the script enforces as its
    deadline (a GPU call allows 600 s, start-up and the bundle's transfer included)."""
    res = run("bash", GPU / "run_all.sh", "--plan")
    plan = [line.split() for line in res.stdout.splitlines()]
    assert [name for name, _ in plan] == ["preflight", "nvidia-smi", "peaks", "demo", "parity-llama-3-8b", "gemm",
                                         "kiln-llama-3-8b-quick", "hf-llama-3-8b-quick"]
    assert sum(int(limit) for _, limit in plan) <= 480
    assert int(dict(plan)["preflight"]) <= 15
    assert re.search(r'\[ "\$QUICK_ONLY" = 1 \] && \{ DEFAULT_DEADLINE=480;', (GPU / "run_all.sh").read_text())


def test_a_failed_preflight_skips_the_rest_with_a_diagnosis(tmp_path):
    """A bundle that cannot run (here: no tvm_ffi at all) stops at preflight: its diagnosis is printed, every later
    part is recorded as skipped, none is counted as run."""
    bundle = tmp_path / "bundle"
    (bundle / "artifacts" / "demo").mkdir(parents=True)
    (bundle / "bundle.json").write_text(json.dumps({"kiln_sources": load_tool("source_hash").source_hash(ROOT)}))
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(GPU / "run_all.sh"), "preflight", "demo", "peaks"], cwd=ROOT, text=True,
                          capture_output=True, timeout=300,
                          env={**os.environ, "PYTHON": sys.executable, "KILN_GPU_BUNDLE": str(bundle), "OUT": str(out),
                               "KILN_GPU_DEVICE": "cpu"})
    assert "PREFLIGHT FAILED at 'python'" in proc.stdout and "no py/tvm_ffi/core" in proc.stdout
    parts = json.loads((out / "results.json").read_text())["parts"]
    assert parts["preflight"]["status"]["rc"] == 1
    assert parts["demo"]["status"] == {"part": "demo", "skipped": "preflight failed"}
    assert parts["peaks"]["status"] == {"part": "peaks", "skipped": "preflight failed"}
