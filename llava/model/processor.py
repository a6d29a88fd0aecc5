"""The `LlavaProcessor` of a model: tokenizer with the image token, the tower's image processor, the chat template,
and how many tokens one image becomes.

`patch_size`, `num_additional_image_tokens` and `vision_feature_select_strategy` are read off the vision tower so
that one `<image>` placeholder expands to exactly as many tokens as the projector emits. No weights are loaded here,
so data can be checked against a 7B model's processor in seconds.
"""

from __future__ import annotations

import logging
import os

import torch
from PIL import Image
from transformers import (AddedToken, AutoConfig, AutoImageProcessor, AutoModel, AutoProcessor, AutoTokenizer,
                          LlavaImageProcessor, LlavaNextProcessor, LlavaOnevisionProcessor, LlavaProcessor,
                          ProcessorMixin)

from llava.data.image_tokens import ImageTokens
from llava.data.types import ConfigurationError
from llava.model.anyres import ANYRES_ARCHITECTURES, ARCHITECTURES, AnyresImageTokens, anyres_processor, check_tower
from llava.model.onevision import OnevisionImageTokens, onevision_processor
from llava.model.final_output import check_final_output
from llava.model.sharding import without_zero3_init

logger = logging.getLogger(__name__)

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
        raise ConfigurationError(f"Unsupported vision tower {vision_path} (model_type {vision_config.model_type!r}): "
                         f"{_UNHOSTABLE_TOWERS[vision_config.model_type]}")
    return vision_config


