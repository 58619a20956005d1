"""The artifact's tokenizer: ``tokenizer.json`` through the ``tokenizers`` library (no transformers)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

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

    @property
    def eos_token_id(self) -> int | None:
        """The id of ``tokenizer_config.json``'s ``eos_token``, None where it names none."""
        eos = self.config.get("eos_token")
        if isinstance(eos, dict):  # older configs store an AddedToken as a dict
            eos = eos.get("content")
        return self._tok.token_to_id(eos) if isinstance(eos, str) else None
