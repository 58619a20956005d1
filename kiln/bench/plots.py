"""PNG plots of ``kiln bench`` results (matplotlib, Agg canvas: no display, no global pyplot state).

- ``serving_latency.png``: p50 and p99 TTFT and TPOT against the request rate (serving mode).
- ``decode_throughput.png``: decode tokens/s against the batch size (latency mode).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path


def _figure(width: float, height: float):
    with warnings.catch_warnings():  # matplotlib 3.10 calls pyparsing 3.3's deprecated names on import
        warnings.simplefilter("ignore", DeprecationWarning)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_serving_latency(serving: list[dict], title: str, path: Path) -> None:
    """TTFT and TPOT (p50 solid, p99 dashed) per request rate; rates sit evenly on the x axis."""
    fig = _figure(9, 3.8)
    xs = list(range(len(serving)))
    labels = ["inf" if math.isinf(r["request_rate"]) else f"{r['request_rate']:g}" for r in serving]
    for ax, name, full in zip(fig.subplots(1, 2), ("ttft", "tpot"), ("time to first token", "time per output token")):
        for q, style in (("p50", "o-"), ("p99", "s--")):
            ys = [r[f"{q}_{name}_ms"] for r in serving]
            ax.plot(xs, [math.nan if y is None else y for y in ys], style, label=q)
        ax.set_xticks(xs, labels)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("ms")
        ax.set_title(f"{name.upper()}: {full}")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.savefig(path)


def plot_decode_throughput(latency: list[dict], title: str, path: Path) -> None:
    """Decode tokens/s (batch / step time) per batch size, log2 x axis."""
    fig = _figure(6, 4)
    ax = fig.subplots()
    batches = [r["batch_size"] for r in latency]
    ax.plot(batches, [r["decode_tokens_per_s"] for r in latency], "o-")
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode tokens/s")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    fig.savefig(path)


def write_plots(result: dict, out_dir: Path) -> list[Path]:
    """The plots ``result`` has data for, written into ``out_dir`` (created); their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    title = f"{result['artifact']} on {result['device']}"
    written = []
    if result.get("serving"):
        plot_serving_latency(result["serving"], title, out_dir / "serving_latency.png")
        written.append(out_dir / "serving_latency.png")
    if result.get("latency"):
        plot_decode_throughput(result["latency"], title, out_dir / "decode_throughput.png")
        written.append(out_dir / "decode_throughput.png")
    return written
