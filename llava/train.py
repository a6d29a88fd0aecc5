"""Training entry point: arguments -> processor -> data -> model -> collator -> trainer -> checkpoints.

Run as `python train_llava.py ...` (or a single .json/.yaml config file); see README for the flags.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

import torch
from transformers import ProcessorMixin, TrainerCallback, set_seed

from llava.arguments import DataArguments, LlavaTrainingArguments, ModelArguments, parse_args
from llava.callbacks import SampleAnswersCallback
from llava.checkpoints import resolve_resume_checkpoint
from llava.data import load_samples
from llava.dataset import build_dataset
from llava.distributed import decided_by_main_process
from llava.final_output import finish_interrupted_publish
from llava.lora import load_lora_model, save_lora_output
from llava.mixture import RECORD_NAME, apply_mixture, check_resumed_mixture, write_record
from llava.model import load_model, set_trainable
from llava.packing import check_exact_packing, planned_batches
from llava.processor import load_processor
from llava.preemption import PREEMPTED_EXIT_CODE
from llava.recompute import recompute_mlp_activations
from llava.run_lock import run_lock
from llava.trainer import LlavaTrainer

logger = logging.getLogger("llava")


def build_model(model_args: ModelArguments, training_args: LlavaTrainingArguments,
                processor: ProcessorMixin) -> torch.nn.Module:
    """The model to train: full weights frozen per component, or (--lora_enable) a frozen base, its LM quantized
    with --load_in_4bit/8bit, carrying adapters next to the fully trained unfrozen components."""
    if training_args.lora_enable:
        model = load_lora_model(model_args, training_args, processor)
    else:
        model = load_model(model_args, processor)
        set_trainable(model, vision_tower=not training_args.freeze_vision_model,
                      projector=not training_args.freeze_projector,
                      language_model=not training_args.freeze_language_model)
    # --gradient_checkpointing: the Trainer switches it on, through `LlavaForConditionalGeneration`'s overrides
    # (only the LM's embeddings made to require grad; a frozen tower is not checkpointed).
    if training_args.recompute_mlp_activations and not (
            training_args.gradient_checkpointing or training_args.lora_enable or training_args.freeze_language_model):
        recompute_mlp_activations(model.model.language_model)
    return model


@contextlib.contextmanager
def _reports_only_where_logged(training_args: LlavaTrainingArguments) -> Iterator[None]:
    """Keep this package's reports (e.g. the invalid-sample summary) to the process that logs (global rank 0):
    every process checks the same data, and N copies of one report bury it. Errors still show everywhere."""
    package = logging.getLogger("llava")
    level = package.level
    if not training_args.should_log:
        package.setLevel(logging.ERROR)
    try:
        yield
    finally:
        package.setLevel(level)


def main(argv: list[str] | None = None, callbacks: list[TrainerCallback] | None = None) -> LlavaTrainer:
    """Train as the flags in `argv` say; `callbacks` are added to the Trainer's (e.g. a benchmark's timer).

    The output_dir is checked to be writable and locked for this run first (`llava.run_lock`): nothing is
    loaded for a run that could not save, or that would write over another run's files."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO,
                        stream=sys.stdout)
    model_args, data_args, training_args = parse_args(argv)
    with run_lock(training_args.output_dir):
        return train(model_args, data_args, training_args, callbacks)


def train(model_args: ModelArguments, data_args: DataArguments, training_args: LlavaTrainingArguments,
          callbacks: list[TrainerCallback] | None) -> LlavaTrainer:
    """`main` once the output_dir is locked."""
    set_seed(training_args.seed)
    if training_args.should_save:
        finish_interrupted_publish(training_args.output_dir)

    # Data is checked with the processor alone, before any weights load: a bad sample costs seconds, not a 7B load.
    # Each node's main process goes first (the others wait; a data cache, once there, is then built once per node);
    # the report is printed once.
    processor = load_processor(model_args)
    # Local rank 0 checks and tokenizes (or reads the cache); the node's other processes then read its cache.
    # The mixture's amounts are applied after (the cache serves every amount).
    mixture = data_args.mixture
    with training_args.main_process_first(local=True, desc="checking and tokenizing the data"), \
            _reports_only_where_logged(training_args):
        train_dataset = build_dataset(mixture.paths, processor, data_args.model_max_length, mixture.image_folders,
                                      skip_invalid=data_args.skip_invalid_samples,
                                      allow_absolute_image_paths=data_args.allow_absolute_image_paths,
                                      max_image_pixels=data_args.max_image_pixels,
                                      cache_dir=data_args.tokenized_cache_dir)
        seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed
        train_dataset, mixture_record = apply_mixture(mixture, train_dataset, seed)
    logger.info("%d training samples from %s", len(train_dataset), ", ".join(mixture.paths))
    # Which checkpoint a resume continues is decided here, so that its data mixture is compared before any weights
    # load; the trainer then resumes exactly that one.
    checkpoint = decided_by_main_process(
        lambda: resolve_resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir))
    check_resumed_mixture(mixture_record, checkpoint)
    if training_args.should_save:
        write_record(training_args.output_dir, mixture_record)
    callbacks = list(callbacks or [])
    train_dataset, collator = planned_batches(
        train_dataset, processor.tokenizer.pad_token_id, data_args.model_max_length, training_args.packing,
        training_args.max_tokens_per_batch, training_args.seed)
    if data_args.sample_data_path:
        samples = load_samples([data_args.sample_data_path])[: data_args.num_logged_samples]
        callbacks.append(SampleAnswersCallback(samples, data_args.sample_image_folder or data_args.image_folder,
                                               processor, max_image_pixels=data_args.max_image_pixels))

    model = build_model(model_args, training_args, processor)
    if training_args.packing:
        check_exact_packing(model)
    trainer = LlavaTrainer(
        model=model, args=training_args, train_dataset=train_dataset,
        data_collator=collator, processing_class=processor,
        callbacks=callbacks,
    )
    trainer.checkpoint_records[RECORD_NAME] = mixture_record  # checked when a checkpoint is resumed
    trainer.train(resume_from_checkpoint=checkpoint)
    if trainer.preempted:  # checkpoint saved; the final output is written by the run that finishes
        logger.warning("Stopped by SIGTERM at step %d after saving a checkpoint; rerun the same command with "
                       "--resume_from_checkpoint True to continue. Exit status %d.", trainer.state.global_step,
                       PREEMPTED_EXIT_CODE)
        raise SystemExit(PREEMPTED_EXIT_CODE)
    if training_args.lora_enable:  # merged LLaVA + adapter/, see llava.lora
        trainer.save_final_output(lambda folder: save_lora_output(trainer, training_args.merge_lora, folder))
    else:  # final weights + config + processor
        trainer.save_final_output(trainer.save_model)
    return trainer


if __name__ == "__main__":
    main()
