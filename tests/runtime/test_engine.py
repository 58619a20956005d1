"""The serving engine on real compiled models: continuous batching, preemption, prefix reuse, n > 1,
stop conditions, aborts and fair scheduling, each checked against requests run one at a time."""

from __future__ import annotations

import random
import re

import pytest

from kiln.errors import KilnError, RequestError
from kiln.runtime.engine import Engine, EngineConfig
from kiln.runtime.outputs import Request
from kiln.runtime.sampler import SamplingParams

pytestmark = pytest.mark.cpu


@pytest.fixture(scope="module")
def demo(zoo):
    return zoo.artifact("demo")


@pytest.fixture(scope="module")
def engine(demo):
    return Engine(demo, EngineConfig(max_num_seqs=16, max_batched_tokens=128, kv_cache_memory=64 << 20))


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


def tokens_of(outs) -> dict[int, list[int]]:
    by_choice: dict[int, list[int]] = {}
    for o in outs:
        for c in o.outputs:
            by_choice.setdefault(c.index, []).extend(c.token_ids)
    return by_choice


def text_of(outs) -> dict[int, str]:
    by_choice: dict[int, str] = {}
    for o in outs:
        for c in o.outputs:
            by_choice[c.index] = by_choice.get(c.index, "") + c.text
    return by_choice


def workload(engine, count=12, seed=0):
    rng = random.Random(seed)
    src = open(__file__).read()
    reqs = []
    for i in range(count):
        start = rng.randrange(0, len(src) - 2000)
        ids = engine.tokenizer.encode(src[start:start + rng.randrange(20, 700)])[:150]
        reqs.append((ids, rng.randrange(4, 40)))
    return reqs


def run_alone(engine, reqs) -> list[list[int]]:
    out = []
    for i, (ids, m) in enumerate(reqs):
        got = engine.generate([Request(f"alone-{i}", ids, greedy(m))])
        out.append(tokens_of(got[f"alone-{i}"])[0])
    return out


def run_together(engine, reqs, tag: str, stagger: int = 3) -> list[list[int]]:
    """Requests arrive every ``stagger`` steps while the earlier ones run."""
    pending = [Request(f"{tag}-{i}", ids, greedy(m)) for i, (ids, m) in enumerate(reqs)]
    got: dict[str, list] = {r.request_id: [] for r in pending}
    step = 0
    while pending or engine.has_unfinished():
        if pending and step % stagger == 0:
            engine.add_request(pending.pop(0))
        for o in engine.step():
            got[o.request_id].append(o)
        step += 1
    return [tokens_of(got[f"{tag}-{i}"])[0] for i in range(len(reqs))]


@pytest.fixture(scope="module")
def reference(demo):
    """Each request alone, on an engine without prefix reuse."""
    eng = Engine(demo, EngineConfig(max_num_seqs=1, kv_cache_memory=64 << 20, prefix_cache=False))
    reqs = workload(eng)
    return reqs, run_alone(eng, reqs)


def test_continuous_batching_equals_one_at_a_time(engine, reference):
    reqs, alone = reference
    assert run_together(engine, reqs, "cb") == alone
    s = engine.stats()
    assert s.running == 0 and s.waiting == 0
    assert_only_cache_holds_pages(engine)


def assert_only_cache_holds_pages(engine):
    s = engine.stats()
    assert s.kv_sequences == s.cached_sequences  # every sequence left in the KV cache is a prefix-cache entry
    assert s.kv_pages_total - s.kv_pages_free == s.kv_pages_cached
    engine.clear_prefix_cache()
    s = engine.stats()
    assert s.kv_sequences == 0 and s.kv_pages_free == s.kv_pages_total and s.kv_pages_cached == 0


def test_preemption_under_a_small_pool_keeps_outputs(demo, reference):
    reqs, alone = reference
    from kiln.artifact import load_artifact

    per_token = load_artifact(demo).spec.kv_bytes_per_token
    eng = Engine(demo, EngineConfig(max_num_seqs=8, max_batched_tokens=64, kv_cache_memory=240 * per_token))
    assert run_together(eng, reqs, "pre", stagger=1) == alone
    assert eng.stats().preemptions > 0


def test_prefix_reuse_computes_only_new_tokens(engine):
    tok = engine.tokenizer
    shared = tok.encode(open(__file__).read())[:200]
    first = engine.generate([Request("p1", shared + tok.encode(" alpha beta"), greedy(8))])
    before = engine.stats()
    second_prompt = shared + tok.encode("\n# gamma delta epsilon")
    got = engine.generate([Request("p2", second_prompt, greedy(8))])
    after = engine.stats()
    assert after.prefill_tokens_computed - before.prefill_tokens_computed == len(second_prompt) - 200
    assert after.prefix_cache_hits == before.prefix_cache_hits + 1
    assert got["p2"][-1].cached_tokens == 200
    # the output equals the same prompt computed from scratch
    fresh = Engine(engine.artifact.path, EngineConfig(max_num_seqs=1, kv_cache_memory=16 << 20, prefix_cache=False))
    assert tokens_of(got["p2"]) == tokens_of(fresh.generate([Request("p2", second_prompt, greedy(8))])["p2"])
    assert first["p1"][-1].finished


