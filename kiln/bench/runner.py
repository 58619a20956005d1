"""The three benchmark modes, each driving one in-process ``Engine`` (its device comes from the artifact).

- latency: for each batch size B, B prompts of ``input_len`` random tokens are submitted together.
  The prefill time is the sum of the ``engine.step()`` times until every prompt has its first token
  (chunked under the step's token budget; the steps may include early finishers' first decodes).
  Then one untimed decode-only step (all B sequences compute one token each; on a GPU it captures the
  CUDA graph of batch size B, once per engine), then ``output_len`` such steps, timed one by one; the
  requests are aborted after them. Decode tokens/s is B / mean step time.
- throughput: ``num_prompts`` ShareGPT-like requests (workload.py) submitted at once; the engine runs
  them to completion. Requests/s, output tokens/s and total tokens/s over the whole run.
- serving: for each request rate, the same request set arrives as a Poisson process. Between steps
  the loop adds every request whose arrival time has passed; the engine steps as fast as it can
  (sleeping only when it has nothing to do). A request's arrival is its scheduled time, so time
  spent waiting for a running step counts in its TTFT, as it would for a server's client. Every
  token's time is the end of the step that produced it. Metrics: metrics.py.

Every request is greedy with ``ignore_eos``; the prefix cache is cleared before each run, and random
prompts never share a prefix.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from ..errors import KilnError
from . import workload
from .metrics import RequestTiming, percentile, serving_metrics

MODES = ("latency", "throughput", "serving")
THROUGHPUT_KEYS = ("completed", "duration", "total_input_tokens", "total_output_tokens", "request_throughput",
                   "output_throughput", "total_token_throughput")


@dataclass(frozen=True)
class BenchConfig:
    modes: tuple[str, ...] = MODES
    batch_sizes: tuple[int, ...] = (1, 8, 32)  # latency
    input_len: int = 32  # latency: prompt tokens
    output_len: int = 128  # latency: decode steps timed
    num_prompts: int = 200  # throughput and serving
    request_rates: tuple[float, ...] = (1.0, 4.0, 16.0, math.inf)  # serving, requests/s
    slo_ms: dict[str, float] = field(default_factory=dict)  # serving goodput: kind -> ms (metrics.SLO_KINDS)
    seed: int = 0
    progress: bool = True  # tqdm bars on stderr

    def __post_init__(self):
        assert self.modes and set(self.modes) <= set(MODES), self.modes
        assert self.batch_sizes and min(self.batch_sizes) >= 1, self.batch_sizes
        assert self.input_len >= 1 and self.output_len >= 1 and self.num_prompts >= 1
        assert self.request_rates and min(self.request_rates) > 0, self.request_rates


def engine_config(bench: BenchConfig, max_num_seqs: int | None = None, max_batched_tokens: int | None = None,
                  kv_cache_memory: int | float | None = None, random_weights: int | None = None):
    """The engine's configuration: the options given, and otherwise the engine's defaults raised to fit
    the largest latency batch in one decode step. KilnError if given options cannot fit it."""
    from ..runtime.engine import EngineConfig

    defaults = EngineConfig()
    given = {"max_num_seqs": max_num_seqs, "max_batched_tokens": max_batched_tokens,
             "kv_cache_memory": kv_cache_memory, "random_weights": random_weights}
    batch = max(bench.batch_sizes) if "latency" in bench.modes else 1
    for name, flag in (("max_num_seqs", "--max-num-seqs"), ("max_batched_tokens", "--max-batched-tokens")):
        if given[name] is None:
            given[name] = max(getattr(defaults, name), batch)
        elif given[name] < batch:
            raise KilnError(f"--batch-sizes {batch} needs {flag} of at least {batch}, got {given[name]}")
    if random_weights is not None and "random_weights" not in {f.name for f in dataclasses.fields(EngineConfig)}:
        raise KilnError("--random-weights needs an engine with random weights (EngineConfig.random_weights); "
                        "this kiln's engine has none")
    return EngineConfig(**{k: v for k, v in given.items() if v is not None})


def check_fits(bench: BenchConfig, context_len: int) -> None:
    """KilnError if the latency requests cannot fit the model's context window."""
    need = bench.input_len + 1 + bench.output_len  # the prefill samples one token, then the decode steps
    if "latency" in bench.modes and need > context_len:
        raise KilnError(f"--input-len {bench.input_len} + 1 token from the prefill + --output-len {bench.output_len} "
                        f"decode steps = {need} tokens exceed the model's context window of {context_len}; "
                        f"lower --input-len or --output-len")


def _bar(bench: BenchConfig, total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="req", leave=False, disable=not bench.progress, dynamic_ncols=True)


