"""kiln.runtime.detokenizer: streamed text equals ``tokenizer.decode`` of the output (cut at a stop string),
never shows half a character or a pending stop string, and costs the same per step however long the output.

Tokenizers: the bundled demo model's byte-level BPE — through its byte table (the fast path) and, with the
table turned off, through the decode window every other tokenizer takes — and a tiny SentencePiece-style BPE with byte fallback
built here (its decoder renders a run of byte tokens as a whole and strips the first leading space).
"""

from __future__ import annotations

import string
import time

import numpy as np
import pytest

from conftest import DEMO_MODEL
from kiln.runtime.detokenizer import IncrementalDetokenizer
from kiln.runtime.tokenizer import Tokenizer

FFFD = "\ufffd"
TEXTS = [
    "héllo 世界 🎉 def foo(x):\n    return x",
    "naïve café — résumé, Ünïcödé; ñ ç ø å ß",
    "日本語のテキストと中文字符 한국어 текст на русском",
    "emoji 👩‍👩‍👧‍👦 🇫🇷 🎉🎉 and math ∑ ∫ √ ≠ ≤ 𝔘𝔫𝔦",
    "import os\nfor i in range(10):\n    print(f'{i}: ok')  # done\n",
]


class WindowOnly(Tokenizer):
    """The demo tokenizer with its byte table turned off: the detokenizer's general path."""

    def token_bytes(self, skip_special_tokens=True):
        return None


@pytest.fixture(scope="module", params=["bytes", "window"])
def demo(request) -> Tokenizer:
    tok = (Tokenizer if request.param == "bytes" else WindowOnly)(DEMO_MODEL)
    assert (tok.token_bytes() is not None) == (request.param == "bytes")
    return tok


@pytest.fixture(scope="module")
def demo_window() -> Tokenizer:
    return WindowOnly(DEMO_MODEL)


@pytest.fixture(scope="module")
def spm(tmp_path_factory) -> Tokenizer:
    """A SentencePiece-style BPE: "▁" for spaces, byte-fallback tokens <0x00>..<0xFF> for anything else."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for c in ["▁", *string.ascii_letters, *string.digits, *".,:;!?'()="]:
        vocab.setdefault(c, len(vocab))
    merges = []
    for a, b in [("▁", "h"), ("e", "l"), ("el", "l"), ("ell", "o"), ("▁h", "ello"), ("▁", "w"), ("o", "r"),
                 ("▁w", "or"), ("▁wor", "l"), ("▁worl", "d"), ("▁", "t"), ("▁t", "e"), ("▁te", "x")]:
        merges.append((a, b))
        vocab.setdefault(a + b, len(vocab))
    tok = HFTokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    path = tmp_path_factory.mktemp("spm")
    tok.save(str(path / "tokenizer.json"))
    return Tokenizer(path)


def stream(tok: Tokenizer, prompt, out, stop=(), skip_special_tokens=True) -> tuple[list[str], str, IncrementalDetokenizer]:
    """Every step's piece, the flushed rest, and the detokenizer."""
    d = IncrementalDetokenizer(tok, prompt, stop, skip_special_tokens)
    pieces = [d.step(t) for t in out]
    return pieces, d.flush(), d


def test_multibyte_text_streams_whole_characters(demo):
    prompt = demo.encode("# a comment\n")
    for text in TEXTS:
        ids = demo.encode(text)
        assert demo.decode(ids) == text
        pieces, rest, d = stream(demo, prompt, ids)
        assert all(FFFD not in p for p in pieces), pieces
        assert "".join(pieces) == text and rest == "" and d.text == text and not d.stopped
        if not text.isascii():
            assert "" in pieces  # a character of several byte tokens was held, then came out whole


def test_matches_the_tokenizers_streaming_decoder(demo):
    """An independent check: the tokenizers library's own DecodeStream gives the same chunks' text."""
    from tokenizers.decoders import DecodeStream

    for text in TEXTS:
        ids = demo.encode(text)
        ds = DecodeStream(skip_special_tokens=True)
        theirs = [ds.step(demo._tok, t) or "" for t in ids]
        ours, _, _ = stream(demo, [], ids)
        assert "".join(ours) == "".join(theirs) == text


