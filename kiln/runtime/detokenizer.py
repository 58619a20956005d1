"""Incremental detokenization: one choice's tokens in, text out as soon as it is final.

Two holds stand between a token and the text a client sees:

1. A character still being spelt. Byte-level BPE and byte-fallback tokens can end inside a multi-byte
   UTF-8 character; the tokenizer renders such a tail as U+FFFD. Text ending in U+FFFD is held until the
   character completes (a later token makes the tail valid) or is shown to be invalid (a later token
   follows it and the replacement stays put).
2. A possible stop string. Text whose end could still grow into one of the stop strings is held until it
   cannot; once a stop string appears (it may span several tokens) the text is cut right before it,
   ``stopped`` turns True and nothing more is ever released.

Each step decodes one window: a few tokens of left context, then the tokens whose text is not all out yet.
It holds at most ``_MAX_WINDOW`` + ``_MAX_PENDING`` tokens, so a step costs the same however long the
output. The left context matters: a byte-level BPE's spaces and a SentencePiece ``▁`` depend on the token
before. The window starts with the prompt's last tokens, so the text is what the output adds after the
prompt; for byte-level tokenizers (the demo model's) that is exactly ``tokenizer.decode(output_ids)``, for
SentencePiece-style ones the first token keeps the leading space that ``decode(output_ids)`` alone would
strip (vLLM does the same). A window never starts inside a character (byte-fallback decoders render a
run of byte tokens as a whole); a prompt that ends inside one gives no context.

Byte-level BPE tokenizers (``Tokenizer.token_bytes``) take a faster road with the same result: each token
is a fixed byte string, so a step appends the token's bytes to an incremental UTF-8 decoder, which holds
an unfinished character's bytes (at most three) and renders invalid ones as U+FFFD, as ``decode`` does.
No tokenizer call, no window: a few microseconds per token, which is what a 128-sequence step needs.

``flush`` renders a tail still incomplete at the end as the tokenizer renders it (U+FFFD), so the text
equals ``decode``'s. Only output that is not valid UTF-8 can stream otherwise: a tail still incomplete
after ``_MAX_PENDING`` tokens (no valid character takes that many) is released as U+FFFD to keep the
window bounded, and a byte-fallback decoder may turn released characters into U+FFFD when invalid bytes
follow them.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from .tokenizer import Tokenizer

REPLACEMENT = "\ufffd"
_CONTEXT = 4  # tokens of left context kept when the window slides
_MAX_WINDOW = 12  # the window slides back to _CONTEXT tokens once longer than this (and final)
_MAX_PENDING = 8  # tokens a non-final tail may span before it is released as U+FFFD


class IncrementalDetokenizer:
    """Turns one choice's generated tokens into streamed text (the module docstring has the rules)."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], stop: Sequence[str] = (),
                 skip_special_tokens: bool = True):
        assert all(stop), "stop strings are non-empty"
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._stop = tuple(stop)
        self._stop_firsts = frozenset(s[0] for s in self._stop)
        self._max_stop_len = max((len(s) for s in self._stop), default=0)
        self._held = ""  # decoded text held back because it could begin a stop string
        self._pieces: list[str] = []
        self.stopped = False
        self._bytes = tokenizer.token_bytes(skip_special_tokens)
        if self._bytes is not None:
            self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
            return
        context, text = self._tail([int(t) for t in prompt_ids[max(0, len(prompt_ids) - _CONTEXT):]])
        if text.endswith(REPLACEMENT):
            context, text = [], ""  # the prompt ends inside a character: the output is decoded on its own
        self._window = context  # token ids: left context, then tokens whose text is not all final
        self._done_len = len(text)  # chars of decode(_window) that are context or already released
        self._pending = 0  # tokens appended since the window's text last ended final

    @property
    def text(self) -> str:
        """All text released so far."""
        return "".join(self._pieces)

    def step(self, token_id: int) -> str:
        """Add one generated token; return the text it makes final ("" if none, and always once stopped)."""
        if self.stopped:
            return ""
        if self._bytes is not None:
            t = int(token_id)
            return self._release(self._utf8.decode(self._bytes[t] if 0 <= t < len(self._bytes) else b""), final=False)
        return self._advance(self._decode(self._push(token_id)))

    @staticmethod
    def step_batch(detoks: Sequence["IncrementalDetokenizer"], token_ids: Sequence[int]) -> list[str]:
        """``step`` for many choices at once: one ``decode_batch`` call per tokenizer and special-token setting
        instead of one decode per choice (the engine's per-step cost at large batches)."""
        out = [""] * len(detoks)
        groups: dict[tuple, list[int]] = {}
        for i, (d, t) in enumerate(zip(detoks, token_ids)):
            if d._bytes is not None:
                out[i] = d.step(t)
            elif not d.stopped:
                d._push(t)
                groups.setdefault((id(d._tokenizer), d._skip_special), []).append(i)
        for idx in groups.values():
            first = detoks[idx[0]]
            texts = first._tokenizer.decode_batch([detoks[i]._window for i in idx], first._skip_special)
            for i, text in zip(idx, texts):
                out[i] = detoks[i]._advance(text)
        return out

    def _push(self, token_id: int) -> list[int]:
        self._window.append(int(token_id))
        self._pending += 1
        return self._window

    def _advance(self, text: str) -> str:
        """The rest of a step, given the decoded window."""
        final_len = len(text.rstrip(REPLACEMENT))
        if final_len == len(text) or self._pending >= _MAX_PENDING:
            final_len = len(text)
            self._pending = 0
        new = text[self._done_len:final_len]
        self._done_len = max(self._done_len, final_len)
        if self._pending == 0 and len(self._window) > _MAX_WINDOW:
            self._window, text = self._tail(self._window)
            self._done_len = len(text)
        return self._release(new, final=False)

    def flush(self) -> str:
        """At the end (length, stop token, abort): release all held text, an incomplete tail as U+FFFD."""
        if self.stopped:
            return ""
        if self._bytes is not None:
            return self._release(self._utf8.decode(b"", final=True), final=True)
        text = self._decode(self._window)
        new = text[self._done_len:]
        self._done_len = len(text)
        self._pending = 0
        return self._release(new, final=True)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special) if ids else ""

    def _tail(self, ids: list[int]) -> tuple[list[int], str]:
        """The longest of ids' last _CONTEXT tokens whose text does not start inside a character, and its text.

        Byte-fallback decoders render a run of byte tokens as a whole, so a window must not start mid-run.
        """
        for start in range(max(0, len(ids) - _CONTEXT), len(ids)):
            text = self._decode(ids[start:])
            if not text.startswith(REPLACEMENT):
                return ids[start:], text
        return ids[-_CONTEXT:], self._decode(ids[-_CONTEXT:])  # only garbage bytes: take them as they render

    def _release(self, new: str, final: bool) -> str:
        """Pass decoded text through the stop-string hold; record and return what gets out."""
        if not self._stop:
            out = new
        else:
            buf = self._held + new  # no stop string starts before buf: its possible starts were held
            cut = min((i for i in (buf.find(s) for s in self._stop) if i >= 0), default=-1)
            if cut >= 0:
                out, self._held, self.stopped = buf[:cut], "", True
            else:
                keep = 0 if final else self._stop_prefix_len(buf)
                out, self._held = buf[:len(buf) - keep], buf[len(buf) - keep:]
        if out:
            self._pieces.append(out)
        return out

    def _stop_prefix_len(self, buf: str) -> int:
        """The length of the longest end of buf that is the start of a stop string (the part to hold)."""
        for i in range(max(0, len(buf) - self._max_stop_len + 1), len(buf)):
            if buf[i] in self._stop_firsts and any(s.startswith(buf[i:]) for s in self._stop):
                return len(buf) - i
        return 0
