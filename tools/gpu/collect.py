"""Gather the parts of a GPU run (tools/gpu/run_all.sh) into one results.json and one logs.txt.

    python tools/gpu/collect.py WORK_DIR OUT_DIR [--bundle gpu_bundle]
    python tools/gpu/collect.py --merge RESULTS.json [RESULTS.json ...] OUT_DIR [--bundle gpu_bundle]   (here)

WORK_DIR holds, per part, ``NAME.status.json`` (written by run_all.sh: exit status, seconds, timed
out or skipped), ``NAME.json`` (the part's own result, if it wrote one) and ``NAME.log``. A part that
failed keeps the end of its log in results.json, so nothing is lost to one failure. The summary
derives the table numbers of BENCHMARKS.md that need more than one part: batch-1 decode's bytes per
token (weights from the artifact's manifest, an untied embedding table as the one row a token gathers, + the
KV cache read at the mean context) over the measured copy bandwidth. A part counts as run (``--merge``) only
if it exited 0 in time and its result records no error. Standard library only: it must run even where nothing else does.

A GPU run spans several calls (each stops at its deadline), each with its own results.json: ``--merge``
joins them here — a part that ran in a later call replaces one that did not run or failed in an
earlier one — and derives the summary and tables.md again over all of them, so ratios across calls
(kiln over the transformers peers) are filled. Artifacts are read from ``--bundle`` by name when the
run's own paths (on the GPU machine) are not here.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1, "int32": 4, "uint32": 4}
LOG_TAIL = 4000


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def weight_bytes(artifact: Path) -> int | None:
    """Weight bytes one decode step reads: every parameter whole, except an untied embedding table, of which a
    step gathers one row per token (a tied one is read whole by the lm_head)."""
    manifest = _read_json(artifact / "manifest.json")
    if not manifest or "param_shapes" not in manifest:
        return None
    shapes = manifest["param_shapes"]
    total = 0
    for name, (shape, dtype) in shapes.items():
        n = math.prod(shape)
        if name == "embed_tokens" and "lm_head" in shapes and len(shape) == 2:
            n = shape[1]  # one row
        total += n * DTYPE_BYTES.get(dtype, 2)
    return total


def kv_bytes_per_token(artifact: Path) -> int | None:
    manifest = _read_json(artifact / "manifest.json")
    if not manifest:
        return None
    s = manifest["spec"]
    return 2 * s["num_layers"] * s["num_kv_heads"] * s["head_dim"] * DTYPE_BYTES[s["dtype"]]


def batch1_bandwidth(bench: dict, artifact: Path, copy_GBps: float | None) -> dict | None:
    """Batch-1 decode: bytes read per token and the fraction of the measured copy bandwidth it reaches."""
    rows = [r for r in bench.get("latency", []) if r.get("batch_size") == 1]
    wb, kvb = weight_bytes(artifact), kv_bytes_per_token(artifact)
    if not rows or wb is None or kvb is None:
        return None
    r = rows[0]
    mean_context = r["input_len"] + r["output_len"] / 2  # KV read per step grows from input_len to input+output
    per_token = wb + kvb * mean_context
    out = {"decode_tokens_per_s": r["decode_tokens_per_s"], "weight_bytes": wb, "kv_bytes_at_mean_context":
           round(kvb * mean_context), "bytes_per_token": round(per_token),
           "achieved_GBps": round(r["decode_tokens_per_s"] * per_token / 1e9, 1)}
    if copy_GBps:
        out["fraction_of_copy_bandwidth"] = round(out["achieved_GBps"] / copy_GBps, 4)
        out["ceiling_tokens_per_s"] = round(copy_GBps * 1e9 / per_token, 1)
    return out


def recommend_low_batch(rows: list[dict]) -> dict | None:
    """gemm.py's low-batch rows -> what cuda_gemv.LOW_BATCH should be. At each m, the fastest of the MMA
    GEMM and the GEMV buckets over every shape together (the sum of their times; a variant wrong on any
    shape is out); then, m ascending, ``[largest m a bucket wins, that bucket]`` pairs, tightest first,
    until the first m the GEMM wins (from there on the dispatch runs the GEMM)."""
    times: dict[int, dict[str, float]] = {}
    seen: dict[tuple[int, str], int] = {}  # (m, variant) -> shapes it ran correctly on
    shapes: dict[int, int] = {}
    for row in rows:
        m = row["m"]
        shapes[m] = shapes.get(m, 0) + 1
        for v, us in row.get("us", {}).items():
            if (v == "mma" or v.startswith("gemv")) and row.get("ok", {}).get(v):
                times.setdefault(m, {})[v] = times.get(m, {}).get(v, 0.0) + us
                seen[(m, v)] = seen.get((m, v), 0) + 1
    winners = {}
    for m in sorted(times):
        ok = {v: t for v, t in times[m].items() if seen[(m, v)] == shapes[m]}  # correct on every shape
        if ok:
            winners[m] = min(ok, key=ok.get)
    if not winners:
        return None
    pairs: list[list[int]] = []
    for m, w in winners.items():
        if w == "mma":
            break
        bucket = int(w.removeprefix("gemv"))
        if pairs and pairs[-1][1] == bucket:
            pairs[-1][0] = m
        else:
            pairs.append([m, bucket])
    return {"fastest_per_m": {str(m): w for m, w in winners.items()}, "LOW_BATCH": pairs}


def collect(work: Path, bundle: Path) -> tuple[dict, str]:
    parts, logs = gather(work)
    return {"collected": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "bundle": _read_json(bundle / "bundle.json"),
            "summary": summarize(parts, bundle), "parts": parts}, logs


def _ran(entry: dict) -> bool:
    """A part counts as run only if it exited 0 within its limit and its result records no error."""
    s, result = entry.get("status", {}), entry.get("result")
    errors = isinstance(result, dict) and (result.get("errors") or result.get("error"))
    return "skipped" not in s and s.get("rc") == 0 and not s.get("timed_out") and not errors


def merge(runs: list[dict], bundle: Path) -> dict:
    """Several calls' results.json as one: each part from the last call in which it ran well, else from
    the last call that has it at all; the summary derived again from the merged parts."""
    parts: dict = {}
    for run in runs:
        for name, entry in run.get("parts", {}).items():
            if name not in parts or _ran(entry) or not _ran(parts[name]):
                parts[name] = entry
    return {"collected": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "bundle": next((r["bundle"] for r in reversed(runs) if r.get("bundle")), _read_json(bundle / "bundle.json")),
            "merged_from": [r.get("collected") for r in runs], "summary": summarize(parts, bundle), "parts": parts}


def gather(work: Path) -> tuple[dict, str]:
    """Every part's status, result and (if it failed) log tail from WORK_DIR; the logs joined."""
    parts, logs = {}, []
    for status_file in sorted(work.glob("*.status.json"), key=lambda p: p.stat().st_mtime):
        name = status_file.name.removesuffix(".status.json")
        status = _read_json(status_file) or {}
        entry = {"status": status, "result": _read_json(work / f"{name}.json")}
        log = (work / f"{name}.log").read_text(errors="replace") if (work / f"{name}.log").exists() else ""
        failed = status.get("rc") not in (0, None) or status.get("timed_out") or (
            isinstance(entry["result"], dict) and (entry["result"].get("errors") or entry["result"].get("error")))
        if failed:
            entry["log_tail"] = log[-LOG_TAIL:]
        parts[name] = entry
        logs.append(f"===== {name} {json.dumps(status)}\n{log[-20000:]}\n")
    return parts, "".join(logs)


