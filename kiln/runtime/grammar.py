"""Structured output: a request's ``response_format`` compiled to an xgrammar grammar over the model's
vocabulary, one matcher per generated choice, and the per-step logit mask.

Life of a constrained choice: ``ResponseFormat.from_openai(body["response_format"])`` ->
``GrammarCompiler.compile(fmt)`` (once per model; cached) -> ``GrammarState(compiled)`` per choice ->
each decode step ``apply_grammar_masks(logits, states)`` before sampling, then ``state.accept(token)``
after it; the choice finishes when the sampled token is a stop token (``state.terminated``).

Only the artifact's tokenizer files are read (no model weights). Never imports ``tvm``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import xgrammar as xgr
from xgrammar import CompiledGrammar

from ..errors import ArtifactError, RequestError

__all__ = ["CompiledGrammar", "GrammarCompiler", "GrammarState", "ResponseFormat", "apply_grammar_masks"]

log = logging.getLogger(__name__)

FORMAT_TYPES = ("text", "json_object", "json_schema", "regex", "ebnf")
MAX_FORMAT_BYTES = 64 * 1024  # a schema/regex/grammar larger than this is refused, not compiled
MAX_JSON_WHITESPACE = 16  # longest whitespace run between JSON tokens (room for "\n" + deep indentation)
CACHE_LIMIT_BYTES = 256 * 1024 * 1024  # compiled grammars kept per model
MAX_REWRITTEN_LENGTH = 512  # see _length_bounds_as_patterns: its regex compiles in O(bound^2)


@dataclass(frozen=True)
class ResponseFormat:
    """What a choice's text must be. Exactly the field its ``type`` needs is set."""

    type: str = "text"  # "text" | "json_object" | "json_schema" | "regex" | "ebnf"
    schema: dict | bool | None = field(default=None, hash=False)  # json_schema: a JSON Schema
    pattern: str | None = None  # regex
    grammar: str | None = None  # ebnf, GBNF-style with root rule "root"

    def __post_init__(self):
        if self.type not in FORMAT_TYPES:
            raise RequestError(f"response_format type must be one of {', '.join(FORMAT_TYPES)}; got {self.type!r}")
        needed = {"json_schema": "schema", "regex": "pattern", "ebnf": "grammar"}.get(self.type)
        for name in ("schema", "pattern", "grammar"):
            value = getattr(self, name)
            if name != needed and value is not None:
                raise RequestError(f"response_format type {self.type!r} takes no {name}")
        if self.type == "json_schema":
            if not isinstance(self.schema, (dict, bool)):
                raise RequestError("response_format json_schema.schema must be a JSON object (or true/false), "
                                   f"got {_json_type(self.schema)}")
        elif needed is not None and not isinstance(getattr(self, needed), str):
            raise RequestError(f"response_format {self.type} must be a string, got {_json_type(getattr(self, needed))}")
        if needed is not None and len(self.source.encode()) > MAX_FORMAT_BYTES:
            raise RequestError(f"response_format {needed} is larger than {MAX_FORMAT_BYTES // 1024} KiB")

    @classmethod
    def from_openai(cls, obj) -> ResponseFormat:
        """Parse an OpenAI ``response_format``: ``{"type": "text"}``, ``{"type": "json_object"}``,
        ``{"type": "json_schema", "json_schema": {"name": .., "schema": {..}, "strict": ..}}``, and kiln's
        extensions ``{"type": "regex", "regex": ".."}`` and ``{"type": "ebnf", "ebnf": ".."}``."""
        if not isinstance(obj, dict):
            raise RequestError(f"response_format must be an object, got {_json_type(obj)}")
        kind = obj.get("type")
        if kind not in FORMAT_TYPES:
            raise RequestError(f"response_format.type must be one of {', '.join(FORMAT_TYPES)}; got {kind!r}")
        payload_key = {"json_schema": "json_schema", "regex": "regex", "ebnf": "ebnf"}.get(kind)
        _no_unknown_keys(obj, {"type", payload_key} - {None}, "response_format")
        if payload_key is not None and payload_key not in obj:
            raise RequestError(f"response_format of type {kind!r} needs a {payload_key!r} field")
        if kind == "regex":
            return cls("regex", pattern=obj["regex"])
        if kind == "ebnf":
            return cls("ebnf", grammar=obj["ebnf"])
        if kind != "json_schema":
            return cls(kind)
        spec = obj["json_schema"]
        if not isinstance(spec, dict):
            raise RequestError(f"response_format.json_schema must be an object, got {_json_type(spec)}")
        _no_unknown_keys(spec, {"name", "description", "schema", "strict"}, "response_format.json_schema")
        if "schema" not in spec:
            raise RequestError("response_format.json_schema needs a 'schema' field (the JSON Schema to follow)")
        if not isinstance(spec.get("name", ""), str) or not isinstance(spec.get("strict", False), (bool, type(None))):
            raise RequestError("response_format.json_schema.name must be a string and .strict a boolean")
        return cls("json_schema", schema=spec["schema"])

    @property
    def source(self) -> str:
        """The grammar's text: the schema as JSON (key order kept: it is the order fields are generated in),
        the regex, or the EBNF; "" for text and json_object."""
        if self.type == "json_schema":
            try:
                return json.dumps(self.schema, ensure_ascii=False, allow_nan=False)
            except (TypeError, ValueError) as e:
                raise RequestError(f"response_format json_schema.schema is not valid JSON ({e})") from None
        return self.pattern or self.grammar or ""


