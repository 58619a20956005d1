"""kiln.runtime.grammar: response formats driven to completion by a seeded "random model" whose logits are
masked by apply_grammar_masks, checked by independent parsers (json + jsonschema, re, a Python recogniser);
masks against a NumPy unpacking of a single matcher's bitmask and brute-force accept/reject; bad inputs."""

from __future__ import annotations

import json
import re
import time

import jsonschema
import numpy as np
import pytest
import torch
import xgrammar as xgr

from conftest import DEMO_MODEL, VOCAB, save_tokenizer
from kiln.errors import ArtifactError, RequestError
from kiln.runtime.grammar import (MAX_FORMAT_BYTES, GrammarCompiler, GrammarState, ResponseFormat,
                                  apply_grammar_masks)
from kiln.runtime.tokenizer import Tokenizer

DEMO_VOCAB = 4096
SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"type": "string", "enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": -5, "maximum": 120},
        "ok": {"type": "boolean"},
        "name": {"type": "string", "maxLength": 8},
    },
    "required": ["color", "count", "ok", "name"],
}
# A regular language spelled in EBNF, with an independent Python regex for the same set of strings.
SQL_EBNF = r'''
root ::= "SELECT " cols " FROM " table (" WHERE " cond)? ";"
cols ::= col (", " col){0,3}
col ::= "id" | "name" | "age"
table ::= "users" | "orders"
cond ::= col (" = " | " < ") [0-9]{1,4}
'''
SQL_RE = r"SELECT (id|name|age)(, (id|name|age)){0,3} FROM (users|orders)( WHERE (id|name|age)( = | < )[0-9]{1,4})?;"
# A context-free one: balanced brackets (a recursive rule), checked by a counter.
DYCK_EBNF = 'root ::= pair\npair ::= "(" pair{0,2} ")" | "[" pair{0,2} "]"'


def is_dyck(text: str) -> bool:
    stack = []
    for ch in text:
        if ch in "([":
            stack.append(")" if ch == "(" else "]")
        elif not stack or stack.pop() != ch:
            return False
    return not stack and bool(text)


@pytest.fixture(scope="module")
def demo():
    tokenizer = Tokenizer(DEMO_MODEL)
    eos = tokenizer.token_to_id("</s>")
    return GrammarCompiler(DEMO_MODEL, DEMO_VOCAB, [eos]), tokenizer, eos


@pytest.fixture(scope="module")
def words(tmp_path_factory):
    d = tmp_path_factory.mktemp("words")
    save_tokenizer(d)
    tokenizer = Tokenizer(d)
    eos = tokenizer.token_to_id("</s>")
    return GrammarCompiler(d, VOCAB, [eos]), tokenizer, eos


def closing_tokens(compiler: GrammarCompiler) -> torch.Tensor:
    """[V] 1.0 for tokens that close a string/object/array/group, else 0.0."""
    closing = torch.zeros(compiler.vocab_size)
    for i, text in enumerate(compiler.tokenizer_info.decoded_vocab):
        if any(c in text for c in b'"}])'):
            closing[i] = 1.0
    return closing


def random_model(compiler: GrammarCompiler, compiled, *, num_rows: int, seed: int, max_steps: int = 300,
                 closing: torch.Tensor | None = None) -> list[tuple[list[int], GrammarState]]:
    """Decode ``num_rows`` choices in one batch from seeded random logits, masked by the grammar, greedily.
    Returns each row's tokens (ending with the stop token if it finished) and its state.

    ``closing`` tokens get a logit bonus growing from 0 to 2 over 100 steps: a model that gets keen to finish,
    else a random walk through an unbounded grammar (any JSON object, nested brackets) need not end."""
    gen = torch.Generator().manual_seed(seed)
    states = [GrammarState(compiled) for _ in range(num_rows)]
    tokens: list[list[int]] = [[] for _ in range(num_rows)]
    for step in range(max_steps):
        active = [s if not s.terminated else None for s in states]
        if not any(active):
            break
        logits = torch.randn(num_rows, compiler.vocab_size, generator=gen)  # [b, V]
        if closing is not None:
            logits += min(2.0, step / 50) * closing
        apply_grammar_masks(logits, active)
        for row, state in enumerate(active):
            if state is not None:
                tok = int(torch.argmax(logits[row]))
                assert state.accept(tok), f"the grammar rejected token {tok} it had allowed"
                tokens[row].append(tok)
    return list(zip(tokens, states))