def test_n_choices_share_the_prompt_and_differ(engine):
    ids = engine.tokenizer.encode("def parse(self, text):\n")
    p = SamplingParams(max_tokens=12, temperature=1.0, seed=7, n=3, ignore_eos=True)
    before = engine.stats().prefill_tokens_computed
    got = engine.generate([Request("n3", ids, p)])["n3"]
    assert engine.stats().prefill_tokens_computed - before == len(ids)  # one prefill for three choices
    toks = tokens_of(got)
    assert sorted(toks) == [0, 1, 2] and all(len(t) == 12 for t in toks.values())
    assert len({tuple(t) for t in toks.values()}) == 3
    again = tokens_of(engine.generate([Request("n3b", ids, p)])["n3b"])
    assert again == toks  # seeded: reproducible
    # choice i of a seeded n>1 request equals a single request seeded seed + i
    for i in range(3):
        single = SamplingParams(max_tokens=12, temperature=1.0, seed=7 + i, ignore_eos=True)
        assert tokens_of(engine.generate([Request(f"s{i}", ids, single)])[f"s{i}"])[0] == toks[i]
    assert got[-1].finished and {c.finish_reason for o in got for c in o.outputs} - {None} == {"length"}


def test_stop_string_and_stop_token(engine):
    ids = engine.tokenizer.encode("import os\n")
    full = text_of(engine.generate([Request("f", ids, greedy(30))])["f"])[0]
    assert "\n" in full
    got = engine.generate([Request("st", ids, greedy(30, stop=("\n",)))])["st"]
    assert text_of(got)[0] == full[:full.index("\n")]
    assert got[-1].outputs[-1].finish_reason == "stop"
    toks = tokens_of(engine.generate([Request("f2", ids, greedy(30))])["f2"])[0]
    got = engine.generate([Request("tk", ids, greedy(30, stop_token_ids=(toks[3],)))])["tk"]
    assert tokens_of(got)[0] == toks[:toks.index(toks[3]) + 1]
    assert got[-1].outputs[-1].finish_reason == "stop"


def test_logprobs(engine):
    ids = engine.tokenizer.encode("class Foo:\n")
    got = engine.generate([Request("lp", ids, greedy(5, logprobs=3))])["lp"]
    lps = [lp for o in got for c in o.outputs for lp in c.logprobs]
    assert len(lps) == 5
    for lp, t in zip(lps, tokens_of(got)[0]):
        assert lp.token_id == t and len(lp.top) == 3 and lp.top[0][0] == t  # greedy picks the top token
        assert lp.logprob <= 0 and abs(lp.top[0][1] - lp.logprob) < 1e-6


@pytest.mark.parametrize("numpy_on_cpu", [True, False])  # False: the path a GPU's logits take, run here
def test_a_mixed_batch_samples_each_row_as_it_would_alone(engine, numpy_on_cpu):
    """Rows the engine only takes an argmax of (plain greedy) next to rows the sampler draws (logprobs, a
    penalty, a seeded draw, n = 2) and a row under a grammar (masked on the host), in the same steps:
    each request's tokens are those it gets alone."""
    from kiln.runtime.grammar import ResponseFormat

    ids = engine.tokenizer.encode("def parse(self, text):\n    ")
    grammar = engine.compile_grammar(ResponseFormat.from_openai({"type": "regex", "regex": "[a-z]+ = [0-9]+"}))
    params = {"plain": greedy(12), "logprobs": greedy(12, logprobs=2), "penalty": greedy(12, repetition_penalty=1.3),
              "seeded": SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True),
              "two": SamplingParams(max_tokens=12, temperature=0.0, n=2, ignore_eos=True),
              "grammar": SamplingParams(max_tokens=12, temperature=0.7, seed=5)}
    reqs = lambda tag: [Request(f"{tag}{k}", ids, p, grammar=grammar if k == "grammar" else None)  # noqa: E731
                        for k, p in params.items()]
    engine.sampler.numpy_on_cpu = numpy_on_cpu
    try:
        alone = {r.request_id[1:]: tokens_of(engine.generate([r])[r.request_id]) for r in reqs("a")}
        together = {k[1:]: tokens_of(v) for k, v in engine.generate(reqs("t")).items()}
    finally:
        engine.sampler.numpy_on_cpu = True
    assert together == alone
    assert alone["two"][0] == alone["two"][1] == alone["plain"][0]
    assert alone["penalty"][0] != alone["plain"][0]  # (the penalty changes the choice: a sampler row)
    assert re.fullmatch("[a-z]+ = [0-9]+", engine.tokenizer.decode(alone["grammar"][0]))
    assert_only_cache_holds_pages(engine)


def test_abort_frees_pages(engine):
    engine.add_request(Request("ab", engine.tokenizer.encode("def f(x):\n"), greedy(200)))
    for _ in range(5):
        engine.step()
    engine.abort_request("ab")
    outs = engine.step()
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
    assert engine.stats().running == 0
    assert_only_cache_holds_pages(engine)


