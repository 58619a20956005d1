"""What goes into the engine and what comes out of it: plain data, no behaviour.

The server (kiln/server) and ``kiln chat`` build ``Request``s and read ``RequestOutput``s; the engine
(kiln/runtime/engine.py) turns one into a stream of the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .sampler import SamplingParams, TokenLogprob


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    user: str | None = None  # the client, for fair scheduling (OpenAI's ``user`` field)
    grammar: object | None = None  # a compiled grammar (kiln.runtime.grammar) constraining every choice
    arrival: float = 0.0  # time.monotonic() at arrival; the engine sets it when 0


@dataclass
class CompletionOutput:
    """What one choice produced since the last output of its request."""

    index: int  # the choice, 0..n-1
    text: str  # new text (never ends inside a multi-byte character, never shows a pending stop string)
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None  # one per token in token_ids, when requested
    finish_reason: str | None = None  # "stop", "length" or "abort" once the choice is finished


@dataclass
class RequestOutput:
    request_id: str
    outputs: list[CompletionOutput]  # only the choices with something new
    prompt_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    finished: bool = False  # every choice is finished; this is the request's last output


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for /metrics. Counters are totals since the engine started."""

    running: int
    waiting: int
    kv_pages_total: int
    kv_pages_free: int
    kv_pages_cached: int  # pages held only by the prefix cache (finished requests kept for reuse)
    prefix_cache_hits: int  # requests that reused a cached prefix
    prefix_cache_hit_tokens: int  # prompt tokens not recomputed thanks to the prefix cache
    prompt_tokens: int  # prompt tokens of admitted requests
    prefill_tokens_computed: int  # tokens run through the model for prompts (incl. recompute after preemption)
    generation_tokens: int  # tokens sampled
    preemptions: int
    requests_finished: dict[str, int] = field(default_factory=dict)  # by finish reason
    kv_sequences: int = 0  # sequences in the KV cache (running + prefix-cache entries)
    cached_sequences: int = 0  # prefix-cache entries
