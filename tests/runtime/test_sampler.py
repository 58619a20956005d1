"""kiln.runtime.sampler against a plain NumPy reference: greedy, temperature, top-k, top-p, min_p, penalties,
seeding, logprobs, validation; the batched torch ``Sampler`` against the NumPy ``probabilities``."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from kiln.errors import RequestError
from kiln.runtime.sampler import (Sampler, SamplingParams, SamplingRow, apply_penalties, argmax_rows,
                                  choice_generator, penalised_logits, probabilities, take_rows)

V = 12


def sample(logits: np.ndarray, p: SamplingParams, gen: torch.Generator | None = None, output_ids=()) -> int:
    """One row through the batched sampler (the engine's only path), drawing from ``gen``."""
    x = torch.tensor(np.asarray(logits, dtype=np.float32)[None])
    return Sampler(x.shape[1], seed=0)(x, [SamplingRow(p, gen, (), output_ids)])[0][0]


def draws(logits: np.ndarray, p: SamplingParams, n: int, seed: int) -> np.ndarray:
    """n independent draws from one row, as one batch of n copies (the sampler's shared generator, seeded)."""
    x = torch.tensor(np.tile(np.asarray(logits, dtype=np.float32), (n, 1)))
    return np.array(Sampler(x.shape[1], seed=seed)(x, [SamplingRow(p)] * n)[0])


def ref_probs(logits, temperature=1.0, top_k=0, top_p=1.0) -> np.ndarray:
    """The textbook definition, written independently: softmax(logits / T); keep the k largest; then keep
    the smallest set of most probable tokens whose mass reaches top_p; renormalise after each cut."""
    x = np.asarray(logits, dtype=np.float64) / temperature
    p = np.exp(x - x.max())
    p /= p.sum()
    if top_k:
        order = sorted(range(len(p)), key=lambda i: -p[i])
        p = np.array([p[i] if i in order[:top_k] else 0.0 for i in range(len(p))])
        p /= p.sum()
    if top_p < 1.0:
        order = sorted(range(len(p)), key=lambda i: -p[i])
        kept, mass = [], 0.0
        for i in order:
            kept.append(i)
            mass += p[i]
            if mass >= top_p:
                break
        p = np.array([p[i] if i in kept else 0.0 for i in range(len(p))])
        p /= p.sum()
    return p


@pytest.fixture
def logits():
    # distinct values (no ties at any cut), spread enough that top-p cuts land between tokens
    return np.random.default_rng(0).normal(0.0, 2.0, V).astype(np.float32)


def test_reference_sanity():
    """The reference itself, on a hand-computed case: probs 0.5/0.3/0.2 -> top_p 0.6 keeps the first two."""
    lg = np.log([0.5, 0.3, 0.2])
    np.testing.assert_allclose(ref_probs(lg), [0.5, 0.3, 0.2])
    np.testing.assert_allclose(ref_probs(lg, top_p=0.6), [0.625, 0.375, 0.0])
    np.testing.assert_allclose(ref_probs(lg, top_k=1), [1.0, 0.0, 0.0])
    np.testing.assert_allclose(ref_probs(lg, top_p=0.4), [1.0, 0.0, 0.0])


def test_greedy_is_argmax(logits):
    gen = torch.Generator().manual_seed(0)
    for i in range(20):
        lg = np.random.default_rng(i).normal(size=300).astype(np.float32)
        # greedy ignores top_k/top_p and the generator
        for p in (SamplingParams(temperature=0), SamplingParams(temperature=0, top_k=5, top_p=0.5, seed=3)):
            assert p.greedy
            assert sample(lg, p, gen) == int(np.argmax(lg))
    # the greedy choice draws nothing from its generator
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    sample(logits, SamplingParams(temperature=0), gen_a)
    assert torch.rand(1, generator=gen_a) == torch.rand(1, generator=gen_b)


def test_greedy_negative_and_large_logits():
    lg = np.array([-1e30, -5.0, -3.0, -4.0], dtype=np.float32)
    assert sample(lg, SamplingParams(temperature=0)) == 2
    lg = np.array([1e30, 3e38, -3e38, 0.0], dtype=np.float32)
    assert sample(lg, SamplingParams(temperature=0)) == 1


CASES = {
    "plain": dict(),
    "hot": dict(temperature=2.0),
    "cold": dict(temperature=0.3),
    "top_k=1": dict(top_k=1),
    "top_k=3": dict(top_k=3),
    "top_k>=V": dict(top_k=V),
    "top_k>V": dict(top_k=10 * V),
    "top_p=0.5": dict(top_p=0.5),
    "top_p=0.9": dict(top_p=0.9),
    "top_p tiny": dict(top_p=1e-6),
    "T+top_k": dict(temperature=1.7, top_k=4),
    "T+top_p": dict(temperature=0.6, top_p=0.8),
    "top_k+top_p": dict(top_k=6, top_p=0.7),
    "all": dict(temperature=1.3, top_k=5, top_p=0.85),
}


@pytest.mark.parametrize("case", CASES)
def test_probabilities_match_reference(logits, case):
    kw = CASES[case]
    got = probabilities(logits, SamplingParams(**kw))
    want = ref_probs(logits, **kw)
    assert got.shape == (V,)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    assert got.sum() == pytest.approx(1.0)


def test_probabilities_cut_sizes(logits):
    """The cuts keep exactly as many tokens as defined: k for top-k, the smallest reaching set for top-p."""
    assert np.count_nonzero(probabilities(logits, SamplingParams(top_k=3))) == 3
    assert np.count_nonzero(probabilities(logits, SamplingParams(top_p=1e-6))) == 1
    base = np.sort(ref_probs(logits))[::-1]
    for top_p in (0.3, 0.5, 0.75, 0.95):
        n = int(np.searchsorted(np.cumsum(base), top_p)) + 1  # smallest n with mass(n) >= top_p
        kept = probabilities(logits, SamplingParams(top_p=top_p))
        assert np.count_nonzero(kept) == n, top_p
        assert base[:n].sum() >= top_p > base[:n - 1].sum()
        # the kept tokens are the n most probable
        assert set(np.flatnonzero(kept)) == set(np.argsort(-logits)[:n])


def test_temperature_limits(logits):
    """Very low temperature concentrates on the argmax; very high flattens towards uniform."""
    cold = probabilities(logits, SamplingParams(temperature=1e-3))
    assert cold[np.argmax(logits)] == pytest.approx(1.0)
    hot = probabilities(logits, SamplingParams(temperature=100.0))
    np.testing.assert_allclose(hot, np.full(V, 1.0 / V), atol=0.01)


def test_large_logits_stay_finite():
    lg = np.array([1000.0, 999.0, -1000.0, 0.0], dtype=np.float32)
    p = probabilities(lg, SamplingParams(temperature=0.5))
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p, ref_probs(lg, temperature=0.5), atol=1e-12)


