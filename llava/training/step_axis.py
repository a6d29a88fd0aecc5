"""One TensorBoard step axis across a pipeline's stages: a stage's events are logged at the pipeline's step
(`$TRAIN_LLAVA_STEP_OFFSET`, set by the pipeline to the steps of the stages before it, plus the stage's own), so
`tensorboard --logdir <output_dir>` shows the stages one after the other. A single run has offset 0."""

from __future__ import annotations

import copy
import os

from torch.utils.tensorboard import SummaryWriter
from transformers.integrations import TensorBoardCallback

STEP_OFFSET_ENV = "TRAIN_LLAVA_STEP_OFFSET"


def step_offset() -> int:
    return int(os.environ.get(STEP_OFFSET_ENV, "0") or 0)


class OffsetTensorBoardCallback(TensorBoardCallback):
    """transformers' TensorBoard callback, logging at `offset` + the run's global step."""

    def __init__(self, offset: int):
        super().__init__()
        self.offset = offset

    def on_log(self, args, state, control, logs=None, **kwargs):
        shifted = copy.copy(state)
        shifted.global_step = state.global_step + self.offset
        super().on_log(args, shifted, control, logs=logs, **kwargs)


def write_flags_text(log_dir: str, stage: str, argv: list[str], step: int) -> None:
    """The stage's command-line flags as a table in TensorBoard's Text tab, at the step the stage starts from."""
    pairs, index = [], 0
    while index < len(argv):
        has_value = index + 1 < len(argv) and not argv[index + 1].startswith("--")
        pairs.append((argv[index].lstrip("-"), argv[index + 1] if has_value else ""))
        index += 2 if has_value else 1
    rows = ["| flag | value |", "|---|---|", *(f"| {flag} | {value} |" for flag, value in pairs)]
    with SummaryWriter(log_dir) as writer:
        writer.add_text(f"pipeline/{stage}/flags", "\n".join(rows), step)
