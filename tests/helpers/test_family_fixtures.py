"""The published chat templates render, their markers tokenize whole, and every tiny architecture runs and reloads."""

import os
import re

import pytest
import torch
from jinja2.exceptions import TemplateError
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers.families import ARCHITECTURES, FAMILIES, TEMPLATE_DIR, family_tokenizer, save_family_lm

# Strings that look like a tokenizer's special marker: <|...|>, <｜...｜>, [UPPER], and the bare <word> markers.
MARKER = re.compile(r"<\|[^<>|\s]+\|>|<｜[^<>｜\s]+｜>|\[/?[A-Z_]+\]"
                    r"|</?(?:s|bos|eos|pad|unk|image|think|start_of_turn|end_of_turn|start_of_image|tool_call)>")


def conversation(family, turns: int, system: bool, end_with_user: bool = False) -> list[dict]:
    """[system?] user (assistant user)* assistant; content as a string or (llava-hf) as typed parts with an image."""
    def content(text, image=False):
        if not family.content_parts:
            return text
        return ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]

    messages = [{"role": "system", "content": content("Answer briefly.")}] if system else []
    messages.append({"role": "user", "content": content("What colour is it?", image=True)})
    for i in range(turns - 1):
        messages.append({"role": "assistant", "content": content(f"It is red, shade {i}.")})
        messages.append({"role": "user", "content": content(f"And the border {i}?")})
    if not end_with_user:
        messages.append({"role": "assistant", "content": content("Blue.")})
    return messages


def render(name: str, **kwargs) -> str:
    family = FAMILIES[name]
    generation = kwargs.pop("end_with_user", False)
    return family_tokenizer(name).apply_chat_template(conversation(family, end_with_user=generation, **kwargs),
                                                      tokenize=False, add_generation_prompt=generation)


def test_every_template_file_has_a_family():
    files = {f for f in os.listdir(TEMPLATE_DIR) if f.endswith(".jinja")}
    assert files == {f.template_file for f in FAMILIES.values()}


@pytest.mark.parametrize("name", sorted(FAMILIES))
@pytest.mark.parametrize("turns", [1, 3])
def test_template_renders(name, turns):
    family = FAMILIES[name]
    for system in (True, False) if family.supports_system else (False,):
        text = render(name, turns=turns, system=system)
        assert "Blue." in text and "What colour is it?" in text
        assert text.count("And the border") == turns - 1
        if system and name not in ("mistral_v0_3", "mistral_nemo"):  # those put the system into the LAST user turn
            assert "Answer briefly." in text
        prompt = render(name, turns=turns, system=system, end_with_user=True)
        assert "Blue." not in prompt
        if system:
            assert "Answer briefly." in prompt


@pytest.mark.parametrize("name", sorted(n for n, f in FAMILIES.items() if not f.supports_system))
def test_template_raises_on_system(name):
    with pytest.raises(TemplateError):
        render(name, turns=1, system=True)


def test_llama3_date_renders_offline():
    """3.1 falls back to a fixed date; 3.2 calls transformers' strftime_now; both take date_string."""
    assert "Today Date: 26 Jul 2024" in render("llama3_1", turns=1, system=False)
    assert re.search(r"Today Date: \d\d \w\w\w \d{4}\n", render("llama3_2", turns=1, system=False))
    tokenizer = family_tokenizer("llama3_2")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, date_string="1 Jan 2030")
    assert "Today Date: 1 Jan 2030" in text


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_special_markers_tokenize_whole(name):
    """Every marker the template renders is a declared special token (or declared plain text) and is one id."""
    family = FAMILIES[name]
    tokenizer = family_tokenizer(name)
    text = render(name, turns=3, system=family.supports_system) + render(name, turns=2, system=False,
                                                                         end_with_user=True)
    undeclared = set(MARKER.findall(text)) - set(family.special_tokens) - set(family.text_markers)
    assert not undeclared, f"rendered markers missing from {name}'s special_tokens: {sorted(undeclared)}"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    for token in family.special_tokens:
        token_id = tokenizer.convert_tokens_to_ids(token)
        assert token_id is not None and token_id != tokenizer.unk_token_id or token == tokenizer.unk_token
        assert ids.count(token_id) == text.count(token), f"{token!r} split or merged in {name}"
    for attr in ("bos_token", "eos_token", "pad_token"):
        assert getattr(tokenizer, attr) == getattr(family, attr)


@pytest.fixture(scope="module")
def tokenizer():
    return family_tokenizer("llama3_1")


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_architecture_forward(architecture, tokenizer):
    config = ARCHITECTURES[architecture](tokenizer)
    assert config.vocab_size == len(tokenizer)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    ids = torch.tensor([tokenizer("<|begin_of_text|>Hello there, tiny model.")["input_ids"]])
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_save_family_lm_reloads(name, tmp_path):
    family = FAMILIES[name]
    path = save_family_lm(name, str(tmp_path / name))
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == ARCHITECTURES[family.architecture](tokenizer).model_type
    assert tokenizer.chat_template == family.template
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (family.bos_token, family.eos_token,
                                                                               family.pad_token)
    text = tokenizer.apply_chat_template(conversation(family, turns=1, system=False), tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == family_tokenizer(name)(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits
    assert logits.shape[-1] == len(tokenizer)


def test_save_family_lm_architecture_override(tmp_path):
    path = save_family_lm("qwen3", str(tmp_path / "qwen3_as_gpt2"), architecture="gpt2")
    assert AutoModelForCausalLM.from_pretrained(path).config.model_type == "gpt2"
    assert AutoTokenizer.from_pretrained(path).chat_template == FAMILIES["qwen3"].template