@pytest.mark.parametrize("case", ["plain", "hot", "top_k=3", "top_p=0.5", "all"])
def test_sample_frequencies_match_probabilities(logits, case):
    kw = CASES[case]
    params = SamplingParams(**kw)
    probs = ref_probs(logits, **kw)
    n = 20000
    drawn = draws(logits, params, n, seed=1234)
    assert drawn.min() >= 0 and drawn.max() < V
    counts = np.bincount(drawn, minlength=V)
    # tokens cut away are never drawn
    assert counts[probs == 0].sum() == 0
    freq = counts / n
    # max |freq - p| within ~5 standard deviations of a binomial proportion
    assert np.abs(freq - probs).max() < 5 * np.sqrt(0.25 / n)
    # and a loose chi-square over the kept tokens (df <= 11: the 1e-4 quantile is below 45)
    kept = probs > 0
    chi2 = float((((counts - n * probs) ** 2)[kept] / (n * probs[kept])).sum())
    assert chi2 < 45, chi2


def test_sample_skewed_distribution():
    """A token of tiny probability is drawn about as often as it should be, not never and not too often."""
    lg = np.log(np.array([0.97, 0.02, 0.01]))
    n = 20000
    counts = np.bincount(draws(lg, SamplingParams(), n, seed=7), minlength=3)
    np.testing.assert_allclose(counts / n, [0.97, 0.02, 0.01], atol=0.005)


def test_same_seed_same_samples(logits):
    params = SamplingParams(temperature=1.5, top_k=8)
    r1, r2, r3 = (torch.Generator().manual_seed(k) for k in (42, 42, 43))
    s1 = [sample(logits, params, r1) for _ in range(200)]
    s2 = [sample(logits, params, r2) for _ in range(200)]
    s3 = [sample(logits, params, r3) for _ in range(200)]
    assert s1 == s2
    assert s1 != s3
    assert len(set(s1)) > 1  # it is really sampling


@pytest.mark.parametrize("kw, field", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-3), "max_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=101.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=-0.5), "top_p"),
    (dict(top_p=1.01), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(min_p=-0.1), "min_p"),
    (dict(min_p=1.5), "min_p"),
    (dict(min_p=float("nan")), "min_p"),
    (dict(n=0), "n"),
    (dict(n=17), "n"),
    (dict(seed=-1), "seed"),
    (dict(seed=2**64), "seed"),
    (dict(seed=1.5), "seed"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(presence_penalty=-2.01), "presence_penalty"),
    (dict(frequency_penalty=3.0), "frequency_penalty"),
    (dict(frequency_penalty=float("nan")), "frequency_penalty"),
    (dict(logprobs=-1), "logprobs"),
    (dict(logprobs=21), "logprobs"),
    (dict(stop=("a", "")), "stop"),
    (dict(stop=tuple(f"s{i}" for i in range(17))), "stop"),
    (dict(stop_token_ids=(-1,)), "stop_token_ids"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(max_tokens=2.0), "max_tokens"),
])
def test_invalid_params(kw, field):
    with pytest.raises(RequestError, match=field):
        SamplingParams(**kw)


