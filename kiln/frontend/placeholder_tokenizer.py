"""A placeholder tokenizer for a model compiled from its config.json alone (``kiln compile --config-only``).

Such a model has random weights, so its text is meaningless; it still needs a tokenizer that covers
every id the model can emit, so that the engine, the server and the benchmarks run unchanged. The
placeholder is a byte-level BPE with no merges, the kind Llama 3 and Qwen use (the engine takes the
same detokenization path as with the real one):

    the special ids of config.json     <|bos|>, <|eos|>, <|eos_1|>, ... at their own ids
    the next 256 ids                   the 256 bytes (any text encodes, one token per byte)
    every id left                      <|t{id}|>, reached only by sampling

A vocabulary under 256 + specials holds the first bytes only; text with other bytes loses them.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..byte_level import BYTE_CHARS
from ..ir.spec import ModelSpec

# The chat template of the placeholder: the messages' contents one after another.
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"


def placeholder_vocab(spec: ModelSpec) -> tuple[dict[str, int], dict[str, str]]:
    """(token -> id for all ``spec.vocab_size`` ids, {"bos_token"/"eos_token": token} of config.json's ids)."""
    V = spec.vocab_size
    special: dict[int, str] = {}
    named: dict[str, str] = {}
    if spec.bos_token_id is not None and 0 <= spec.bos_token_id < V:
        special[spec.bos_token_id] = named["bos_token"] = "<|bos|>"
    for k, i in enumerate(spec.eos_token_ids):
        if 0 <= i < V and i not in special:
            special[i] = "<|eos|>" if k == 0 else f"<|eos_{k}|>"
        if k == 0 and 0 <= i < V:
            named["eos_token"] = special[i]
    byte_chars = iter(BYTE_CHARS)
    vocab = {}
    for i in range(V):
        token = special.get(i) or next(byte_chars, None) or f"<|t{i}|>"
        vocab[token] = i
    assert len(vocab) == V
    return vocab, named


def write_placeholder_tokenizer(spec: ModelSpec, out_dir: Path) -> list[Path]:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` covering ``spec.vocab_size`` ids; return their paths."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab, named = placeholder_vocab(spec)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    specials = [t for t in vocab if t.startswith("<|") and not t.startswith("<|t")]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    assert tok.get_vocab_size() == spec.vocab_size
    out_dir = Path(out_dir)
    tok.save(str(out_dir / "tokenizer.json"), pretty=False)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": spec.context_len,
              "chat_template": CHAT_TEMPLATE, "kiln_placeholder": True, **named}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return [out_dir / "tokenizer.json", out_dir / "tokenizer_config.json"]
