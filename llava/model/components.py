"""The four parts of a LLaVA that freeze flags, LoRA targets and the parameter table talk about: vision tower,
projector, language model (the decoder) and lm_head."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel


class _ProjectorGroup(torch.nn.Module):
    """LLaVA-NeXT's projector with its `image_newline` vector, as one part (not attached to the model: the weights
    keep their places and names).

    Why: the newline is new in a LLaVA-NeXT made from a LLaVA-1.5 model and is what maps image rows into the LM, as
    the projector does: it must freeze, train and take --projector_lr with it, and be counted in its table row."""

    def __init__(self, projector: torch.nn.Module, image_newline: torch.nn.Parameter):
        super().__init__()
        self.projector = projector
        self.image_newline = image_newline


def components(model: PreTrainedModel) -> dict[str, torch.nn.Module]:
    """The four parts that freeze flags and the parameter table talk about (of the base model, under peft)."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    projector = model.model.multi_modal_projector
    newline = getattr(model.model, "image_newline", None)
    return {
        "vision_tower": model.model.vision_tower,
        "projector": projector if newline is None else _ProjectorGroup(projector, newline),
        "language_model": model.model.language_model,
        "lm_head": model.lm_head,
    }


def set_trainable(model: PreTrainedModel, *, vision_tower: bool, projector: bool, language_model: bool) -> None:
    """Set `requires_grad` per component; the lm_head goes with the language model.

    Frozen parts build no autograd graph of their own (their weights need no gradient and, for the vision
    tower, neither do its inputs), yet stay ordinary modules: passing True later really trains them.
    """
    wanted = {"vision_tower": vision_tower, "projector": projector,
              "language_model": language_model, "lm_head": language_model}
    for name, module in components(model).items():
        module.requires_grad_(wanted[name])


def module_name(model: torch.nn.Module, component: str) -> str:
    """Full name of a component inside `model`, e.g. 'model.multi_modal_projector'."""
    return {id(module): name for name, module in model.named_modules()}[id(components(model)[component])]


def linear_layer_names(model: torch.nn.Module, component: str) -> list[str]:
    """Full names (from the model's root) of the `nn.Linear` layers of one component, in model order.

    bitsandbytes' `Linear4bit`/`Linear8bitLt` subclass `nn.Linear`, so quantized layers are included.
    """
    prefix = module_name(model, component)
    return [f"{prefix}.{name}" for name, module in components(model)[component].named_modules()
            if isinstance(module, torch.nn.Linear)]


LORA_PREFIX = "lora_"  # peft's adapter tensors: lora_A, lora_B, lora_embedding_A/B, lora_magnitude_vector


def parameter_table(model: PreTrainedModel, rates: dict[str, float]) -> str:
    """Total and trainable parameters per component, its LoRA adapters in a row of their own ('<component>.lora'),
    and the learning rate each row trains at (`rates`, by component), 'frozen' where nothing of it trains.

    Each shared tensor is counted once (tied lm_head); the full sizes also when DeepSpeed ZeRO-3 has partitioned
    the weights.
    """
    seen: set[int] = set()
    rows: dict[str, list[int]] = {}
    for component, module in components(model).items():
        rows[component] = [0, 0]
        for name, param in module.named_parameters():
            if id(param) in seen:
                continue
            seen.add(id(param))
            is_adapter = any(part.startswith(LORA_PREFIX) for part in name.split("."))
            row = rows.setdefault(f"{component}.lora", [0, 0]) if is_adapter else rows[component]
            numel = getattr(param, "ds_numel", param.numel())  # ZeRO-3 keeps an empty tensor in place of a shard
            row[0] += numel
            row[1] += numel if param.requires_grad else 0
    table = [("group", "parameters", "trainable", "lr")]
    for group, (total, trainable) in rows.items():
        note = " (tied to input embeddings)" if group == "lm_head" and total == 0 else ""
        lr = f"{rates[group.split('.')[0]]:g}" if trainable else "frozen"
        table.append((group + note, f"{total:,}", f"{trainable:,}", lr))
    table.append(("total", f"{sum(r[0] for r in rows.values()):,}", f"{sum(r[1] for r in rows.values()):,}", ""))
    widths = [max(len(row[column]) for row in table) for column in range(4)]
    return "\n".join(row[0].ljust(widths[0]) + "".join(f"  {cell:>{width}}" for cell, width in zip(row[1:], widths[1:]))
                     for row in table)
