"""Training entry point: arguments -> processor -> data -> model -> collator -> trainer -> checkpoints.

Run as `python train_llava.py ...` (or a single .json/.yaml config file); see README for the flags.
"""

from __future__ import annotations

import logging
import sys

from transformers import set_seed

from llava.arguments import parse_args
from llava.collator import LlavaDataCollator
from llava.dataset import build_dataset
from llava.model import load_model, load_processor, set_trainable
from llava.trainer import LlavaTrainer

logger = logging.getLogger("llava")


def main(argv: list[str] | None = None) -> LlavaTrainer:
    model_args, data_args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO,
                        stream=sys.stdout)
    set_seed(training_args.seed)

    # Data is checked with the processor alone, before any weights load: a bad sample costs seconds, not a 7B load.
    processor = load_processor(model_args)
    train_dataset = build_dataset(data_args.data_paths, processor, data_args.model_max_length, data_args.image_folder)
    logger.info("%d training samples from %s", len(train_dataset), ", ".join(data_args.data_paths))

    model = load_model(model_args, processor)
    set_trainable(model, vision_tower=not training_args.freeze_vision_model,
                  projector=not training_args.freeze_projector,
                  language_model=not training_args.freeze_language_model)
    if training_args.gradient_checkpointing:
        # With frozen embeddings the checkpointed blocks would see inputs without grad and drop the gradient.
        model.enable_input_require_grads()

    trainer = LlavaTrainer(
        model=model, args=training_args, train_dataset=train_dataset,
        data_collator=LlavaDataCollator(pad_token_id=processor.tokenizer.pad_token_id), processing_class=processor,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()  # final weights + config + processor in --output_dir
    trainer.save_state()
    return trainer


if __name__ == "__main__":
    main()
