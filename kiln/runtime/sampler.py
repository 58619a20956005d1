"""Sampling: choose one token per row of logits, each row with its own parameters.

``Sampler`` is the engine's batched path, over torch tensors on whichever device holds the logits (on a GPU
no [b, V] array crosses to the host; only ids, and logprobs when asked); ``Sampler.argmax`` is its greedy
choice alone. ``Sampler.sample`` is what the engine calls each step: it routes each choice's row — an
argmax where the logits are for a plain greedy row, the batched path for the others, the host (NumPy,
under xgrammar's mask) for a row under a grammar. ``probabilities`` is the same math for one row in plain
NumPy float64, the reference the tests hold the batched path to.

Per row, in this order:
1. logprobs, when asked, from the logits as given: log_softmax over the real vocabulary, before anything
   below (vLLM's default);
2. penalties: repetition (tokens of the prompt and the output; positive logits divided, negative
   multiplied), then frequency and presence (output tokens only, subtracted);
3. temperature 0: argmax, done. Otherwise divide by the temperature;
4. top-k, then top-p on what top-k kept (renormalised), then min_p. Each cut is a threshold on the value,
   so a token tied with the last one kept is kept too and no result depends on a sort order. min_p
   compares with the most likely token, which every cut keeps, so its cut is the same wherever it runs;
5. draw: one uniform u per row; the token is the first whose cumulative probability (float64, vocabulary
   order) exceeds u times the total. A token cut to probability 0 adds nothing to the sum, so it is never
   drawn. u comes from the row's own generator when it has one, so a seeded row's draw depends only on its
   seed, its step and its logits, never on the rest of the batch. (One uniform per row rather than an
   exponential race: torch's CPU generator needs ~2 ms for 128 x 4096 numbers.)

The batched path works on weights exp((x - max) / T), the most likely token at 1, so the cuts are
comparisons with a per-row threshold and nothing needs normalising. On the CPU, where NumPy's kernels are
much faster than torch's on the same memory (argmax, sort, partition), it calls NumPy; on another device
(or with ``numpy_on_cpu=False``, which the tests use to run that path here) the same steps are torch's,
``topk`` taking the partition's place, so a GPU sorts no [m, V] rows for a batch cut at top_k <= 256.
The uniforms always come from CPU generators, so a seeded row draws the same wherever it runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import RequestError

if TYPE_CHECKING:
    from .grammar import GrammarState

MAX_N = 16
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_SEED = 2**64 - 1
TOP_K_FAST_PATH = 256  # batches whose rows all cut at top_k <= this draw from the candidates alone


def _check(ok: bool, field: str, allowed: str, value) -> None:
    if not ok:
        raise RequestError(f"{field} must be {allowed}, got {value!r}")


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _in(v, lo: float, hi: float) -> bool:
    """lo <= v <= hi for a real number; False for NaN and for anything that is not a number."""
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and lo <= v <= hi


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling settings (OpenAI/vLLM names and meanings), validated on construction.

    ``stop`` and ``stop_token_ids`` also accept a list (and ``stop`` a single string); they are stored as
    tuples. ``top_k=-1`` is stored as 0; both mean no top-k cut. That ``max_tokens`` fits the context window
    is the engine's check, not this one.
    """

    max_tokens: int = 64
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) means no limit
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one
    seed: int | None = None
    n: int = 1  # choices per request
    repetition_penalty: float = 1.0  # HF/vLLM: prompt and output tokens; > 1 discourages repeats
    presence_penalty: float = 0.0  # OpenAI: output tokens only, subtracted once per token seen
    frequency_penalty: float = 0.0  # OpenAI: output tokens only, subtracted once per occurrence
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; 0: the sampled token's; k: plus the k most likely tokens
    skip_special_tokens: bool = True

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        _check(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", "an integer >= 1", self.max_tokens)
        _check(_in(self.temperature, 0.0, 100.0), "temperature", "in [0, 100] (0 is greedy)", self.temperature)
        _check(_in(self.top_p, 0.0, 1.0) and self.top_p > 0.0, "top_p", "in (0, 1]", self.top_p)
        _check(_is_int(self.top_k) and self.top_k >= -1, "top_k", "an integer >= 0 (0 or -1: no limit)", self.top_k)
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        _check(_in(self.min_p, 0.0, 1.0), "min_p", "in [0, 1]", self.min_p)
        _check(self.seed is None or (_is_int(self.seed) and 0 <= self.seed <= MAX_SEED),
               "seed", "null or an integer in [0, 2**64 - 1]", self.seed)
        _check(_is_int(self.n) and 1 <= self.n <= MAX_N, "n", f"an integer in [1, {MAX_N}]", self.n)
        _check(_in(self.repetition_penalty, 0.0, math.inf) and 0.0 < self.repetition_penalty < math.inf,
               "repetition_penalty", "a finite number > 0 (1 is off)", self.repetition_penalty)
        _check(_in(self.presence_penalty, -2.0, 2.0), "presence_penalty", "in [-2, 2]", self.presence_penalty)
        _check(_in(self.frequency_penalty, -2.0, 2.0), "frequency_penalty", "in [-2, 2]", self.frequency_penalty)
        _check(len(self.stop) <= MAX_STOP_STRINGS, "stop", f"at most {MAX_STOP_STRINGS} strings",
               f"{len(self.stop)} strings")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "a list of non-empty strings", self.stop)
        _check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               "a list of token ids >= 0", self.stop_token_ids)
        _check(self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
               "logprobs", f"null or an integer in [0, {MAX_LOGPROBS}]", self.logprobs)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def choice_generator(seed: int, index: int = 0) -> torch.Generator:
    """The generator of choice ``index`` of a seeded request: seeded ``seed + index`` (vLLM's convention for n > 1)."""
    return torch.Generator().manual_seed((seed + index) % (MAX_SEED + 1))