class GrammarCompiler:
    """Compiles ``ResponseFormat``s for one model. Thread-safe; compiled grammars are cached (LRU by size).

    ``vocab_size`` is the model's logits width (may exceed the tokenizer's vocabulary; the extra ids are
    never allowed). ``stop_token_ids`` end a choice; a grammar allows them once its text is complete.
    """

    def __init__(self, tokenizer_dir: str | Path, vocab_size: int, stop_token_ids: Sequence[int],
                 *, max_threads: int | None = None):
        if not stop_token_ids:
            raise ArtifactError("structured output needs at least one stop token id (the model's eos)")
        self.tokenizer_info, self.vocab_matches_decoder = _tokenizer_info(Path(tokenizer_dir), vocab_size,
                                                                          list(stop_token_ids))
        threads = max_threads or min(8, os.cpu_count() or 1)
        self._compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=threads, cache_enabled=False)
        self._cache: OrderedDict[tuple[str, str], CompiledGrammar] = OrderedDict()
        self._cache_bytes = 0
        self._lock = threading.Lock()

    @property
    def vocab_size(self) -> int:
        return self.tokenizer_info.vocab_size

    def compile(self, fmt: ResponseFormat) -> CompiledGrammar | None:
        """The grammar for ``fmt``; None for "text" (unconstrained). RequestError if ``fmt`` does not compile."""
        if fmt.type == "text":
            return None
        key = (fmt.type, fmt.source)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        compiled = self._compile(fmt)
        with self._lock:
            if key not in self._cache:
                self._cache[key] = compiled
                self._cache_bytes += compiled.memory_size_bytes
                while self._cache_bytes > CACHE_LIMIT_BYTES and len(self._cache) > 1:
                    self._cache_bytes -= self._cache.popitem(last=False)[1].memory_size_bytes
            return self._cache[key]

    def _compile(self, fmt: ResponseFormat) -> CompiledGrammar:
        what = {"json_object": "JSON object grammar", "json_schema": "JSON schema", "regex": "regex",
                "ebnf": "EBNF grammar"}[fmt.type]
        try:
            if fmt.type == "json_object":
                compiled = self._compiler.compile_json_schema('{"type": "object"}', strict_mode=False,
                                                              any_whitespace=True,
                                                              max_whitespace_cnt=MAX_JSON_WHITESPACE)
            elif fmt.type == "json_schema":
                schema = json.dumps(_length_bounds_as_patterns(fmt.schema), ensure_ascii=False)
                compiled = self._compiler.compile_json_schema(schema, any_whitespace=True,
                                                              max_whitespace_cnt=MAX_JSON_WHITESPACE)
            elif fmt.type == "regex":
                compiled = self._compiler.compile_regex(fmt.pattern)
            else:
                compiled = self._compiler.compile_grammar(fmt.grammar, root_rule_name="root")
        except Exception as e:  # xgrammar reports every bad input as RuntimeError/ValueError from C++
            raise RequestError(f"response_format {what} is invalid: {_xgrammar_message(e)}") from None
        if not _first_mask(compiled).any():
            raise RequestError(f"response_format {what} cannot be produced with this model's vocabulary")
        return compiled