def test_invalid_params_message_names_the_range():
    with pytest.raises(RequestError, match=r"temperature must be in \[0, 100\].*got -1"):
        SamplingParams(temperature=-1)
    with pytest.raises(RequestError, match=r"logprobs must be null or an integer in \[0, 20\]"):
        SamplingParams(logprobs=50)


def test_valid_edge_params():
    SamplingParams(max_tokens=1, temperature=0.0, top_p=1.0, top_k=0)
    SamplingParams(temperature=100.0, top_p=1e-9, top_k=1)
    SamplingParams(min_p=1.0, n=16, seed=0, repetition_penalty=1e-3, presence_penalty=-2, frequency_penalty=2,
                   logprobs=20, stop=tuple("abcdefghijklmnop"))
    SamplingParams(seed=2**64 - 1, logprobs=0, min_p=0.0, n=1)
    assert SamplingParams(top_k=-1).top_k == 0  # -1 is vLLM's "off"
    p = SamplingParams(stop=["a", "bc"], stop_token_ids=[3, 4])
    assert p.stop == ("a", "bc") and p.stop_token_ids == (3, 4)
    hash(p)  # still a frozen, hashable value
    assert SamplingParams(stop="END").stop == ("END",)


@pytest.mark.cpu
def test_seeded_generation_reproducible(zoo):
    from conftest import VOCAB
    from kiln.runtime import LLM

    llm = LLM(zoo.artifact("llama", dtype="float32"))
    prompt = np.random.default_rng(5).integers(3, VOCAB, 7).tolist()
    free = llm.kv.num_free_pages

    def run(seed, n=1):
        p = SamplingParams(max_tokens=24, temperature=1.0, top_k=50, top_p=0.95, seed=seed, ignore_eos=True)
        return [r.token_ids for r in llm.generate([prompt] * n, p)]

    a = run(11)[0]
    assert len(a) == 24
    assert run(11)[0] == a  # same seed: same tokens
    b = run(12)[0]
    assert b != a  # another seed: other tokens
    assert run(12)[0] == b
    # each sequence of a batch has its own generator: two copies with one seed sample alike, as if alone
    assert run(11, n=2) == [a, a]
    greedy = llm.generate([prompt], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0].token_ids
    assert a != greedy  # sampling is not silently greedy
    assert llm.kv.num_free_pages == free


# ---------------------------------------------------------------------------------------------------------
# The reference's new parts by hand: penalties, min_p, ties


def test_penalties_by_hand():
    lg = np.array([2.0, -1.0, 0.5, 3.0])
    rep = SamplingParams(repetition_penalty=2.0)
    # token 0 is in the prompt (positive: halved), token 1 in the output (negative: doubled), 2 and 3 unseen
    np.testing.assert_allclose(penalised_logits(lg, rep, prompt_ids=[0], output_ids=[1, 1]), [1.0, -2.0, 0.5, 3.0])
    # frequency: once per occurrence, output only (the prompt's token 0 is untouched)
    freq = SamplingParams(frequency_penalty=0.5)
    np.testing.assert_allclose(penalised_logits(lg, freq, prompt_ids=[0], output_ids=[1, 1, 2]), [2.0, -2.0, 0.0, 3.0])
    # presence: once per token seen, output only
    pres = SamplingParams(presence_penalty=0.7)
    np.testing.assert_allclose(penalised_logits(lg, pres, prompt_ids=[0], output_ids=[1, 1, 2]), [2.0, -1.7, -0.2, 3.0])
    # all three: repetition first (prompt 0 and 3, output 1 and 2), then frequency and presence
    both = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.7)
    np.testing.assert_allclose(penalised_logits(lg, both, prompt_ids=[0, 3], output_ids=[1, 1, 2]),
                               [1.0, -2.0 - 1.0 - 0.7, 0.25 - 0.5 - 0.7, 1.5])
    # negative penalties encourage repeats
    np.testing.assert_allclose(penalised_logits(lg, SamplingParams(presence_penalty=-1.0), output_ids=[2]),
                               [2.0, -1.0, 1.5, 3.0])


def test_torch_penalties_match_hand_values():
    lg = torch.tensor([[2.0, -1.0, 0.5, 3.0], [2.0, -1.0, 0.5, 3.0], [2.0, -1.0, 0.5, 3.0]])
    rows = [SamplingRow(SamplingParams(repetition_penalty=2.0), None, [0], [1, 1]),
            SamplingRow(SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.7), None,
                        np.array([0, 3]), torch.tensor([1, 1, 2])),
            SamplingRow(SamplingParams(frequency_penalty=0.5), None, [0], [])]
    got = apply_penalties(lg, rows)
    np.testing.assert_allclose(got.numpy(), [[1.0, -2.0, 0.5, 3.0], [1.0, -3.7, -0.95, 1.5], [2.0, -1.0, 0.5, 3.0]],
                               rtol=1e-6)
    assert lg[0, 0] == 2.0  # the input is not modified


