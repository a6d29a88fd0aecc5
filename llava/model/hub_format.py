"""The on-disk format of every output: llava-hf tensor names, the layouts transformers 4.x expects, and processor
files that 4.x, vLLM, SGLang and lmms-eval read.

Every save writes the llava-hf layout that the hub checkpoints, transformers 4.x, vLLM and SGLang use
(`language_model.model.*`, `language_model.lm_head.*`, `vision_tower.vision_model.*` for CLIP/SigLIP,
`multi_modal_projector.*`), see `hub_state_dict`; loading accepts that, the in-memory names and what earlier
versions of this project wrote, and fails on anything else (`check_loading_info`).
"""

from __future__ import annotations

import json
import os

import torch
import transformers
from safetensors import safe_open
from transformers import PreTrainedModel, ProcessorMixin
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, get_model_conversion_mapping
from transformers.core_model_loading import PrefixChange, revert_weight_conversion
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from llava.data.chat_template import ChatTemplate
from llava.utils.files import update_json

# In-memory (5.x) prefix -> llava-hf name on disk. The vision tower's entry gets the tower class's own legacy
# prefix (`vision_model.` for CLIP/SigLIP), see `_hub_tower_prefix`.
_HUB_PREFIXES = {"model.language_model.": "language_model.model.", "lm_head.": "language_model.lm_head.",
                 "model.multi_modal_projector.": "multi_modal_projector.", "model.vision_tower.": "vision_tower.",
                 "model.image_newline": "image_newline"}  # LLaVA-NeXT's newline vector (a tensor, not a module)
# llava-hf name -> in-memory name, for loading (`from_pretrained(key_mapping=...)`). transformers' own mapping of the
# tower class then drops `vision_model.` where the 5.x class has no such submodule.
FROM_HUB = {r"^language_model\.model\.": "model.language_model.", r"^language_model\.lm_head\.": "lm_head.",
            r"^vision_tower\.": "model.vision_tower.", r"^multi_modal_projector\.": "model.multi_modal_projector.",
            r"^image_newline$": "model.image_newline"}


# --------------------------------------------------------------------------------------------- weights

def _hub_tower_prefix(model: transformers.LlavaForConditionalGeneration) -> str:
    """`vision_tower.` plus the legacy prefix the tower's class dropped in transformers 5.x (CLIP, SigLIP:
    `vision_model.`), read off transformers' own load-time mapping of that class; DINOv2-style towers have none."""
    mapping = get_checkpoint_conversion_mapping(type(model.model.vision_tower).__name__) or []
    dropped = [t.prefix_to_remove for t in mapping if isinstance(t, PrefixChange) and t.prefix_to_remove
               and not t.model_prefix]
    return "vision_tower." + "".join(prefix + "." for prefix in dropped)


def hub_state_dict(model: transformers.LlavaForConditionalGeneration, state_dict: dict) -> dict:
    """`state_dict` (in-memory names) under the llava-hf names, whatever the LM family: the decoder's own names
    go under `language_model.model.`, as in transformers 4.x's Llava (whose language model is `AutoModel` of the
    text config). The tower's and the LM's tensors are first written as transformers 4.x laid them out for their
    class (`_legacy_layout`: DINOv2's `attention.attention.query`, Mixtral's per-expert weights)."""
    prefixes = {**_HUB_PREFIXES, "model.vision_tower.": _hub_tower_prefix(model)}
    parts: dict[str, dict] = {prefix: {} for prefix in prefixes}
    for key, value in state_dict.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"Cannot save {key!r}: not part of the vision tower, projector, LM or lm_head.")
        parts[prefix][key[len(prefix):]] = value
    for prefix, module in (("model.vision_tower.", model.model.vision_tower),
                           ("model.language_model.", model.model.language_model)):
        parts[prefix] = _legacy_layout(module, parts[prefix])
    return {prefixes[prefix] + key: value for prefix, part in parts.items() for key, value in part.items()}


def _legacy_layout(module: torch.nn.Module, state_dict: dict) -> dict:
    """`state_dict` (names relative to `module`) as transformers 4.x's class of `module` names and shapes it: the
    reverse of the renamings and merges transformers 5.x applies when it loads such weights. Prefix changes are left
    to `_hub_tower_prefix`, which knows where LLaVA puts the tower."""
    if not isinstance(module, PreTrainedModel) or not state_dict:
        return state_dict
    conversions = [c for c in get_model_conversion_mapping(module, add_legacy=False) if not isinstance(c, PrefixChange)]
    if not conversions:
        return state_dict
    # revert_weight_conversion reverses the conversions a model was loaded with; name these explicitly, since a part
    # moved into the LLaVA keeps those of its own earlier load (prefix changes included).
    loaded_with = module.__dict__.get("_weight_conversions")
    module._weight_conversions = conversions
    try:
        return dict(revert_weight_conversion(module, state_dict))
    finally:
        if loaded_with is None:
            del module._weight_conversions
        else:
            module._weight_conversions = loaded_with


