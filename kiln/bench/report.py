"""``kiln bench`` results as a human-readable summary and as strict JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path


def jsonable(value):
    """``value`` with infinite floats as "inf" (vLLM's request_rate convention), NaN as None and paths
    as strings, so ``json.dumps(allow_nan=False)`` accepts it."""
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return None if math.isnan(value) else value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(result: dict, path: Path) -> None:
    path.write_text(json.dumps(jsonable(result), indent=2, allow_nan=False) + "\n")


def _fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def summary(result: dict) -> str:
    """The summary table printed on stdout: one block per mode that ran."""
    lines = [f"kiln bench {result['artifact']} on {result['device']} (kiln {result['kiln_version']}, "
             f"{result['date']})"]
    if "latency" in result:
        rows = [[str(r["batch_size"]), _fmt(r["prefill_ms"], 2), _fmt(r["prefill_tokens_per_s"], 0),
                 _fmt(r["mean_decode_step_ms"], 3), _fmt(r["p99_decode_step_ms"], 3), _fmt(r["decode_tokens_per_s"], 0)]
                for r in result["latency"]]
        r0 = result["latency"][0]
        lines += ["", f"offline latency: {r0['input_len']}-token prompts, {r0['output_len']} decode steps",
                  *_table(["batch", "prefill ms", "prefill tok/s", "decode ms/step", "p99 ms/step", "decode tok/s"],
                          rows)]
    if "throughput" in result:
        t = result["throughput"]
        lines += ["", f"offline throughput: {t['completed']} requests in {t['duration']:.2f} s: "
                      f"{t['request_throughput']:.2f} req/s, {t['output_throughput']:,.0f} output tok/s, "
                      f"{t['total_token_throughput']:,.0f} total tok/s"]
    if "serving" in result:
        slo = ",".join(f"{k}:{v:g}" for k, v in result.get("slo_ms", {}).items())
        rows = [[("inf" if math.isinf(r["request_rate"]) else f"{r['request_rate']:g}"),
                 _fmt(r["request_throughput"], 2), _fmt(r["request_goodput"], 2), _fmt(r["output_throughput"], 0),
                 _fmt(r["mean_ttft_ms"]), _fmt(r["p99_ttft_ms"]), _fmt(r["mean_tpot_ms"], 2), _fmt(r["p99_tpot_ms"], 2),
                 _fmt(r["p99_itl_ms"], 2), _fmt(r["mean_e2el_ms"])] for r in result["serving"]]
        lines += ["", f"online serving: {result['serving'][0]['completed']} requests per rate, Poisson arrivals"
                      + (f", goodput under {slo}" if slo else ""),
                  *_table(["rate", "req/s", "goodput", "out tok/s", "mean TTFT", "p99 TTFT", "mean TPOT", "p99 TPOT",
                           "p99 ITL", "mean E2EL"], rows),
                  "(latencies in ms; goodput in req/s meeting every SLO)"]
    return "\n".join(lines)