def test_penalties_change_the_greedy_choice():
    lg = torch.tensor([[1.0, 0.9, -5.0, 0.0]])
    s = Sampler(4, seed=0)
    assert s(lg, [SamplingRow(SamplingParams(temperature=0))])[0] == [0]
    # token 0 was generated: 1.0 / 1.2 < 0.9
    assert s(lg, [SamplingRow(SamplingParams(temperature=0, repetition_penalty=1.2), None, (), [0])])[0] == [1]
    # only in the prompt: repetition sees it, frequency and presence do not
    assert s(lg, [SamplingRow(SamplingParams(temperature=0, repetition_penalty=1.2), None, [0], [])])[0] == [1]
    assert s(lg, [SamplingRow(SamplingParams(temperature=0, presence_penalty=2.0), None, [0], [])])[0] == [0]
    assert s(lg, [SamplingRow(SamplingParams(temperature=0, frequency_penalty=0.06), None, (), [0, 0])])[0] == [1]
    assert s(lg, [SamplingRow(SamplingParams(temperature=0, frequency_penalty=0.06), None, (), [0])])[0] == [0]
    # and through the one-row helper, from a NumPy row
    assert sample(lg[0].numpy(), SamplingParams(temperature=0, presence_penalty=0.2), output_ids=[0]) == 1


def test_min_p_by_hand():
    lg = np.log([0.5, 0.3, 0.15, 0.05])
    # min_p 0.2: keep p >= 0.2 * 0.5 = 0.1
    np.testing.assert_allclose(probabilities(lg, SamplingParams(min_p=0.2)), np.array([0.5, 0.3, 0.15, 0.0]) / 0.95)
    np.testing.assert_allclose(probabilities(lg, SamplingParams(min_p=1.0)), [1.0, 0.0, 0.0, 0.0])
    # after temperature: T=2 gives p ~ sqrt(p); 0.05 -> sqrt(0.1) ~ 0.316 of the max: kept by min_p 0.3
    assert np.count_nonzero(probabilities(lg, SamplingParams(temperature=2.0, min_p=0.3))) == 4
    # min_p after top-p: top_p 0.7 keeps 0.5 and 0.3; min_p 0.7 then drops 0.3 (< 0.35)
    np.testing.assert_allclose(probabilities(lg, SamplingParams(top_p=0.7, min_p=0.7)), [1.0, 0.0, 0.0, 0.0])


def test_ties_at_a_cut_are_kept():
    """Cuts are thresholds on the value: tokens tied with the last one kept stay (no dependence on sort order)."""
    lg = np.array([1.0, 1.0, 1.0, 0.0])
    np.testing.assert_allclose(probabilities(lg, SamplingParams(top_k=1)), [1 / 3, 1 / 3, 1 / 3, 0.0])
    np.testing.assert_allclose(probabilities(lg, SamplingParams(top_p=0.3)), [1 / 3, 1 / 3, 1 / 3, 0.0])
    counts = np.bincount(draw_many(lg, SamplingParams(top_k=1), 3000), minlength=4)
    assert counts[3] == 0 and counts[:3].min() > 800


def test_greedy_probabilities_are_one_hot():
    lg = np.array([0.1, 2.0, 1.9])
    np.testing.assert_array_equal(probabilities(lg, SamplingParams(temperature=0)), [0.0, 1.0, 0.0])
    np.testing.assert_array_equal(probabilities(lg, SamplingParams(temperature=0, presence_penalty=0.5),
                                                output_ids=[1]), [0.0, 0.0, 1.0])


# ---------------------------------------------------------------------------------------------------------
# The batched torch Sampler against the NumPy reference


def draw_many(logits_row, params: SamplingParams, n: int, seed: int = 0, prompt_ids=(), output_ids=(),
              pad: int = 0, numpy_on_cpu: bool = True) -> np.ndarray:
    """n independent draws of one row: one batch of n copies (each row gets its own uniform)."""
    row = torch.as_tensor(np.asarray(logits_row, dtype=np.float32))
    x = torch.cat([row, torch.full((pad,), 1e30)]).repeat(n, 1)  # padded columns would win any draw
    sampler = Sampler(len(logits_row), seed=seed, numpy_on_cpu=numpy_on_cpu)
    tokens, lps = sampler(x, [SamplingRow(params, None, prompt_ids, output_ids)] * n)
    assert lps == [None] * n
    return np.array(tokens)


