"""TensorBoard callbacks: what the model answers, not only a loss curve; a pipeline stage's steps on the pipeline's
step axis, and its flags."""

from __future__ import annotations

import copy
import os

import numpy as np
from torch.utils.tensorboard import SummaryWriter
from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback

from llava.data.images import load_image, resolve_image_path
from llava.data.types import Sample
from llava.model.evaluation import sample_card
from llava.model.inference import Answerer
from llava.model.sharding import parameters_sharded
from llava.training.step_axis import step_offset

class SampleAnswersCallback(TrainerCallback):
    """At every checkpoint save and at the end, answer a few held-out samples greedily and log them to
    TensorBoard under <output_dir>/runs/samples: one picture per sample (image + question, model answer,
    ground truth) in the Images tab and a table in the Text tab.

    Only the main process writes. It also answers alone, except when the weights are sharded (FSDP, ZeRO-3):
    then every process must run the same forward passes, so all of them answer.
    """

    def __init__(self, samples: list[Sample], image_folder: str | None, processor, max_new_tokens: int = 16,
                 max_image_pixels: int | None = None):
        self.samples = samples
        self.max_image_pixels = max_image_pixels
        self.image_folder = image_folder
        self.processor = processor
        self.max_new_tokens = max_new_tokens
        self.writer = None
        self._answerer: Answerer | None = None  # built once: its template probes would otherwise rerun every save

    def _log(self, args, state, model) -> None:
        if not self.samples or not (state.is_world_process_zero or parameters_sharded(model)):
            return
        images = [[load_image(resolve_image_path(self.image_folder, p, s), self.max_image_pixels) for p in s.images]
                  for s in self.samples]
        was_training = model.training
        model.eval()
        try:
            if self._answerer is None:
                self._answerer = Answerer(model, self.processor, self.max_new_tokens)
            self._answerer.model = model
            answers = self._answerer.answer([s.messages[:-1] for s in self.samples], images)
        finally:
            model.train(was_training)
        if not state.is_world_process_zero:
            return
        step = state.global_step + step_offset()  # on a pipeline's step axis (0 for a single run)
        if self.writer is None:
            self.writer = SummaryWriter(os.path.join(args.output_dir, "runs", "samples"))
        rows = ["| id | question | model | truth |", "|---|---|---|---|"]
        for index, (sample, sample_images, answer) in enumerate(zip(self.samples, images, answers)):
            question = sample.messages[-2].content.replace(self.processor.image_token, "").strip()
            truth = sample.messages[-1].content
            card = sample_card(sample_images[0] if sample_images else None,
                               [f"Q: {question}", f"model: {answer}", f"truth: {truth}"])
            self.writer.add_image(f"samples/{index}_{sample.id}", np.asarray(card), step,
                                  dataformats="HWC")
            rows.append(f"| {sample.id} | {question} | {answer} | {truth} |")
        self.writer.add_text("samples", "\n".join(rows), step)
        self.writer.flush()

    def on_save(self, args, state, control, model=None, **kwargs):
        self._log(args, state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._log(args, state, model)
        if self.writer is not None:
            self.writer.close()


class OffsetTensorBoardCallback(TensorBoardCallback):
    """transformers' TensorBoard callback, logging at `offset` + the run's global step (a pipeline's later stage)."""

    def __init__(self, offset: int):
        super().__init__()
        self.offset = offset

    def on_log(self, args, state, control, logs=None, **kwargs):
        shifted = copy.copy(state)
        shifted.global_step = state.global_step + self.offset
        super().on_log(args, shifted, control, logs=logs, **kwargs)


def write_flags_text(log_dir: str, stage: str, argv: list[str], step: int) -> None:
    """A pipeline stage's command-line flags as a table in TensorBoard's Text tab, at the step it starts from."""
    pairs, index = [], 0
    while index < len(argv):
        has_value = index + 1 < len(argv) and not argv[index + 1].startswith("--")
        pairs.append((argv[index].lstrip("-"), argv[index + 1] if has_value else ""))
        index += 2 if has_value else 1
    rows = ["| flag | value |", "|---|---|", *(f"| {flag} | {value} |" for flag, value in pairs)]
    with SummaryWriter(log_dir) as writer:
        writer.add_text(f"pipeline/{stage}/flags", "\n".join(rows), step)
