"""`python train_llava.py` with accelerate's FSDP switched on for CPU processes, so CI can run real FSDP.

    torchrun --nproc_per_node 2 tests/helpers/fsdp_on_cpu.py <train_llava.py flags> --use_cpu True --fsdp "full_shard auto_wrap"

Why: accelerate enables FSDP only for GPU-like devices; on CPU it silently runs DDP instead, so a plain CPU run
never exercises sharded weights (their collective gathers, FSDP checkpoints). PyTorch's FSDP2 itself runs on CPU
with gloo. This shim makes accelerate use the FSDP plugin that Trainer passes for a multi-CPU run, and nothing else.
"""

import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_original_init = AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.fsdp_plugin = fsdp_plugin
        # AcceleratorState re-reads distributed_type from PartialState's shared state: set it there too.
        PartialState._shared_state["distributed_type"] = self.distributed_type = DistributedType.FSDP


AcceleratorState.__init__ = _init_with_fsdp_on_cpu

if __name__ == "__main__":
    from llava.train import main

    trainer = main(sys.argv[1:])
    if not trainer.is_fsdp_enabled:
        sys.exit("FSDP did not turn on: the shim in tests/helpers/fsdp_on_cpu.py no longer matches accelerate.")