def assert_draws_follow(draws: np.ndarray, probs: np.ndarray) -> None:
    """Exact support (prob 0 never drawn), frequencies within 5 binomial sigmas, and a loose chi-square."""
    n, V = len(draws), len(probs)
    assert draws.min() >= 0 and draws.max() < V
    counts = np.bincount(draws, minlength=V)
    assert counts[probs == 0].sum() == 0, "a token of probability 0 was drawn"
    assert (counts[probs > 20 / n] > 0).all(), "a likely token was never drawn"
    assert np.abs(counts / n - probs).max() < 5 * np.sqrt(0.25 / n)
    # chi-square over the tokens expected at least 5 times (the 1e-6 quantile for df <= 63 is below 130) ...
    big = n * probs >= 5
    chi2 = float((((counts - n * probs) ** 2)[big] / (n * probs[big])).sum())
    assert chi2 < (45 if big.sum() <= 12 else 130), chi2
    # ... and the rare ones pooled, against a generous Poisson bound
    rare_expected = n * probs[~big].sum()
    assert counts[~big].sum() <= rare_expected + 6 * np.sqrt(rare_expected) + 6


BATCH_CASES = {
    **CASES,
    "min_p": dict(min_p=0.1),
    "T+min_p": dict(temperature=0.7, min_p=0.3),
    "top_k+top_p+min_p": dict(top_k=8, top_p=0.9, min_p=0.05, temperature=1.2),
    "rep": dict(repetition_penalty=1.8),
    "freq+pres": dict(frequency_penalty=0.6, presence_penalty=-0.4, temperature=0.9),
    "everything": dict(temperature=0.8, top_k=7, top_p=0.95, min_p=0.02, repetition_penalty=1.3,
                       frequency_penalty=0.3, presence_penalty=0.2),
}
PROMPT, OUTPUT = (0, 3, 5, 5), (1, 3, 3, 7)


@pytest.mark.parametrize("case", BATCH_CASES)
def test_sampler_draws_follow_reference(logits, case):
    params = SamplingParams(**BATCH_CASES[case])
    probs = probabilities(logits, params, PROMPT, OUTPUT)
    assert_draws_follow(draw_many(logits, params, 20000, seed=11, prompt_ids=PROMPT, output_ids=OUTPUT, pad=3), probs)


def test_sampler_larger_vocab_follows_reference():
    lg = np.random.default_rng(3).normal(0.0, 1.5, 64).astype(np.float32)
    for kw in (dict(temperature=1.3, top_p=0.8), dict(top_k=20, min_p=0.05)):
        params = SamplingParams(**kw)
        assert_draws_follow(draw_many(lg, params, 20000, seed=5), probabilities(lg, params))


def test_mixed_batch_one_pass(logits):
    """Rows with different settings interleaved in one batch: each follows its own distribution."""
    names = ["plain", "cold", "top_k=3", "top_p=0.5", "min_p", "everything", "T+top_p"]
    per_case, rng = 6000, np.random.default_rng(0)
    which = rng.permutation(np.repeat(np.arange(len(names)), per_case))
    params = [SamplingParams(**BATCH_CASES[name]) for name in names]
    rows = [SamplingRow(params[w], None, PROMPT, OUTPUT) for w in which]
    x = torch.as_tensor(logits).repeat(len(rows), 1)
    tokens = np.array(Sampler(V, seed=1)(x, rows)[0])
    for k, name in enumerate(names):
        assert_draws_follow(tokens[which == k], probabilities(logits, params[k], PROMPT, OUTPUT))


def test_mixed_batch_with_greedy_rows(logits):
    rng = np.random.default_rng(1)
    x = torch.as_tensor(rng.normal(size=(40, V)).astype(np.float32))
    params = [SamplingParams(temperature=0) if i % 3 == 0 else SamplingParams(temperature=0.5, top_p=0.9)
              for i in range(40)]
    tokens, _ = Sampler(V, seed=0)(x, [SamplingRow(p) for p in params])
    for i, (p, t) in enumerate(zip(params, tokens)):
        if p.greedy:
            assert t == int(x[i].argmax())
        else:
            assert probabilities(x[i].numpy(), p)[t] > 0


def test_greedy_batch_is_argmax_and_ignores_padding():
    x = torch.randn(128, 300, generator=torch.Generator().manual_seed(0))
    x[:, 256:] = 1e30  # padded columns past the vocabulary
    tokens, lps = Sampler(256)(x, [SamplingRow(SamplingParams(temperature=0))] * 128)
    assert tokens == x[:, :256].argmax(dim=-1).tolist()
    assert lps == [None] * 128
    assert x[0, 256] == 1e30  # untouched
    assert Sampler(256)(torch.empty(0, 300), []) == ([], [])


@pytest.mark.parametrize("numpy_on_cpu", [True, False])  # False: the torch path a GPU's logits take
def test_argmax_rows_is_the_samplers_greedy_choice(numpy_on_cpu):
    x = torch.randn(6, 300, generator=torch.Generator().manual_seed(1))
    x[:, 256:] = 1e30  # padded columns past the vocabulary
    x[2, 7] = x[2, 9] = 50.0  # a tie: the first wins, as in the sampler
    rows = [4, 2, 2, 0]  # a subset, out of order, one row twice (n > 1 choices of one prompt)
    want, _ = Sampler(256)(x[rows], [SamplingRow(SamplingParams(temperature=0))] * len(rows))
    assert Sampler(256).argmax(x, rows) == want
    assert argmax_rows(x[:, :256], rows, numpy_on_cpu=numpy_on_cpu) == want and want[1] == 7
    assert argmax_rows(x[:, :256], list(range(6)), numpy_on_cpu=numpy_on_cpu) == x[:, :256].argmax(-1).tolist()