def summarize(parts: dict, bundle: Path) -> dict:
    """The numbers BENCHMARKS.md needs that take more than one part, from the parts' results."""
    summary: dict = {}
    peaks = (parts.get("peaks") or {}).get("result") or {}
    copy = (peaks.get("copy") or {}).get("GBps_read_plus_write")
    summary["copy_GBps"] = copy
    summary["matmul_TFLOPs"] = {k.removeprefix("matmul_"): v.get("TFLOPs") for k, v in peaks.items()
                                if k.startswith("matmul_") and isinstance(v, dict)}
    for name, entry in parts.items():
        result = entry["result"]
        if not name.startswith("kiln-") or not isinstance(result, dict):
            continue
        artifact = Path(result.get("artifact_path", ""))
        if not artifact.is_absolute() or not artifact.exists():  # (merged here: the GPU machine's path)
            artifact = bundle / "artifacts" / result.get("artifact", "")
        if "latency" in result:
            summary.setdefault(name, {})["latency"] = {
                str(r["batch_size"]): {"input_len": r["input_len"], "decode_tokens_per_s": r["decode_tokens_per_s"],
                                       "prefill_tokens_per_s": r["prefill_tokens_per_s"]} for r in result["latency"]}
            b1 = batch1_bandwidth(result, artifact, copy) if name.endswith("-latency") else None
            if b1:
                summary[name]["batch1"] = b1
    for name, entry in parts.items():  # the transformers peers, and kiln over them on the same shape
        result = entry["result"]
        if not name.startswith("hf-") or not isinstance(result, dict):
            continue
        peers = result.get("results", {})
        rates = {k: peers[k]["decode_tokens_per_s"] for k in ("eager", "static_compile") if k in peers}
        rates.update({f"batched_{b}": r["decode_tokens_per_s"] for b, r in peers.get("batched", {}).items()})
        if "continuous_batching" in peers:
            rates["continuous_batching_output"] = peers["continuous_batching"]["output_tokens_per_s"]
        summary[name] = {"decode_tokens_per_s": rates}
        kiln_latency = summary.get(f"kiln-{name.removeprefix('hf-')}-latency", {}).get("latency", {})
        ratios = {f"batch1_over_{k}": kiln_latency["1"]["decode_tokens_per_s"] / rates[k]
                  for k in ("eager", "static_compile") if rates.get(k) and "1" in kiln_latency}
        ratios.update({f"batch{b}_over_batched": kiln_latency[b]["decode_tokens_per_s"] / rates[f"batched_{b}"]
                       for b in kiln_latency if rates.get(f"batched_{b}")})
        summary[name]["kiln_over_peer"] = {k: round(v, 3) for k, v in ratios.items()}
    gemm = (parts.get("gemm") or {}).get("result") or {}
    fp16_peak = summary["matmul_TFLOPs"].get("float16")
    for row in gemm.get("shapes", []):
        summary.setdefault("gemm", {})[str(row["m"])] = {
            k: row.get(k) for k in ("ok", "kiln_tflops", "torch_tflops", "kiln_over_torch")} | (
            {"kiln_fraction_of_measured_fp16_peak": round(row["kiln_tflops"] / fp16_peak, 4)} if fp16_peak else {})
    for row in gemm.get("configs", []):  # tile configurations: the fastest correct one at each m
        good = {k: v for k, v in row["tflops"].items() if row["ok"].get(k)}
        if good:
            best = max(good, key=good.get)
            summary.setdefault("gemm_configs", {})[str(row["m"])] = {"best": best, "tflops": row["tflops"]} | (
                {"best_fraction_of_measured_fp16_peak": round(good[best] / fp16_peak, 4)} if fp16_peak else {})
    for row in gemm.get("wgmma", []):  # the sm_90a wgmma variants: the fastest correct one against the best mma.sync
        cell = {"ok": row["ok"], "tflops": row["tflops"]}
        good = {k: v for k, v in row["tflops"].items() if row["ok"].get(k)}
        if good:
            cell["best"] = max(good, key=good.get)
            if fp16_peak:
                cell["fraction_of_measured_fp16_peak"] = round(good[cell["best"]] / fp16_peak, 4)
            mma = summary.get("gemm_configs", {}).get(str(row["m"]))
            if mma and mma["tflops"].get(mma["best"]):
                cell["over_best_mma"] = round(good[cell["best"]] / mma["tflops"][mma["best"]], 3)
        summary.setdefault("wgmma", {})[str(row["m"])] = cell
    for row in gemm.get("lowbatch", []):  # decode-side linears: weight bytes/s per variant, and kiln's over copy
        gbps = row["weight_GBps"]
        cell = {"weight_GBps": gbps, "fastest": max(gbps, key=gbps.get), "all_ok": all(row["ok"].values())}
        if copy and "kiln" in gbps:
            cell["kiln_fraction_of_copy_bandwidth"] = round(gbps["kiln"] / copy, 4)
        summary.setdefault("lowbatch", {}).setdefault(f"{row['n']}x{row['k']}", {})[str(row["m"])] = cell
    rec = {}  # what the run says the compiler's defaults should be
    if "4096" in summary.get("gemm_configs", {}):
        rec["MMAConfig"] = summary["gemm_configs"]["4096"]["best"]  # (MMA_CONFIGS' name; "default" is today's)
    if summary.get("wgmma", {}).get("4096", {}).get("best"):
        rec["WgmmaConfig"] = summary["wgmma"]["4096"]["best"]  # (gemm.py WGMMA_VARIANTS' name)
    low = recommend_low_batch(gemm.get("lowbatch", []))
    if low:
        rec["low_batch"] = low
    if rec:
        summary["recommended"] = rec
    for part, key in (("demo", "demo_greedy_match"), ("demo-nograph", "demo_nograph_greedy_match")):
        demo = (parts.get(part) or {}).get("result") or {}
        if demo:
            summary[key] = {k: demo.get(k) for k in ("match", "first_mismatch", "num_tokens",
                                                     "teacher_forced_argmax_agree", "first_logits_max_abs_diff")}
    parity = (parts.get("parity-llama-3-8b") or {}).get("result") or {}
    if parity.get("max_rel_diff_per_row"):
        agree = parity["argmax_agree_per_row"]
        summary["fp16_parity_llama_3_8b"] = {"ok": parity["ok"], "dtype": parity["dtype"], "rtol": parity["rtol"],
                                             "max_rel_diff": max(parity["max_rel_diff_per_row"]),
                                             "argmax_agree": f"{sum(agree)}/{len(agree)}"}
    logits = (parts.get("wgmma-logits") or {}).get("result") or {}
    if logits:
        summary["wgmma_same_logits"] = {k: logits.get(k) for k in ("ok", "max_rel_diff_per_step",
                                                                   "argmax_agree_per_step", "rtol")}
    for n in ("512", "2048"):  # prefill tokens/s with the wgmma linears (sm_90a) over mma.sync (sm_90)
        rate = lambda name: next(iter(summary.get(name, {}).get("latency", {}).values()), {}).get(  # noqa: E731
            "prefill_tokens_per_s")
        mma, wg = rate(f"kiln-llama-3-8b-prefill-{n}"), rate(f"kiln-llama-3-8b-sm90a-prefill-{n}")
        if mma and wg:
            summary.setdefault("wgmma_prefill_speedup", {})[n] = round(wg / mma, 3)
    graphs = summary.get("kiln-llama-3.2-1b-latency", {}).get("latency", {})
    plain = summary.get("kiln-llama-3.2-1b-nograph-latency", {}).get("latency", {})
    if graphs and plain:  # decode with CUDA graphs over without, per batch size run by both
        summary["cuda_graph_decode_speedup"] = {
            b: round(graphs[b]["decode_tokens_per_s"] / plain[b]["decode_tokens_per_s"], 3)
            for b in graphs if b in plain and plain[b]["decode_tokens_per_s"]}
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("inputs", type=Path, nargs="+", help="WORK_DIR OUT_DIR, or with --merge: RESULTS.json... OUT_DIR")
    ap.add_argument("--merge", action="store_true", help="join several calls' results.json")
    ap.add_argument("--bundle", type=Path, default=Path("gpu_bundle"))
    args = ap.parse_args()
    *sources, out = args.inputs
    if not sources or (not args.merge and len(sources) != 1):
        ap.error("give WORK_DIR OUT_DIR, or --merge RESULTS.json [...] OUT_DIR")
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        runs = [_read_json(p) for p in sources]
        if any(r is None for r in runs):
            ap.error(f"not a results.json: {', '.join(str(p) for p, r in zip(sources, runs) if r is None)}")
        results = merge(runs, args.bundle)
    else:
        results, logs = collect(sources[0], args.bundle)
        (out / "logs.txt").write_text(logs)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    from tables import tables  # (tools/gpu/, this script's directory)

    (out / "tables.md").write_text(tables(results) + "\n")


if __name__ == "__main__":
    main()