def random_sequences(tok: Tokenizer, num: int, seed: int):
    """Random outputs, three kinds: uniform over the vocabulary (garbage bytes, special tokens), slices of
    real text encodings glued together (characters cut at the seams), and whole encodings of real text."""
    rng = np.random.default_rng(seed)
    encodings = [tok.encode(t) for t in TEXTS]
    for i in range(num):
        kind = i % 3
        if kind == 0:
            out = rng.integers(0, tok.vocab_size, int(rng.integers(1, 60))).tolist()
        else:
            out = []
            for _ in range(int(rng.integers(1, 4))):
                enc = encodings[int(rng.integers(len(encodings)))]
                a = int(rng.integers(0, len(enc))) if kind == 1 else 0
                b = int(rng.integers(a + 1, len(enc) + 1)) if kind == 1 else len(enc)
                out += enc[a:b]
        prompt = [] if i % 5 == 0 else rng.integers(0, tok.vocab_size, int(rng.integers(1, 10))).tolist()
        if i % 7 == 1:
            prompt = tok.encode("x = 'ü'\n")
        yield kind, prompt, out


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_outputs_concatenate_to_decode(demo, skip_special_tokens):
    for kind, prompt, out in random_sequences(demo, 600, seed=int(skip_special_tokens)):
        pieces, rest, d = stream(demo, prompt, out, skip_special_tokens=skip_special_tokens)
        full = demo.decode(out, skip_special_tokens=skip_special_tokens)
        assert "".join(pieces) + rest == full == d.text, (prompt, out)
        # no piece ends inside a character: what is out so far is always final text
        for k in range(len(pieces)):
            assert full.startswith("".join(pieces[:k + 1])), (prompt, out, pieces)
        if isinstance(demo, WindowOnly):  # the window cannot tell a bad byte from a start: it holds both
            assert not any(p.endswith(FFFD) for p in pieces), (prompt, out, pieces)
        if kind == 2:
            assert FFFD not in full and rest == ""


def test_special_tokens(demo):
    end = demo.token_to_id("<|end|>")
    ids = demo.encode("hi") + [end] + demo.encode(" there")
    assert "".join(stream(demo, [], ids)[0]) == "hi there"
    assert "".join(stream(demo, [], ids, skip_special_tokens=False)[0]) == "hi<|end|> there"
    # a prompt ending in special tokens is fine context
    prompt = demo.encode("q") + [demo.token_to_id("<|assistant|>")]
    assert "".join(stream(demo, prompt, demo.encode("answer"))[0]) == "answer"


def test_prompt_ending_inside_a_character(demo):
    """A token-id prompt cut inside a character: the output is decoded on its own, like decode(output)."""
    emoji = demo.encode("🎉")
    assert len(emoji) == 4
    prompt, out = demo.encode("a ") + emoji[:2], emoji[2:] + demo.encode(" b")
    pieces, rest, _ = stream(demo, prompt, out)
    assert "".join(pieces) + rest == demo.decode(out)


# ---------------------------------------------------------------------------------------------------------
# Stop strings


def test_stop_string_spanning_tokens(demo):
    ids = demo.encode("def foo(x):\n    return x + 1\n")
    pieces, rest, d = stream(demo, [], ids, stop=["rn x +"])
    assert d.stopped and rest == ""
    assert "".join(pieces) == d.text == "def foo(x):\n    retu"
    # nothing after the stop is released
    assert d.step(ids[0]) == "" and d.flush() == "" and d.text == "def foo(x):\n    retu"


def test_stop_string_held_until_it_cannot_match(demo):
    ids = demo.encode("a STOX STO")
    pieces, rest, d = stream(demo, [], ids, stop=["STOP"])
    assert not d.stopped
    full = "".join(pieces)
    assert full == "a STOX " and rest == "STO"  # the final "STO" could still have become "STOP"
    assert d.text == "a STOX STO"
    # at every step, what is out never ends with a prefix of the stop string
    out = ""
    for p in pieces:
        out += p
        assert not any(out.endswith("STOP"[:k]) for k in range(1, 4))


def test_earliest_stop_string_wins(demo):
    ids = demo.encode("one two three four")
    _, _, d = stream(demo, [], ids, stop=["four", "hree", "o t"])
    assert d.stopped and d.text == "one tw"
    _, _, d = stream(demo, [], ids, stop=["one"])
    assert d.stopped and d.text == ""


def test_stop_string_with_multibyte_characters(demo):
    ids = demo.encode("héllo 世界 🎉 end")
    _, _, d = stream(demo, [], ids, stop=["界 🎉"])
    assert d.stopped and d.text == "héllo 世"
    _, _, d = stream(demo, [], ids, stop=["🎉"])
    assert d.stopped and d.text == "héllo 世界 "