def finished_texts(runs, tokenizer, eos) -> list[str]:
    texts = []
    for ids, state in runs:
        assert state.terminated, f"no stop token after {len(ids)} steps: {tokenizer.decode(ids)!r}"
        assert ids[-1] == eos and eos not in ids[:-1]
        texts.append(tokenizer.decode(ids[:-1]))
    return texts


# ---- generation under each format -------------------------------------------------------------------------


def test_demo_vocab_is_byte_level(demo):
    """xgrammar sees the demo's byte-level BPE tokens as the bytes the tokenizer decodes them to."""
    compiler, tokenizer, _ = demo
    info = compiler.tokenizer_info
    assert info.vocab_type == xgr.VocabType.BYTE_LEVEL
    assert compiler.vocab_matches_decoder
    decoded = info.decoded_vocab
    for i in range(6, DEMO_VOCAB, 7):
        text = tokenizer.decode([i], skip_special_tokens=False)
        if "\ufffd" not in text:  # a lone byte of a multi-byte character decodes to U+FFFD alone
            assert decoded[i] == text.encode(), i
    # special tokens (<s>, <|user|>, ...) are never text a grammar can produce; the eos is the stop token
    assert set(info.special_token_ids) == {0, 2, 3, 4, 5} and list(info.stop_token_ids) == [1]


def test_json_schema_demo(demo):
    compiler, tokenizer, eos = demo
    compiled = compiler.compile(ResponseFormat.from_openai(
        {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}))
    runs = random_model(compiler, compiled, num_rows=4, seed=0)
    for text in finished_texts(runs, tokenizer, eos):
        value = json.loads(text)  # strict: no raw control characters in strings
        jsonschema.validate(value, SCHEMA)
        assert len(value["name"]) <= 8


def test_json_object_demo(demo):
    compiler, tokenizer, eos = demo
    compiled = compiler.compile(ResponseFormat.from_openai({"type": "json_object"}))
    runs = random_model(compiler, compiled, num_rows=8, seed=1, closing=closing_tokens(compiler))
    values = [json.loads(text) for text in finished_texts(runs, tokenizer, eos)]
    assert all(isinstance(v, dict) for v in values) and any(values)  # some are not just {}


def test_regex_demo(demo):
    compiler, tokenizer, eos = demo
    pattern = "[0-9]{3}-[a-z]{2,4}"
    compiled = compiler.compile(ResponseFormat.from_openai({"type": "regex", "regex": pattern}))
    runs = random_model(compiler, compiled, num_rows=6, seed=2)
    for text in finished_texts(runs, tokenizer, eos):
        assert re.fullmatch(pattern, text), text


@pytest.mark.parametrize("grammar, member", [(SQL_EBNF, lambda t: re.fullmatch(SQL_RE, t)), (DYCK_EBNF, is_dyck)],
                         ids=["regular", "recursive"])
def test_ebnf_demo(demo, grammar, member):
    compiler, tokenizer, eos = demo
    compiled = compiler.compile(ResponseFormat.from_openai({"type": "ebnf", "ebnf": grammar}))
    runs = random_model(compiler, compiled, num_rows=8, seed=3, closing=closing_tokens(compiler))
    texts = finished_texts(runs, tokenizer, eos)
    assert all(member(text) for text in texts), texts
    assert max(map(len, texts)) > 4


