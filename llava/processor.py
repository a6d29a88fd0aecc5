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
                          LlavaImageProcessor, LlavaProcessor, ProcessorMixin)

from llava.arguments import ModelArguments
from llava.distributed import without_zero3_init
from llava.final_output import check_final_output

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

# Vision-model types LLaVA cannot host: why, and what to use instead.
_UNHOSTABLE_TOWERS = {
    "siglip2_vision_model": (
        "SigLIP2 NaFlex towers cut each image into a variable number of patches at its own aspect ratio, but "
        "LLaVA expands one image token into a fixed number of tokens. Use a fixed-resolution SigLIP or SigLIP2 "
        "checkpoint instead (config model_type 'siglip', e.g. google/siglip2-base-patch16-224 or "
        "google/siglip-so400m-patch14-384)."
    ),
}


def tower_config(vision_path: str, trust_remote_code: bool = False):
    """The vision config of a vision-only checkpoint, or the vision part of a full CLIP/SigLIP one.

    Towers LLaVA cannot host are refused here, before any weights or data load.
    """
    config = AutoConfig.from_pretrained(vision_path, trust_remote_code=trust_remote_code)
    vision_config = getattr(config, "vision_config", None) or config
    if vision_config.model_type in _UNHOSTABLE_TOWERS:
        raise ValueError(f"Unsupported vision tower {vision_path} (model_type {vision_config.model_type!r}): "
                         f"{_UNHOSTABLE_TOWERS[vision_config.model_type]}")
    return vision_config


def check_vision_feature_layer(vision_config, layer: int, vision_path: str) -> None:
    """Refuse a --vision_feature_layer the tower does not have, before any weights load (it would otherwise be an
    IndexError at the first forward pass). The tower returns its embeddings plus one output per layer."""
    outputs = vision_config.num_hidden_layers + 1
    if not -outputs <= layer < outputs:
        raise ValueError(f"--vision_feature_layer {layer} is out of range for {vision_path}: it has "
                         f"{vision_config.num_hidden_layers} layers, so valid values are {-outputs} to {outputs - 1} "
                         "(-1 the last layer, -2 the penultimate as in LLaVA-1.5, 0 the embeddings).")


def _extra_vision_tokens(vision_config, height: int, width: int) -> int:
    """Tokens the tower emits beside its patches (CLIP: 1 CLS; SigLIP: 0; DINOv2: 1 CLS, plus its registers).

    Counted on a forward pass of a weightless (meta-device) copy at the size the image processor gives, so no
    family's layout is assumed, and towers that interpolate their position embeddings to the input (DINOv2:
    configured for 518 pixels, fed 224-pixel crops) are counted at the size they really see.
    """
    patch = vision_config.patch_size
    with torch.device("meta"), without_zero3_init():
        tower = AutoModel.from_config(vision_config)
        try:
            output = tower(pixel_values=torch.zeros(1, vision_config.num_channels, height, width),
                           output_hidden_states=True)
        except Exception as error:
            raise ValueError(f"The vision tower {type(tower).__name__} cannot take the {height}x{width} images its "
                             f"image processor gives ({error}). LLaVA needs a fixed-size tower whose image "
                             "processor matches it.") from error
    if not getattr(output, "hidden_states", None):
        raise ValueError(f"Unsupported vision tower {type(tower).__name__}: it returns no hidden states to "
                         "project.")
    extra = output.hidden_states[-1].shape[1] - (height // patch) * (width // patch)
    if extra < 0:
        raise ValueError(f"Unsupported vision tower {type(tower).__name__}: it emits fewer tokens than "
                         f"({height}/{patch}) x ({width}/{patch}) patches (pooled or merged patches).")
    return int(extra)


def processed_image_size(image_processor) -> tuple[int, int]:
    """(height, width) of the pixel values the image processor gives, read off a wide and a tall image.

    Why both: a processor that keeps the aspect ratio without cropping gives each image its own size, hence its
    own token count, which LLaVA cannot stack into a batch; it is refused with the fix.
    """
    sizes = {tuple(image_processor(images=[Image.new("RGB", size)], return_tensors="pt")["pixel_values"].shape[-2:])
             for size in ((96, 48), (48, 96))}
    if len(sizes) != 1:
        raise ValueError(f"The image processor ({type(image_processor).__name__}) gives images of different sizes "
                         f"{sorted(sizes)} depending on their aspect ratio; LLaVA needs one fixed size. Pass "
                         "--image_aspect_ratio pad, crop or resize.")
    height, width = sizes.pop()
    return int(height), int(width)


# Fields of a tower's image processor that carry over into transformers' LlavaImageProcessor for `pad`.
_LLAVA_IMAGE_PROCESSOR_FIELDS = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale",
                                 "rescale_factor", "do_normalize", "image_mean", "image_std", "do_convert_rgb")


