"""The serving engine: requests in, streamed choices out, one model step at a time.

``Engine.step()`` asks the scheduler for a batch, runs it through the model runner, samples the
sequences whose computed tokens reached their end (grammar masks first), detokenizes, applies the
stop conditions and hands finished sequences back to the scheduler (which keeps their KV for prefix
reuse). ``AsyncEngine`` runs that loop on a background thread for the HTTP server: requests are
submitted and aborted through a queue, outputs come back on one asyncio queue per request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path

from ..artifact import Artifact, load_artifact
from ..errors import KilnError, RequestError
from ..scheduler.scheduler import Scheduler, SchedulerConfig
from ..scheduler.sequence import Sequence, Status
from .detokenizer import IncrementalDetokenizer
from .kv_cache import KVCacheConfig
from .outputs import CompletionOutput, EngineStats, Request, RequestOutput
from .sampler import Sampler, SamplingParams, SamplingRow, choice_generator
from .tokenizer import Tokenizer
from .tvm_runtime import require_cuda

log = logging.getLogger("kiln.engine")


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 64  # sequences running at once
    max_batched_tokens: int = 512  # tokens computed per step (prefill chunks + decodes)
    kv_cache_memory: int | float = 0.25  # bytes (int), or a fraction (0, 1] of the memory available
    policy: str = "fcfs"  # "fcfs" | "vtc"
    prefix_cache: bool = True
    device: str | None = None
    page_size: int = 16
    random_weights: int | None = None  # a seed: seeded random weights in the artifact's layout (benchmarks)

    def __post_init__(self):
        if self.max_num_seqs < 1:
            raise KilnError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_batched_tokens < 1:
            raise KilnError(f"max_batched_tokens must be at least 1, got {self.max_batched_tokens}")
        m = self.kv_cache_memory
        if isinstance(m, bool) or not isinstance(m, (int, float)) or m <= 0 or (isinstance(m, float) and m > 1):
            raise KilnError(f"kv_cache_memory must be a byte count or a fraction in (0, 1], got {m!r}")
        if self.policy not in ("fcfs", "vtc"):
            raise KilnError(f"unknown scheduling policy {self.policy!r} (fcfs or vtc)")


def _available_memory(device: str) -> int:
    if device == "cuda":
        import torch

        require_cuda()
        return torch.cuda.mem_get_info()[0]
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def kv_cache_config(spec, config: EngineConfig, device: str) -> KVCacheConfig:
    """Pages for ``config.kv_cache_memory`` bytes, capped at twice what the running sequences can use
    (the rest of the cap feeds the prefix cache)."""
    m = config.kv_cache_memory
    budget = int(m * _available_memory(device)) if isinstance(m, float) else int(m)
    tokens = min(budget // spec.kv_bytes_per_token, 2 * config.max_num_seqs * spec.context_len)
    p = config.page_size
    tokens = tokens // p * p
    if tokens < p:
        raise KilnError(f"kv_cache_memory={m!r} holds {budget // spec.kv_bytes_per_token} tokens; one page needs "
                        f"{p} tokens = {p * spec.kv_bytes_per_token} bytes")
    return KVCacheConfig(max_num_seqs=config.max_num_seqs, max_total_tokens=tokens,
                         prefill_chunk_size=min(config.max_batched_tokens, tokens), page_size=p)


@dataclass
class Choice:
    """One choice of a request, as the engine keeps it between steps. Made for every choice when the request
    is added (a child of an n > 1 request starts from the prompt, as its parent does)."""

    index: int  # 0..n-1
    row: SamplingRow  # the sampler's view: params, own generator, penalty history, grammar state
    detok: IncrementalDetokenizer
    news: CompletionOutput  # what it produced since the request's last output
    done: bool = False

    def take_news(self) -> CompletionOutput:
        out, self.news = self.news, CompletionOutput(self.index, "", [], [] if self.news.logprobs is not None else None)
        return out


@dataclass
class _Live:
    """An admitted request: its choices, the sequences that compute them, and its stop token ids."""

    request: Request
    choices: list[Choice]
    seqs: list[Sequence]
    stop_ids: frozenset[int]
    touched: bool = False  # a choice has news for the next output

    @property
    def finished(self) -> bool:
        return all(c.done for c in self.choices)


class Engine:
    def __init__(self, artifact: str | Path | Artifact, config: EngineConfig = EngineConfig(),
                 kv_config: KVCacheConfig | None = None):
        """``kv_config``: the KV cache's exact shape, instead of sizing it from ``config.kv_cache_memory``; its
        ``max_num_seqs`` and ``prefill_chunk_size`` then bound the scheduler's batch."""
        import torch

        from .model_runner import ModelRunner

        # The model runs on TVM's own thread pool; torch (the sampler) on more than one thread only fights it.
        torch.set_num_threads(1)
        self.artifact = artifact if isinstance(artifact, Artifact) else load_artifact(artifact)
        self.spec = self.artifact.spec
        self.model_name = self.artifact.path.name
        device = config.device or self.artifact.target["device"]
        if kv_config is not None:
            config = replace(config, max_num_seqs=kv_config.max_num_seqs, max_batched_tokens=kv_config.prefill_chunk_size)
        self.config = config
        kv_cfg = kv_config or kv_cache_config(self.spec, config, device)
        self.runner = ModelRunner(self.artifact, device, kv_cfg, random_weights=config.random_weights)
        self.kv = self.runner.kv
        self.kv_pages_total = self.kv.num_free_pages
        self.scheduler = Scheduler(SchedulerConfig(max_num_seqs=config.max_num_seqs,
                                                   max_batched_tokens=kv_cfg.prefill_chunk_size,
                                                   page_size=kv_cfg.page_size, policy=config.policy,
                                                   prefix_cache=config.prefix_cache), self.kv)
        self.tokenizer = Tokenizer(self.artifact.path)
        self.sampler = Sampler(self.spec.vocab_size)
        self._grammar_compiler = None
        self._live: dict[str, _Live] = {}
        self._ended: list[RequestOutput] = []  # outputs of aborted requests, returned by the next step
        self.finished_by_reason: dict[str, int] = {}
        self.num_steps = 0  # steps that ran a batch
        self.step_times: list[tuple] = []  # per step: (batch size, schedule, inputs, model, outputs, sample+detok) s

    # -- requests ----------------------------------------------------------------------------------

    def compile_grammar(self, fmt):
        """A compiled grammar for a ``grammar.ResponseFormat`` (None for plain text); RequestError if invalid."""
        if self._grammar_compiler is None:
            from .grammar import GrammarCompiler

            self._grammar_compiler = GrammarCompiler(self.artifact.path, self.spec.vocab_size, self.spec.eos_token_ids)
        return self._grammar_compiler.compile(fmt)

    def validate(self, req: Request) -> None:
        """Raise RequestError for a request that can never run. Safe to call from another thread."""
        p, ctx, n = req.params, self.spec.context_len, len(req.prompt_ids)
        if n == 0:
            raise RequestError("the prompt is empty")
        if any(not 0 <= t < self.spec.vocab_size for t in req.prompt_ids):
            raise RequestError(f"prompt token ids must be in [0, {self.spec.vocab_size})")
        if any(not 0 <= t < self.spec.vocab_size for t in p.stop_token_ids):
            raise RequestError(f"stop_token_ids must be in [0, {self.spec.vocab_size})")
        if n >= ctx:
            raise RequestError(f"the prompt has {n} tokens; this model's context window is {ctx} tokens")
        if n + p.max_tokens > ctx:
            raise RequestError(f"this model's context window is {ctx} tokens; the prompt has {n} and max_tokens "
                               f"asks for {p.max_tokens} more (at most {ctx - n})")
        cap = self.kv.max_sequence_tokens(ctx)
        if n + p.max_tokens > cap:
            raise RequestError(f"the request needs up to {n + p.max_tokens} tokens of KV cache; the server's cache "
                               f"holds {cap}")
        if p.n > self.config.max_num_seqs:
            raise RequestError(f"n={p.n} exceeds the server's max_num_seqs={self.config.max_num_seqs}")
        if req.request_id in self._live:
            raise RequestError(f"request id {req.request_id!r} is already in use")

    def add_request(self, req: Request) -> None:
        self.validate(req)
        p = req.params
        req.arrival = req.arrival or time.monotonic()
        stop = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.spec.eos_token_ids))
        seq = Sequence(self.scheduler.new_seq_id(), req.request_id, list(req.prompt_ids), len(req.prompt_ids),
                       p.max_tokens, user=req.user, arrival=req.arrival, forks=p.n - 1)
        self._live[req.request_id] = _Live(req, [self._new_choice(req, i) for i in range(p.n)], [seq], frozenset(stop))
        self.scheduler.add(seq)

    def _new_choice(self, req: Request, index: int) -> Choice:
        p = req.params
        grammar = None
        if req.grammar is not None:
            from .grammar import GrammarState

            grammar = GrammarState(req.grammar)
        row = SamplingRow(p, choice_generator(p.seed, index) if p.seed is not None else None,
                          list(req.prompt_ids) if p.repetition_penalty != 1.0 else (), grammar=grammar)
        detok = IncrementalDetokenizer(self.tokenizer, req.prompt_ids, p.stop, p.skip_special_tokens)
        return Choice(index, row, detok, CompletionOutput(index, "", [], [] if p.logprobs is not None else None))

    def abort_request(self, request_id: str) -> None:
        live = self._live.pop(request_id, None)
        if live is None:
            return
        for seq in live.seqs:
            if seq.status is not Status.FINISHED:
                self.scheduler.abort(seq)
        for c in live.choices:
            if not c.done:
                c.done, c.news.finish_reason = True, "abort"
                self.finished_by_reason["abort"] = self.finished_by_reason.get("abort", 0) + 1
        self._ended.append(self._output(live))

    def has_unfinished(self) -> bool:
        return bool(self._live) or bool(self._ended)

    # -- one step ----------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """schedule -> run -> sample -> postprocess; the outputs of every request with news."""
        t0 = time.perf_counter()
        outputs, self._ended = self._ended, []
        batch = self.scheduler.schedule()
        if not batch:
            return outputs
        logits = self.runner.forward_logits(batch.seq_ids, batch.token_lists)
        t1 = time.perf_counter()
        choices = [self._live[seq.request_id].choices[index] for _, seq, index in batch.samples]
        tokens, logprobs = self.sampler.sample(logits, [row for row, _, _ in batch.samples], self._rows(batch, choices))
        finished = self._check_stops(batch, choices, tokens, logprobs)
        for child in self.scheduler.postprocess(batch, tokens, finished):
            self._live[child.request_id].seqs.append(child)
        self._record_step(len(batch), t0, t1)
        return outputs + self._outputs()

    def _rows(self, batch, choices: list[Choice]) -> list[SamplingRow]:
        """Each choice's sampling row, its output so far (for the penalties) brought up to date."""
        for (_, seq, index), c in zip(batch.samples, choices):
            if c.row.params.has_penalties and index == seq.index:  # a child-to-be has no output yet
                c.row.output_ids = seq.tokens[seq.prompt_len:]
        return [c.row for c in choices]

    def _check_stops(self, batch, choices: list[Choice], tokens: list[int], logprobs: list) -> list[bool]:
        """Record each choice's new token, detokenize them together, and apply the stop conditions: a stop
        token, a stop string, the grammar's end, ``max_tokens`` or the context window. Whether each ends."""
        reasons: list[str | None] = [None] * len(choices)
        text_rows = []
        for k, (c, token) in enumerate(zip(choices, tokens)):
            live = self._live[batch.samples[k][1].request_id]
            live.touched = True
            c.news.token_ids.append(token)
            if c.news.logprobs is not None:
                c.news.logprobs.append(logprobs[k])
            grammar = c.row.grammar
            if grammar is not None and not grammar.accept(token):
                reasons[k] = "stop"  # cannot happen with the mask applied; never continue outside the grammar
            if token in live.stop_ids:
                reasons[k] = "stop"  # a stop token's text is not part of the output
            else:
                text_rows.append(k)
        detoks = [choices[k].detok for k in text_rows]
        for k, text in zip(text_rows, IncrementalDetokenizer.step_batch(detoks, [tokens[k] for k in text_rows])):
            choices[k].news.text += text
            if choices[k].detok.stopped:
                reasons[k] = "stop"
        for k, (c, (_, seq, _)) in enumerate(zip(choices, batch.samples)):
            # a child-to-be's length is its parent's after this token: the prompt plus one
            generated, length = seq.num_generated + 1, len(seq.tokens) + 1
            if reasons[k] is None and c.row.grammar is not None and c.row.grammar.terminated:
                reasons[k] = "stop"
            if reasons[k] is None and (generated >= seq.max_tokens or length >= self.spec.context_len):
                reasons[k] = "length"
            if reasons[k] is not None:
                if not c.detok.stopped:
                    c.news.text += c.detok.flush()
                c.done, c.news.finish_reason = True, reasons[k]
                self.finished_by_reason[reasons[k]] = self.finished_by_reason.get(reasons[k], 0) + 1
        return [r is not None for r in reasons]

    def _outputs(self) -> list[RequestOutput]:
        """One output per request with news; a finished request leaves the engine."""
        outputs = [self._output(live) for live in self._live.values() if live.touched]
        for out in outputs:
            if out.finished:
                del self._live[out.request_id]
        return outputs

    def _output(self, live: _Live) -> RequestOutput:
        live.touched = False
        outs = [c.take_news() for c in live.choices if c.news.token_ids or c.news.finish_reason or c.news.text]
        first = live.seqs[0]
        return RequestOutput(live.request.request_id, outs, first.prompt_len, first.num_cached, live.finished)

    def _record_step(self, batch_size: int, t0: float, t1: float) -> None:
        """Per step: (batch size, schedule, inputs, model, outputs, sample+detok) seconds (tools/bench_engine.py)."""
        inputs, model, wrap = self.runner.last_timing
        schedule = t1 - t0 - inputs - model - wrap
        self.step_times.append((batch_size, schedule, inputs, model, wrap, time.perf_counter() - t1))
        del self.step_times[:-4096]
        self.num_steps += 1

    # -- observation -------------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        s = self.scheduler.stats
        return EngineStats(running=len(self.scheduler.running), waiting=self.scheduler.num_waiting,
                           kv_pages_total=self.kv_pages_total, kv_pages_free=self.kv.num_free_pages,
                           kv_pages_cached=self.scheduler.num_cached_pages,
                           prefix_cache_hits=s.prefix_cache_hits, prefix_cache_hit_tokens=s.prefix_cache_hit_tokens,
                           prompt_tokens=s.prompt_tokens, prefill_tokens_computed=s.prefill_tokens_computed,
                           generation_tokens=s.generation_tokens, preemptions=s.preemptions,
                           requests_finished=dict(self.finished_by_reason), kv_sequences=len(self.kv.live),
                           cached_sequences=len(self.scheduler.cache))

    @property
    def decode_graph_bound(self) -> int | None:
        """The largest decode batch the artifact's CUDA graphs are planned for; None where it has none
        (a CPU artifact, ``--no-cuda-graph``, a grouped-KV model)."""
        bound = self.artifact.manifest.options.max_batch_size
        return bound if self.runner.device == "cuda" else None

    def capture_decode_graphs(self, sizes=None) -> list[int]:
        """Run one decode step at each batch size of ``sizes`` (default: every size a step can have, up to
        max_num_seqs and the step's token budget), largest first, so that a GPU captures each size's CUDA
        graph now instead of in the first requests' steps. Each step is that many one-token prompts, each
        asking for one token; afterwards the engine is as new (no sequence, no cached prefix, counters at
        zero). Returns the batch sizes of the steps run. Call it before taking requests."""
        assert not self.has_unfinished(), "capture_decode_graphs runs on an idle engine"
        top = min(self.config.max_num_seqs, self.scheduler.config.max_batched_tokens)
        sizes = sorted({b for b in (sizes or range(1, top + 1)) if 1 <= b <= top}, reverse=True)
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        first = len(self.step_times)
        for b in sizes:
            self.generate([Request(f"kiln-graph-warmup-{b}-{i}", [i % self.spec.vocab_size], params)
                           for i in range(b)])
        seen = [t[0] for t in self.step_times[first:]]
        self.clear_prefix_cache()
        self.scheduler.stats = type(self.scheduler.stats)()
        self.finished_by_reason.clear()
        self.step_times.clear()
        self.num_steps = 0
        return seen

    def clear_prefix_cache(self) -> None:
        """Drop every prefix-cache entry (their pages come back unless a running fork still uses them)."""
        self.scheduler.clear_prefix_cache()

    def generate(self, requests: list[Request]) -> dict[str, list[RequestOutput]]:
        """Run requests to completion (offline use and tests): every output of each request, in order."""
        for r in requests:
            self.add_request(r)
        got: dict[str, list[RequestOutput]] = {r.request_id: [] for r in requests}
        while self.has_unfinished():
            for out in self.step():
                got[out.request_id].append(out)
        return got