class GrammarState:
    """One choice's position in its grammar (an xgrammar matcher)."""

    def __init__(self, compiled: CompiledGrammar):
        self.matcher = xgr.GrammarMatcher(compiled)
        self.vocab_size = compiled.tokenizer_info.vocab_size
        self.stop_token_ids = tuple(compiled.tokenizer_info.stop_token_ids)

    def accept(self, token_id: int) -> bool:
        """Advance by ``token_id``; False (and no change) if the grammar does not allow it here."""
        if not 0 <= token_id < self.vocab_size or self.terminated:
            return False
        return self.matcher.accept_token(token_id)

    @property
    def terminated(self) -> bool:
        """The grammar has accepted a stop token: the choice is finished."""
        return self.matcher.is_terminated()

    def allows_stop(self) -> bool:
        """The text so far is a complete sentence of the grammar (a stop token would be accepted)."""
        return self.matcher.is_completed()


def apply_grammar_masks(logits: torch.Tensor, states: Sequence[GrammarState | None]) -> None:
    """Set the logits of tokens each row's grammar forbids to -inf, in place. Rows whose state is None are
    untouched; a terminated row may only produce a stop token. Costs nothing when no row is constrained.

    One bitmask buffer per thread (grown on demand) is reused across calls; several constrained rows are
    filled by one ``BatchGrammarMatcher`` call. A row whose grammar reached a dead end (a vocabulary that
    cannot spell any continuation) may only stop, rather than leave the sampler an all -inf row; its
    ``accept`` of that stop token returns False, and the engine ends the choice on the stop token as usual.
    """
    rows = [i for i, s in enumerate(states) if s is not None]
    if not rows:
        return
    # logits: [b, V] float32 on the CPU
    assert logits.dim() == 2 and logits.shape[0] == len(states), (logits.shape, len(states))
    assert logits.device.type == "cpu" and logits.dtype == torch.float32, (logits.device, logits.dtype)
    vocab = logits.shape[1]
    assert all(states[i].vocab_size == vocab for i in rows), "grammar compiled for another vocab size"
    bitmask = _MASKS.get(logits.shape[0], vocab)  # [>= b, ceil(V / 32)] int32, rows past b unused
    live = [i for i in rows if not states[i].terminated]
    if len(live) == 1:
        states[live[0]].matcher.fill_next_token_bitmask(bitmask, live[0])
    elif live:
        _MASKS.batch_matcher().batch_fill_next_token_bitmask([states[i].matcher for i in live], bitmask, live)
    stuck = sorted(set(rows) - set(live))
    if live:
        # numpy, not torch: indexing a tensor by a Python list took ~8 ms here
        dead = [i for i, ok in zip(live, bitmask.numpy()[live].any(axis=1)) if not ok]
        if dead:
            log.warning("a grammar reached a dead end for this vocabulary; ending its choice")
            stuck += dead
    for i in stuck:
        _set_only(bitmask[i], states[i].stop_token_ids)
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab, indices=rows)


class _MaskBuffer(threading.local):
    """The reused bitmask and batch matcher behind ``apply_grammar_masks``, one set per thread."""

    def __init__(self):
        self._bitmask: torch.Tensor | None = None  # [rows, ceil(V / 32)] int32
        self._batch: xgr.BatchGrammarMatcher | None = None

    def get(self, num_rows: int, vocab_size: int) -> torch.Tensor:
        old = self._bitmask
        if old is None or old.shape[0] < num_rows or old.shape[1] != xgr.get_bitmask_shape(1, vocab_size)[1]:
            self._bitmask = xgr.allocate_token_bitmask(max(num_rows, 0 if old is None else old.shape[0]), vocab_size)
        return self._bitmask

    def batch_matcher(self) -> xgr.BatchGrammarMatcher:
        if self._batch is None:
            # "auto" = half the hardware threads; measured on 2 shared cores, 2 threads were 4x slower than 1
            self._batch = xgr.BatchGrammarMatcher(max_threads="auto")
        return self._batch


_MASKS = _MaskBuffer()


def _set_only(row: torch.Tensor, token_ids: Sequence[int]) -> None:
    """Make a bitmask row allow exactly ``token_ids``."""
    words = [0] * row.shape[0]
    for t in token_ids:
        words[t // 32] |= 1 << (t % 32)
    row.copy_(torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32))


_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})  # their values are JSON data, not schemas


