"""Perplexity of an artifact on a text, through kiln's own runtime (``kiln eval``).

The definition (Hugging Face's "perplexity of fixed-length models" recipe, with exact token counts):
the text is tokenized as one sequence ``x[0..N)`` (BOS first when the model has one and the
tokenizer does not add it). Windows of ``window`` tokens start every ``stride`` tokens:
``[b, min(b + window, N))`` for ``b = 0, stride, 2 stride, ...`` until a window reaches the end.
A window scores only the tokens the previous window did not reach — ``x[t]`` for ``t`` in
``[max(prev_end, b + 1), end)`` — each from its own logits given ``x[b..t)``. With ``stride < window``
every token but the first is scored exactly once, with at least ``window - stride`` tokens of context
once past the first window; with ``stride == window`` (no overlap) the first token of each window has
no context and is not scored. Over the set T of scored tokens:

    perplexity = exp( -1/|T| * sum_{t in T} log p(x[t] | x[b(t)..t)) )

(The recipe's published code weights each window's mean loss by ``trg_len - 1`` tokens; the true
count after the first window is ``trg_len``. kiln sums the log-probabilities themselves.)

Each window is one fresh KV sequence prefilled through ``batch_prefill`` with a logit position for
every token that predicts a scored one (the entry point gathers those hidden-state rows before the
lm_head), in chunks of at most ``prefill_chunk_size`` tokens.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..artifact import load_artifact
from ..errors import KilnError
from ..progress import count
from .kv_cache import KVCacheConfig
from .engine import Engine, EngineConfig
from .model_runner import ModelRunner
from .tokenizer import Tokenizer

MAX_DEFAULT_WINDOW = 512


@dataclass(frozen=True)
class Window:
    begin: int  # first token of the window's context
    end: int  # one past its last token
    first_scored: int  # x[first_scored..end) are scored in this window

    def __post_init__(self):
        assert 0 <= self.begin < self.first_scored < self.end, self


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token, nats
    num_tokens: int  # tokens in the text
    num_tokens_scored: int  # num_tokens - 1 when stride < window
    window: int
    stride: int
    num_windows: int
    seconds: float

    def to_json(self) -> dict:
        return asdict(self)


def sliding_windows(num_tokens: int, window: int, stride: int) -> list[Window]:
    """The windows of the definition above (pure; ``kiln eval``'s and the tests' shared truth)."""
    if num_tokens < 2:
        raise KilnError(f"the text has {num_tokens} token(s); perplexity needs at least 2")
    if window < 2:
        raise KilnError(f"--window {window}: a window needs at least 2 tokens")
    if not 1 <= stride <= window:
        raise KilnError(f"--stride {stride} must be between 1 and the window ({window})")
    out, prev_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + window, num_tokens)
        first_scored = max(prev_end, begin + 1)
        if end > first_scored:  # a window that would score nothing is skipped
            out.append(Window(begin, end, first_scored))
        prev_end = end
        if end == num_tokens:
            break
    return out


def token_nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Sum of -log softmax(logits[i])[targets[i]], in float64. logits: [m, V], targets: [m]."""
    assert logits.ndim == 2 and logits.shape[0] == targets.shape[0], (logits.shape, targets.shape)
    total = 0.0
    for lo in range(0, len(targets), 64):  # rows in blocks: a 150k vocabulary stays a few MB in float64
        z = logits[lo:lo + 64].astype(np.float64)
        zmax = z.max(axis=1, keepdims=True)
        lse = np.log(np.exp(z - zmax).sum(axis=1)) + zmax[:, 0]
        total += float((lse - z[np.arange(len(z)), targets[lo:lo + 64]]).sum())
    return total


def window_nll(runner: ModelRunner, token_ids: np.ndarray, w: Window) -> float:
    """Sum of -log p(x[t] | x[w.begin..t)) over the window's scored tokens, on a fresh KV sequence."""
    chunk = runner.kv.config.prefill_chunk_size
    runner.kv.add_sequence(0)
    try:
        nll = 0.0
        for lo in range(w.begin, w.end, chunk):
            hi = min(lo + chunk, w.end)
            # x[t] is predicted by the row of x[t - 1]: rows lo..hi-1 predict x[lo+1..hi]
            targets = np.arange(max(lo + 1, w.first_scored), min(hi + 1, w.end))
            positions = targets - 1 - lo
            if len(targets) == 0:  # a context-only chunk: the entry point still wants one row
                runner.prefill_rows(0, token_ids[lo:hi].tolist(), np.array([hi - lo - 1]))
                continue
            logits = runner.prefill_rows(0, token_ids[lo:hi].tolist(), positions)
            nll += token_nll(logits, token_ids[targets])
    finally:
        runner.kv.remove_sequence(0)
    return nll


def encode_text(tokenizer: Tokenizer, text: str, bos_token_id: int | None) -> np.ndarray:
    """The text as one token sequence, BOS first when the model has one (as HF's Llama tokenizers add)."""
    ids = tokenizer.encode(text)
    if bos_token_id is not None and (not ids or ids[0] != bos_token_id):
        ids = [bos_token_id] + ids
    return np.asarray(ids, dtype=np.int64)


def evaluate_perplexity(artifact_path: str | Path, text: str, window: int | None = None,
                        stride: int | None = None) -> PerplexityResult:
    """Load the artifact and measure its perplexity on ``text`` (definition in the module docstring).
    ``window`` defaults to the model's context capped at 512 tokens, ``stride`` to ``window // 2``."""
    t0 = time.perf_counter()
    art = load_artifact(artifact_path)
    spec = art.spec
    window = window or min(spec.context_len, MAX_DEFAULT_WINDOW)
    if window > spec.context_len:
        raise KilnError(f"--window {window} exceeds the model's context window ({spec.context_len} tokens)")
    stride = stride or max(1, window // 2)
    if not text.strip():
        raise KilnError("the evaluation text is empty")
    ids = encode_text(Tokenizer(art.path), text, spec.bos_token_id)
    windows = sliding_windows(len(ids), window, stride)
    page = 16
    kv = KVCacheConfig(max_num_seqs=1, max_total_tokens=-(-window // page) * page,
                       prefill_chunk_size=min(window, MAX_DEFAULT_WINDOW), page_size=page)
    runner = Engine(art, EngineConfig(prefix_cache=False), kv_config=kv).runner  # the engine's loading and checks
    nll = 0.0
    for i, w in enumerate(windows, start=1):
        nll += window_nll(runner, ids, w)
        count("eval: window", i, len(windows))
    scored = sum(w.end - w.first_scored for w in windows)
    return PerplexityResult(perplexity=math.exp(nll / scored), nll=nll / scored, num_tokens=len(ids),
                            num_tokens_scored=scored, window=window, stride=stride, num_windows=len(windows),
                            seconds=time.perf_counter() - t0)