@dataclass
class SamplingRow:
    """What the sampler needs to know about one row (one choice) for this step."""

    params: SamplingParams
    generator: torch.Generator | None = None  # the choice's own (seeded requests); None: the sampler's shared one
    prompt_ids: Sequence[int] = ()  # read only for repetition_penalty; a NumPy array or tensor avoids a copy
    output_ids: Sequence[int] = ()  # tokens generated so far, read only for the penalties
    grammar: GrammarState | None = None  # the choice's structured-output state: its mask applies to the row

    @property
    def plain(self) -> bool:
        """Nothing but an argmax to do: greedy, no penalty, no logprobs, no grammar."""
        p = self.params
        return self.grammar is None and p.greedy and not p.has_penalties and p.logprobs is None


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # the most likely tokens at this step, best first


class Sampler:
    """Samples one token per row of a batch of logits, vectorised over the rows (the module docstring has the math).

    Precondition: every row has at least one finite logit (a grammar mask may leave a single token).
    The sampler keeps no per-request state; it draws unseeded rows' noise from its own generator.
    """

    def __init__(self, vocab_size: int, seed: int | None = None, numpy_on_cpu: bool = True):
        assert vocab_size > 0
        self.vocab_size = vocab_size
        self.numpy_on_cpu = numpy_on_cpu
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> tuple[list[int], list[TokenLogprob | None]]:
        # logits: [num_rows, >= vocab_size] float32 on any device; columns from vocab_size on are padding
        assert logits.dim() == 2 and logits.shape[0] == len(rows) and logits.shape[1] >= self.vocab_size, \
            (tuple(logits.shape), len(rows), self.vocab_size)
        assert logits.dtype == torch.float32, logits.dtype
        if not rows:
            return [], []
        x = logits[:, :self.vocab_size]  # a view; the caller's tensor is never written
        np_ok = self.uses_numpy(x)
        params = [r.params for r in rows]
        with_logprobs = [i for i, p in enumerate(params) if p.logprobs is not None]
        penalised = [i for i, p in enumerate(params) if p.has_penalties]
        drawn = [i for i, p in enumerate(params) if not p.greedy]

        logprobs = torch.log_softmax(x[with_logprobs], dim=-1) if with_logprobs else None
        if len(penalised) == len(rows):
            x = apply_penalties(x, rows)
        elif penalised:
            x = x.clone()
            x[penalised] = apply_penalties(x[penalised], [rows[i] for i in penalised])
        if len(drawn) == len(rows):
            tokens = self._draw(x, rows)
        else:  # NumPy's argmax: ~10x torch's on the CPU
            tokens = torch.from_numpy(x.numpy().argmax(axis=-1)) if np_ok else x.argmax(dim=-1)
            if drawn:
                tokens[drawn] = self._draw(x[drawn], [rows[i] for i in drawn])
        token_list = tokens.tolist()
        out: list[TokenLogprob | None] = [None] * len(rows)
        if with_logprobs:
            for i, lp in zip(with_logprobs, _token_logprobs(logprobs, tokens[with_logprobs],
                                                            [params[i].logprobs for i in with_logprobs])):
                out[i] = lp
        return token_list, out

    def sample(self, logits: torch.Tensor, positions: list[int], rows: list[SamplingRow]) \
            -> tuple[list[int], list[TokenLogprob | None]]:
        """One token for each ``rows[j]`` from row ``positions[j]`` of ``logits`` [b, >= vocab_size] float32,
        wherever the logits are (positions may repeat: the choices of one prompt share its row).

        Plain rows take an argmax alone; the others go through ``__call__`` where the logits are, except rows
        under a grammar, which are copied to the host for xgrammar's mask (on the CPU the host path takes
        every non-plain row at once). On a GPU a step so brings back ids (and logprobs when asked), not its
        [b, V] logits."""
        assert len(positions) == len(rows)
        tokens: list[int] = [0] * len(rows)
        logprobs: list[TokenLogprob | None] = [None] * len(rows)
        is_plain = [r.plain for r in rows]
        plain = [j for j, yes in enumerate(is_plain) if yes]
        for j, t in zip(plain, self.argmax(logits, [positions[j] for j in plain]) if plain else ()):
            tokens[j] = t
        rest = [j for j, yes in enumerate(is_plain) if not yes]
        groups = [rest] if self.uses_numpy(logits) else [[j for j in rest if rows[j].grammar is None],
                                                         [j for j in rest if rows[j].grammar is not None]]
        for group in (g for g in groups if g):
            x = take_rows(logits, [positions[j] for j in group])
            if any(rows[j].grammar is not None for j in group):
                from .grammar import apply_grammar_masks

                x = x.cpu()
                apply_grammar_masks(x, [rows[j].grammar for j in group])
            for j, t, lp in zip(group, *self(x, [rows[j] for j in group])):
                tokens[j], logprobs[j] = t, lp
        return tokens, logprobs

    def argmax(self, logits: torch.Tensor, rows: list[int]) -> list[int]:
        """The greedy token of each of ``rows`` of ``logits`` [b, >= vocab_size] float32, on whichever
        device holds them (the first of tied maxima, as ``__call__``'s greedy rows): only ids leave it."""
        return argmax_rows(logits[:, :self.vocab_size], rows, numpy_on_cpu=self.numpy_on_cpu)

    def uses_numpy(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is sampled by the NumPy path (on the CPU), else by torch where it lies."""
        return self.numpy_on_cpu and x.device.type == "cpu"

    def _draw(self, x: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Temperature, the cuts, then one uniform per row through the CDF. x: [m, V] (penalised) -> tokens [m]."""
        m, V = x.shape
        params = [r.params for r in rows]
        np_ok = self.uses_numpy(x)
        temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=x.device).unsqueeze(1)
        # unnormalised probabilities, the most likely token at exactly 1: [m, V]
        weights = torch.sub(x, x.amax(dim=-1, keepdim=True)).div_(temperature).exp_()
        if V > 4 * TOP_K_FAST_PATH and all(0 < p.top_k <= TOP_K_FAST_PATH for p in params):
            tokens = self._draw_top_k(weights.numpy(), rows, params) if np_ok else \
                self._draw_top_k_torch(weights, rows, params)
            if tokens is not None:
                return tokens
        thr = cut_thresholds(weights, params, use_numpy=np_ok)
        if thr is not None:
            weights = weights * (weights >= thr)  # (masked_fill is 3x slower here)
        cdf = weights.double().cumsum_(dim=-1)  # [m, V]; a cut token adds 0, so no target ever lands on it
        target = self._uniforms(rows).to(x.device) * cdf[:, -1]  # [m] in [0, total)
        tokens = torch.searchsorted(cdf, target.unsqueeze(1), right=True).squeeze(1)  # first cdf > target
        if bool((tokens >= V).any()):  # u * total rounded up to total: take the last token with weight
            over = (tokens >= V).nonzero().squeeze(1)
            tokens[over] = V - 1 - (weights[over] > 0).flip(-1).to(torch.uint8).argmax(dim=-1)
        return tokens

    def _draw_top_k(self, w: np.ndarray, rows: list[SamplingRow], params: list[SamplingParams]) -> torch.Tensor | None:
        """``_draw`` for a batch whose every row has a top-k cut, over each row's largest weights only:
        one O(V) partition instead of a sort, a cumsum and a CDF over the whole vocabulary.

        The candidates are the ``max(k) + 1`` largest weights of each row. Every kept token is one of them
        as long as a row's k-th largest weight is above the smallest candidate (otherwise a tie with a
        token outside could be kept): then the cuts are top-k's (ties included), top-p's (the smallest set
        of most likely tokens whose mass reaches top_p of top-k's mass) and min_p's, as in
        ``cut_thresholds``, and the CDF runs over the kept candidates in token-id order — the same sums as
        the full CDF, whose cut tokens add exactly 0. Returns None (draw nothing) when a tie forbids it."""
        m, V = w.shape
        c = max(p.top_k for p in params) + 1
        idx = np.argpartition(w, V - c, axis=1)[:, V - c:]  # [m, c]: the c largest, unordered
        vals = np.take_along_axis(w, idx, axis=1)
        order = np.argsort(vals, axis=1, kind="stable")
        idx, vals = np.take_along_axis(idx, order, axis=1), np.take_along_axis(vals, order, axis=1)  # ascending
        k = np.array([p.top_k for p in params])
        kth = vals[np.arange(m), c - k][:, None]  # [m, 1]
        if (kth <= vals[:, :1]).any():
            return None
        thr = kth.astype(np.float64)
        top_p = np.array([p.top_p for p in params])[:, None]
        if (top_p < 1.0).any():
            kept = np.where(vals >= kth, vals, 0).astype(np.float64)
            above = kept[:, ::-1].cumsum(axis=1)[:, ::-1] - kept  # mass of the kept tokens more likely than j
            mass_k = kept.sum(axis=1, keepdims=True)
            first_p = np.argmax(above < top_p * mass_k, axis=1)  # the first (least likely) token top-p keeps
            thr = np.where(top_p < 1.0, np.maximum(thr, vals[np.arange(m), first_p][:, None]), thr)
        min_p = np.array([p.min_p for p in params])[:, None]
        thr = np.maximum(thr, min_p)
        by_id = np.argsort(idx, axis=1)
        idx, vals = np.take_along_axis(idx, by_id, axis=1), np.take_along_axis(vals, by_id, axis=1)
        weights = np.where(vals >= thr, vals, 0).astype(np.float64)
        cdf = weights.cumsum(axis=1)
        target = self._uniforms(rows).numpy() * cdf[:, -1]
        pos = (cdf <= target[:, None]).sum(axis=1)  # first cdf > target
        over = pos >= c  # u * total rounded up to total: the last token with weight
        if over.any():
            pos[over] = c - 1 - np.argmax((weights[over] > 0)[:, ::-1], axis=1)
        return torch.from_numpy(idx[np.arange(m), pos].astype(np.int64))

    def _draw_top_k_torch(self, w: torch.Tensor, rows: list[SamplingRow],
                          params: list[SamplingParams]) -> torch.Tensor | None:
        """``_draw_top_k`` in torch, where ``w`` lies (the candidates from ``topk``, no partition): the same
        candidates wherever no tie forbids the fast path, so the same tokens."""
        m, V = w.shape
        dev = w.device
        c = max(p.top_k for p in params) + 1
        vals, idx = torch.topk(w, c, dim=1)  # [m, c] descending
        vals, idx = vals.flip(1), idx.flip(1)  # ascending, as _draw_top_k has them
        k = torch.tensor([p.top_k for p in params], device=dev)
        kth = vals.gather(1, (c - k).unsqueeze(1))  # [m, 1]
        if bool((kth <= vals[:, :1]).any()):
            return None
        vals64, thr = vals.double(), kth.double()
        top_p = torch.tensor([p.top_p for p in params], dtype=torch.float64, device=dev).unsqueeze(1)
        if bool((top_p < 1.0).any()):
            kept = torch.where(vals >= kth, vals64, 0.0)
            above = kept.flip(1).cumsum(1).flip(1) - kept  # mass of the kept tokens more likely than j
            mass_k = kept.sum(1, keepdim=True)
            first_p = (above < top_p * mass_k).to(torch.uint8).argmax(dim=1, keepdim=True)  # the first True
            thr = torch.where(top_p < 1.0, torch.maximum(thr, vals64.gather(1, first_p)), thr)
        min_p = torch.tensor([p.min_p for p in params], dtype=torch.float64, device=dev).unsqueeze(1)
        thr = torch.maximum(thr, min_p)
        by_id = idx.argsort(dim=1)
        idx, vals64 = idx.gather(1, by_id), vals64.gather(1, by_id)
        weights = torch.where(vals64 >= thr, vals64, 0.0)
        cdf = weights.cumsum(1)
        target = self._uniforms(rows).to(dev) * cdf[:, -1]
        pos = (cdf <= target.unsqueeze(1)).sum(1)  # first cdf > target
        over = pos >= c  # u * total rounded up to total: the last token with weight
        if bool(over.any()):
            pos[over] = c - 1 - (weights[over] > 0).flip(1).to(torch.uint8).argmax(dim=1)
        return idx.gather(1, pos.unsqueeze(1)).squeeze(1)

    def _uniforms(self, rows: list[SamplingRow]) -> torch.Tensor:
        """One U[0, 1) per row, float64 [m]: from the row's own generator, else from one draw of the shared one."""
        shared = [j for j, r in enumerate(rows) if r.generator is None]
        u = torch.rand(len(rows), dtype=torch.float64, generator=self.generator) if len(shared) == len(rows) \
            else torch.empty(len(rows), dtype=torch.float64)
        if len(shared) < len(rows):
            if shared:
                u[shared] = torch.rand(len(shared), dtype=torch.float64, generator=self.generator)
            for j, r in enumerate(rows):
                if r.generator is not None:
                    u[j] = torch.rand(1, dtype=torch.float64, generator=r.generator)
        return u