def apply_image_aspect_ratio(image_processor, mode: str | None):
    """The tower's image processor set up for `--image_aspect_ratio` (unchanged when None).

    - pad (LLaVA-1.5): expand to a square filled with the processor's mean colour, then the tower's own resize
      and crop: transformers' `LlavaImageProcessor` with `do_pad`.
    - crop: resize the shortest edge, then center-crop (CLIP's default). Kept as is where the processor already
      does this (CLIP, DINOv2); otherwise (SigLIP) a `LlavaImageProcessor` does it, because SigLIP's own class
      has no center crop in transformers 4.x and would fail there on a shortest-edge size.
    - resize: squash the whole image to the input size, nothing cropped (the tower's own class, height/width size).
    Either way the checkpoint's preprocessor_config.json makes plain transformers (4.x and 5.x) and vLLM
    preprocess as training did. The input size stays what the processor gives today: same patch count.
    """
    if mode is None:
        return image_processor
    height, width = processed_image_size(image_processor)
    fields = {k: v for k, v in image_processor.to_dict().items() if k != "image_processor_type"}
    if mode == "pad":
        return _llava_image_processor(fields, do_pad=True)
    if mode == "crop":
        if fields.get("do_center_crop") and "shortest_edge" in (fields.get("size") or {}):
            return image_processor
        return _llava_image_processor(fields, do_resize=True, size={"shortest_edge": max(height, width)},
                                      do_center_crop=True, crop_size={"height": height, "width": width})
    if mode == "resize":
        overrides = {"do_resize": True, "size": {"height": height, "width": width}}
        if "do_center_crop" in fields:  # a field the class knows (CLIP, BiT), not added to one that lacks it
            overrides["do_center_crop"] = False
        return type(image_processor).from_dict({**fields, **overrides})
    raise ValueError(f"--image_aspect_ratio must be pad, crop or resize, got {mode!r}.")


def _llava_image_processor(fields: dict, **overrides) -> LlavaImageProcessor:
    """transformers' `LlavaImageProcessor` with a tower processor's normalisation, resize and crop `fields`."""
    carried = {k: fields[k] for k in _LLAVA_IMAGE_PROCESSOR_FIELDS if fields.get(k) is not None}
    carried["do_center_crop"] = bool(carried.get("do_center_crop")) and "crop_size" in carried
    return LlavaImageProcessor(**{**carried, **overrides})


def _read_chat_template(value: str) -> str:
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    return value


# Templates with a thinking switch (Qwen3) default to thinking, and then their generation prompt lacks the empty
# think block that every trained answer (LLaVA data has no reasoning) follows; off by default, the prompt that
# plain transformers, vLLM or lmms-eval render is the one training saw. `enable_thinking=True` still turns it on.
_THINKING_OFF_PREAMBLE = "{%- if enable_thinking is not defined -%}{%- set enable_thinking = false -%}{%- endif -%}"


def multimodal_chat_template(lm_template: str, image_token: str) -> str:
    """The LM's chat template, also accepting structured (image/text) message content, thinking off by default."""
    thinking = _THINKING_OFF_PREAMBLE if "enable_thinking" in lm_template else ""
    return thinking + _STRUCTURED_CONTENT_PREAMBLE.replace("__IMAGE_TOKEN__", image_token) + lm_template


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
    check_vision_feature_layer(vision_config, args.vision_feature_layer, args.vision_model_name_or_path)
    image_processor = AutoImageProcessor.from_pretrained(args.vision_model_name_or_path,
                                                         trust_remote_code=args.trust_remote_code)
    image_processor = apply_image_aspect_ratio(image_processor, args.image_aspect_ratio)
    extra_tokens = _extra_vision_tokens(vision_config, *processed_image_size(image_processor))
    strategy = args.vision_feature_select_strategy or ("default" if extra_tokens > 0 else "full")
    if strategy == "default" and extra_tokens == 0:
        logger.warning("vision_feature_select_strategy='default' drops the first token, but %s has no CLS token: "
                       "a real patch is dropped. Use --vision_feature_select_strategy full.",
                       args.vision_model_name_or_path)
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=vision_config.patch_size,
        vision_feature_select_strategy=strategy, num_additional_image_tokens=extra_tokens,
        image_token=args.image_token, chat_template=multimodal_chat_template(lm_template, args.image_token),
    )


