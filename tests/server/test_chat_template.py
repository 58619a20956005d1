"""Chat templates render and tokenize exactly as transformers' ``apply_chat_template`` does, refuse what
they should with RequestError, and cannot reach Python internals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kiln.errors import RequestError
from kiln.runtime.chat_template import encode_chat, render_chat
from kiln.runtime.tokenizer import Tokenizer

DEMO = Path(__file__).resolve().parents[2] / "models" / "kiln-demo"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi — ça va?"},
            {"role": "assistant", "content": "Yes."}, {"role": "user", "content": "Open a file."}]

# a Llama-2-style template: BOS in the template, roles must alternate, raise_exception otherwise
LLAMA2_TEMPLATE = (
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + message['content'] | trim + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}{% endfor %}")


def with_config(tmp_path: Path, **changes) -> Path:
    """A copy of the demo tokenizer with tokenizer_config.json entries changed (None removes one)."""
    d = tmp_path / "tok"
    d.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO / name, d / name)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.update(changes)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def with_bos_post_processor(d: Path) -> Path:
    """Make the tokenizer add <s> to every text, as Llama tokenizers do."""
    tok = json.loads((d / "tokenizer.json").read_text())
    tok["post_processor"] = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                                                      {"Sequence": {"id": "A", "type_id": 0}}],
                             "pair": [{"Sequence": {"id": "A", "type_id": 0}}],
                             "special_tokens": {"<s>": {"id": "<s>", "ids": [0], "tokens": ["<s>"]}}}
    (d / "tokenizer.json").write_text(json.dumps(tok))
    return d


def hf_tokenizer(d: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(d)


def hf_ids(hf, messages, **kwargs) -> list[int]:
    out = hf.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)  # a BatchEncoding in recent transformers


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_demo_template_matches_transformers(add_generation_prompt):
    tok, hf = Tokenizer(DEMO), hf_tokenizer(DEMO)
    text = render_chat(tok, MESSAGES, add_generation_prompt)
    assert text == hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert text.endswith("<|assistant|>\n") == add_generation_prompt
    assert encode_chat(tok, text) == hf_ids(hf, MESSAGES, add_generation_prompt=add_generation_prompt)


def test_bos_in_template_and_tokenizer_gives_one_bos(tmp_path):
    d = with_bos_post_processor(with_config(tmp_path, chat_template=LLAMA2_TEMPLATE))
    tok, hf = Tokenizer(d), hf_tokenizer(d)
    chat = MESSAGES[1:]
    text = render_chat(tok, chat)
    assert text.startswith("<s>[INST] Hi") and text.count("<s>") == 2 and "</s>" in text
    assert tok.encode(text)[:2] == [0, 0]  # the tokenizer alone would double the first BOS
    ids = encode_chat(tok, text)
    assert ids[0] == 0 and ids[1] != 0
    assert ids == hf_ids(hf, chat)


def test_template_can_refuse_the_messages(tmp_path):
    tok = Tokenizer(with_config(tmp_path, chat_template=LLAMA2_TEMPLATE))
    with pytest.raises(RequestError, match="roles must alternate"):
        render_chat(tok, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_no_template(tmp_path):
    tok = Tokenizer(with_config(tmp_path, chat_template=None))
    with pytest.raises(RequestError, match="no chat template"):
        render_chat(tok, MESSAGES)


def test_template_that_does_not_parse(tmp_path):
    tok = Tokenizer(with_config(tmp_path, chat_template="{% for m in messages %}"))
    with pytest.raises(RequestError, match="does not parse"):
        render_chat(tok, MESSAGES)


@pytest.mark.parametrize("template", [
    "{{ messages.__class__.__mro__ }}",
    "{% set _ = messages.append({'role': 'user', 'content': 'x'}) %}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
])
def test_template_is_sandboxed(tmp_path, template):
    tok = Tokenizer(with_config(tmp_path, chat_template=template))
    with pytest.raises(RequestError, match="unsafe"):
        render_chat(tok, MESSAGES)


def test_named_templates_and_helpers(tmp_path):
    template = ("{{ bos_token }}{% for m in messages %}{{ m | tojson }}{% endfor %}"
                "{{ strftime_now('%Y') | length }}")
    tok = Tokenizer(with_config(tmp_path, chat_template=[{"name": "tool_use", "template": "x"},
                                                         {"name": "default", "template": template}]))
    text = render_chat(tok, MESSAGES[1:2])
    assert text == '<s>{"role": "user", "content": "Hi — ça va?"}4'  # tojson keeps non-ASCII text
