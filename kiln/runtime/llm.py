"""Offline generation over an artifact: several prompts decoded together on the paged KV cache.

Each step runs every unfinished sequence once: prompts are prefilled in chunks of at most
``prefill_chunk_size`` tokens per step (several prompts share a step), then all sequences decode
together, one token each. Sequences leave the batch as they finish and free their pages. This is a
static batch; continuous batching with admission and preemption is kiln/scheduler's job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..artifact import load_artifact
from ..errors import RequestError
from .kv_cache import KVCacheConfig
from .model_runner import ModelRunner
from .sampler import SamplingParams, sample
from .tokenizer import Tokenizer


@dataclass
class GenerationResult:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (a stop token) or "length" (max_tokens or the context window)


@dataclass
class _Seq:
    seq_id: int
    prompt: list[int]
    params: SamplingParams
    rng: np.random.Generator
    stop_ids: frozenset[int]
    prefilled: int = 0
    out: list[int] = field(default_factory=list)
    finish_reason: str | None = None


class LLM:
    def __init__(self, artifact: str | Path, device: str | None = None, kv_config: KVCacheConfig | None = None):
        self.artifact = load_artifact(artifact)
        self.spec = self.artifact.spec
        self.runner = ModelRunner(self.artifact, device, kv_config)
        self.tokenizer = Tokenizer(self.artifact.path)
        self._next_id = 0

    @property
    def kv(self):
        return self.runner.kv

    def generate(self, prompts: list[str] | list[list[int]], params: SamplingParams | list[SamplingParams]) \
            -> list[GenerationResult]:
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise RequestError("give one SamplingParams for all prompts or one per prompt")
        seqs = []
        for prompt, p in zip(prompts, plist):
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
            if not ids:
                raise RequestError("a prompt must have at least one token")
            if len(ids) >= self.spec.context_len:
                raise RequestError(f"the prompt has {len(ids)} tokens; the context window is {self.spec.context_len}")
            if any(t < 0 or t >= self.spec.vocab_size for t in ids):
                raise RequestError(f"token ids must be in [0, {self.spec.vocab_size})")
            stop = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.spec.eos_token_ids))
            seqs.append(_Seq(self._next_id, ids, p, np.random.default_rng(p.seed), frozenset(stop)))
            self._next_id += 1
        for wave in self._waves(seqs):
            self._run(wave)
        return [GenerationResult(s.prompt, s.out, self.tokenizer.decode(s.out), s.finish_reason) for s in seqs]

    def _waves(self, seqs: list[_Seq]) -> list[list[_Seq]]:
        """Groups that fit the cache at once: at most max_num_seqs, their worst-case pages all free."""
        cfg = self.kv.config
        pages = lambda s: -(-min(len(s.prompt) + s.params.max_tokens, self.spec.context_len) // cfg.page_size)
        waves, cur, used = [], [], 0
        for s in seqs:
            if pages(s) > cfg.num_pages:
                raise RequestError(f"a request needs {pages(s) * cfg.page_size} tokens of KV cache; "
                                   f"the cache holds {cfg.num_pages * cfg.page_size}")
            if cur and (len(cur) == cfg.max_num_seqs or used + pages(s) > cfg.num_pages):
                waves.append(cur)
                cur, used = [], 0
            cur.append(s)
            used += pages(s)
        return waves + [cur] if cur else waves

    def _run(self, seqs: list[_Seq]) -> None:
        for s in seqs:
            self.kv.add_sequence(s.seq_id)
        try:
            active = list(seqs)
            while active:
                batch, chunks = self._next_step(active)
                logits = self.runner.forward([s.seq_id for s in batch], chunks)
                for s, chunk, row in zip(batch, chunks, logits):
                    if s.prefilled < len(s.prompt):
                        s.prefilled += len(chunk)
                        if s.prefilled < len(s.prompt):
                            continue  # mid-prompt chunk: its logits are not needed
                    self._append(s, sample(row, s.params, s.rng))
                for s in [s for s in active if s.finish_reason]:
                    self.kv.remove_sequence(s.seq_id)
                active = [s for s in active if not s.finish_reason]
        finally:
            for s in seqs:
                if s.seq_id in self.kv.live:
                    self.kv.remove_sequence(s.seq_id)

    def _next_step(self, active: list[_Seq]) -> tuple[list[_Seq], list[list[int]]]:
        """Prefill work first (packed under the chunk budget), else one decode token for everyone."""
        budget = self.kv.config.prefill_chunk_size
        batch, chunks = [], []
        for s in active:
            if s.prefilled < len(s.prompt) and budget > 0:
                chunk = s.prompt[s.prefilled:s.prefilled + budget]
                batch.append(s)
                chunks.append(chunk)
                budget -= len(chunk)
        if batch:
            return batch, chunks
        return active, [[s.out[-1]] for s in active]

    def _append(self, s: _Seq, token: int) -> None:
        s.out.append(token)
        if token in s.stop_ids:
            s.finish_reason = "stop"
        elif len(s.out) >= s.params.max_tokens or len(s.prompt) + len(s.out) >= self.spec.context_len:
            s.finish_reason = "length"