def test_take_rows_views_every_row_and_copies_a_subset():
    x = torch.randn(4, 10)
    assert take_rows(x, [0, 1, 2, 3]).data_ptr() == x.data_ptr()  # (the engine masks it in place)
    sub = take_rows(x, [3, 1, 1])
    assert sub.data_ptr() != x.data_ptr() and torch.equal(sub, x[[3, 1, 1]])


MASK_PARAMS = [dict(temperature=0), dict(), dict(temperature=0.05), dict(top_p=0.5), dict(top_k=3),
               dict(min_p=0.5), dict(repetition_penalty=1.5), dict(presence_penalty=-2.0, frequency_penalty=-2.0),
               dict(temperature=2.0, top_k=2, top_p=0.1, min_p=0.9, repetition_penalty=0.5)]


@pytest.mark.parametrize("kw", MASK_PARAMS, ids=str)
def test_grammar_mask_leaves_one_token(kw):
    """-inf logits (a grammar mask) never give NaN; a row with one finite logit always yields that token."""
    x = torch.full((50, 40), -math.inf)
    allowed = torch.arange(50) % 40
    x[torch.arange(50), allowed] = torch.randn(50) * 10
    rows = [SamplingRow(SamplingParams(logprobs=3, **kw), None, [1, 2, 3], [int(allowed[i]), 5])
            for i in range(50)]
    tokens, lps = Sampler(40, seed=0)(x, rows)
    assert tokens == allowed.tolist()
    for lp, t in zip(lps, tokens):
        assert lp.token_id == t and lp.logprob == pytest.approx(0.0, abs=1e-6)
        assert lp.top == ((t, lp.logprob),)  # the masked alternatives (-inf) are left out


def test_grammar_mask_follows_reference(logits):
    masked = logits.copy()
    masked[[0, 2, 3, 7, 8]] = -np.inf
    for kw in (dict(), dict(temperature=1.5, top_p=0.9), dict(top_k=4, repetition_penalty=1.4)):
        params = SamplingParams(**kw)
        probs = probabilities(masked, params, PROMPT, OUTPUT)
        assert np.isfinite(probs).all() and (probs[[0, 2, 3, 7, 8]] == 0).all()
        assert_draws_follow(draw_many(masked, params, 20000, seed=2, prompt_ids=PROMPT, output_ids=OUTPUT), probs)


def test_extreme_logits_stay_finite():
    x = torch.tensor([[1e30, 3e38, -3e38, 0.0], [-1e30, -5.0, -3.0, -4.0]])
    for kw in (dict(temperature=0.001), dict(temperature=100.0, top_p=0.9), dict(min_p=0.5), dict(top_k=2)):
        tokens, _ = Sampler(4, seed=0)(x, [SamplingRow(SamplingParams(**kw))] * 2)
        assert tokens[0] == 1
        assert tokens[1] in (1, 2, 3)


def test_seeded_row_independent_of_batch():
    """A seeded choice draws the same tokens alone and inside changing mixed batches."""
    Vb, steps = 64, 60
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    others = [SamplingParams(temperature=0), SamplingParams(), SamplingParams(temperature=0.7, top_k=5),
              SamplingParams(temperature=1.5, seed=1234 + 1), SamplingParams(min_p=0.1, presence_penalty=1.0)]
    alone, in_batch = Sampler(Vb, seed=0), Sampler(Vb, seed=99)
    gen_alone, gen_batch = choice_generator(params.seed), choice_generator(params.seed)
    other_gens = [choice_generator(p.seed) if p.seed is not None else None for p in others]
    a, b = [], []
    for step in range(steps):
        row = torch.as_tensor(rng.normal(0.0, 2.0, Vb).astype(np.float32))
        a += alone(row[None], [SamplingRow(params, gen_alone, (), a)])[0]
        m = int(rng.integers(1, 40))
        x = torch.as_tensor(rng.normal(0.0, 2.0, (m, Vb + 8)).astype(np.float32))
        where = int(rng.integers(0, m))
        x[where, :Vb] = row
        rows = [SamplingRow(others[j % len(others)], other_gens[j % len(others)], (), [1, 2]) for j in range(m)]
        rows[where] = SamplingRow(params, gen_batch, (), b)
        b.append(in_batch(x, rows)[0][where])
    assert a == b
    assert len(set(a)) > 10  # it really samples
    # another seed, other tokens
    gen = choice_generator(params.seed, index=1)
    c = []
    for step in range(steps):
        row = torch.as_tensor(np.random.default_rng(step).normal(0.0, 2.0, Vb).astype(np.float32))
        c += alone(row[None], [SamplingRow(params, gen)])[0]
    assert c != a