def image_token_count(processor: ProcessorMixin) -> int:
    """How many tokens one image placeholder becomes, by asking the processor itself (fixed-size towers)."""
    height, width = processed_image_size(processor.image_processor)
    encoded = processor(text=processor.image_token, images=[Image.new("RGB", (width, height))])
    return int(sum(1 for i in encoded["input_ids"][0] if i == processor.image_token_id))


def load_processor(args: ModelArguments) -> ProcessorMixin:
    """The processor of the checkpoint being continued (refused when half-published, see `check_final_output`),
    or a new one for an assembled model."""
    if args.assembles_new_model:
        return build_processor(args)
    check_final_output(args.model_name_or_path)
    processor = AutoProcessor.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    if args.chat_template:  # e.g. llava-hf checkpoints, whose template ends answers with no end-of-turn token
        processor.chat_template = multimodal_chat_template(_read_chat_template(args.chat_template),
                                                           processor.image_token)
    return processor


# --------------------------------------------------------------------------------------------- saving

def save_processor(processor: ProcessorMixin, folder: str) -> None:
    """Write `processor` into a model folder so that transformers 4.x and 5.x, vLLM, SGLang and lmms-eval all read it,
    and make the folder's generation config stop where the chat template ends a turn.

    transformers 5.x alone would leave three gaps: `tokenizer_class` "TokenizersBackend" (4.x cannot import it;
    "PreTrainedTokenizerFast" reads the same tokenizer.json there and is the same class in 5.x; `model_input_names`
    is written so 4.x returns the same inputs), the image
    processor only inside processor_config.json (older readers look for preprocessor_config.json), and a
    generation config whose `eos_token_id` is the LM's EOS only, so generation runs past `<|im_end|>`-style
    end-of-turn tokens. The chat template written is the processor's, i.e. the one training used.
    """
    processor.save_pretrained(folder)
    make_processor_files_portable(processor, folder)


def make_processor_files_portable(processor: ProcessorMixin, folder: str) -> None:
    """Close those gaps in a folder where `processor.save_pretrained` already wrote (Trainer's own saves)."""
    processor.image_processor.save_pretrained(folder)
    tokenizer_config = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        _update_json(tokenizer_config, lambda c: _readable_by_transformers_4(c, processor.tokenizer))
    generation_config = os.path.join(folder, "generation_config.json")
    if os.path.isfile(generation_config):
        _update_json(generation_config, lambda c: _stop_at_end_of_turn(c, processor))


def _readable_by_transformers_4(tokenizer_config: dict, tokenizer) -> None:
    """A tokenizer class 4.x can import, and the model inputs the tokenizer returns now: 4.x's
    PreTrainedTokenizerFast would otherwise also return `token_type_ids`, which GPT-2-style LMs add to the
    embeddings (different logits)."""
    if tokenizer_config.get("tokenizer_class", "").endswith("Backend"):
        tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tokenizer_config["model_input_names"] = list(tokenizer.model_input_names)


def _stop_at_end_of_turn(generation_config: dict, processor: ProcessorMixin) -> None:
    eos = generation_config.get("eos_token_id")
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    # Imported here: the encoder builds on this module (IGNORE_INDEX, image_token_count).
    from llava.conversation import ConversationEncoder

    end_of_turn = ConversationEncoder(processor, max_length=1).end_of_turn  # what every trained answer ends with
    end_of_turn_ids = processor.tokenizer(end_of_turn, add_special_tokens=False)["input_ids"]
    stops = [processor.tokenizer.eos_token_id, *eos, *end_of_turn_ids]
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