def test_random_stop_strings(demo):
    """Stop strings cut from the output text at random (mostly spanning tokens): the stream is cut right before
    the first occurrence, `stopped` turns True at the first step whose text contains it, and nothing of the
    stop string is ever released."""
    rng = np.random.default_rng(0)
    checked = 0
    for kind, prompt, out in random_sequences(demo, 450, seed=7):
        full = demo.decode(out)
        if len(full) < 3:
            continue
        a = int(rng.integers(0, len(full) - 1))
        stop = full[a:a + int(rng.integers(1, 8))]
        if FFFD in stop or not stop:
            continue
        stops = [stop] + (["zzz\u2603", "Q" * 5] if checked % 2 else [])
        expected = full[:full.find(stop)]
        d = IncrementalDetokenizer(demo, prompt, stops)
        released, stopped_at = "", None
        for i, t in enumerate(out):
            released += d.step(t)
            assert expected.startswith(released)
            if d.stopped and stopped_at is None:
                stopped_at = i
        released += d.flush()
        assert released == d.text == expected and d.stopped
        assert stopped_at == min(i for i in range(len(out)) if stop in demo.decode(out[:i + 1]))
        checked += 1
    assert checked > 300


# ---------------------------------------------------------------------------------------------------------
# Cost per step


class CountingTokenizer:
    """Records how many token ids each decode call gets."""

    def __init__(self, tok: Tokenizer):
        self.tok, self.lengths = tok, []

    def token_bytes(self, skip_special_tokens=True):
        return None

    def decode(self, ids, skip_special_tokens=True):
        self.lengths.append(len(ids))
        return self.tok.decode(ids, skip_special_tokens)


def test_window_stays_bounded(demo_window):
    demo = demo_window
    rng = np.random.default_rng(0)
    text = " ".join(TEXTS) * 20
    ids = demo.encode(text)
    garbage = rng.integers(0, demo.vocab_size, 2000).tolist()
    for out in (ids, garbage, ids + garbage + ids):
        counting = CountingTokenizer(demo)
        d = IncrementalDetokenizer(counting, demo.encode("prompt " * 100), stop=["never appears"])
        for t in out:
            d.step(t)
        d.flush()
        assert max(counting.lengths) <= 21, max(counting.lengths)  # _MAX_WINDOW + _MAX_PENDING + 1
        assert len(counting.lengths) <= 1.5 * len(out) + 10  # about one decode per step
        assert d.text == demo.decode(out)


def test_long_invalid_tail_is_released(demo_window):
    """Lead bytes that never complete: after 8 tokens the tail goes out as U+FFFD (the window stays bounded)."""
    demo = demo_window
    lead = demo.token_to_id("ä")  # the byte 0xE4, which starts a 3-byte character
    d = IncrementalDetokenizer(demo, [])
    pieces = [d.step(lead) for _ in range(10)]
    assert pieces[:7] == [""] * 7 and pieces[7] == FFFD * 8
    assert "".join(pieces) + d.flush() == demo.decode([lead] * 10) == FFFD * 10


def test_benchmark_per_step_cost(demo):
    """Prints the per-step cost over a long output; asserts only that late steps are not much dearer."""
    ids = demo.encode(" ".join(TEXTS) * 60)
    assert len(ids) > 4000
    d = IncrementalDetokenizer(demo, demo.encode("x = 1\n"), stop=["\nimport sys", "STOP"])
    times = []
    for t in ids:
        t0 = time.perf_counter()
        d.step(t)
        times.append(time.perf_counter() - t0)
    early, late = np.median(times[:1000]) * 1e6, np.median(times[-1000:]) * 1e6
    print(f"\ndetokenizer: {len(ids)} steps, median {early:.1f} us/step (first 1000), {late:.1f} us/step (last 1000)")
    assert late < 3 * early + 20


# ---------------------------------------------------------------------------------------------------------
# A byte-fallback SentencePiece-style tokenizer


def test_byte_fallback_multibyte(spm):
    assert spm.token_bytes() is None  # its text depends on the neighbours: the window path
    for text in ["héllo 世界 🎉", "hello world", "naïve 日本 👩‍👩‍👧 ok"]:
        ids = spm.encode(text)
        assert spm.decode(ids) == text
        assert any(spm.id_to_token(t).startswith("<0x") for t in ids) or text == "hello world"
        pieces, rest, _ = stream(spm, [], ids)
        assert all(FFFD not in p for p in pieces)
        assert "".join(pieces) == text and rest == ""


