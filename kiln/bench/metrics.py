"""Serving metrics from per-request token times: pure functions, no clocks, no engine.

Names follow vLLM's ``benchmark_serving`` so results compare side by side:

- ``ttft``: time to first token, first token time - arrival.
- ``tpot``: time per output token after the first, (e2el - ttft) / (output_len - 1). A request with a
  single output token has no TPOT: it is left out of the TPOT statistics and meets any TPOT SLO.
- ``itl``: inter-token latency, the gap between consecutive tokens of a request; all gaps of all
  requests pooled.
- ``e2el``: end-to-end latency, last token time - arrival.
- goodput: completed requests per second that meet every given SLO (milliseconds).

Statistics are reported in milliseconds as ``mean_<name>_ms``, ``p50_<name>_ms``, ``p90_<name>_ms``,
``p99_<name>_ms``; percentiles interpolate linearly between the closest ranks (NumPy's default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SLO_KINDS = ("ttft", "tpot", "e2el")
PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class RequestTiming:
    """One finished request: when it arrived and when each of its output tokens came back (seconds)."""

    arrival: float
    token_times: tuple[float, ...]  # one per output token, non-decreasing, all >= arrival
    prompt_len: int

    def __post_init__(self):
        assert self.token_times, "a finished request has at least one output token"
        assert self.token_times[0] >= self.arrival, (self.arrival, self.token_times[0])
        assert all(a <= b for a, b in zip(self.token_times, self.token_times[1:])), "token times go backwards"

    @property
    def output_len(self) -> int:
        return len(self.token_times)

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.arrival

    @property
    def e2el(self) -> float:
        return self.token_times[-1] - self.arrival

    @property
    def tpot(self) -> float | None:
        """(e2el - ttft) / (output_len - 1); None with a single output token."""
        if self.output_len < 2:
            return None
        return (self.e2el - self.ttft) / (self.output_len - 1)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100), linear between closest ranks like ``numpy.percentile``."""
    assert values, "percentile of nothing"
    assert 0 <= q <= 100, q
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize_ms(name: str, seconds: list[float]) -> dict[str, float | None]:
    """``mean_<name>_ms`` and ``p50/p90/p99_<name>_ms`` of ``seconds``; None for each when it is empty."""
    ms = [s * 1e3 for s in seconds]
    out: dict[str, float | None] = {f"mean_{name}_ms": sum(ms) / len(ms) if ms else None}
    for q in PERCENTILES:
        out[f"p{q}_{name}_ms"] = percentile(ms, q) if ms else None
    return out


def meets_slo(req: RequestTiming, slo_ms: dict[str, float]) -> bool:
    """Whether ``req`` meets every SLO in ``slo_ms`` (kind -> milliseconds; a missing TPOT counts as 0)."""
    value_s = {"ttft": req.ttft, "tpot": req.tpot or 0.0, "e2el": req.e2el}
    return all(value_s[kind] * 1e3 <= limit for kind, limit in slo_ms.items())


def goodput(reqs: list[RequestTiming], slo_ms: dict[str, float], duration: float) -> float:
    """Requests per second that meet every SLO in ``slo_ms`` over ``duration`` seconds."""
    assert duration > 0, duration
    return sum(meets_slo(r, slo_ms) for r in reqs) / duration


def serving_metrics(reqs: list[RequestTiming], duration: float,
                    slo_ms: dict[str, float] | None = None) -> dict[str, float | int | None]:
    """vLLM's serving metrics for requests that all finished within ``duration`` seconds.

    ``request_goodput`` is None without SLOs."""
    assert duration > 0, duration
    num_out = sum(r.output_len for r in reqs)
    num_in = sum(r.prompt_len for r in reqs)
    out: dict[str, float | int | None] = {
        "completed": len(reqs),
        "duration": duration,
        "total_input_tokens": num_in,
        "total_output_tokens": num_out,
        "request_throughput": len(reqs) / duration,
        "request_goodput": goodput(reqs, slo_ms, duration) if slo_ms else None,
        "output_throughput": num_out / duration,
        "total_token_throughput": (num_in + num_out) / duration,
    }
    out.update(summarize_ms("ttft", [r.ttft for r in reqs]))
    out.update(summarize_ms("tpot", [r.tpot for r in reqs if r.tpot is not None]))
    out.update(summarize_ms("itl", [gap for r in reqs for gap in r.itls]))
    out.update(summarize_ms("e2el", [r.e2el for r in reqs]))
    return out


def parse_slo(text: str) -> dict[str, float]:
    """``ttft:500,tpot:50`` -> {"ttft": 500.0, "tpot": 50.0} (milliseconds); ValueError says what is wrong."""
    slo: dict[str, float] = {}
    for part in text.split(","):
        kind, sep, value = part.strip().partition(":")
        kind = kind.strip().lower()
        if not sep or kind not in SLO_KINDS:
            raise ValueError(f"{part.strip()!r} is not KIND:MS with KIND one of {', '.join(SLO_KINDS)} "
                             f"(e.g. ttft:500,tpot:50)")
        if kind in slo:
            raise ValueError(f"{kind} is given twice")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"{kind}: {value.strip()!r} is not a number of milliseconds") from None
        if not (math.isfinite(ms) and ms > 0):
            raise ValueError(f"{kind}: the limit must be a positive number of milliseconds, got {value.strip()!r}")
        slo[kind] = ms
    return slo