def test_unseeded_rows_reproducible_with_sampler_seed(logits):
    x = torch.as_tensor(logits).repeat(30, 1)
    rows = [SamplingRow(SamplingParams(temperature=1.2))] * 30
    assert Sampler(V, seed=7)(x, rows)[0] == Sampler(V, seed=7)(x, rows)[0]
    assert Sampler(V, seed=7)(x, rows)[0] != Sampler(V, seed=8)(x, rows)[0]


def test_choice_generators_differ():
    draws = [torch.rand(4, generator=choice_generator(5, i)).tolist() for i in range(3)]
    assert draws[0] != draws[1] != draws[2]
    assert torch.rand(4, generator=choice_generator(5, 0)).tolist() == draws[0]
    choice_generator(2**64 - 1, 3)  # wraps around instead of overflowing


def test_logprobs():
    rng = np.random.default_rng(4)
    Vl = 50
    x = rng.normal(0.0, 3.0, (6, Vl + 2)).astype(np.float32)
    x[5, :40] = -np.inf
    params = [SamplingParams(logprobs=None), SamplingParams(logprobs=0), SamplingParams(logprobs=5, temperature=0),
              SamplingParams(logprobs=20, temperature=0.3, top_k=3, repetition_penalty=2.0, presence_penalty=1.5),
              SamplingParams(logprobs=1, top_p=0.5), SamplingParams(logprobs=20)]
    rows = [SamplingRow(p, None, [0, 1], [2, 3]) for p in params]
    tokens, lps = Sampler(Vl, seed=0)(torch.as_tensor(x), rows)
    assert lps[0] is None
    for i in range(1, 6):
        real = x[i, :Vl].astype(np.float64)
        ref = real - real.max() - np.log(np.exp(real - real.max()).sum())  # log_softmax, before any penalty
        lp = lps[i]
        assert lp.token_id == tokens[i]
        assert lp.logprob == pytest.approx(ref[tokens[i]], abs=1e-5)
        k = params[i].logprobs
        finite = np.isfinite(ref)
        want = [j for j in np.argsort(-ref, kind="stable") if finite[j]][:k]
        assert [t for t, _ in lp.top] == want
        np.testing.assert_allclose([v for _, v in lp.top], ref[want], atol=1e-5)
        assert all(a[1] >= b[1] for a, b in zip(lp.top, lp.top[1:]))  # best first
    assert lps[1].top == ()
    assert len(lps[5].top) == 10  # only the 10 unmasked tokens
    assert tokens[2] == int(np.argmax(x[2, :Vl]))


def _best_ms(fn, calls: int, repeats: int = 5) -> float:
    fn()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls * 1e3)
    return best