def test_byte_fallback_left_context_keeps_the_space(spm):
    """After a prompt, the first output word keeps its space (the decoder strips it only at the start)."""
    prompt, out = spm.encode("hello"), spm.encode("world 世界")
    assert spm.decode(out) == "world 世界"  # on its own, the leading "▁" is stripped
    pieces, rest, _ = stream(spm, prompt, out)
    assert "".join(pieces) + rest == " world 世界" == spm.decode(prompt + out)[len(spm.decode(prompt)):]


def test_byte_fallback_random_valid_text(spm):
    rng = np.random.default_rng(1)
    words = ["hello", "world", "tex", "é", "世界", "🎉", "naïve", "a", "Zz", "日本", "👩‍👩‍👧", "ok!"]
    for i in range(300):
        text = " ".join(words[j] for j in rng.integers(0, len(words), int(rng.integers(1, 12))))
        prompt_text = " ".join(words[j] for j in rng.integers(0, len(words), int(rng.integers(0, 4))))
        prompt, out = spm.encode(prompt_text), spm.encode(text)
        pieces, rest, _ = stream(spm, prompt, out, stop=["qq"])
        want = spm.decode(prompt + out)[len(spm.decode(prompt)):] if prompt else spm.decode(out)
        assert "".join(pieces) + rest == want, (prompt_text, text)
        assert all(FFFD not in p for p in pieces) and rest == ""


# ---------------------------------------------------------------------------------------------------------
# Tokenizer helpers


def test_tokenizer_helpers(demo):
    assert demo.special_token_ids == frozenset(range(6))
    assert demo.eos_token_id == demo.token_to_id("</s>") == 1
    t = demo.encode(" return")[0]
    assert demo.id_to_token(t) == "Ġreturn" and demo.decode_token(t) == " return"
    assert demo.decode_token(demo.token_to_id("<|end|>")) == "<|end|>"
    assert demo.decode_token(demo.encode("🎉")[0]) == FFFD  # a partial character
    assert demo.id_to_token(10**6) is None


def test_token_bytes():
    """The byte table: a byte-level BPE's tokens as bytes (special ones empty when skipped), checked against
    decode; None for a tokenizer whose text depends on neighbouring tokens."""
    demo = Tokenizer(DEMO_MODEL)
    table, raw = demo.token_bytes(True), demo.token_bytes(False)
    assert len(table) == len(raw) == demo.vocab_size
    assert table[demo.token_to_id("<|end|>")] == b"" and raw[demo.token_to_id("<|end|>")] == b"<|end|>"
    assert table[demo.encode(" return")[0]] == b" return"
    ids = demo.encode("".join(TEXTS))
    assert b"".join(table[i] for i in ids).decode() == "".join(TEXTS)
    assert any(len(b) == 1 and b[0] >= 0x80 for b in table)  # lone bytes of multi-byte characters


def test_byte_path_bad_bytes_go_out_at_once():
    """A byte that can never start a character is final at once (the window path must wait a token)."""
    demo = Tokenizer(DEMO_MODEL)
    table = demo.token_bytes()
    bad = next(i for i, b in enumerate(table) if b == b"\xff")
    lead = next(i for i, b in enumerate(table) if b == b"\xe4")
    d = IncrementalDetokenizer(demo, [])
    assert d.step(bad) == FFFD and d.step(lead) == "" and d.step(lead) == FFFD
    assert d.flush() == FFFD and d.text == demo.decode([bad, lead, lead]) == FFFD * 3


def test_step_batch_equals_step(demo, spm):
    """The engine's batched path gives each choice exactly what its own step() would, across tokenizers,
    skip_special_tokens settings and stop strings, including choices that stop midway."""
    seqs = random_sequences(demo, 12, seed=5)
    cases = [(demo if i % 3 else spm, prompt, out, ("e", "\n") if i % 4 == 0 else (), i % 2 == 0)
             for i, (_, prompt, out) in enumerate(seqs)]
    cases = [(tok, [t % tok.vocab_size for t in prompt], [t % tok.vocab_size for t in out], stop, skip)
             for tok, prompt, out, stop, skip in cases]
    one = [IncrementalDetokenizer(tok, prompt, stop, skip) for tok, prompt, _, stop, skip in cases]
    many = [IncrementalDetokenizer(tok, prompt, stop, skip) for tok, prompt, _, stop, skip in cases]
    for k in range(max(len(c[2]) for c in cases)):
        live = [i for i, c in enumerate(cases) if k < len(c[2])]
        got = IncrementalDetokenizer.step_batch([many[i] for i in live], [cases[i][2][k] for i in live])
        assert got == [one[i].step(cases[i][2][k]) for i in live]
    assert [d.text + d.flush() for d in many] == [d.text + d.flush() for d in one]
    assert any(d.stopped for d in many)