def test_regex_word_level(words):
    """The word-level test tokenizer: a RAW vocabulary ("w3".."w319") whose decoder joins words with spaces,
    so the grammar constrains the concatenated token texts, and the decoded text is those words spaced."""
    compiler, tokenizer, eos = words
    assert compiler.tokenizer_info.vocab_type == xgr.VocabType.RAW
    assert not compiler.vocab_matches_decoder
    word = "w(1[0-9]|2[0-9])"
    compiled = compiler.compile(ResponseFormat("regex", pattern=f"{word}({word}){{2,5}}"))
    runs = random_model(compiler, compiled, num_rows=4, seed=4)
    for text, (ids, _) in zip(finished_texts(runs, tokenizer, eos), runs):
        assert re.fullmatch(f"{word}( {word}){{2,5}}", text), text
        assert len(ids) - 1 == len(text.split())


def test_dead_end_may_only_stop(words):
    """After "w12" the regex needs an "x" no word-level token spells: the row may only produce the stop token."""
    compiler, _, eos = words
    state = GrammarState(compiler.compile(ResponseFormat("regex", pattern="w1[0-9]x")))
    assert state.accept(compiler.tokenizer_info.decoded_vocab.index(b"w12"))
    logits = torch.zeros(2, VOCAB)
    apply_grammar_masks(logits, [None, state])
    assert torch.equal(torch.isfinite(logits[1]).nonzero().flatten(), torch.tensor([eos]))
    assert torch.equal(logits[0], torch.zeros(VOCAB))


def test_unproducible_grammar(words):
    """No word-level token can start a JSON object: refused at compile time, not an all -inf row later."""
    compiler, _, _ = words
    with pytest.raises(RequestError, match="cannot be produced with this model's vocabulary"):
        compiler.compile(ResponseFormat("json_object"))


# ---- response_format parsing, compile errors, caching ---------------------------------------------------


