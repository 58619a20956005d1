"""BENCHMARKS.md's tables, filled from one GPU run's results.json (tools/gpu/collect.py).

    python tools/gpu/tables.py OUT/results.json > tables.md

Each table of BENCHMARKS.md in its order, a cell filled only from the run (an empty cell is a part that
did not run or failed; its log is in results.json), headed by the run's date, bundle commit and versions.
Run by run_all.sh after every part, so $OUT/tables.md is always current. Standard library only.
"""

from __future__ import annotations

import json
import sys

SHAPES = (("llama-3-8b", "Llama-3-8B"), ("llama-3.2-1b", "Llama-3.2-1B"))
BATCHES = ("1", "8", "32", "64", "128", "256")


def _f(value, digits: int = 1, scale: float = 1.0, suffix: str = "") -> str:
    if value is None or isinstance(value, str):
        return "" if value is None else value
    return f"{value * scale:,.{digits}f}{suffix}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows), ""]


def _result(parts: dict, name: str) -> dict:
    r = (parts.get(name) or {}).get("result")
    return r if isinstance(r, dict) else {}


def tables(results: dict) -> str:
    s, parts, bundle = results.get("summary", {}), results.get("parts", {}), results.get("bundle") or {}
    peaks = _result(parts, "peaks")
    mm = s.get("matmul_TFLOPs", {})
    out = [f"Run collected {results.get('collected', '?')}; bundle built {bundle.get('built', '?')} from kiln "
           f"{bundle.get('git_head', '?')[:10]}{' (dirty)' if bundle.get('git_dirty') else ''}; TVM "
           f"{bundle.get('tvm', '?')}, tvm-ffi {bundle.get('tvm_ffi', '?')}; torch {peaks.get('torch', '?')}.", ""]

    out += ["## Setup", ""] + _table(["", ""], [
        ["GPU", peaks.get("device_name", "")],
        ["measured device-to-device copy (bytes read + written)", _f(s.get("copy_GBps"), 0, suffix=" GB/s")],
        ["measured dense matmul, 8192^3, bf16 / fp16",
         f"{_f(mm.get('bfloat16'), 0)} / {_f(mm.get('float16'), 0)} TFLOP/s" if mm else ""]])

    rows = []
    for key, label in SHAPES:
        b1 = s.get(f"kiln-{key}-latency", {}).get("batch1", {})
        frac = b1.get("fraction_of_copy_bandwidth")
        rows.append([label, _f(b1.get("decode_tokens_per_s")), _f(b1.get("bytes_per_token"), 0),
                     _f(frac, 1, 100, "%"), _f(b1.get("ceiling_tokens_per_s"))])
    out += ["## Batch-1 decode", ""] + _table(
        ["model (fp16)", "decode tokens/s", "bytes per token", "% of measured copy bandwidth",
         "tokens/s at that bandwidth"], rows)

    rows = []
    for key, label in SHAPES:
        lat = s.get(f"kiln-{key}-latency", {}).get("latency", {})
        rows.append([label, *(_f(lat.get(b, {}).get("decode_tokens_per_s"), 0) for b in BATCHES)])
    out += ["## Decode throughput (tokens/s)", ""] + _table(["model (fp16)", *(f"batch {b}" for b in BATCHES)], rows)
    graphs = s.get("cuda_graph_decode_speedup")
    if graphs:
        out += ["CUDA graphs, Llama-3.2-1B: decode tokens/s with over without, per batch size: "
                + ", ".join(f"{b}: {v:.2f}x" for b, v in graphs.items()), ""]

    rows = []
    for key, label in SHAPES:
        cells = []
        for n in ("512", "2048"):
            lat = s.get(f"kiln-{key}-prefill-{n}", {}).get("latency", {})
            cells.append(_f(next(iter(lat.values()), {}).get("prefill_tokens_per_s"), 0))
        rows.append([label, *cells])
    for key, label in (("llama-3-8b-sm90a", "Llama-3-8B, sm_90a (wgmma linears)"),):
        cells = [_f(next(iter(s.get(f"kiln-{key}-prefill-{n}", {}).get("latency", {}).values()), {}).get(
            "prefill_tokens_per_s"), 0) for n in ("512", "2048")]
        rows.append([label, *cells])
    out += ["## Prefill (tokens/s; one prompt in one step)", ""] + _table(
        ["model (fp16)", "512 tokens", "2048 tokens"], rows)
    same = s.get("wgmma_same_logits")
    if same:
        out += [f"sm_90a against sm_90 on the same random weights (tools/gpu/same_logits.py): logits within "
                f"rtol {same['rtol']}: {same['ok']}; largest relative difference per step "
                f"{same['max_rel_diff_per_step']}; argmax agrees {same['argmax_agree_per_step']}.", ""]

    rows = []
    for key, label in SHAPES:
        for r in _result(parts, f"kiln-{key}-serving").get("serving", []):
            rate = r.get("request_rate")
            ms = lambda name: f"{_f(r.get(f'p50_{name}_ms'))} / {_f(r.get(f'p99_{name}_ms'))}"  # noqa: E731, B023
            rows.append([label, str(rate), _f(r.get("output_throughput"), 0), ms("ttft"), ms("tpot"), ms("itl"),
                         ms("e2el")])
    out += ["## Serving (ms, p50 / p99)", ""] + _table(
        ["model (fp16)", "request rate (req/s)", "output tokens/s", "TTFT", "TPOT", "ITL", "E2E latency"], rows)

    gemm, peak = s.get("gemm", {}), mm.get("float16")
    rows = [[m, _f(g.get("kiln_tflops")), _f(g.get("torch_tflops")), _f(g.get("kiln_over_torch"), 2),
             _f(g.get("kiln_fraction_of_measured_fp16_peak"), 1, 100, "%"), str(g.get("ok", ""))]
            for m, g in gemm.items()]
    out += ["## Kernels alone", "", "mma.sync GEMM [m, 4096] x [4096, 4096]^T, default configuration:", ""] + _table(
        ["m", "kiln TFLOP/s", "torch TFLOP/s", "kiln / torch", "% of measured fp16 peak", "correct"], rows)
    cfg = s.get("gemm_configs", {})
    if cfg:
        names = list(next(iter(cfg.values()))["tflops"])
        out += ["Tile configurations (TFLOP/s; fastest correct one named):", ""] + _table(
            ["m", *names, "fastest correct"], [[m, *(_f(c["tflops"].get(n)) for n in names), c["best"]]
                                               for m, c in cfg.items()])
    wg = s.get("wgmma", {})
    if wg:
        names = list(next(iter(wg.values()))["tflops"])
        out += ["wgmma GEMM variants (sm_90a), TFLOP/s (x: wrong result):", ""] + _table(
            ["m", *names, "fastest correct", "% of measured fp16 peak", "over the best mma.sync configuration"],
            [[m, *(_f(w["tflops"].get(n)) + ("" if w["ok"].get(n) else " x") for n in names), w.get("best", ""),
              _f(w.get("fraction_of_measured_fp16_peak"), 1, 100, "%"), _f(w.get("over_best_mma"), 2, suffix="x")]
             for m, w in wg.items()])
    low = s.get("lowbatch", {})
    if low:
        variants = list(next(iter(next(iter(low.values())).values()))["weight_GBps"])
        rows = [[shape, m, *(_f(c["weight_GBps"].get(v), 0) for v in variants),
                 _f(c.get("kiln_fraction_of_copy_bandwidth"), 1, 100, "%"), str(c["all_ok"])]
                for shape, by_m in low.items() for m, c in by_m.items()]
        out += ["Decode-side linears, weight GB/s:", ""] + _table(
            ["N x K", "m", *variants, "kiln % of copy bandwidth", "all correct"], rows)
    if peak is None and gemm:
        out += ["(no fp16 matmul peak was measured in this run: no fractions)", ""]
    rec = s.get("recommended", {})
    if rec:  # (not a BENCHMARKS.md table: what to change in kiln/codegen after this run)
        low = rec.get("low_batch", {})
        out += ["What this run says to set in kiln/codegen:", ""] + _table(["setting", "value"], [
            ["cuda_matmul.MMAConfig (gemm.py MMA_CONFIGS, fastest correct at m = 4096)",
             rec.get("MMAConfig", "")],
            ["cuda_wgmma.WgmmaConfig (gemm.py WGMMA_VARIANTS, fastest correct at m = 4096)",
             rec.get("WgmmaConfig", "")],
            ["cuda_gemv.LOW_BATCH, (n <= limit, bucket)", str(tuple(map(tuple, low["LOW_BATCH"]))) if low else ""],
            ["fastest linear per m (all shapes)",
             ", ".join(f"{m}: {w}" for m, w in low.get("fastest_per_m", {}).items())]])

    rows, ratios = [], []
    for key, label in SHAPES:
        hf = s.get(f"hf-{key}", {})
        r = hf.get("decode_tokens_per_s", {})
        rows.append([label, _f(r.get("eager"), 0), _f(r.get("static_compile"), 0),
                     " / ".join(_f(r.get(f"batched_{b}"), 0) for b in ("8", "32", "64")),
                     _f(r.get("continuous_batching_output"), 0)])
        k = hf.get("kiln_over_peer", {})
        ratios.append([label, _f(k.get("batch1_over_eager"), 2, suffix="x"),
                       _f(k.get("batch1_over_static_compile"), 2, suffix="x"),
                       " / ".join(_f(k.get(f"batch{b}_over_batched"), 2, suffix="x") for b in ("8", "32", "64"))])
    out += ["## The transformers peers (decode tokens/s)", ""] + _table(
        ["model (fp16)", "eager `generate`, batch 1", "static cache + `torch.compile`, batch 1",
         "`generate`, batch 8 / 32 / 64", "continuous batching, 64 requests"], rows) + _table(
        ["model (fp16)", "kiln / eager, batch 1", "kiln / static + compile, batch 1", "kiln / `generate`, batch 8 / 32 / 64"],
        ratios)

    rows = [[name, str(d.get("match")), str(d.get("num_tokens")), str(d.get("first_mismatch"))]
            for name, key in (("with CUDA graphs", "demo_greedy_match"), ("without", "demo_nograph_greedy_match"))
            if (d := s.get(key))]
    out += ["## The demo model on the GPU vs the CPU (greedy, fp32)", ""] + _table(
        ["artifact", "tokens equal", "tokens", "first mismatch"], rows)
    par = s.get("fp16_parity_llama_3_8b")
    rows = [["Llama-3-8B", par.get("dtype", ""), str(par.get("ok")), _f(par.get("max_rel_diff"), 2, 100, "%"),
             _f(par.get("rtol"), 0, 100, "%"), par.get("argmax_agree", "")]] if par else []
    out += ["## kiln's logits against transformers' on the same seeded weights (prefill + teacher-forced decode)",
            ""] + _table(["model", "dtype", "within tolerance", "largest difference / largest logit", "tolerance",
                          "argmax equal (rows)"], rows)
    skipped = [n for n, p in parts.items() if "skipped" in (p.get("status") or {})]
    failed = [n for n, p in parts.items() if (p.get("status") or {}).get("rc") not in (0, None)]
    if skipped or failed:
        out += [f"Skipped: {', '.join(skipped) or 'none'}. Failed: {', '.join(failed) or 'none'}.", ""]
    return "\n".join(out)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    print(tables(json.loads(open(sys.argv[1]).read())))


if __name__ == "__main__":
    main()