def test_benchmark_batched_sampler():
    """Prints the cost of a 128-row step at V=4096; asserts only loose bounds (the machine may be busy)."""
    Vb, b = 4096, 128
    x = torch.randn(b, Vb, generator=torch.Generator().manual_seed(0)) * 3
    sampler = Sampler(Vb, seed=0)
    greedy = [SamplingRow(SamplingParams(temperature=0))] * b
    mixed = [SamplingRow(p, choice_generator(p.seed) if p.seed is not None else None) for p in
             [SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_p=0.9),
              SamplingParams(temperature=1.2, top_k=40, seed=3), SamplingParams(min_p=0.05)] * (b // 4)]
    greedy_ms = _best_ms(lambda: sampler(x, greedy), 100)
    mixed_ms = _best_ms(lambda: sampler(x, mixed), 10)
    print(f"\nsampler, {b} rows x V={Vb}: all greedy {greedy_ms:.3f} ms, mixed {mixed_ms:.2f} ms "
          f"(greedy / top-p / top-k+seed / min_p)")
    assert greedy_ms < 20
    assert mixed_ms < 500


# ---------------------------------------------------------------------------------------------------------
# The top-k fast path (every row cut by top_k, a large vocabulary): candidates instead of a full sort


def _big_logits(m: int, V: int = 3000, seed: int = 0) -> torch.Tensor:
    return torch.as_tensor(np.random.default_rng(seed).normal(0.0, 2.5, (m, V)).astype(np.float32))


@pytest.mark.parametrize("kw", [dict(top_k=50), dict(top_k=40, top_p=0.9, temperature=0.8),
                                dict(top_k=200, top_p=0.5, min_p=0.01), dict(top_k=1, temperature=2.0)])
def test_top_k_fast_path_follows_reference(kw):
    lg = _big_logits(1, seed=4)[0].numpy()
    params = SamplingParams(**kw)
    assert_draws_follow(draw_many(lg, params, 20000, seed=3), probabilities(lg, params))


def test_top_k_fast_path_draws_what_the_full_path_draws(monkeypatch):
    """Same logits, same generators: identical tokens with the fast path on and off (mixed k, p, min_p)."""
    import kiln.runtime.sampler as sampler_mod

    x = _big_logits(64, seed=7)
    kws = [dict(top_k=50, temperature=0.8, top_p=0.95), dict(top_k=5), dict(top_k=100, min_p=0.05, top_p=0.7),
           dict(top_k=1), dict(top_k=256, top_p=0.99, temperature=1.5, seed=9)]
    rows = [SamplingRow(SamplingParams(**kws[i % len(kws)]),
                        choice_generator(9, i) if i % len(kws) == 4 else None) for i in range(64)]
    fast = Sampler(x.shape[1], seed=5)(x, rows)[0]
    rows = [SamplingRow(r.params, choice_generator(9, i) if r.generator is not None else None)
            for i, r in enumerate(rows)]
    monkeypatch.setattr(sampler_mod, "TOP_K_FAST_PATH", 0)
    full = Sampler(x.shape[1], seed=5)(x, rows)[0]
    assert fast == full


@pytest.mark.parametrize("numpy_on_cpu", [True, False])
def test_top_k_fast_path_falls_back_on_a_tie(numpy_on_cpu):
    """A tie at the k-th weight with tokens outside the candidates: the full path keeps them all."""
    V = 2000
    x = torch.full((1, V), -5.0)
    x[0, :3] = 4.0
    x[0, 100:400] = 1.0  # 300 tokens tied at the k-th largest for k = 10
    params = SamplingParams(top_k=10)
    draws = draw_many(x[0].numpy(), params, 6000, seed=1, numpy_on_cpu=numpy_on_cpu)
    assert set(np.unique(draws)) <= set(range(3)) | set(range(100, 400))
    assert (draws >= 100).sum() > 1000 and len(set(draws[draws >= 100])) > 200  # the whole tie, not 7 of it


@pytest.mark.parametrize("all_top_k,torch_fast", [(False, True), (True, True), (True, False)])
def test_torch_path_draws_what_the_numpy_path_draws(all_top_k, torch_fast, monkeypatch):
    """The path a GPU's logits take (torch alone, ``numpy_on_cpu=False``), run here: the same tokens and
    logprobs as the NumPy path for the same logits and generators, over every kind of row in one batch."""
    x = _big_logits(48, seed=2)
    kws = [dict(top_k=50, temperature=0.8, top_p=0.95), dict(top_k=5, min_p=0.1), dict(top_k=1, logprobs=3),
           dict(top_k=20, repetition_penalty=1.4, frequency_penalty=0.5, presence_penalty=0.3, seed=3)]
    if not all_top_k:
        kws += [dict(), dict(temperature=0), dict(temperature=0, logprobs=2), dict(top_p=0.3, temperature=1.5),
                dict(min_p=0.2), dict(temperature=0, repetition_penalty=2.0)]

    def rows():
        out = []
        for i in range(48):
            p = SamplingParams(**kws[i % len(kws)])
            out.append(SamplingRow(p, choice_generator(p.seed, i) if p.seed is not None else None,
                                   prompt_ids=list(range(i, i + 30)), output_ids=[i, 7, 7, 2999]))
        return out

    want = Sampler(x.shape[1], seed=4)(x, rows())  # (all_top_k: by NumPy's top-k fast path)
    if not torch_fast:  # the torch side without its top-k fast path: the full sort
        import kiln.runtime.sampler as sampler_mod

        monkeypatch.setattr(sampler_mod, "TOP_K_FAST_PATH", 0)
    got = Sampler(x.shape[1], seed=4, numpy_on_cpu=False)(x, rows())
    assert got[0] == want[0]
    for a, b in zip(got[1], want[1]):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-6
            assert [t for t, _ in a.top] == [t for t, _ in b.top]


def test_sample_routes_each_choice_to_its_path():
    """``Sampler.sample``: plain rows take an argmax alone, the others the batched path; rows may share a
    position (the choices of one prompt), and a seeded row draws as it would alone."""
    V = 64
    x = torch.from_numpy(np.random.default_rng(3).normal(size=(3, V)).astype(np.float32))
    hot = SamplingParams(temperature=1.0, seed=5)
    rows = [SamplingRow(SamplingParams(temperature=0)), SamplingRow(SamplingParams(temperature=0, logprobs=2)),
            SamplingRow(hot, choice_generator(5, 0)), SamplingRow(hot, choice_generator(5, 1))]
    assert [r.plain for r in rows] == [True, False, False, False]
    tokens, logprobs = Sampler(V, seed=0).sample(x, [0, 1, 2, 2], rows)
    assert tokens[:2] == [int(x[0].argmax()), int(x[1].argmax())]
    assert logprobs[0] is None and logprobs[1].token_id == tokens[1] and len(logprobs[1].top) == 2
    for j, index in ((2, 0), (3, 1)):  # the two choices of row 2, each as if sampled alone
        alone = Sampler(V, seed=1)(x[2:3], [SamplingRow(hot, choice_generator(5, index))])[0][0]
        assert tokens[j] == alone
    assert Sampler(V).sample(x, [], []) == ([], [])
