"""Offline generation: prompts in, one finished result each, on the serving engine run to completion.

``LLM`` is what ``kiln generate``, the tests and the tools use when they want whole completions rather
than a stream: it tokenizes, submits every prompt to one ``Engine`` (continuous batching, chunked
prefill, the same sampler and stop conditions as the server) and steps it until all are done. Its KV
cache is sized for up to 8 full-context sequences (``KVCacheConfig.for_model``) unless given one, and
it keeps no prefix cache, so every call leaves the cache as it found it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ..artifact import load_artifact
from ..errors import RequestError
from .engine import Engine, EngineConfig
from .kv_cache import KVCacheConfig
from .outputs import Request
from .sampler import SamplingParams


@dataclass
class GenerationResult:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (a stop token or string) or "length" (max_tokens or the context window)


class LLM:
    def __init__(self, artifact: str | Path, device: str | None = None, kv_config: KVCacheConfig | None = None):
        art = load_artifact(artifact)
        kv_config = kv_config or KVCacheConfig.for_model(art.spec.context_len, art.spec.kv_bytes_per_token)
        self.engine = Engine(art, EngineConfig(device=device, prefix_cache=False), kv_config=kv_config)
        self.spec, self.tokenizer, self.runner = self.engine.spec, self.engine.tokenizer, self.engine.runner
        self._next_id = 0

    @property
    def kv(self):
        return self.runner.kv

    def generate(self, prompts: list[str] | list[list[int]], params: SamplingParams | list[SamplingParams]) \
            -> list[GenerationResult]:
        """One result per prompt (a string, or token ids). ``max_tokens`` stops at the context window, with
        finish reason "length", rather than being refused."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise RequestError("give one SamplingParams for all prompts or one per prompt")
        if any(p.n != 1 for p in plist):
            raise RequestError("LLM.generate returns one completion per prompt: use n=1 (the Engine serves n > 1)")
        requests = []
        for prompt, p in zip(prompts, plist):
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
            room = self.spec.context_len - len(ids)
            requests.append(Request(f"llm-{self._next_id}", ids, replace(p, max_tokens=min(p.max_tokens, max(room, 1)))))
            self._next_id += 1
        for r in requests:  # all or none: a bad request is refused before any runs
            self.engine.validate(r)
        got = self.engine.generate(requests)
        results = []
        for r in requests:
            outs = [o for out in got[r.request_id] for o in out.outputs]
            results.append(GenerationResult(r.prompt_ids, [t for o in outs for t in o.token_ids],
                                            "".join(o.text for o in outs), outs[-1].finish_reason))
        return results
