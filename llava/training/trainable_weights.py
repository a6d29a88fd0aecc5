"""`--checkpoint_weights trainable`: checkpoint-N holds only the weights that train; resuming rebuilds the others
from the stage's start model, checked unchanged by its digest.

A stage-1 checkpoint-N (only the projector trains) then takes about the projector's size plus its optimizer state,
instead of the whole model's. Beside the optimizer, scheduler, RNG and trainer state that Trainer writes, it holds:
    trainable_weights.safetensors  every parameter that requires grad, under its in-memory name
    start_model.json               what the other weights are rebuilt from: the start model's paths as given, with
                                   their digests (`llava.training.pipeline.digests.model_digest`), and for a model
                                   assembled from parts the seed (its new embedding rows are drawn with it)
The weights file is not model.safetensors, so no loader takes the folder for a whole model. Buffers are not saved:
none of the supported models changes one in training. LoRA checkpoints hold only the adapters and the fully trained
modules anyway (peft), so there the flag adds the record only. The final output is always a complete llava-hf
checkpoint.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llava.training.pipeline.digests import model_digest

CHECKPOINT_WEIGHTS_CHOICES = ["full", "trainable"]
TRAINABLE_WEIGHTS_NAME = "trainable_weights.safetensors"
START_MODEL_RECORD = "start_model.json"


@dataclass
class CheckpointWeightsArguments:
    """`--checkpoint_weights`, one of `LlavaTrainingArguments`' flags."""

    checkpoint_weights: str = field(
        default="full",
        metadata={"help": "What checkpoint-N holds of the model: 'full' (every weight) or 'trainable' (only the "
                          "weights that train: a stage-1 checkpoint then takes about the projector's size instead "
                          "of the whole model's). Resuming a 'trainable' checkpoint rebuilds the other weights from "
                          "the start model (--model_name_or_path, or the vision and language parts), which must be "
                          "unchanged: its digest is checked (a hub id by name only). Hashing it costs a read of its "
                          "files when the run starts. Not with DeepSpeed or FSDP. LoRA checkpoints hold only the "
                          "adapters either way; the final output is always complete.",
                  "choices": CHECKPOINT_WEIGHTS_CHOICES},
    )

    def _check_checkpoint_weights(self, sharded: bool) -> None:
        """Refuse trainable-only checkpoints when the model is sharded (`sharded`: DeepSpeed or FSDP): those save and
        resume their own model states, with every weight, never through `save_trainable_weights`."""
        if self.checkpoint_weights == "trainable" and sharded:
            raise ValueError("--checkpoint_weights trainable works without DeepSpeed and FSDP only: they save and "
                             "resume their own (sharded) model states, which hold every weight. Drop the flag (or "
                             "pass --checkpoint_weights full), or train without --deepspeed/--fsdp.")


def holds_trainable_weights_only(checkpoint: str | None) -> bool:
    """True for a checkpoint-N saved under --checkpoint_weights trainable."""
    return checkpoint is not None and os.path.isfile(os.path.join(checkpoint, TRAINABLE_WEIGHTS_NAME))


def save_trainable_weights(model: torch.nn.Module, folder: str) -> None:
    """Write the parameters of `model` that require grad into `folder`, under their in-memory names."""
    weights = {name: param.detach().cpu().contiguous() for name, param in model.named_parameters()
               if param.requires_grad}
    save_file(weights, os.path.join(folder, TRAINABLE_WEIGHTS_NAME), metadata={"format": "pt"})


def load_trainable_weights(model: torch.nn.Module, folder: str) -> None:
    """Copy a trainable-only checkpoint's weights into `model` in place, strictly: the saved names must be exactly
    the parameters of `model` that train, each of the same shape (cast to the parameter's dtype)."""
    trainable = {name: param for name, param in model.named_parameters() if param.requires_grad}
    with safe_open(os.path.join(folder, TRAINABLE_WEIGHTS_NAME), framework="pt", device="cpu") as handle:
        saved = set(handle.keys())
        if saved != trainable.keys():
            raise ValueError(
                f"{folder} holds the weights of other parameters than this run trains (missing: "
                f"{sorted(trainable.keys() - saved)[:5]}, not trained here: {sorted(saved - trainable.keys())[:5]}). "
                "Resume with the --freeze_* and --lora_* flags of the run that saved it.")
        with torch.no_grad():
            for name in sorted(saved):
                tensor = handle.get_tensor(name)
                if tensor.shape != trainable[name].shape:  # copy_ would broadcast some mismatches silently
                    raise ValueError(f"{folder}: {name} has shape {list(tensor.shape)}, the model's "
                                     f"{list(trainable[name].shape)}.")
                trainable[name].copy_(tensor)


