"""LoRA and QLoRA: where adapters go, and turning adapter checkpoints into plain LLaVA.

An adapter checkpoint (every checkpoint-N of a LoRA run, and `<output_dir>/adapter`) holds:
    adapter_config.json        peft `LoraConfig`; `base_model_name_or_path` is the full-precision LLaVA the
                               adapters were trained on (stage 1's output, or `<output_dir>/base_model` when the
                               run assembled its model from parts)
    adapter_model.safetensors  the LoRA matrices plus every fully trained module (the projector; the vision tower
                               when it trains without adapters), all in full precision
    processor files            tokenizer, image processor, chat template (loadable with `AutoProcessor`)
    training_args.json         the run's flags
    optimizer.pt, scheduler.pt, rng_state.pth, trainer_state.json, checkpoint_complete.json
                               (checkpoint-N only: resume state, and the marker `llava.training.checkpoints` writes last)

A QLoRA run quantizes only its in-memory copy of the base: merging (`load_merged_model`, `python -m
llava.merge_lora`) reloads the base in full precision and adds the adapters there, so every tensor that did not
train is bitwise the base's.
"""

from __future__ import annotations

import os

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoProcessor, ProcessorMixin

from llava.data.types import ConfigurationError
from llava.model.components import linear_layer_names, module_name
from llava.model.modeling import LlavaForConditionalGeneration
from llava.model.vision_layers import tuned_vision_modules

ADAPTER_CONFIG = "adapter_config.json"
# `--lora_target_modules` entries with this prefix name vision-tower modules; all others name LM modules.
VISION_TARGET_PREFIX = "vision_tower."
ADAPTER_SUBFOLDER = "adapter"  # where a merged LoRA output keeps its adapter
ALL_LINEAR = "all-linear"


# --------------------------------------------------------------------------------------------- targets

def lora_target_names(model: torch.nn.Module, targets: list[str]) -> list[str]:
    """Full names of the linear layers that get adapters, each `--lora_target_modules` entry scoped to one component.

    Plain entries are matched as name suffixes inside the language model only, so 'q_proj' never reaches the
    vision tower's q_proj (a bug other LLaVA trainers ship); 'vision_tower.<name>' entries match inside the
    tower. 'all-linear' is every linear layer of that component (lm_head is not part of the LM decoder).

    Raises:
        ValueError: an entry matches no linear layer (the message lists the layer names that exist).
    """
    names: list[str] = []
    for target in targets:
        component, suffix = (("vision_tower", target[len(VISION_TARGET_PREFIX):])
                             if target.startswith(VISION_TARGET_PREFIX) else ("language_model", target))
        candidates = linear_layer_names(model, component)
        matched = candidates if suffix == ALL_LINEAR else [
            name for name in candidates if name == suffix or name.endswith("." + suffix)]
        if not matched:
            available = sorted({name.rsplit(".", 1)[-1] for name in candidates})
            raise ConfigurationError(f"--lora_target_modules entry {target!r} matches no linear layer of the {component}; "
                             f"its linear layers are named {available} (or use {ALL_LINEAR!r}).")
        names += [name for name in matched if name not in names]
    return names


def add_adapters(model: LlavaForConditionalGeneration, targets: list[str], *, r: int, alpha: int, dropout: float,
                 train_projector: bool, train_vision_tower: bool, vision_last_n_layers: int | None = None
                 ) -> PeftModel:
    """Wrap `model` with LoRA adapters on the `targets` (see `lora_target_names`): adapters and the fully trained
    modules train, every other weight is frozen.

    An unfrozen projector, and an unfrozen vision tower without adapters of its own (only its last
    `vision_last_n_layers` layers when given, see `tuned_vision_modules`), train in full next to the adapters (peft
    `modules_to_save`), which also puts their weights into every adapter checkpoint."""
    fully_trained = [module_name(model, "projector")] if train_projector else []
    if train_vision_tower and not any(t.startswith(VISION_TARGET_PREFIX) for t in targets):
        fully_trained += tuned_vision_modules(model, vision_last_n_layers)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=lora_target_names(model, targets),
                        modules_to_save=fully_trained or None)
    return get_peft_model(model, config)


# --------------------------------------------------------------------------------------------- checkpoints

def adapter_folder(path: str) -> str | None:
    """The adapter checkpoint at `path`: `path` itself, or the `adapter/` subfolder of a merged LoRA output."""
    for candidate in (path, os.path.join(path, ADAPTER_SUBFOLDER)):
        if os.path.isfile(os.path.join(candidate, ADAPTER_CONFIG)):
            return candidate
    return None


def is_adapter_checkpoint(path: str) -> bool:
    """True for a checkpoint that holds adapters instead of full weights (checkpoint-N of a LoRA run).

    A merged LoRA output is a plain checkpoint (False), though `load_merged_model` also accepts it.
    """
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def load_merged_model(path: str, dtype: torch.dtype = torch.float32, base_model_name_or_path: str | None = None
                      ) -> tuple[LlavaForConditionalGeneration, ProcessorMixin]:
    """A plain LLaVA with the adapters of `path` merged in, and its processor.

    The base is loaded unquantized in float32 whatever the run trained with (QLoRA included), the LoRA deltas
    are added there and the fully trained modules replace the base's; only then is the model cast to `dtype`.

    Args:
        path: an adapter checkpoint (checkpoint-N of a LoRA run) or a merged LoRA output (uses its `adapter/`).
        dtype: dtype of the returned model.
        base_model_name_or_path: the base to merge into; default: the one named in adapter_config.json.

    Raises:
        ValueError: `path` holds no adapter.
        FileNotFoundError: the base named by the adapter is not there (moved?); pass `base_model_name_or_path`.
    """
    folder = adapter_folder(path)
    if folder is None:
        raise ConfigurationError(f"{path} is not a LoRA checkpoint: no {ADAPTER_CONFIG} in it or in its {ADAPTER_SUBFOLDER}/ "
                         "subfolder. A full checkpoint loads as it is, without merging.")
    base = base_model_name_or_path or PeftConfig.from_pretrained(folder).base_model_name_or_path
    if base is None or (os.path.isabs(base) and not os.path.isdir(base)):
        raise FileNotFoundError(f"The base model of the adapter in {folder} ({base}) is not found; pass the "
                                "full-precision LLaVA it was trained on (--base_model_name_or_path).")
    if getattr(AutoConfig.from_pretrained(base), "quantization_config", None) is not None:
        raise ConfigurationError(f"The base model {base} is itself saved quantized, so a merge into it cannot be full "
                         "precision; pass the full-precision LLaVA (--base_model_name_or_path).")
    model = LlavaForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, folder).merge_and_unload()
    return merged.to(dtype), AutoProcessor.from_pretrained(folder)