def _greedy(max_tokens: int):
    from ..runtime.sampler import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def warm_up(engine, bench: BenchConfig) -> dict:
    """One short request first, so one-time costs (allocations, first calls) stay out of the numbers;
    then, where the artifact has decode CUDA graphs, one decode step at every batch size the runs can
    have (the latency batch sizes; 1 to num_prompts for throughput and serving), capturing each graph
    as ``kiln serve`` does at startup. Returns what it did: ``{"graph_batch_sizes", "graph_seconds"}``."""
    from ..runtime.outputs import Request

    (req,) = workload.fixed_requests(1, min(bench.input_len, engine.spec.context_len - 3), 2,
                                     engine.spec.vocab_size, bench.seed + 10_000)
    engine.generate([Request("bench-warmup", list(req.prompt_ids), _greedy(2))])
    engine.clear_prefix_cache()
    if engine.decode_graph_bound is None:
        return {"graph_batch_sizes": 0, "graph_seconds": 0.0}
    sizes = set(bench.batch_sizes) if "latency" in bench.modes else set()
    if {"throughput", "serving"} & set(bench.modes):
        sizes |= set(range(1, bench.num_prompts + 1))
    t = time.perf_counter()
    seen = engine.capture_decode_graphs(sizes)
    return {"graph_batch_sizes": len(seen), "graph_seconds": round(time.perf_counter() - t, 3)}


# -- latency --------------------------------------------------------------------------------------------


def _decoding(engine, batch: int) -> bool:
    """Whether the next step is decode-only over the whole batch: every sequence computes one token."""
    running = engine.scheduler.running
    return len(running) == batch and engine.scheduler.num_waiting == 0 and all(s.remaining == 1 for s in running)


def latency_at_batch(engine, bench: BenchConfig, batch: int, seed: int) -> dict:
    """Prefill time of ``batch`` prompts and the time of each of ``output_len`` decode steps after it."""
    from ..runtime.outputs import Request

    engine.clear_prefix_cache()
    # room to keep decoding whatever the prefill's chunking did: the requests are aborted after the timed steps
    room = engine.kv.max_sequence_tokens(engine.spec.context_len) - bench.input_len
    if room < 2 + bench.output_len:
        raise KilnError(f"the KV cache holds {bench.input_len + room} tokens, fewer than --input-len "
                        f"{bench.input_len} + 2 + --output-len {bench.output_len}; raise --kv-cache-memory")
    params = _greedy(room)
    reqs = workload.fixed_requests(batch, bench.input_len, bench.output_len, engine.spec.vocab_size, seed)
    ids = [f"latency-{batch}-{i}" for i in range(batch)]
    for rid, r in zip(ids, reqs):
        engine.add_request(Request(rid, list(r.prompt_ids), params))
    started: set[str] = set()
    prefill_s, prefill_steps = 0.0, 0
    while len(started) < batch and engine.has_unfinished():
        t = time.perf_counter()
        outs = engine.step()
        prefill_s += time.perf_counter() - t
        prefill_steps += 1
        started.update(o.request_id for o in outs if any(c.token_ids for c in o.outputs))
    step_s: list[float] = []
    warm = False  # the first decode-only step at this batch size is not timed: it may capture a CUDA graph
    while len(step_s) < bench.output_len and engine.has_unfinished():
        decode_only = _decoding(engine, batch)
        t = time.perf_counter()
        engine.step()
        if decode_only and warm:
            step_s.append(time.perf_counter() - t)
        warm = warm or decode_only
    for rid in ids:
        engine.abort_request(rid)
    while engine.has_unfinished():
        engine.step()
    if len(step_s) < bench.output_len:
        raise KilnError(f"batch {batch}: only {len(step_s)} of {bench.output_len} decode steps ran with the whole "
                        f"batch (too little KV cache?); raise --kv-cache-memory or lower --output-len")
    mean_s = sum(step_s) / len(step_s)
    return {"batch_size": batch, "input_len": bench.input_len, "output_len": bench.output_len,
            "prefill_steps": prefill_steps, "prefill_ms": prefill_s * 1e3,
            "prefill_tokens_per_s": batch * bench.input_len / prefill_s,
            "decode_steps": len(step_s), "mean_decode_step_ms": mean_s * 1e3,
            "p50_decode_step_ms": percentile(step_s, 50) * 1e3, "p99_decode_step_ms": percentile(step_s, 99) * 1e3,
            "decode_tokens_per_s": batch / mean_s}


def run_latency(engine, bench: BenchConfig) -> list[dict]:
    """``latency_at_batch`` for every batch size, each with its own prompts."""
    rows = []
    with tqdm(bench.batch_sizes, desc="latency", unit="batch", leave=False, disable=not bench.progress) as bar:
        for i, batch in enumerate(bar):
            bar.set_postfix(batch=batch)
            rows.append(latency_at_batch(engine, bench, batch, bench.seed + 1 + i))
    return rows


# -- throughput and serving -------------------------------------------------------------------------------


