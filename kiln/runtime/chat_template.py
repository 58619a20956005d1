"""Chat templates: OpenAI-style messages -> the prompt text a chat model was trained on, and its token ids.

The template is the artifact's own (``chat_template`` in tokenizer_config.json, or chat_template.jinja),
rendered the way Hugging Face transformers renders it so that a model sees the same prompt under kiln:
a sandboxed, immutable jinja2 environment (a template cannot reach Python internals or mutate its
inputs), ``trim_blocks``/``lstrip_blocks``, the ``raise_exception`` helper, a ``tojson`` filter that
keeps non-ASCII text, ``strftime_now``, and the tokenizer's special tokens (``bos_token``, ...) as
variables. The template decides every special token of the prompt; ``encode_chat`` therefore drops the
ones the tokenizer itself would add on top (a second BOS).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import RequestError
from .tokenizer import Tokenizer

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def template_source(tokenizer: Tokenizer) -> str | None:
    """The default chat template, or None. (tokenizer_config.json may hold a list of named templates.)"""
    t = tokenizer.chat_template
    if isinstance(t, list):
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default")
    return t if isinstance(t, str) and t else None


def special_tokens(tokenizer: Tokenizer) -> dict[str, str]:
    """``bos_token`` etc. as strings (tokenizer_config.json stores each as a string or as {"content": ...})."""
    out = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = tokenizer.config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        out[name] = value if isinstance(value, str) else ""
    return out


def render_chat(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Render ``messages`` ([{"role": ..., "content": ...}, ...]) with the artifact's chat template.

    Raises RequestError when the artifact has no template or the template refuses the messages
    (a template's own ``raise_exception("...")``, e.g. roles that do not alternate)."""
    source = template_source(tokenizer)
    if source is None:
        raise RequestError("this model has no chat template (tokenizer_config.json has no 'chat_template'); "
                           "use /v1/completions with a plain prompt")
    try:
        template = _compile(source)
    except jinja2.exceptions.TemplateError as e:
        raise RequestError(f"this model's chat template does not parse: {e}") from None
    try:
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               **special_tokens(tokenizer))
    except Exception as e:  # the template is arbitrary code over the request's data; any failure is the request's
        raise RequestError(f"the chat template cannot render these messages: {e}") from None


def encode_chat(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of a rendered chat, as transformers' ``apply_chat_template(tokenize=True)`` makes them:
    the template placed the special tokens it wants, so the ones the tokenizer adds to any text
    (what it makes of the empty string, e.g. [bos]) are removed from the front, or else the back."""
    ids = tokenizer.encode(text)
    added = tokenizer.encode("")
    if added and len(ids) > len(added):
        if ids[:len(added)] == added:
            return ids[len(added):]
        if ids[-len(added):] == added:
            return ids[:-len(added)]
    return ids