def make_config_portable(config_path: str) -> None:
    """Rewrite a saved config.json for the readers of a published model: the LM's rotary fields also as 4.x reads
    them (`_add_legacy_rope_fields`), and `use_cache` true.

    Why `use_cache`: Trainer sets `config.use_cache = False` for training (`TrainingArguments.use_cache`), and
    saves write that, so a server or a plain `forward` that reads the file would recompute every past token at
    each generated one. Only the file changes: the model in memory keeps training without a cache.
    """
    update_json(config_path, _portable_config)


def _portable_config(config: dict) -> None:
    _add_legacy_rope_fields(config)
    config["use_cache"] = True
    if "use_cache" in config.get("text_config", {}):  # what the LM's own forward falls back on
        config["text_config"]["use_cache"] = True


def _add_legacy_rope_fields(config: dict) -> None:
    """Repeat the LM's `rope_parameters` as `rope_theta`/`rope_scaling`, the fields transformers 4.x reads.

    Why: 4.x ignores `rope_parameters` and silently uses its default base (10000), so a Qwen2 (1e6) or Llama 3
    (500000) LM would load with the wrong rotary frequencies. transformers 5.x reads the legacy fields too.
    """
    rope = config["text_config"].get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" not in rope:  # absent, or one entry per layer type
        return
    config["text_config"]["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") != "default":
        config["text_config"]["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}


def check_loading_info(info: dict, model: PreTrainedModel, path) -> None:
    """Raise unless every weight of `model` came from the checkpoint (tied weights excepted) and every tensor of the
    checkpoint found its place."""
    tied = set(model.all_tied_weights_keys)
    missing = sorted(set(info["missing_keys"]) - tied)
    unexpected = sorted(info["unexpected_keys"])
    mismatched = [key for key, *_ in info.get("mismatched_keys", [])]
    problems = [f"{len(names)} {what} (e.g. {names[:5]})" for what, names in [
        ("tensors with unknown names", unexpected), ("weights missing", missing),
        ("weights with the wrong shape", mismatched)] if names]
    if problems:
        raise ValueError(
            f"{path} is not a LLaVA checkpoint this model loads completely: {'; '.join(problems)}. Known tensor "
            "name layouts: llava-hf (language_model.model.*, language_model.lm_head.*, vision_tower.*, "
            "multi_modal_projector.*), transformers 5.x (model.language_model.*, lm_head.*, model.vision_tower.*, "
            "model.multi_modal_projector.*) and earlier train_llava saves.")


def load_saved_weights(model: PreTrainedModel, folder: str) -> bool:
    """Copy the weights saved in `folder` (a checkpoint of the same model) into `model` in place, tensor by tensor,
    strictly; False, loading nothing, when the files are not exactly what `save_pretrained` writes for this model
    (earlier saves' names, towers or LMs whose 4.x layout merges or splits tensors, .bin checkpoints): then load
    with `from_pretrained`, which maps those.

    Why: resuming through `from_pretrained` builds a second full model next to the one being trained (a full host
    copy per process, in the checkpoint's dtype). Here at most one tensor is held at a time, cast to the dtype of
    the weight it replaces.
    """
    files = safetensors_files(folder)
    in_memory = _saved_names(model)
    if not files or in_memory is None:
        return False
    handles_keys = []
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as handle:
            handles_keys.append((file, list(handle.keys())))
    if sorted(key for _, keys in handles_keys for key in keys) != sorted(in_memory):
        return False
    weights = model.state_dict()  # tensors sharing storage with the parameters and buffers
    with torch.no_grad():
        for file, keys in handles_keys:
            with safe_open(file, framework="pt", device="cpu") as handle:
                for key in keys:
                    weights[in_memory[key]].copy_(handle.get_tensor(key))
    return True


def _saved_names(model: PreTrainedModel) -> dict[str, str] | None:
    """On-disk (llava-hf) name -> in-memory name of each weight, as `save_pretrained` writes them; None when a
    legacy layout merges or splits tensors. Found by passing weightless stand-ins through `hub_state_dict`."""
    tied = set(model.all_tied_weights_keys)  # left out of saves, as `save_pretrained` does
    stand_ins = {name: torch.empty(0, device="meta") for name in model.state_dict() if name not in tied}
    by_identity = {id(t): name for name, t in stand_ins.items()}
    saved = hub_state_dict(model, stand_ins)
    names = {key: by_identity.get(id(t)) for key, t in saved.items()}
    return None if None in names.values() else names


def safetensors_files(path: str) -> list[str]:
    """The local checkpoint's safetensors files (one or several shards); empty for hub ids and .bin checkpoints."""
    single, index = os.path.join(path, SAFE_WEIGHTS_NAME), os.path.join(path, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            return [os.path.join(path, name) for name in sorted(set(json.load(f)["weight_map"].values()))]
    return []


# --------------------------------------------------------------------------------------------- processor files

def save_processor(processor: ProcessorMixin, folder: str, end_of_turn_ids: list[int] | None = None) -> None:
    """Write `processor` into a model folder so that transformers 4.x and 5.x, vLLM, SGLang and lmms-eval all read it,
    and make the folder's generation config stop where the chat template ends a turn.

    transformers 5.x alone would leave three gaps: `tokenizer_class` "TokenizersBackend" (4.x cannot import it;
    "PreTrainedTokenizerFast" reads the same tokenizer.json there and is the same class in 5.x; `model_input_names`
    is written so 4.x returns the same inputs), the image and video processors only inside processor_config.json
    (older readers look for preprocessor_config.json and video_preprocessor_config.json: 4.57 without the latter
    builds LLaVA-OneVision's video processor from the image processor's file), and a generation config whose
    `eos_token_id` is the LM's EOS only, so generation runs past `<|im_end|>`-style end-of-turn tokens. The chat
    template written is the processor's, i.e. the one training used. `end_of_turn_ids`: see `make_processor_files_portable`.
    """
    processor.save_pretrained(folder)
    make_processor_files_portable(processor, folder, end_of_turn_ids)


def make_processor_files_portable(processor: ProcessorMixin, folder: str,
                                  end_of_turn_ids: list[int] | None = None) -> None:
    """Close those gaps in a folder where `processor.save_pretrained` already wrote (Trainer's own saves).

    `end_of_turn_ids` (`find_end_of_turn_ids(processor)`) are found from the chat template when not given; a run that
    saves many checkpoints computes them once."""
    processor.image_processor.save_pretrained(folder)
    if getattr(processor, "video_processor", None) is not None:  # LLaVA-OneVision's (videos are not trained)
        processor.video_processor.save_pretrained(folder)
    tokenizer_config = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        update_json(tokenizer_config, lambda c: _readable_by_transformers_4(c, processor.tokenizer))
    generation_config = os.path.join(folder, "generation_config.json")
    if os.path.isfile(generation_config):
        ids = end_of_turn_ids if end_of_turn_ids is not None else find_end_of_turn_ids(processor)
        update_json(generation_config, lambda c: _stop_at_end_of_turn(c, processor.tokenizer, ids))


def find_end_of_turn_ids(processor: ProcessorMixin) -> list[int]:
    """The token ids every trained answer ends with (the chat template's end of turn, see `ChatTemplate`)."""
    template = ChatTemplate(processor.tokenizer, processor.chat_template, processor.image_token,
                            processor.image_token_id)
    return processor.tokenizer(template.end_of_turn, add_special_tokens=False)["input_ids"]


def _readable_by_transformers_4(tokenizer_config: dict, tokenizer) -> None:
    """A tokenizer class 4.x can import, the model inputs the tokenizer returns now (4.x's PreTrainedTokenizerFast
    would otherwise also return `token_type_ids`, which GPT-2-style LMs add to the embeddings: different logits),
    and the LM's extra special tokens where 4.x looks for them.

    Why the last: 5.x writes them as a list under `extra_special_tokens` (Qwen's and Llama's tokenizers have
    some), where 4.x expects a dict of named tokens and fails to load the tokenizer ("'list' object has no
    attribute 'keys'", reported as "requires the protobuf library" when protobuf is missing). The same list under
    `additional_special_tokens` loads in 4.x and 5.x with the same ids."""
    if tokenizer_config.get("tokenizer_class", "").endswith("Backend"):
        tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tokenizer_config["model_input_names"] = list(tokenizer.model_input_names)
    extra = tokenizer_config.get("extra_special_tokens")
    if isinstance(extra, list):
        del tokenizer_config["extra_special_tokens"]
        listed = tokenizer_config.get("additional_special_tokens") or []
        tokenizer_config["additional_special_tokens"] = list(dict.fromkeys([*listed, *extra]))


def _stop_at_end_of_turn(generation_config: dict, tokenizer, end_of_turn: list[int]) -> None:
    eos = generation_config.get("eos_token_id")
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    stops = [tokenizer.eos_token_id, *eos, *end_of_turn]
    stops = list(dict.fromkeys(i for i in stops if i is not None))
    generation_config["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    generation_config["pad_token_id"] = tokenizer.pad_token_id
