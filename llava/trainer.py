"""`LlavaTrainer`: a thin `transformers.Trainer` subclass; what it adds is listed in its docstring."""

from __future__ import annotations

import logging

from transformers import Trainer

from llava.model import parameter_table

logger = logging.getLogger(__name__)


class LlavaTrainer(Trainer):
    """`Trainer` for LLaVA models.

    - Needs the processor as `processing_class`: the Trainer then writes it into every checkpoint-N and the
      final output, so each one loads with `AutoProcessor.from_pretrained` beside the weights.
    - Logs the per-component parameter table when training starts, so what trains is never a surprise.
    """

    def __init__(self, *args, processing_class=None, **kwargs):
        if processing_class is None:
            raise ValueError("LlavaTrainer needs processing_class=<the LlavaProcessor>, so checkpoints are complete.")
        super().__init__(*args, processing_class=processing_class, **kwargs)

    def train(self, *args, **kwargs):
        if self.is_world_process_zero():
            logger.info("Parameters per component:\n%s", parameter_table(self.model))
        return super().train(*args, **kwargs)
