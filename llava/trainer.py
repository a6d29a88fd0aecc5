"""`LlavaTrainer`: a thin `transformers.Trainer` subclass; what it adds is listed in its docstring."""

from __future__ import annotations

import logging

import torch
from transformers import PreTrainedModel, Trainer

from llava.arguments import LlavaTrainingArguments
from llava.model import components, parameter_table

logger = logging.getLogger(__name__)


class LlavaTrainer(Trainer):
    """`Trainer` for LLaVA models (plain or wrapped with peft adapters).

    - Needs the processor as `processing_class`: the Trainer then writes it into every checkpoint-N and the
      final output, so each one loads with `AutoProcessor.from_pretrained` beside the weights.
    - Logs the per-component parameter table when training starts, so what trains is never a surprise.
    - Optimizer parameter groups per component (`--projector_lr`, `--vision_lr`), see `parameter_groups`.
    - Resuming a full-weight checkpoint restores every weight (see `_load_from_checkpoint`).
    """

    def __init__(self, *args, processing_class=None, **kwargs):
        if processing_class is None:
            raise ValueError("LlavaTrainer needs processing_class=<the LlavaProcessor>, so checkpoints are complete.")
        super().__init__(*args, processing_class=processing_class, **kwargs)

    def train(self, *args, **kwargs):
        if self.is_world_process_zero():
            logger.info("Parameters per component:\n%s", parameter_table(self.model))
        return super().train(*args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        """Load checkpoint-N's full weights through `from_pretrained`, strictly.

        Why: Trainer loads them with a raw `load_state_dict`, but transformers 5.x saves LLaVA under its original
        key names (`model.language_model.model.*`) that only `from_pretrained` maps back. The raw load misses
        every LM weight, merely warns, and the run resumes from the LM it started with (transformers #43701).
        Adapter checkpoints (peft models) and FSDP go through Trainer's own loading.
        """
        target = self.model if model is None else model
        if not isinstance(target, PreTrainedModel) or self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        saved = type(target).from_pretrained(resume_from_checkpoint, dtype=target.dtype)
        target.load_state_dict(saved.state_dict())  # strict: a missing or renamed weight fails instead of warning

    def get_optimizer_cls_and_kwargs(self, args: LlavaTrainingArguments, model: torch.nn.Module | None = None):
        """Trainer's optimizer choice (--optim), with our parameter groups: `create_optimizer` takes
        `kwargs["params"]` in place of its own two groups. Optimizers that bring their own groups keep them."""
        optimizer_cls, optimizer_kwargs = super().get_optimizer_cls_and_kwargs(args, model)
        if model is not None and not {"params", "model", "optimizer_dict"} & optimizer_kwargs.keys():
            optimizer_kwargs["params"] = parameter_groups(model, args, set(self.get_decay_parameter_names(model)))
        return optimizer_cls, optimizer_kwargs


def parameter_groups(model: torch.nn.Module, args: LlavaTrainingArguments, decay_names: set[str]) -> list[dict]:
    """Trainable parameters grouped by (component, weight decay or not).

    The projector learns at `args.projector_lr` and the vision tower (its adapters included) at `args.vision_lr`,
    each defaulting to `args.learning_rate`; everything else (the LM or its adapters, lm_head) at
    `args.learning_rate`. Parameters outside `decay_names` (biases and norms) get no weight decay. Each group
    carries a "name" for logs and tests.
    """
    rates = {"projector": args.projector_lr, "vision_tower": args.vision_lr}
    component_of = {id(p): name for name, module in components(model).items() if name in rates
                    for p in module.parameters()}
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        component = component_of.get(id(param), "language_model")
        decay = name in decay_names
        key = component if decay else f"{component}/no_decay"
        lr = rates.get(component)
        group = groups.setdefault(key, {"name": key, "params": [], "weight_decay": args.weight_decay if decay else 0.0,
                                        "lr": args.learning_rate if lr is None else lr})
        group["params"].append(param)
    return list(groups.values())