def argmax_rows(x: torch.Tensor, rows: list[int], numpy_on_cpu: bool = True) -> list[int]:
    """``x[rows].argmax(-1)`` as a list, computed where ``x`` is (NumPy's on the CPU unless told not to:
    ~10x torch's there). Rows may repeat (the choices of one prompt share its logits)."""
    every = rows == list(range(x.shape[0]))
    if x.device.type == "cpu" and numpy_on_cpu:
        a = x.numpy()
        return (a if every else a[rows]).argmax(axis=-1).tolist()
    return (x if every else x[torch.tensor(rows, device=x.device)]).argmax(dim=-1).tolist()


def take_rows(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """``logits[rows]`` where ``logits`` is: a view when ``rows`` is every row in order (then writing it
    writes ``logits``), else a copy of those rows."""
    every = rows == list(range(logits.shape[0]))
    return logits if every else logits[torch.tensor(rows, device=logits.device)]


def cut_thresholds(weights: torch.Tensor, params: list[SamplingParams], use_numpy: bool = True) -> torch.Tensor | None:
    """Per row, the weight below which top-k, top-p and min_p cut, or None when no row cuts.

    weights: [m, V] unnormalised probabilities with each row's max at 1 -> [m, 1], on weights' device. Only
    the rows with a top-k or top-p cut are sorted (ascending; by NumPy when ``use_numpy`` and on the CPU);
    top-p's mass comes from one float64 cumsum over the sorted row.
    """
    m, V = weights.shape
    dev = weights.device
    top_k = [p.top_k if 0 < p.top_k < V else V for p in params]
    sorted_rows = [i for i, p in enumerate(params) if top_k[i] < V or p.top_p < 1.0]
    with_min_p = any(p.min_p > 0.0 for p in params)
    if not sorted_rows and not with_min_p:
        return None
    thr = torch.zeros(m, 1, device=dev)
    if sorted_rows:
        w = weights if len(sorted_rows) == m else weights[torch.tensor(sorted_rows, device=dev)]
        # [s, V] ascending; NumPy's sort is ~10x torch's on the CPU
        asc = (torch.from_numpy(np.sort(w.numpy(), axis=-1)) if use_numpy and dev.type == "cpu"
               else w.sort(dim=-1).values)
        k = torch.tensor([top_k[i] for i in sorted_rows], device=dev).unsqueeze(1)
        kth = asc.gather(1, V - k)  # [s, 1]; top-k keeps every token >= the k-th largest (ties included)
        top_p = torch.tensor([params[i].top_p for i in sorted_rows], dtype=torch.float64, device=dev).unsqueeze(1)
        if bool((top_p < 1.0).any()):
            cum = asc.double().cumsum_(dim=-1)  # [s, V]
            total = cum[:, -1:]
            first_k = torch.searchsorted(asc, kth)  # where top-k's survivors start
            mass_k = total - torch.where(first_k > 0, cum.gather(1, (first_k - 1).clamp_min(0)), 0.0)
            # keep a token when the mass of the tokens more likely than it (total - cum) is below top_p of
            # top-k's mass: the smallest set of most likely tokens whose mass reaches top_p
            first_p = torch.searchsorted(cum, total - top_p * mass_k, right=True).clamp_max(V - 1)
            kth = torch.where(top_p < 1.0, torch.maximum(kth, asc.gather(1, first_p)), kth)
        thr[torch.tensor(sorted_rows, device=dev)] = kth
    if with_min_p:
        thr = torch.maximum(thr, torch.tensor([p.min_p for p in params], dtype=torch.float32, device=dev).unsqueeze(1))
    return thr


def apply_penalties(x: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Repetition, then frequency and presence penalties: x [m, V] -> a new [m, V].

    Only the entries of tokens seen are touched, so the cost follows the number of ids, not m * V.
    """
    m, V = x.shape
    params = [r.params for r in rows]
    dev = x.device
    x = x.clone(memory_format=torch.contiguous_format)
    flat = x.view(-1)  # [m * V]; the key of (row i, token t) is i * V + t
    out_keys, out_counts = _unique_counts(_keys([r.output_ids for r in rows], V))  # (on the host: token ids)
    if any(p.repetition_penalty != 1.0 for p in params):
        prompt_keys = _keys([r.prompt_ids if p.repetition_penalty != 1.0 else () for r, p in zip(rows, params)], V)
        seen = torch.from_numpy(_unique_counts(np.concatenate([out_keys, prompt_keys]))[0])
        rep = torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32)[seen // V].to(dev)
        seen = seen.to(dev)
        v = flat[seen]
        flat[seen] = torch.where(v > 0, v / rep, v * rep)
    out_keys, out_counts = torch.from_numpy(out_keys), torch.from_numpy(out_counts)
    freq = torch.tensor([p.frequency_penalty for p in params], dtype=torch.float32)[out_keys // V]
    presence = torch.tensor([p.presence_penalty for p in params], dtype=torch.float32)[out_keys // V]
    flat[out_keys.to(dev)] -= (freq * out_counts + presence).to(dev)  # keys are unique: one update per (row, token)
    return x


def _unique_counts(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.unique(keys, return_counts=True) by sorting (torch.unique is ~3x slower; NumPy 2's hashing ~10x)."""
    k = np.sort(keys)
    starts = np.flatnonzero(np.concatenate([[k.size > 0], k[1:] != k[:-1]]))
    return k[starts], np.diff(np.append(starts, k.size))


def _keys(id_lists: list[Sequence[int]], V: int) -> np.ndarray:
    """Every (row i, token t) of id_lists as i * V + t: int64 [total ids]."""
    ids = [np.asarray(ids, dtype=np.int64).reshape(-1) for ids in id_lists]
    flat = np.concatenate(ids)
    assert flat.size == 0 or (flat.min() >= 0 and flat.max() < V), "token ids out of the vocabulary"
    return np.repeat(np.arange(len(ids), dtype=np.int64) * V, [len(t) for t in ids]) + flat


def _token_logprobs(logprobs: torch.Tensor, tokens: torch.Tensor, ks: list[int]) -> list[TokenLogprob]:
    """logprobs: [m, V] log_softmax; tokens: [m] -> the sampled token's logprob and the top-k per row, best first.

    Alternatives with logprob -inf (masked out) are left out of ``top``: they are impossible, and not JSON.
    """
    chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
    k_max = min(max(ks), logprobs.shape[1])
    top_v, top_i = logprobs.topk(k_max, dim=-1) if k_max else (None, None)
    top_v = top_v.tolist() if k_max else None
    top_i = top_i.tolist() if k_max else None
    result = []
    for j, (token, lp, k) in enumerate(zip(tokens.tolist(), chosen, ks)):
        top = tuple((i, v) for i, v in zip(top_i[j][:k], top_v[j][:k]) if v != -math.inf) if k else ()
        result.append(TokenLogprob(token, lp, top))
    return result


# ---------------------------------------------------------------------------------------------------------
# The NumPy reference (one row, float64)


def penalised_logits(logits: np.ndarray, p: SamplingParams, prompt_ids: Sequence[int] = (),
                     output_ids: Sequence[int] = ()) -> np.ndarray:
    """logits [V] -> float64 [V] after the repetition, frequency and presence penalties."""
    x = np.asarray(logits, dtype=np.float64).copy()
    V = x.shape[0]
    counts = np.bincount(np.asarray(output_ids, dtype=np.int64), minlength=V)
    if p.repetition_penalty != 1.0:
        seen = (counts > 0) | (np.bincount(np.asarray(prompt_ids, dtype=np.int64), minlength=V) > 0)
        x[seen] = np.where(x[seen] > 0, x[seen] / p.repetition_penalty, x[seen] * p.repetition_penalty)
    return x - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)


def probabilities(logits: np.ndarray, p: SamplingParams, prompt_ids: Sequence[int] = (),
                  output_ids: Sequence[int] = ()) -> np.ndarray:
    """The distribution ``Sampler`` draws from for one row: logits [V] -> probs [V] (one-hot when greedy)."""
    x = penalised_logits(logits, p, prompt_ids, output_ids)
    if p.greedy:
        probs = np.zeros_like(x)
        probs[np.argmax(x)] = 1.0
        return probs
    z = x / p.temperature
    z -= z.max()
    if 0 < p.top_k < z.shape[0]:
        z[z < np.sort(z)[-p.top_k]] = -np.inf
    if p.top_p < 1.0:
        probs = np.exp(z) / np.exp(z).sum()
        order = np.argsort(-z, kind="stable")
        keep = np.cumsum(probs[order]) - probs[order] < p.top_p  # the smallest prefix whose mass reaches top_p
        z[z < z[order[keep][-1]]] = -np.inf
    if p.min_p > 0.0:
        z[z < np.log(p.min_p)] = -np.inf
    probs = np.exp(z)
    return probs / probs.sum()

