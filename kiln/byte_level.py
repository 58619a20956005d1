"""The byte-level BPE alphabet (GPT-2, Llama 3, Qwen, the demo model, kiln's placeholder tokenizer):
the printable character each byte is written as in the vocabulary. No kiln imports: the frontend
(placeholder tokenizer), the runtime (token bytes) and the server (logprob bytes) all read it."""

from __future__ import annotations


def _byte_chars() -> tuple[str, ...]:
    # printable Latin-1 bytes (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand for themselves; the other 68
    # take the code points from 256 up, in byte order (so the space 0x20 is ``Ġ`` U+0120)
    keep = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    out, extra = [], 256
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(extra))
            extra += 1
    return tuple(out)


BYTE_CHARS: tuple[str, ...] = _byte_chars()  # BYTE_CHARS[b]: the character byte b is written as
CHAR_BYTES: dict[str, int] = {c: b for b, c in enumerate(BYTE_CHARS)}  # the inverse