def drive(engine, reqs: list[workload.BenchRequest], arrivals: list[float],
          bar: tqdm) -> tuple[list[RequestTiming], float]:
    """Run ``reqs``, each added once its arrival offset (s) has passed; return their timings and the
    run's duration (from the first arrival to the last token)."""
    from ..runtime.outputs import Request

    assert len(reqs) == len(arrivals) and all(a <= b for a, b in zip(arrivals, arrivals[1:]))
    engine.clear_prefix_cache()
    times: dict[str, list[float]] = {f"bench-{i}": [] for i in range(len(reqs))}
    start = time.perf_counter()
    sent = 0
    while sent < len(reqs) or engine.has_unfinished():
        now = time.perf_counter() - start
        while sent < len(reqs) and arrivals[sent] <= now:
            r = reqs[sent]
            engine.add_request(Request(f"bench-{sent}", list(r.prompt_ids), _greedy(r.output_len)))
            sent += 1
        if not engine.has_unfinished():
            time.sleep(max(0.0, arrivals[sent] - (time.perf_counter() - start)))
            continue
        outs = engine.step()
        t = time.perf_counter() - start
        for o in outs:
            for c in o.outputs:
                times[o.request_id].extend([t] * len(c.token_ids))
            bar.update(int(o.finished))
    duration = time.perf_counter() - start
    timings = []
    for i, r in enumerate(reqs):
        got = times[f"bench-{i}"]
        assert len(got) == r.output_len, (i, len(got), r.output_len)  # greedy, ignore_eos, within the context
        timings.append(RequestTiming(arrivals[i], tuple(got), r.prompt_len))
    return timings, duration


def sharegpt_requests(engine, bench: BenchConfig) -> list[workload.BenchRequest]:
    return workload.sharegpt_like(bench.num_prompts, engine.spec.context_len, engine.spec.vocab_size, bench.seed)


def run_throughput(engine, bench: BenchConfig) -> dict:
    """Every request submitted at once, run to completion: requests/s and tokens/s."""
    reqs = sharegpt_requests(engine, bench)
    with _bar(bench, len(reqs), "throughput") as bar:
        timings, duration = drive(engine, reqs, [0.0] * len(reqs), bar)
    metrics = serving_metrics(timings, duration)
    return {k: metrics[k] for k in THROUGHPUT_KEYS}


def rate_label(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def run_serving(engine, bench: BenchConfig) -> list[dict]:
    """The same request set at every rate, arriving as a Poisson process."""
    reqs = sharegpt_requests(engine, bench)
    rows = []
    for rate in bench.request_rates:
        arrivals = workload.poisson_arrivals(len(reqs), rate, bench.seed)
        with _bar(bench, len(reqs), f"serving at {rate_label(rate)} req/s") as bar:
            timings, duration = drive(engine, reqs, arrivals, bar)
        rows.append({"request_rate": rate, **serving_metrics(timings, duration, bench.slo_ms or None)})
    return rows


# -- everything -------------------------------------------------------------------------------------------


def workload_info(engine, bench: BenchConfig) -> dict:
    """What the throughput and serving requests look like (for the report)."""
    reqs = sharegpt_requests(engine, bench)
    return {"dataset": "sharegpt-like (synthetic, random token ids)", "num_prompts": len(reqs), "seed": bench.seed,
            "length_scale": workload.length_scale(engine.spec.context_len),
            "mean_prompt_len": sum(r.prompt_len for r in reqs) / len(reqs),
            "mean_output_len": sum(r.output_len for r in reqs) / len(reqs),
            "max_total_len": max(r.prompt_len + r.output_len for r in reqs)}


def run_bench(artifact: str | Path, bench: BenchConfig, config=None) -> dict:
    """Load ``artifact`` into an engine with ``config`` (default: ``engine_config(bench)``) and run the
    modes of ``bench``; one dict with the results and what produced them."""
    from .. import __version__
    from ..artifact import load_artifact
    from ..runtime.engine import Engine

    check_fits(bench, load_artifact(artifact, verify=False).spec.context_len)  # before the slow load
    config = config or engine_config(bench)
    engine = Engine(artifact, config)
    spec = engine.spec
    result: dict = {
        "kiln_version": __version__, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "artifact": engine.model_name, "artifact_path": str(engine.artifact.path), "target": engine.artifact.target,
        "device": engine.runner.device,
        "model": {"architecture": spec.architecture, "dtype": spec.dtype, "context_len": spec.context_len,
                  "vocab_size": spec.vocab_size},
        "engine_config": dataclasses.asdict(config), "modes": list(bench.modes),
    }
    if {"throughput", "serving"} & set(bench.modes):
        result["workload"] = workload_info(engine, bench)
    result["warm_up"] = warm_up(engine, bench)
    if "latency" in bench.modes:
        result["latency"] = run_latency(engine, bench)
    if "throughput" in bench.modes:
        result["throughput"] = run_throughput(engine, bench)
    if "serving" in bench.modes:
        result["slo_ms"] = dict(bench.slo_ms)
        result["serving"] = run_serving(engine, bench)
    return result
