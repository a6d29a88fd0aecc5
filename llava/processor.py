"""The `LlavaProcessor` of a model: tokenizer with the image token, the tower's image processor, the chat template,
and how many tokens one image becomes.

`patch_size`, `num_additional_image_tokens` and `vision_feature_select_strategy` are read off the vision tower so
that one `<image>` placeholder expands to exactly as many tokens as the projector emits. No weights are loaded here,
so data can be checked against a 7B model's processor in seconds.
"""

from __future__ import annotations

import json
import logging
import os

import torch
from PIL import Image
from transformers import (AddedToken, AutoConfig, AutoImageProcessor, AutoModel, AutoProcessor, AutoTokenizer,
                          LlavaProcessor, ProcessorMixin)

from llava.arguments import ModelArguments

logger = logging.getLogger(__name__)

# Label of every token the loss ignores (prompts, image tokens, padding): PyTorch's cross-entropy default.
IGNORE_INDEX = -100

# Prepended to the LM's own chat template so the processor also accepts transformers' structured content
# ([{"type": "image"}, {"type": "text", "text": ...}]), the form users serving the model elsewhere send: it is
# flattened to the LM's plain-string form, with each image written as the image token on its own line.
_STRUCTURED_CONTENT_PREAMBLE = (
    "{%- set _flat = namespace(messages=[]) -%}"
    "{%- for _m in messages -%}"
    "{%- if _m['content'] is string or _m['content'] is none -%}"
    "{%- set _flat.messages = _flat.messages + [_m] -%}"
    "{%- else -%}"
    "{%- set _text = namespace(value='') -%}"
    "{%- for _c in _m['content'] -%}"
    "{%- if _c['type'] == 'image' -%}{%- set _text.value = _text.value + '__IMAGE_TOKEN__\\n' -%}"
    "{%- elif _c['type'] == 'text' -%}{%- set _text.value = _text.value + _c['text'] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set _flat.messages = _flat.messages + [dict(_m, content=_text.value)] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = _flat.messages -%}"
)

# Stands in for an assistant answer when reading off which token the chat template ends a turn with.
_ANSWER_SENTINEL = "Sentinel answer 8472"




def tower_config(vision_path: str, trust_remote_code: bool = False):
    """The vision config of a vision-only checkpoint, or the vision part of a full CLIP/SigLIP one."""
    config = AutoConfig.from_pretrained(vision_path, trust_remote_code=trust_remote_code)
    return getattr(config, "vision_config", config)


def _extra_vision_tokens(vision_config) -> int:
    """Tokens the tower emits beside its patches (CLIP: 1 CLS, SigLIP: 0), read off a weightless copy."""
    with torch.device("meta"):
        tower = AutoModel.from_config(vision_config)
    for module in tower.modules():
        if hasattr(module, "num_positions") and hasattr(module, "num_patches"):
            return int(module.num_positions - module.num_patches)
    raise ValueError(f"Unsupported vision tower {type(tower).__name__}: expected CLIP/SigLIP-style patch embeddings "
                     "(num_patches, num_positions).")


def _read_chat_template(value: str) -> str:
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    return value


def multimodal_chat_template(lm_template: str, image_token: str) -> str:
    """The LM's chat template, also accepting structured (image/text) message content."""
    return _STRUCTURED_CONTENT_PREAMBLE.replace("__IMAGE_TOKEN__", image_token) + lm_template


def build_processor(args: ModelArguments) -> LlavaProcessor:
    """A `LlavaProcessor` for a new model: the LM's tokenizer (plus the image token), the tower's image processor.

    `patch_size`, `num_additional_image_tokens` and `vision_feature_select_strategy` are set so that one
    image token expands to exactly as many tokens as the projector emits; the chat template is the LM's own
    (or --chat_template). No weights are loaded.
    """
    tokenizer = AutoTokenizer.from_pretrained(args.language_model_name_or_path,
                                              trust_remote_code=args.trust_remote_code)
    if args.image_token not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(args.image_token, special=True, normalized=False)], special_tokens=True)
    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and loss, so reusing EOS is safe for training.
        tokenizer.pad_token = tokenizer.eos_token
    lm_template = _read_chat_template(args.chat_template) if args.chat_template else tokenizer.chat_template
    if not isinstance(lm_template, str) or not lm_template:
        raise ValueError(
            f"The tokenizer of {args.language_model_name_or_path} has no chat template (a base model?). "
            "Pass one with --chat_template (a Jinja string or a .jinja file), or use an instruct model."
        )
    vision_config = tower_config(args.vision_model_name_or_path, args.trust_remote_code)
    extra_tokens = _extra_vision_tokens(vision_config)
    strategy = args.vision_feature_select_strategy or ("default" if extra_tokens > 0 else "full")
    if strategy == "default" and extra_tokens == 0:
        logger.warning("vision_feature_select_strategy='default' drops the first token, but %s has no CLS token: "
                       "a real patch is dropped. Use --vision_feature_select_strategy full.",
                       args.vision_model_name_or_path)
    image_processor = AutoImageProcessor.from_pretrained(args.vision_model_name_or_path,
                                                         trust_remote_code=args.trust_remote_code)
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=vision_config.patch_size,
        vision_feature_select_strategy=strategy, num_additional_image_tokens=extra_tokens,
        image_token=args.image_token, chat_template=multimodal_chat_template(lm_template, args.image_token),
    )


