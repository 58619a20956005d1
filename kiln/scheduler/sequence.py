"""One generated choice as the scheduler sees it: its tokens and how many of them have KV in the cache.

A sequence is uniform across prefill, decode and recompute: each step computes some of the tokens
``tokens[num_computed:]``; when a step reaches the end of ``tokens`` its logits are sampled and the
new token is appended. A prompt is the first ``prompt_len`` tokens; a sequence preempted by
recompute simply drops back to ``num_computed = 0`` and recomputes prompt and output together.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int  # the KV cache's id, unique for the engine's lifetime
    request_id: str
    tokens: list[int]  # prompt, then generated tokens
    prompt_len: int
    max_tokens: int  # generated tokens allowed
    index: int = 0  # the choice within its request
    user: str | None = None  # the client (fair scheduling)
    arrival: float = 0.0
    forks: int = 0  # siblings to fork off once the prompt is computed (n > 1)
    num_computed: int = 0  # tokens whose KV is in the cache
    num_cached: int = 0  # prompt tokens reused from the prefix cache at the last admission
    status: Status = Status.WAITING
    admissions: int = 0  # times admitted (more than once after preemption)
    charged_input: bool = False  # fair scheduling charged this request's prompt already

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def remaining(self) -> int:
        """Tokens still to run through the model before the next sample."""
        return len(self.tokens) - self.num_computed

    @property
    def is_decode(self) -> bool:
        return len(self.tokens) - self.num_computed == 1 and self.num_generated > 0
