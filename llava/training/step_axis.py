"""One TensorBoard step axis across a pipeline's stages: a stage's events are logged at the pipeline's step
(`$TRAIN_LLAVA_STEP_OFFSET`, set by the pipeline to the steps of the stages before it, plus the stage's own), so
`tensorboard --logdir <output_dir>` shows the stages one after the other. A single run has offset 0. The pipeline
also names the stage (`$TRAIN_LLAVA_PIPELINE_STAGE`), whose process logs its flags as text
(`llava.training.callbacks`). Light on purpose: the pipeline's process imports it and holds no torch."""

from __future__ import annotations

import os

STEP_OFFSET_ENV = "TRAIN_LLAVA_STEP_OFFSET"
STAGE_ENV = "TRAIN_LLAVA_PIPELINE_STAGE"


def step_offset() -> int:
    return int(os.environ.get(STEP_OFFSET_ENV, "0") or 0)


def pipeline_stage() -> str | None:
    """The name of the pipeline stage this run is, or None for a run of its own."""
    return os.environ.get(STAGE_ENV) or None