def test_bad_requests_raise_request_error(engine):
    ctx = engine.spec.context_len
    with pytest.raises(RequestError, match="empty"):
        engine.add_request(Request("e1", [], greedy(4)))
    with pytest.raises(RequestError, match="context window"):
        engine.add_request(Request("e2", [5] * ctx, greedy(4)))
    with pytest.raises(RequestError, match="max_tokens"):
        engine.add_request(Request("e3", [5] * 10, greedy(ctx)))
    with pytest.raises(RequestError, match="token ids"):
        engine.add_request(Request("e4", [engine.spec.vocab_size], greedy(4)))
    assert not engine.has_unfinished()


def test_engine_config_errors(demo):
    with pytest.raises(KilnError, match="kv_cache_memory"):
        EngineConfig(kv_cache_memory=1.5)
    with pytest.raises(KilnError, match="policy"):
        EngineConfig(policy="lottery")
    with pytest.raises(KilnError, match="one page"):
        Engine(demo, EngineConfig(kv_cache_memory=100))


def test_vtc_serves_the_light_client_fairly(demo):
    """Real model, backlogged clients, 'heavy' sends 10x the requests of 'light': under VTC the light client
    gets about half the service while it has work queued; under FCFS it gets about a tenth."""

    def share(policy):
        eng = Engine(demo, EngineConfig(max_num_seqs=4, max_batched_tokens=64, kv_cache_memory=16 << 20,
                                        policy=policy, prefix_cache=False))
        ids = eng.tokenizer.encode("def handler(request):\n")
        for i in range(66):
            user = "light" if i % 11 == 0 else "heavy"
            eng.add_request(Request(f"{policy}-{i}", ids, greedy(8), user=user))
        served = {"heavy": 0, "light": 0}
        while any(s.user == "light" for s in eng.scheduler.policy.waiting()):
            for o in eng.step():
                user = "light" if int(o.request_id.split("-")[1]) % 11 == 0 else "heavy"
                served[user] += sum(len(c.token_ids) for c in o.outputs)
        return served["light"] / (served["light"] + served["heavy"])

    assert share("vtc") > 0.3
    assert share("fcfs") < 0.15


def test_json_schema_output_validates(engine):
    import json

    import jsonschema

    from kiln.runtime.grammar import ResponseFormat

    schema = {"type": "object", "properties": {"lang": {"enum": ["python", "c"]},
                                               "stars": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "typed": {"type": "boolean"}},
              "required": ["lang", "stars", "typed"], "additionalProperties": False}
    grammar = engine.compile_grammar(ResponseFormat.from_openai(
        {"type": "json_schema", "json_schema": {"name": "repo", "schema": schema}}))
    ids = engine.tokenizer.encode("config = ")
    p = SamplingParams(max_tokens=120, temperature=0.7, seed=3, n=2)
    got = engine.generate([Request("js", ids, p, grammar=grammar)])["js"]
    texts = text_of(got)
    for i in (0, 1):
        jsonschema.validate(json.loads(texts[i]), schema)
    assert {c.finish_reason for o in got for c in o.outputs} - {None} == {"stop"}
    with pytest.raises(RequestError):
        engine.compile_grammar(ResponseFormat.from_openai({"type": "regex", "regex": "("}))


def test_logits_of_a_step_survive_the_next(engine):
    """The runner hands back the VM's output tensor without copying it (CPU): a later step must not write
    into an earlier step's logits."""
    runner, kv = engine.runner, engine.kv
    a, b = 10_001, 10_002
    kv.add_sequence(a)
    kv.add_sequence(b)
    try:
        first = runner.forward([a], [[5, 6, 7, 8]])
        kept = first.copy()
        runner.forward([b], [[9, 10, 11, 12, 13, 14]])
        runner.forward([a, b], [[20], [21]])
        assert (first == kept).all()
    finally:
        kv.remove_sequence(a)
        kv.remove_sequence(b)


def test_capture_decode_graphs_steps_once_at_each_batch_size(demo):
    """Each step a one-token prompt per sequence: one decode step at every batch size, largest first, and
    afterwards an engine as new (a CPU artifact has no graphs; the steps and what they leave are the same)."""
    eng = Engine(demo, EngineConfig(max_num_seqs=5, max_batched_tokens=64, kv_cache_memory=16 << 20))
    assert eng.decode_graph_bound is None  # (CPU)
    assert eng.capture_decode_graphs() == [5, 4, 3, 2, 1]
    assert eng.capture_decode_graphs([8, 3, 3, 1]) == [3, 1]  # sizes past max_num_seqs cannot occur
    s = eng.stats()
    assert (s.running, s.waiting, s.kv_sequences, s.prompt_tokens, s.generation_tokens) == (0, 0, 0, 0, 0)
    assert s.kv_pages_free == s.kv_pages_total and s.requests_finished == {} and eng.step_times == []
