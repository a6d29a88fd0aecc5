"""`python train_llava.py ...` (or `python -m llava.train ...`): parse the flags, check the data files, lock the
output_dir, train (`llava.training.run.train`). `--help` lists every flag; see README.md and run_stage*.sh."""

from __future__ import annotations

import logging
import os
import sys

from typing import TYPE_CHECKING

from llava.reporting import run_command
from llava.training.pipeline.arguments import FLAG_NAMES_ENV
from llava.training.pipeline.runner import run_pipeline
from llava.training.pipeline.spec import CONFIG_SUFFIXES, is_pipeline_file

if TYPE_CHECKING:
    from transformers import TrainerCallback

    from llava.training.trainer import LlavaTrainer


def main(argv: list[str] | None = None, callbacks: list[TrainerCallback] | None = None) -> LlavaTrainer | int:
    """Train as the flags in `argv` say; `callbacks` are added to the Trainer's (e.g. a benchmark's timer). A
    config file with `stages:` first is a pipeline (`llava.training.pipeline`): its exit status is returned.

    The data files are found and the output_dir is checked to be writable and locked for this run first
    (`llava.training.run_lock`): nothing is loaded for a run that could not read its data or save, or that would
    write over another run's files."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO,
                        stream=sys.stdout)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0].lower().endswith(CONFIG_SUFFIXES) and is_pipeline_file(argv[0]):
        if os.environ.get(FLAG_NAMES_ENV):  # the checks' process that the pipeline's own process starts
            from llava.training.pipeline.check import main as check_pipeline

            return check_pipeline(argv)
        return run_pipeline(argv)
    # Imported here: a pipeline's process never needs them (it stays free of torch while its stages train).
    from llava.data.mixture import read_mixture
    from llava.model.library_refusals import naming_library_refusals
    from llava.training.parsing import check_model_paths, parse_args
    from llava.training.run import train
    from llava.training.run_lock import run_lock

    args = parse_args(argv)
    check_model_paths(args.model)
    mixture = read_mixture(args.data.data_path, args.data.image_folder)
    with run_lock(args.training.output_dir), naming_library_refusals(read_folders(args)):
        return train(args, mixture, callbacks)


def read_folders(args) -> list[str]:
    """The folders a run loads files from: its model parts, and the output_dir (or the folder
    --resume_from_checkpoint names) whose checkpoint-N it resumes."""
    model, training = args.model, args.training
    folders = [model.model_name_or_path, model.vision_model_name_or_path, model.language_model_name_or_path,
               training.resume_from_checkpoint, training.output_dir]
    return [folder for folder in folders if isinstance(folder, str) and os.path.isdir(folder)]


if __name__ == "__main__":
    run_command(main)
