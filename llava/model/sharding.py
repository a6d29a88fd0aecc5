"""Models whose weights several processes share: built outside DeepSpeed ZeRO-3's init, and whether weights are
sharded (FSDP, ZeRO-3), so that every process must take part in each forward pass."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from transformers.integrations import deepspeed as hf_deepspeed


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


def parameters_sharded(model: torch.nn.Module) -> bool:
    """Whether FSDP (1 or 2) or DeepSpeed ZeRO-3 shards this model's weights across processes, so that every
    process must take part in each forward pass."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    return (any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules())
            or any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in model.parameters()))
