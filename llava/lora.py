"""LoRA and QLoRA: where adapters go, the model they train on, and turning adapter checkpoints into plain LLaVA.

An adapter checkpoint (every checkpoint-N of a LoRA run, and `<output_dir>/adapter`) holds:
    adapter_config.json        peft `LoraConfig`; `base_model_name_or_path` is the full-precision LLaVA the
                               adapters were trained on (stage 1's output, or `<output_dir>/base_model` when the
                               run assembled its model from parts)
    adapter_model.safetensors  the LoRA matrices plus every fully trained module (the projector; the vision tower
                               when it trains without adapters), all in full precision
    processor files            tokenizer, image processor, chat template (loadable with `AutoProcessor`)
    training_args.json         the run's flags
    optimizer.pt, scheduler.pt, rng_state.pth, trainer_state.json, checkpoint_complete.json
                               (checkpoint-N only: resume state, and the marker `llava.checkpoints` writes last)

A QLoRA run quantizes only its in-memory copy of the base: merging (`load_merged_model`, `python -m
llava.merge_lora`) reloads the base in full precision and adds the adapters there, so every tensor that did not
train is bitwise the base's.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from typing import TYPE_CHECKING

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoProcessor, ProcessorMixin

if TYPE_CHECKING:  # importing Trainer costs ~90 MB, which `python -m llava.merge_lora` does not need
    from transformers import Trainer

from llava.arguments import VISION_TARGET_PREFIX, LlavaTrainingArguments, ModelArguments
from llava.model import (LlavaForConditionalGeneration, assemble_llava, linear_layer_names, load_llava,
                         module_name, quantization_config)
from llava.processor import save_processor

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SUBFOLDER = "adapter"  # where a merged LoRA output keeps its adapter
BASE_SUBFOLDER = "base_model"  # where a LoRA run assembled from parts keeps the base its adapters need
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
            raise ValueError(f"--lora_target_modules entry {target!r} matches no linear layer of the {component}; "
                             f"its linear layers are named {available} (or use {ALL_LINEAR!r}).")
        names += [name for name in matched if name not in names]
    return names


def fully_trained_modules(model: torch.nn.Module, args: LlavaTrainingArguments) -> list[str]:
    """Unfrozen components without adapters: they train in full next to the adapters (peft `modules_to_save`),
    which also puts their weights into every adapter checkpoint."""
    modules = [] if args.freeze_projector else [module_name(model, "projector")]
    vision_adapters = any(t.startswith(VISION_TARGET_PREFIX) for t in args.lora_targets)
    if not args.freeze_vision_model and not vision_adapters:
        modules.append(module_name(model, "vision_tower"))
    return modules


def add_adapters(model: LlavaForConditionalGeneration, args: LlavaTrainingArguments) -> PeftModel:
    """Wrap `model` with LoRA adapters: adapters and fully trained modules train, every other weight is frozen."""
    config = LoraConfig(
        r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        target_modules=lora_target_names(model, args.lora_targets),
        modules_to_save=fully_trained_modules(model, args) or None,
    )
    return get_peft_model(model, config)


# --------------------------------------------------------------------------------------------- the base

def training_dtype(args: LlavaTrainingArguments) -> torch.dtype:
    """What quantized layers compute in: the mixed-precision dtype of --bf16/--fp16, else float32."""
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def load_lora_model(model_args: ModelArguments, training_args: LlavaTrainingArguments,
                    processor: ProcessorMixin) -> PeftModel:
    """The base LLaVA (LM quantized for QLoRA) wrapped with adapters, ready for `LlavaTrainer`.

    Adapter checkpoints name their base by path, so the base must exist on disk in full precision: a model
    assembled from parts is first saved to `<output_dir>/base_model` (for QLoRA then reloaded from there
    quantized; the full-precision copy is freed before the quantized one loads).
    """
    quantization = quantization_config(model_args, training_dtype(training_args))
    if model_args.assembles_new_model:
        base_path = os.path.join(training_args.output_dir, BASE_SUBFOLDER)
        model = assemble_llava(model_args, processor)
        with training_args.main_process_first(desc="saving the base model for the adapters"):
            if training_args.should_save:
                model.save_pretrained(base_path)
                save_processor(processor, base_path)
        if quantization is not None:
            del model
            gc.collect()
            model = load_llava(base_path, model_args, quantization)
    else:
        base_path = model_args.model_name_or_path
        model = load_llava(base_path, model_args, quantization)
    if os.path.isdir(base_path):  # an absolute path keeps the checkpoints loadable from any working directory
        model.name_or_path = model.config.name_or_path = os.path.abspath(base_path)
    return add_adapters(model, training_args)


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
        raise ValueError(f"{path} is not a LoRA checkpoint: no {ADAPTER_CONFIG} in it or in its {ADAPTER_SUBFOLDER}/ "
                         "subfolder. A full checkpoint loads as it is, without merging.")
    base = base_model_name_or_path or PeftConfig.from_pretrained(folder).base_model_name_or_path
    if base is None or (os.path.isabs(base) and not os.path.isdir(base)):
        raise FileNotFoundError(f"The base model of the adapter in {folder} ({base}) is not found; pass the "
                                "full-precision LLaVA it was trained on (--base_model_name_or_path).")
    if getattr(AutoConfig.from_pretrained(base), "quantization_config", None) is not None:
        raise ValueError(f"The base model {base} is itself saved quantized, so a merge into it cannot be full "
                         "precision; pass the full-precision LLaVA (--base_model_name_or_path).")
    model = LlavaForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, folder).merge_and_unload()
    return merged.to(dtype), AutoProcessor.from_pretrained(folder)


def save_lora_output(trainer: Trainer, merge: bool, output_dir: str) -> None:
    """Write a LoRA run's final output into `output_dir` (the staging folder of `LlavaTrainer.save_final_output`):
    the merged plain LLaVA with the adapter in `adapter/`, or (merge False) an adapter checkpoint like checkpoint-N.

    The merge runs as `python -m llava.merge_lora` in a fresh process: it holds the whole base in float32, and
    beside this process's training memory (the model, allocator caches of freed activations) that would be the
    run's peak. If it fails, nothing is published: the run's newest checkpoint-N holds the same adapter.
    """
    if not merge:
        trainer.save_model(output_dir)
        return
    adapter_dir = os.path.join(output_dir, ADAPTER_SUBFOLDER)
    trainer.save_model(adapter_dir)
    if trainer.args.should_save:
        command = [sys.executable, "-m", "llava.merge_lora", "--checkpoint", adapter_dir, "--output_dir", output_dir]
        if subprocess.run(command).returncode != 0:
            raise RuntimeError("Merging the adapters failed (see above), so the final output was not written; the "
                               "newest checkpoint-N in --output_dir holds the adapter: merge it with python -m "
                               "llava.merge_lora --checkpoint <it> --output_dir <folder>.")