_END = object()


class RequestStream:
    """The outputs of one request, as an async iterator; ``abort()`` cancels it."""

    def __init__(self, owner: "AsyncEngine", request_id: str, loop: asyncio.AbstractEventLoop):
        self._owner, self.request_id, self._loop = owner, request_id, loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self.finished = False

    def _push(self, item) -> None:  # engine thread
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone: nobody is listening
            self._owner._abort(self.request_id)

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self._owner._abort(self.request_id)


class AsyncEngine:
    """Runs ``Engine.step()`` on a background thread; submit and abort from the event loop."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, RequestStream] = {}
        self._stopping = False
        self._snapshot = engine.stats()
        self._ids_in_use: set[str] = set()
        self._thread = threading.Thread(target=self._run, name="kiln-engine", daemon=True)
        self._thread.start()

    # -- what a front end needs from the model (fixed at load; safe from any thread) ----------------

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def context_len(self) -> int:
        return self.engine.spec.context_len

    @property
    def max_sequence_tokens(self) -> int:
        """The most tokens (prompt + output) one sequence can hold: the context window, or less if the KV
        cache is smaller."""
        return self.engine.kv.max_sequence_tokens(self.engine.spec.context_len)

    def compile_grammar(self, fmt):
        """A compiled grammar for a ``grammar.ResponseFormat`` (None for plain text); RequestError if invalid.
        Slow for a new schema: call it off the event loop."""
        return self.engine.compile_grammar(fmt)

    def submit(self, req: Request) -> RequestStream:
        if req.request_id in self._ids_in_use:
            raise RequestError(f"request id {req.request_id!r} is already in use")
        self.engine.validate(req)
        req.arrival = req.arrival or time.monotonic()
        stream = RequestStream(self, req.request_id, asyncio.get_running_loop())
        self._ids_in_use.add(req.request_id)
        self._cmds.put(("add", req, stream))
        self._wake.set()
        return stream

    def _abort(self, request_id: str) -> None:
        self._cmds.put(("abort", request_id, None))
        self._wake.set()

    def clear_prefix_cache(self) -> Future:
        """Drop every prefix-cache entry, on the engine thread between two steps (benchmarks and tests
        start from a cold cache). Callable from any thread; the future gets the stats right after."""
        done: Future = Future()
        self._cmds.put(("clear", None, done))
        self._wake.set()
        return done

    def stats(self) -> EngineStats:
        return self._snapshot

    async def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10)

    def _run(self) -> None:
        eng = self.engine
        while not self._stopping:
            if self._cmds.empty() and not eng.has_unfinished():
                self._wake.wait(1.0)
                self._wake.clear()
            while not self._cmds.empty():
                kind, arg, reply = self._cmds.get()  # reply: the request's stream ("add"), a Future ("clear")
                if kind == "add":
                    try:
                        eng.add_request(arg)
                        self._streams[arg.request_id] = reply
                    except Exception as e:  # RequestError (validated twice: cheap) or a bug: the request fails alone
                        self._ids_in_use.discard(arg.request_id)
                        reply._push(e if isinstance(e, KilnError) else RuntimeError(f"engine error: {e}"))
                elif kind == "clear":
                    try:
                        eng.clear_prefix_cache()
                        self._snapshot = eng.stats()
                        reply.set_result(self._snapshot)
                    except Exception as e:
                        reply.set_exception(e)
                else:
                    eng.abort_request(arg)
            if not eng.has_unfinished():
                self._snapshot = eng.stats()
                continue
            try:
                outputs = eng.step()
            except Exception as e:  # a bug must not take the server down: fail what is in flight, keep serving
                log.exception("engine step failed; aborting the requests in flight")
                for rid in list(eng._live):
                    eng.abort_request(rid)
                eng._ended = []
                for rid, stream in list(self._streams.items()):
                    stream._push(RuntimeError(f"engine error: {e}"))
                    self._ids_in_use.discard(rid)
                self._streams.clear()
                continue
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    stream._push(out)
                    if out.finished:
                        del self._streams[out.request_id]
                        self._ids_in_use.discard(out.request_id)
            self._snapshot = eng.stats()