def image_token_count(processor: ProcessorMixin) -> int:
    """How many tokens one image placeholder becomes, by asking the processor itself (fixed-size towers)."""
    size = processor.image_processor.crop_size or processor.image_processor.size
    height = size.get("height") or size.get("shortest_edge")
    width = size.get("width") or size.get("shortest_edge")
    encoded = processor(text=processor.image_token, images=[Image.new("RGB", (width, height))])
    return int(sum(1 for i in encoded["input_ids"][0] if i == processor.image_token_id))


def load_processor(args: ModelArguments) -> ProcessorMixin:
    """The processor of the checkpoint being continued, or a new one for an assembled model."""
    if args.assembles_new_model:
        return build_processor(args)
    return AutoProcessor.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)


# --------------------------------------------------------------------------------------------- saving

def end_of_turn_token_ids(processor: ProcessorMixin) -> list[int]:
    """The special token(s) the chat template writes right after an assistant answer (ChatML: `<|im_end|>`,
    Llama 3: `<|eot_id|>`), found by rendering a one-turn conversation with a sentinel answer; empty when the
    template ends a turn with plain text only."""
    tokenizer = processor.tokenizer
    # Plain-string content: the form every LM template takes (ours also take structured content).
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _ANSWER_SENTINEL}],
        chat_template=processor.chat_template, tokenize=False)
    if _ANSWER_SENTINEL not in rendered:
        return []
    after = rendered[rendered.index(_ANSWER_SENTINEL) + len(_ANSWER_SENTINEL):]
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    return [next(i for i in ids if i in special)] if any(i in special for i in ids) else []


def save_processor(processor: ProcessorMixin, folder: str) -> None:
    """Write `processor` into a model folder so that transformers 4.x and 5.x, vLLM, SGLang and lmms-eval all read it,
    and make the folder's generation config stop where the chat template ends a turn.

    transformers 5.x alone would leave three gaps: `tokenizer_class` "TokenizersBackend" (4.x cannot import it;
    "PreTrainedTokenizerFast" reads the same tokenizer.json there and is the same class in 5.x), the image
    processor only inside processor_config.json (older readers look for preprocessor_config.json), and a
    generation config whose `eos_token_id` is the LM's EOS only, so generation runs past `<|im_end|>`-style
    end-of-turn tokens. The chat template written is the processor's, i.e. the one training used.
    """
    processor.save_pretrained(folder)
    processor.image_processor.save_pretrained(folder)
    tokenizer_config = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        _update_json(tokenizer_config, lambda c: c.update(tokenizer_class="PreTrainedTokenizerFast")
                     if c.get("tokenizer_class", "").endswith("Backend") else None)
    generation_config = os.path.join(folder, "generation_config.json")
    if os.path.isfile(generation_config):
        _update_json(generation_config, lambda c: _stop_at_end_of_turn(c, processor))


def _stop_at_end_of_turn(generation_config: dict, processor: ProcessorMixin) -> None:
    eos = generation_config.get("eos_token_id")
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    stops = [processor.tokenizer.eos_token_id, *eos, *end_of_turn_token_ids(processor)]
    stops = list(dict.fromkeys(i for i in stops if i is not None))
    generation_config["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    generation_config["pad_token_id"] = processor.tokenizer.pad_token_id


def _update_json(path: str, update) -> None:
    with open(path, encoding="utf-8") as f:
        values = json.load(f)
    update(values)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(values, f, indent=2, sort_keys=True)
        f.write("\n")