def _length_bounds_as_patterns(node):
    r"""A copy of a JSON schema where ``{"type": "string", "minLength": m, "maxLength": n}`` (no pattern or
    format) becomes ``{"type": "string", "pattern": "^[\s\S]{m,n}$"}``.

    Why: xgrammar 0.2.8 lowers length-bounded strings to ``[^"\\\r\n]{m,n}``, which admits raw control
    characters (U+0000-U+001F: invalid JSON, rejected by ``json.loads``); mlc-ai/xgrammar#800. Its
    ``pattern`` route counts the same characters but excludes control characters. Bounds above
    MAX_REWRITTEN_LENGTH keep the native route: the regex compiles in time quadratic in the bound.
    """
    if isinstance(node, list):
        return [_length_bounds_as_patterns(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: v if k in _DATA_KEYWORDS else _length_bounds_as_patterns(v) for k, v in node.items()}
    lo, hi = out.get("minLength", 0), out.get("maxLength")
    if (out.get("type") == "string" and ("minLength" in out or "maxLength" in out)
            and not {"pattern", "format"} & out.keys()
            and all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= MAX_REWRITTEN_LENGTH
                    for b in (lo, 0 if hi is None else hi))):
        out.pop("minLength", None)
        out.pop("maxLength", None)
        out["pattern"] = f"^[\\s\\S]{{{lo},{'' if hi is None else hi}}}$"
    return out


def _first_mask(compiled: CompiledGrammar) -> torch.Tensor:
    """The allowed-token mask at the start of the grammar: [ceil(V / 32)] int32."""
    bitmask = xgr.allocate_token_bitmask(1, compiled.tokenizer_info.vocab_size)
    xgr.GrammarMatcher(compiled).fill_next_token_bitmask(bitmask)
    return bitmask[0]


def _tokenizer_info(directory: Path, vocab_size: int, stop_token_ids: list[int]) -> tuple[xgr.TokenizerInfo, bool]:
    """xgrammar's view of the vocabulary: each id's text as bytes, special tokens (``<s>``, ``<|user|>``..)
    blanked so no grammar can emit them, ids past the tokenizer's vocabulary blanked likewise.

    Also says whether decoding a token sequence equals concatenating the tokens' texts (true for byte-level
    BPE, byte-fallback SentencePiece and raw vocabularies; false for e.g. WordPiece, which inserts spaces):
    only then does the decoded text follow the grammar exactly.
    """
    from transformers import PreTrainedTokenizerFast

    path = directory / "tokenizer.json"
    try:
        tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
    except Exception as e:
        raise ArtifactError(f"{path} cannot be loaded for structured output ({e})") from None
    # from_huggingface detects how tokens map to bytes (byte-level, byte-fallback or raw) ...
    detected = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
    # ... but treats added special tokens as text; rebuild with those ids blanked ("" = never allowed).
    special = {i for i, t in tok.added_tokens_decoder.items() if t.special}
    encoded = [""] * vocab_size
    for text, i in tok.get_vocab().items():
        if i < vocab_size and i not in special:
            encoded[i] = text
    info = xgr.TokenizerInfo(encoded, vocab_type=detected.vocab_type, vocab_size=vocab_size,
                             stop_token_ids=stop_token_ids, add_prefix_space=detected.add_prefix_space)
    matches = _decoder_concatenates(tok, info)
    if not matches:
        log.warning("%s: decoding tokens is not concatenating their texts; structured output may differ from "
                    "the grammar in whitespace", path)
    return info, matches


def _decoder_concatenates(tok, info: xgr.TokenizerInfo) -> bool:
    """Spot-check that decode([a, b]) == text(a) + text(b) on ASCII tokens (cheap: 24 pairs)."""
    decoded = info.decoded_vocab
    ascii_ids = [i for i, b in enumerate(decoded) if b and b.isascii() and b.strip() == b]
    ascii_ids = ascii_ids[:: max(1, len(ascii_ids) // 48)][:48]  # spread over the vocabulary
    pairs = list(zip(ascii_ids[0::2], ascii_ids[1::2]))
    return all(tok.decode([a, b]) == (decoded[a] + decoded[b]).decode() for a, b in pairs)


def _xgrammar_message(e: Exception) -> str:
    """xgrammar's C++ message without its "[time] file.cc:line:" prefix and check noise, on one line."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    text = re.sub(r"^\[[\d:.]+\]\s+\S+:\d+:\s*", "", text)
    text = re.sub(r"^Check failed: .*? is false:\s*", "", text)
    return text if len(text) <= 300 else text[:297] + "..."


def _no_unknown_keys(obj: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise RequestError(f"{where} has unknown field(s) {', '.join(map(repr, unknown))}; "
                           f"allowed: {', '.join(sorted(allowed))}")


def _json_type(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)
