"""kiln.runtime.sampler against a plain NumPy reference: greedy, temperature, top-k, top-p, seeding, validation."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.errors import RequestError
from kiln.runtime.sampler import SamplingParams, probabilities, sample

V = 12


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
    rng = np.random.default_rng(0)
    for i in range(20):
        lg = np.random.default_rng(i).normal(size=300).astype(np.float32)
        # greedy ignores top_k/top_p and the rng
        for p in (SamplingParams(temperature=0), SamplingParams(temperature=0, top_k=5, top_p=0.5, seed=3)):
            assert p.greedy
            assert sample(lg, p, rng) == int(np.argmax(lg))
    # the greedy choice draws nothing from the rng
    rng_a, rng_b = np.random.default_rng(1), np.random.default_rng(1)
    sample(logits, SamplingParams(temperature=0), rng_a)
    assert rng_a.random() == rng_b.random()


def test_greedy_negative_and_large_logits():
    lg = np.array([-1e30, -5.0, -3.0, -4.0], dtype=np.float32)
    assert sample(lg, SamplingParams(temperature=0), np.random.default_rng()) == 2
    lg = np.array([1e30, 3e38, -3e38, 0.0], dtype=np.float32)
    assert sample(lg, SamplingParams(temperature=0), np.random.default_rng()) == 1


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
    rng = np.random.default_rng(1234)
    n = 20000
    draws = np.array([sample(logits, params, rng) for _ in range(n)])
    assert draws.min() >= 0 and draws.max() < V
    counts = np.bincount(draws, minlength=V)
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
    rng = np.random.default_rng(7)
    n = 20000
    counts = np.bincount([sample(lg, SamplingParams(), rng) for _ in range(n)], minlength=3)
    np.testing.assert_allclose(counts / n, [0.97, 0.02, 0.01], atol=0.005)


def test_same_seed_same_samples(logits):
    params = SamplingParams(temperature=1.5, top_k=8)
    r1, r2, r3 = np.random.default_rng(42), np.random.default_rng(42), np.random.default_rng(43)
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
    (dict(top_k=-1), "top_k"),
])
def test_invalid_params(kw, field):
    with pytest.raises(RequestError, match=field):
        SamplingParams(**kw)


def test_valid_edge_params():
    SamplingParams(max_tokens=1, temperature=0.0, top_p=1.0, top_k=0)
    SamplingParams(temperature=100.0, top_p=1e-9, top_k=1)


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