def check_vision_feature_layer(vision_config, layer: int, vision_path: str) -> None:
    """Refuse a --vision_feature_layer the tower does not have, before any weights load (it would otherwise be an
    IndexError at the first forward pass). The tower returns its embeddings plus one output per layer."""
    outputs = vision_config.num_hidden_layers + 1
    if not -outputs <= layer < outputs:
        raise ConfigurationError(f"--vision_feature_layer {layer} is out of range for {vision_path}: it has "
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
            raise ConfigurationError(f"The vision tower {type(tower).__name__} cannot take the {height}x{width} images its "
                             f"image processor gives ({error}). LLaVA needs a fixed-size tower whose image "
                             "processor matches it.") from error
    if not getattr(output, "hidden_states", None):
        raise ConfigurationError(f"Unsupported vision tower {type(tower).__name__}: it returns no hidden states to "
                         "project.")
    extra = output.hidden_states[-1].shape[1] - (height // patch) * (width // patch)
    if extra < 0:
        raise ConfigurationError(f"Unsupported vision tower {type(tower).__name__}: it emits fewer tokens than "
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
        raise ConfigurationError(f"The image processor ({type(image_processor).__name__}) gives images of different sizes "
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
    raise ConfigurationError(f"--image_aspect_ratio must be pad, crop or resize, got {mode!r}.")


def _llava_image_processor(fields: dict, **overrides) -> LlavaImageProcessor:
    """transformers' `LlavaImageProcessor` with a tower processor's normalisation, resize and crop `fields`."""
    carried = {k: fields[k] for k in _LLAVA_IMAGE_PROCESSOR_FIELDS if fields.get(k) is not None}
    carried["do_center_crop"] = bool(carried.get("do_center_crop")) and "crop_size" in carried
    return LlavaImageProcessor(**{**carried, **overrides})


def read_chat_template(value: str) -> str:
    """`value` itself, or the text of the file it names (a --chat_template given as a path)."""
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    return value


# What a --chat_template value that names a file ends with; a Jinja string never does.
_TEMPLATE_FILE_SUFFIXES = (".jinja", ".j2", ".txt")


def check_chat_template_path(value: str | None) -> None:
    """Refuse a --chat_template that looks like a file path (a template suffix, or a path separator and no Jinja
    braces) but names no file: it would be used as the literal template, and every sample then fails oddly."""
    if not value or os.path.isfile(value) or "{" in value:
        return
    if value.lower().endswith(_TEMPLATE_FILE_SUFFIXES) or os.sep in value:
        raise ValueError(f"--chat_template {value}: no such file. Pass the path of a template file, or the "
                         "template itself as a Jinja string.")


# Templates with a thinking switch (Qwen3) default to thinking, and then their generation prompt lacks the empty
# think block that every trained answer (LLaVA data has no reasoning) follows; off by default, the prompt that
# plain transformers, vLLM or lmms-eval render is the one training saw. `enable_thinking=True` still turns it on.
_THINKING_OFF_PREAMBLE = "{%- if enable_thinking is not defined -%}{%- set enable_thinking = false -%}{%- endif -%}"


def multimodal_chat_template(lm_template: str, image_token: str) -> str:
    """The LM's chat template, also accepting structured (image/text) message content, thinking off by default."""
    thinking = _THINKING_OFF_PREAMBLE if "enable_thinking" in lm_template else ""
    return thinking + _STRUCTURED_CONTENT_PREAMBLE.replace("__IMAGE_TOKEN__", image_token) + lm_template


def build_processor(vision_model: str, language_model: str, *, image_token: str = "<image>",
                    chat_template: str | None = None, image_aspect_ratio: str | None = None,
                    vision_feature_layer: int = -2, vision_feature_select_strategy: str | None = None,
                    trust_remote_code: bool = False, architecture: str = "llava",
                    image_grid_pinpoints: list[list[int]] | None = None, vision_aspect_ratio: str | None = None
                    ) -> ProcessorMixin:
    """A `LlavaProcessor` for a new model: the LM's tokenizer (plus the image token), the tower's image processor;
    for `architecture` "llava_next" the `LlavaNextProcessor` tiling it on `image_grid_pinpoints` (`anyres_processor`),
    for "llava_onevision" the `LlavaOnevisionProcessor` (`onevision_processor`, capped at `vision_aspect_ratio`).

    `patch_size`, `num_additional_image_tokens` and `vision_feature_select_strategy` are set so that one
    image token expands to exactly as many tokens as the projector emits; the chat template is the LM's own
    (or `chat_template`, a Jinja string or a file). No weights are loaded.

    Args:
        vision_model, language_model: hub ids or folders of the vision tower and the causal LM.
        image_token: the placeholder of an image in the text (added to the tokenizer when missing).
        image_aspect_ratio: None, "pad", "crop" or "resize" (see `apply_image_aspect_ratio`).
        vision_feature_layer: checked against the tower's layer count here, before anything loads.
        vision_feature_select_strategy: "default" (drop the CLS token) or "full"; None picks by the tower.
    """
    tokenizer = AutoTokenizer.from_pretrained(language_model, trust_remote_code=trust_remote_code)
    if image_token in tokenizer.get_vocab() and image_token not in tokenizer.get_added_vocab():
        raise ConfigurationError(f"--image_token {image_token!r} is an ordinary token of {language_model}'s tokenizer, so "
                         "text that contains it would be taken for an image. Pass a string the tokenizer does not "
                         "have as one token, e.g. --image_token '<image>' (the default).")
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(image_token, special=True, normalized=False)], special_tokens=True)
    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and loss, so reusing EOS is safe for training.
        tokenizer.pad_token = tokenizer.eos_token
    lm_template = read_chat_template(chat_template) if chat_template else tokenizer.chat_template
    if not isinstance(lm_template, str) or not lm_template:
        raise ConfigurationError(
            f"The tokenizer of {language_model} has no chat template (a base model?). "
            "Pass one with --chat_template (a Jinja string or a .jinja file), or use an instruct model."
        )
    vision_config = tower_config(vision_model, trust_remote_code)
    check_vision_feature_layer(vision_config, vision_feature_layer, vision_model)
    if architecture in ANYRES_ARCHITECTURES and image_aspect_ratio:
        raise ConfigurationError(f"--image_aspect_ratio {image_aspect_ratio} is LLaVA-1.5's preprocessing; "
                                 f"--architecture {architecture} keeps every image's aspect ratio on its grid. Drop it.")
    image_processor = AutoImageProcessor.from_pretrained(vision_model, trust_remote_code=trust_remote_code)
    image_processor = apply_image_aspect_ratio(image_processor, image_aspect_ratio)
    extra_tokens = _extra_vision_tokens(vision_config, *processed_image_size(image_processor))
    strategy = vision_feature_select_strategy or ("default" if extra_tokens > 0 else "full")
    if strategy == "default" and extra_tokens == 0:
        logger.warning("vision_feature_select_strategy='default' drops the first token, but %s has no CLS token: "
                       "a real patch is dropped. Use --vision_feature_select_strategy full.", vision_model)
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=vision_config.patch_size,
        vision_feature_select_strategy=strategy, num_additional_image_tokens=extra_tokens,
        image_token=image_token, chat_template=multimodal_chat_template(lm_template, image_token),
    )
    return with_architecture(processor, vision_config, architecture, image_grid_pinpoints, vision_model,
                             vision_aspect_ratio)


def architecture_of(processor: ProcessorMixin) -> str:
    """Which LLaVA architecture a processor is for: llava, llava_next or llava_onevision."""
    if isinstance(processor, LlavaOnevisionProcessor):
        return "llava_onevision"
    return "llava_next" if isinstance(processor, LlavaNextProcessor) else "llava"


def with_architecture(processor: ProcessorMixin, vision_config, architecture: str | None,
                      image_grid_pinpoints: list[list[int]] | None, where: str,
                      vision_aspect_ratio: str | None = None) -> ProcessorMixin:
    """`processor` for `architecture` (None: as it is): turned into a later one of `ARCHITECTURES` (a new model, or a
    `llava`/`llava_next` stage output continued as LLaVA-NeXT or LLaVA-OneVision), or unchanged. `where` names the
    model in errors.

    Raises:
        ConfigurationError: back to an earlier architecture (its grid or newline would be dropped); a grid
            (--image_grid_pinpoints) or feature cap (--vision_aspect_ratio) for a model that keeps its own or has
            none; a tower an anyres model cannot tile (`check_tower`).
    """
    current = architecture_of(processor)
    target = architecture or current
    if ARCHITECTURES.index(target) < ARCHITECTURES.index(current):
        kept = "grid" if target == "llava" else "feature cap and multi-image views"
        raise ConfigurationError(f"{where} is a {current} model; --architecture {target} cannot drop its {kept}. Drop "
                                 f"--architecture to continue it as {current}.")
    converting = target != current
    if image_grid_pinpoints and not (converting and target in ANYRES_ARCHITECTURES):
        raise ConfigurationError(f"--image_grid_pinpoints sets the grid of a new llava_next or llava_onevision model; "
                                 f"{where} " + (f"keeps its own grid (its preprocessor_config.json): drop the flag."
                                                if target == current != "llava" else
                                                "is not one: add --architecture llava_next, or drop the flag."))
    if vision_aspect_ratio and not (converting and target == "llava_onevision"):
        raise ConfigurationError(f"--vision_aspect_ratio sets the feature cap of a new llava_onevision model; {where} "
                                 + ("keeps its own (its processor_config.json): drop the flag." if
                                    target == "llava_onevision" else
                                    "is not one: add --architecture llava_onevision, or drop the flag."))
    if not converting:
        return processor
    input_size = processed_image_size(processor.image_processor)
    check_tower(vision_config, processor, input_size[0], where, target)
    if target == "llava_next":
        return anyres_processor(processor, input_size, image_grid_pinpoints)
    return onevision_processor(processor, input_size, image_grid_pinpoints, vision_aspect_ratio)


def image_tokens(processor: ProcessorMixin) -> ImageTokens:
    """What each image placeholder becomes: per image size for LLaVA-NeXT (per sample for LLaVA-OneVision), else
    one fixed count (`image_token_count`). Computed once per run and handed on (encoder, checking, dataset, cache
    key)."""
    if isinstance(processor, LlavaOnevisionProcessor):
        return OnevisionImageTokens.of(processor)
    if isinstance(processor, LlavaNextProcessor):
        return AnyresImageTokens.of(processor)
    return ImageTokens(image_token_count(processor))


def image_token_count(processor: ProcessorMixin) -> int:
    """How many tokens one image placeholder becomes, by asking the processor itself (fixed-size towers).

    Computed once per run and handed on as a value (encoder, dataset, token cache key, model config)."""
    height, width = processed_image_size(processor.image_processor)
    encoded = processor(text=processor.image_token, images=[Image.new("RGB", (width, height))])
    return int(sum(1 for i in encoded["input_ids"][0] if i == processor.image_token_id))


def load_processor(path: str, *, chat_template: str | None = None, trust_remote_code: bool = False,
                   architecture: str | None = None, image_grid_pinpoints: list[list[int]] | None = None,
                   vision_aspect_ratio: str | None = None) -> ProcessorMixin:
    """The processor of a LLaVA checkpoint (refused when half-published, see `check_final_output`), its chat
    template replaced by `chat_template` when given (e.g. llava-hf checkpoints, whose template ends answers with no
    end-of-turn token), for `architecture` (None: the checkpoint's; see `with_architecture`)."""
    check_final_output(path)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    if chat_template:
        processor.chat_template = multimodal_chat_template(read_chat_template(chat_template), processor.image_token)
    if architecture is None and not image_grid_pinpoints and not vision_aspect_ratio:
        return processor
    vision_config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).vision_config
    return with_architecture(processor, vision_config, architecture, image_grid_pinpoints, path, vision_aspect_ratio)