def test_from_openai():
    assert ResponseFormat.from_openai({"type": "text"}) == ResponseFormat()
    assert ResponseFormat.from_openai({"type": "json_object"}) == ResponseFormat("json_object")
    fmt = ResponseFormat.from_openai({"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}})
    assert fmt == ResponseFormat("json_schema", schema=SCHEMA)
    assert ResponseFormat.from_openai({"type": "json_schema", "json_schema": {"schema": True}}).schema is True
    assert ResponseFormat.from_openai({"type": "regex", "regex": "a+"}) == ResponseFormat("regex", pattern="a+")
    assert ResponseFormat.from_openai({"type": "ebnf", "ebnf": 'root ::= "a"'}).grammar == 'root ::= "a"'


@pytest.mark.parametrize("obj, message", [
    ("json", "must be an object"),
    ({"type": "xml"}, "type must be one of"),
    ({}, "type must be one of"),
    ({"type": "json_object", "schema": {}}, "unknown field"),
    ({"type": "json_schema"}, "needs a 'json_schema' field"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "needs a 'schema' field"),
    ({"type": "json_schema", "json_schema": "{}"}, "json_schema must be an object"),
    ({"type": "json_schema", "json_schema": {"schema": [1]}}, "schema must be a JSON object"),
    ({"type": "json_schema", "json_schema": {"schema": "{}"}}, "schema must be a JSON object"),
    ({"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}}, "strict a boolean"),
    ({"type": "json_schema", "json_schema": {"schema": {}, "extra": 1}}, "unknown field"),
    ({"type": "regex"}, "needs a 'regex' field"),
    ({"type": "regex", "regex": 5}, "regex must be a string"),
    ({"type": "ebnf", "ebnf": None}, "ebnf must be a string"),
    ({"type": "json_schema", "json_schema": {"schema": {"description": "x" * MAX_FORMAT_BYTES}}}, "larger than"),
])
def test_from_openai_rejects(obj, message):
    with pytest.raises(RequestError, match=message):
        ResponseFormat.from_openai(obj)


@pytest.mark.parametrize("fmt, message", [
    (ResponseFormat("json_schema", schema={"type": 5}), "JSON schema is invalid: Type should be a string"),
    (ResponseFormat("json_schema", schema={"$ref": "#/nope"}), "JSON schema is invalid: Cannot find field '?nope"),  # xgrammar 0.2.9 quotes it
    (ResponseFormat("json_schema", schema={"type": "string", "minLength": 5, "maxLength": 2}), "invalid"),
    (ResponseFormat("json_schema", schema=False), "cannot accept any value"),
    (ResponseFormat("regex", pattern="("), "regex is invalid: .*parenthesis is not closed"),
    (ResponseFormat("regex", pattern="(?<=a)b"), "regex is invalid: .*Lookbehind"),
    (ResponseFormat("ebnf", grammar="root ::= foo"), 'EBNF grammar is invalid: .*Rule "foo" is not defined'),
    (ResponseFormat("ebnf", grammar='start ::= "a"'), 'EBNF grammar is invalid: .*root rule'),
    (ResponseFormat("ebnf", grammar='root ::= "a" |'), "EBNF grammar is invalid"),
])
def test_compile_rejects(demo, fmt, message):
    with pytest.raises(RequestError, match=message) as info:
        demo[0].compile(fmt)
    assert "\n" not in str(info.value) and ".cc:" not in str(info.value)  # one line, no C++ location


def test_compile_caches(demo):
    compiler = demo[0]
    assert compiler.compile(ResponseFormat()) is None
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert compiler.compile(ResponseFormat("json_schema", schema=schema)) is compiler.compile(
        ResponseFormat("json_schema", schema=json.loads(json.dumps(schema))))
    regex = ResponseFormat("regex", pattern="a+")
    assert compiler.compile(regex) is compiler.compile(ResponseFormat("regex", pattern="a+"))


def test_length_bound_rewrite_keeps_language(demo):
    """The maxLength workaround (xgrammar#800): control characters refused; length counted in characters."""
    compiled = demo[0].compile(ResponseFormat("json_schema", schema={"type": "string", "minLength": 2, "maxLength": 3}))
    for body, ok in [("ab", True), ("abc", True), ("a", False), ("abcd", False), ("é€𝄞", True), ("a\x19", False),
                     ("a\tb", False)]:
        m = xgr.GrammarMatcher(compiled)
        assert (m.accept_string(json.dumps(body, ensure_ascii=False)) and m.is_completed()) == ok, body


def test_compiler_needs_tokenizer_and_stop_token(tmp_path, demo):
    with pytest.raises(ArtifactError, match="tokenizer.json"):
        GrammarCompiler(tmp_path, 100, [1])
    with pytest.raises(ArtifactError, match="stop token"):
        GrammarCompiler(DEMO_MODEL, DEMO_VOCAB, [])


# ---- masks ---------------------------------------------------------------------------------------------


def unpack(bitmask_row: torch.Tensor, vocab: int) -> np.ndarray:
    """[ceil(V/32)] int32 -> [V] bool: bit j of word w allows token 32 * w + j."""
    words = bitmask_row.numpy().astype("<i4")
    return np.unpackbits(words.view(np.uint8), bitorder="little")[:vocab].astype(bool)


def test_masks_match_single_matcher(demo):
    compiler, _, eos = demo
    schema = compiler.compile(ResponseFormat("json_schema", schema=SCHEMA))
    regex = compiler.compile(ResponseFormat("regex", pattern="[0-9]{3}-[a-z]{2,4}"))
    states = [GrammarState(schema), None, GrammarState(schema), GrammarState(regex), None, GrammarState(regex)]
    assert states[0].matcher.accept_string('{"color": "gr')
    assert states[2].matcher.accept_string('{"color": "red", "count": 1')
    assert states[5].matcher.accept_string("123-ab")
    done = GrammarState(regex)
    assert done.matcher.accept_string("123-ab") and done.accept(eos) and done.terminated
    states.append(done)

    logits = torch.randn(len(states), DEMO_VOCAB, generator=torch.Generator().manual_seed(0))  # [b, V]
    before = logits.clone()
    apply_grammar_masks(logits, states)
    rng = np.random.default_rng(0)
    for row, state in enumerate(states):
        if state is None:
            assert torch.equal(logits[row], before[row])
            continue
        if state.terminated:
            allowed = np.zeros(DEMO_VOCAB, bool)
            allowed[eos] = True
        else:
            ref = xgr.allocate_token_bitmask(1, DEMO_VOCAB)
            state.matcher.fill_next_token_bitmask(ref)
            allowed = unpack(ref[0], DEMO_VOCAB)
            assert 0 < allowed.sum() < DEMO_VOCAB  # a real constraint, not all or nothing
            # brute force on a sample: allowed tokens are accepted by a fork, masked ones rejected
            for tok in np.concatenate([rng.choice(np.flatnonzero(allowed), min(40, allowed.sum()), replace=False),
                                       rng.choice(np.flatnonzero(~allowed), 40, replace=False)]):
                assert state.matcher.fork().accept_token(int(tok)) == allowed[tok], (row, tok)
        expected = np.where(allowed, before[row].numpy(), -np.inf)
        np.testing.assert_array_equal(logits[row].numpy(), expected)


def test_regex_mask_against_python_reference(demo):
    """The whole mask for a regex, recomputed in pure Python: a token is allowed iff the text so far plus its
    bytes is still a prefix of some string of [0-9]{3}-[a-z]{2,4}; the stop token iff the text is complete."""
    compiler, _, eos = demo
    regex = compiler.compile(ResponseFormat("regex", pattern="[0-9]{3}-[a-z]{2,4}"))
    vocab_bytes = compiler.tokenizer_info.decoded_vocab
    for prefix in ["", "12", "123", "123-", "123-ab", "123-abcd"]:
        state = GrammarState(regex)
        assert state.matcher.accept_string(prefix)
        viable = re.compile(rb"[0-9]{0,3}|[0-9]{3}-[a-z]{0,4}")  # every prefix of the language
        expected = np.array([bool(b) and viable.fullmatch(prefix.encode() + b) is not None for b in vocab_bytes])
        expected[eos] = re.fullmatch("[0-9]{3}-[a-z]{2,4}", prefix) is not None
        logits = torch.zeros(1, DEMO_VOCAB)
        apply_grammar_masks(logits, [state])
        np.testing.assert_array_equal(torch.isfinite(logits[0]).numpy(), expected, err_msg=prefix)


def test_masks_leave_unconstrained_batches_alone():
    logits = torch.randn(3, 50)
    before = logits.clone()
    apply_grammar_masks(logits, [None, None, None])
    assert torch.equal(logits, before)


def test_padded_vocab(demo):
    """A logits width past the tokenizer's vocabulary: the padding ids are never allowed."""
    _, _, eos = demo
    compiler = GrammarCompiler(DEMO_MODEL, DEMO_VOCAB + 64, [eos])
    state = GrammarState(compiler.compile(ResponseFormat("json_object")))
    logits = torch.zeros(1, DEMO_VOCAB + 64)
    apply_grammar_masks(logits, [state])
    assert torch.isinf(logits[0, DEMO_VOCAB:]).all() and torch.isfinite(logits[0]).any()
    assert not state.accept(DEMO_VOCAB + 3) and not state.accept(-1)


def test_mask_cost(demo):
    """Per-step cost of fill + apply for 32 constrained rows at V=4096 (printed; no assertion on time)."""
    compiler, _, _ = demo
    compiled = compiler.compile(ResponseFormat("json_schema", schema=SCHEMA))
    gen = torch.Generator().manual_seed(5)
    states = [GrammarState(compiled) for _ in range(32)]
    logits = torch.empty(32, DEMO_VOCAB)
    timings = {}
    for name, rows in [("32 rows", states), ("1 row", states[:1] + [None] * 31), ("unconstrained", [None] * 32)]:
        elapsed, steps = 0.0, 0
        for _ in range(40):
            live = [s if s is not None and not s.terminated else None for s in rows]
            logits.normal_(generator=gen)
            start = time.perf_counter()
            apply_grammar_masks(logits, live)
            elapsed += time.perf_counter() - start
            steps += 1
            for row, s in enumerate(live):
                if s is not None:
                    assert s.accept(int(torch.argmax(logits[row])))
        timings[name] = elapsed / steps * 1e6
    print("apply_grammar_masks per step (us): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
