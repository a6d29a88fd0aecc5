"""What multi-process runs (torchrun, accelerate launch, DeepSpeed) need beyond the Trainer: DeepSpeed's process
group on machines without GPUs, and decisions that one process takes for all of them."""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from typing import TypeVar

import torch
from transformers.trainer_pt_utils import AcceleratorConfig

from llava.model.sharding import multi_process

T = TypeVar("T")


def start_deepspeed_on_cpu(timeout_s: int) -> None:
    """Start the run's process group for DeepSpeed on a machine without GPUs: gloo, one rank per process.

    Why: `TrainingArguments` starts DeepSpeed's process group without naming a backend, and accelerate, finding no
    GPU backend, then counts a single process while DeepSpeed counts them all ("train_batch_size is not equal to
    micro_batch_per_gpu * gradient_acc_step * world_size"). Started here first, accelerate's shared state is the
    one that TrainingArguments then finds.
    """
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]


def keeping_started_state(config: AcceleratorConfig | dict | str | None) -> AcceleratorConfig:
    """`--accelerator_config` (None, a dict or a JSON file, as TrainingArguments reads it) with
    `use_configured_state` on, so that TrainingArguments keeps the process group started before it instead of
    resetting it."""
    if not isinstance(config, AcceleratorConfig):
        config = AcceleratorConfig.from_json_file(config) if isinstance(config, str) else AcceleratorConfig(
            **(config or {}))
    config.use_configured_state = True
    return config


def decided_by_main_process(decide: Callable[[], T]) -> T:
    """`decide()` computed once, by global rank 0, and its result (or its exception) given to every process.

    Why: decisions that read shared state, such as which checkpoint `--resume_from_checkpoint True` means, can come
    out differently per process (a network filesystem's cached listings, a save finishing between two reads);
    processes resuming from different steps would then train out of step. Every process must call this at the
    same point.
    """
    if not multi_process():
        return decide()
    outcome: list = [None]
    if torch.distributed.get_rank() == 0:
        try:
            outcome[0] = (decide(), None)
        except Exception as error:  # raised on every process below, not only here (others would wait forever)
            outcome[0] = (None, error)
    torch.distributed.broadcast_object_list(outcome, src=0)
    value, error = outcome[0]
    if error is not None:
        raise error
    return value
