"""The artifact's tokenizer: ``tokenizer.json`` through the ``tokenizers`` library (no transformers)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

from ..byte_level import CHAR_BYTES
from ..errors import ArtifactError


class Tokenizer:
    def __init__(self, directory: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        directory = Path(directory)
        try:
            self._tok = HFTokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as e:
            raise ArtifactError(f"{directory / 'tokenizer.json'} cannot be loaded ({e})") from None
        cfg_path = directory / "tokenizer_config.json"
        self.config = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        template = directory / "chat_template.jinja"
        self.chat_template = self.config.get("chat_template") or (template.read_text() if template.exists() else None)
        self._token_bytes: dict[bool, list[bytes] | None] = {}

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, id_lists: list[list[int]], skip_special_tokens: bool = True) -> list[str]:
        """``decode`` of several id lists in one call (the serving engine's detokenization of a whole batch)."""
        return self._tok.decode_batch(id_lists, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry (e.g. ``"Ġdef"`` in a byte-level BPE), None for an id outside the vocabulary."""
        return self._tok.id_to_token(token_id)

    def decode_token(self, token_id: int) -> str:
        """One token's text, as shown beside a logprob: special tokens included, a partial character as U+FFFD."""
        return self._tok.decode([token_id], skip_special_tokens=False)

    @cached_property
    def special_token_ids(self) -> frozenset[int]:
        """The ids of special tokens (``<s>``, ``<|end|>``, ...): the ones ``skip_special_tokens`` leaves out."""
        return frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)

    def token_bytes(self, skip_special_tokens: bool = True) -> list[bytes] | None:
        """Each token's bytes, where ``decode(ids)`` is exactly the UTF-8 (lossy) decoding of the
        concatenated bytes: a byte-level BPE (``ByteLevel`` decoder) — GPT-2, Llama 3, Qwen, the demo model.
        None for any other tokenizer (SentencePiece ``▁`` handling, byte-fallback runs, cleanup), whose
        text depends on the neighbouring tokens. Skipped special tokens have no bytes. Checked against
        ``decode`` token by token when built; any disagreement turns the table off."""
        key = bool(skip_special_tokens)
        if key not in self._token_bytes:
            self._token_bytes[key] = self._build_token_bytes(key)
        return self._token_bytes[key]

    def _build_token_bytes(self, skip: bool) -> list[bytes] | None:
        decoder = json.loads(self._tok.to_str()).get("decoder") or {}
        if decoder.get("type") != "ByteLevel":
            return None
        special = self.special_token_ids
        table = []
        for i in range(self.vocab_size):
            piece = self._tok.id_to_token(i)
            if piece is None or (skip and i in special):
                table.append(b"")
            elif all(c in CHAR_BYTES for c in piece):
                table.append(bytes(CHAR_BYTES[c] for c in piece))
            else:  # an added token spelt outside the byte alphabet decodes as its own text
                table.append(piece.encode())
        ids = [[i] for i in range(self.vocab_size)]
        if [t.decode(errors="replace") for t in table] != self._tok.decode_batch(ids, skip_special_tokens=skip):
            return None
        return table

    @property
    def eos_token_id(self) -> int | None:
        """The id of ``tokenizer_config.json``'s ``eos_token``, None where it names none."""
        eos = self.config.get("eos_token")
        if isinstance(eos, dict):  # older configs store an AddedToken as a dict
            eos = eos.get("content")
        return self._tok.token_to_id(eos) if isinstance(eos, str) else None
