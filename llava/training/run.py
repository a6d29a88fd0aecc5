"""One training run, top to bottom: processor -> data -> model -> trainer -> checkpoints -> final output.

`llava.train.main` parses the flags and locks the output_dir, then calls `train`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterator

from transformers import TrainerCallback, set_seed
from transformers.integrations import TensorBoardCallback

from llava.data.dataset import LlavaDataset, build_dataset
from llava.data.image_tokens import ImageTokens
from llava.data.mixture import RECORD_NAME, Mixture, apply_mixture, check_resumed_mixture, write_record
from llava.data.packing import planned_batches
from llava.data.records import load_samples
from llava.model.building import check_exact_packing
from llava.model.final_output import finish_interrupted_publish
from llava.model.lora import ADAPTER_SUBFOLDER
from llava.model.processor import image_tokens
from llava.training.build import check_architecture_flags, model_for_training, processor_for
from llava.training.callbacks import OffsetTensorBoardCallback, SampleAnswersCallback, write_flags_text
from llava.training.checkpoints import resolve_resume_checkpoint
from llava.training.distributed import decided_by_main_process
from llava.training.parsing import RunArguments
from llava.training.preemption import PREEMPTED_EXIT_CODE
from llava.training.step_axis import pipeline_stage, step_offset
from llava.training.trainable_weights import START_MODEL_RECORD, start_model_for
from llava.training.trainer import LlavaTrainer
from llava.utils.memory import memory_line

logger = logging.getLogger("llava")


def train(args: RunArguments, mixture: Mixture, callbacks: list[TrainerCallback] | None = None) -> LlavaTrainer:
    """Train as `args` say on `mixture` (`args.data.data_path` read by `llava.data.mixture.read_mixture`); `callbacks`
    are added to the Trainer's (e.g. a benchmark's timer). The output_dir must be locked for this run."""
    model_args, data_args, lora_args, training_args = args
    set_seed(training_args.seed)
    if training_args.should_save:
        finish_interrupted_publish(training_args.output_dir)

    # Data is checked with the processor alone, before any weights load: a bad sample costs seconds, not a 7B load.
    processor = processor_for(model_args)
    check_architecture_flags(processor, lora_args, training_args)
    tokens = image_tokens(processor)
    # Each node's local rank 0 checks and tokenizes (or reads the cache); the node's other processes then read its
    # cache. The mixture's amounts are applied after (the cache serves every amount); the report is printed once.
    with training_args.main_process_first(local=True, desc="checking and tokenizing the data"), \
            _reports_only_where_logged(training_args):
        train_dataset = checked_dataset(data_args, mixture, processor, tokens)
        train_dataset, mixture_record = apply_mixture(mixture, train_dataset, data_seed(training_args))
    logger.info("%d training samples from %s (%s)", len(train_dataset), ", ".join(mixture.paths), memory_line())
    # Which checkpoint a resume continues is decided here, once, so that its data mixture (and, for one holding only
    # the trainable weights, its start model: hashed once) is compared before any weights load; the trainer then
    # resumes exactly that one.
    checkpoint = decided_by_main_process(
        lambda: resolve_resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir))
    check_resumed_mixture(mixture_record, checkpoint)
    start_model = decided_by_main_process(lambda: start_model_for(model_args, training_args, checkpoint))
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

    model = model_for_training(model_args, lora_args, training_args, processor)
    logger.info("Model ready (%s)", memory_line())
    if training_args.packing:
        check_exact_packing(model)
    trainer = LlavaTrainer(model=model, args=training_args, train_dataset=train_dataset, data_collator=collator,
                           processing_class=processor, callbacks=callbacks)
    if "tensorboard" in training_args.report_to and step_offset():  # a pipeline's later stage
        trainer.remove_callback(TensorBoardCallback)
        trainer.add_callback(OffsetTensorBoardCallback(step_offset()))
    if "tensorboard" in training_args.report_to and pipeline_stage() and trainer.is_world_process_zero():
        write_flags_text(os.path.join(training_args.output_dir, "runs"), pipeline_stage(), sys.argv[1:], step_offset())
    trainer.checkpoint_records[RECORD_NAME] = mixture_record  # checked when a checkpoint is resumed
    if start_model is not None:  # --checkpoint_weights trainable: what resuming rebuilds the other weights from
        trainer.checkpoint_records[START_MODEL_RECORD] = start_model
    trainer.train(resume_from_checkpoint=checkpoint)
    if trainer.preempted:  # checkpoint saved; the final output is written by the run that finishes
        logger.warning("Stopped by SIGTERM at step %d after saving a checkpoint; rerun the same command with "
                       "--resume_from_checkpoint True to continue. Exit status %d.", trainer.state.global_step,
                       PREEMPTED_EXIT_CODE)
        raise SystemExit(PREEMPTED_EXIT_CODE)
    if lora_args.lora_enable:  # merged LLaVA + adapter/, see llava.model.lora
        trainer.save_final_output(lambda folder: save_lora_output(trainer, lora_args.merge_lora, folder))
    else:  # final weights + config + processor
        trainer.save_final_output(trainer.save_model)
    return trainer


def checked_dataset(data_args, mixture: Mixture, processor, tokens: ImageTokens) -> LlavaDataset:
    """Every valid sample of the mixture's sources, checked and tokenized as the flags say (or read from the cache)."""
    return build_dataset(mixture, processor, tokens, data_args.model_max_length,
                         skip_invalid=data_args.skip_invalid_samples,
                         allow_absolute_image_paths=data_args.allow_absolute_image_paths,
                         max_image_pixels=data_args.max_image_pixels, cache_dir=data_args.tokenized_cache_dir,
                         decode_images=bool(data_args.decode_images))


def data_seed(training_args) -> int:
    """The seed of the mixture's draw: --data_seed, else --seed."""
    return training_args.data_seed if training_args.data_seed is not None else training_args.seed


@contextlib.contextmanager
def _reports_only_where_logged(training_args) -> Iterator[None]:
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


def save_lora_output(trainer: LlavaTrainer, merge: bool, output_dir: str) -> None:
    """Write a LoRA run's final output into `output_dir` (the staging folder of `LlavaTrainer.save_final_output`):
    the merged plain LLaVA with the adapter in `adapter/`, or (merge False) an adapter checkpoint like checkpoint-N.

    The merge runs as `python -m llava.merge_lora` in a fresh process: it holds the whole base in float32, and
    beside this process's training memory (the model, allocator caches of freed activations) that would be the
    run's peak. If it fails, nothing is published: the run's newest checkpoint-N holds the same adapter.
    """
    if not merge:
        trainer.save_model(output_dir)
        return
    adapter_dir = os.path.join(output_dir, ADAPTER_SUBFOLDER)
    trainer.save_model(adapter_dir)
    if trainer.args.should_save:
        command = [sys.executable, "-m", "llava.merge_lora", "--checkpoint", adapter_dir, "--output_dir", output_dir]
        if subprocess.run(command).returncode != 0:
            raise RuntimeError("Merging the adapters failed (see above), so the final output was not written; the "
                               "newest checkpoint-N in --output_dir holds the adapter: merge it with python -m "
                               "llava.merge_lora --checkpoint <it> --output_dir <folder>.")
