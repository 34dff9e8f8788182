"""Chat templates render as transformers' `apply_chat_template` renders them: the same text and the same ids, for
Llama-3-, Gemma- and ChatML-style templates, from tokenizer_config.json (a string or named templates) or a
chat_template.jinja file; a template's refusal and the sandbox are typed errors."""
from __future__ import annotations

import json

import pytest
import transformers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from djinn.chat_template import ChatTemplateError
from djinn.models.tokenizer import load_tokenizer

LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}"
          "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
          "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
          "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
         "{{ raise_exception('System role not supported') }}{% endif %}"
         "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
         "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
         "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}"
         "{% set role = message['role'] %}{% endif %}"
         "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# tojson (no HTML escaping), strftime_now and the other special tokens reach the template
EXTRAS = ("{{ bos_token }}{{ messages | tojson }}{{ pad_token }}{{ strftime_now('%Y') | length }}"
          "{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}")

SPECIALS = ["<s>", "</s>", "<pad>", "<bos>", "<eos>", "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>",
            "<|end_header_id|>", "<start_of_turn>", "<end_of_turn>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["Hello there, how are you? I am fine. What is a class? A class is a blueprint <b>&amp;</b>."] * 20
CONVERSATION = [{"role": "user", "content": "Hello there!"}, {"role": "assistant", "content": "  I am fine. "},
                {"role": "user", "content": "What is a <b>class</b>?"}]

STYLES = {
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>", CONVERSATION),
    "gemma": (GEMMA, "<bos>", "<eos>", CONVERSATION),
    "chatml": (CHATML, None, "<|im_end|>", [{"role": "system", "content": "Be brief."}, *CONVERSATION]),
    "extras": (EXTRAS, "<s>", "</s>", CONVERSATION),
}


def _tokenizer_json(path) -> None:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path / "tokenizer.json"))


def write_folder(path, template, bos, eos, *, as_file=False, named=False) -> None:
    _tokenizer_json(path)
    cfg = {"eos_token": eos, "pad_token": "<pad>", "tokenizer_class": "PreTrainedTokenizerFast",
           "add_bos_token": False}
    if bos is not None:
        cfg["bos_token"] = bos
    if as_file:
        (path / "chat_template.jinja").write_text(template)
    elif named:
        cfg["chat_template"] = [{"name": "tool_use", "template": "{{ raise_exception('not this one') }}"},
                                {"name": "default", "template": template}]
    else:
        cfg["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("style", list(STYLES))
@pytest.mark.parametrize("where", ["config", "named", "file"])
def test_rendering_equals_transformers(tmp_path, style, where):
    template, bos, eos, messages = STYLES[style]
    write_folder(tmp_path, template, bos, eos, as_file=where == "file", named=where == "named")
    ours = load_tokenizer(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    text = ours.chat_template.render(messages, add_generation_prompt=True)
    assert text == theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    want = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ours.encode(text) == list(want)
    if bos is not None:  # the template's BOS is the only one: once, first
        assert ours.encode(text)[0] == ours.bos_id and ours.encode(text).count(ours.bos_id) == 1


def test_refusals_and_the_sandbox_are_typed_errors(tmp_path):
    write_folder(tmp_path, GEMMA, "<bos>", "<eos>")
    template = load_tokenizer(tmp_path).chat_template
    with pytest.raises(ChatTemplateError, match="System role not supported"):
        template.render([{"role": "system", "content": "x"}, {"role": "user", "content": "y"}])
    with pytest.raises(ChatTemplateError, match="alternate"):
        template.render([{"role": "user", "content": "x"}, {"role": "user", "content": "y"}])
    escape = type(template)("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ChatTemplateError):
        escape.render(CONVERSATION)
    with pytest.raises(ChatTemplateError, match="does not compile"):
        type(template)("{% for %}").render(CONVERSATION)


def test_a_folder_without_a_template_has_none(tmp_path):
    _tokenizer_json(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert load_tokenizer(tmp_path).chat_template is None
