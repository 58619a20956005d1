"""The artifact's tokenizer: ``tokenizer.json`` through the ``tokenizers`` library (no transformers)."""

from __future__ import annotations

import json
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

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)
