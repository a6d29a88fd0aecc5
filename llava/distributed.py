"""What multi-process runs (torchrun, accelerate launch, DeepSpeed) need beyond the Trainer: building models
outside DeepSpeed ZeRO-3's init, and decisions that one process takes for all of them."""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
from transformers.integrations import deepspeed as hf_deepspeed

T = TypeVar("T")


@contextlib.contextmanager
def without_zero3_init() -> Iterator[None]:
    """Build models as plain full-size modules even while a DeepSpeed ZeRO-3 config is active.

    Why: under ZeRO-3 transformers builds every model inside `deepspeed.zero.Init`, which partitions parameters as
    they are created, meta-device ones too ("Cannot copy out of meta tensor"), and parts moved into a LLaVA shell
    would carry another model's partitioning. Built plainly, the model is partitioned once, by DeepSpeed, when the
    Trainer hands it over (each process holds the new model in full until then).
    """
    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def multi_process() -> bool:
    """Whether this process trains together with others (torchrun, accelerate launch), whose graphs must match."""
    return torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


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