def start_model_record(model_args, seed: int) -> dict:
    """What the weights that do not train come from: each start model flag's path as given and its digest (None
    for a hub id), and for a model assembled from parts the seed, which draws its new embedding rows."""
    if model_args.assembles_new_model:
        paths = {"vision_model_name_or_path": model_args.vision_model_name_or_path,
                 "language_model_name_or_path": model_args.language_model_name_or_path}
    else:
        paths = {"model_name_or_path": model_args.model_name_or_path}
    record = {"start_model": {flag: {"path": path, "digest": model_digest(path)} for flag, path in paths.items()}}
    return {**record, "seed": seed} if model_args.assembles_new_model else record


def start_model_for(model_args, training_args, checkpoint: str | None) -> dict | None:
    """The start model record this run writes into its checkpoints (None under --checkpoint_weights full), after
    checking that `checkpoint`, when it holds the trainable weights only, was trained from the same start model.

    Raises:
        StartModelChangedError: the start model differs from the one `checkpoint` was trained from.
    """
    trainable = training_args.checkpoint_weights == "trainable"
    if not trainable and not holds_trainable_weights_only(checkpoint):
        return None
    record = start_model_record(model_args, training_args.seed)
    if holds_trainable_weights_only(checkpoint):
        check_start_model(record, checkpoint)
    return record if trainable else None


class StartModelChangedError(RuntimeError):
    """A trainable-only checkpoint would be resumed on another start model than the one it was trained from."""


def check_start_model(record: dict, checkpoint: str) -> None:
    """Raise `StartModelChangedError` unless `checkpoint`'s start model record matches `record` (this run's)."""
    try:
        with open(os.path.join(checkpoint, START_MODEL_RECORD), encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError) as error:
        saved, problem = None, f"its {START_MODEL_RECORD} does not read ({error})"
    changes = [problem] if saved is None else start_model_changes(saved, record)
    if changes:
        listing = "\n".join(f"  {change}" for change in changes)
        raise StartModelChangedError(
            f"{checkpoint} holds only the weights that trained (--checkpoint_weights trainable); the others are "
            f"rebuilt from the start model, which is not the one this checkpoint was trained from:\n{listing}\n"
            "Point --model_name_or_path (or --vision_model_name_or_path and --language_model_name_or_path) at the "
            "original start model, unchanged, with the same --seed; or resume from a checkpoint saved with "
            "--checkpoint_weights full, which holds every weight.")


def start_model_changes(saved: dict, current: dict) -> list[str]:
    """How this run's start model (`current`) differs from the one a checkpoint recorded (`saved`), one line each:
    by digest where both have one (the folder may have moved), else by path."""
    was, now = saved.get("start_model", {}), current["start_model"]
    if was.keys() != now.keys():
        return [f"trained from {_flags(was)}, now given {_flags(now)}"]
    changes = []
    for flag, before in was.items():
        after = now[flag]
        if before["digest"] and after["digest"] and before["digest"] != after["digest"]:
            changes.append(f"--{flag} {after['path']}: its files' digest is {after['digest'][:12]}..., "
                           f"{before['path']} had {before['digest'][:12]}... when the checkpoint was saved")
        elif not (before["digest"] and after["digest"]) and before != after:
            changes.append(f"--{flag}: {before['path']} (digest {before['digest']}) when saved, now {after['path']} "
                           f"(digest {after['digest']})")
    if saved.get("seed") != current.get("seed"):
        changes.append(f"--seed {saved.get('seed')} when saved, now {current.get('seed')}")
    return changes


def _flags(start_model: dict) -> str:
    """A start model record's flags as they would be given, e.g. '--model_name_or_path stage1/'."""
    return ", ".join(f"--{flag} {entry['path']}" for flag, entry in start_model.items())
