"""`python train_llava.py pipeline.yaml [--stages a,b] [--dry_run True] [--restart_from s] [flags]`: check every
stage, then run the stages in order, one `python -m llava.train` process each, recording each in the manifest.

Why a process per stage: each stage's memory (model, optimizer states, allocator caches, dataloader workers) is
surely returned before the next loads, and a stage is exactly the command a single run would be. The pipeline
process itself loads no weights; under a multi-GPU launcher each stage's process group is the launcher's
(`--launcher "torchrun --nproc_per_node 8"`), so the pipeline runs once, not once per GPU.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser
from transformers.trainer import TRAINER_STATE_NAME

from llava.data.mixture import RECORD_NAME, read_mixture
from llava.data.types import ConfigurationError, DataError
from llava.training.parsing import RUN_DATACLASSES, parse_args
from llava.training.pipeline.digests import model_digest
from llava.training.pipeline.dry_run import describe_plan
from llava.training.pipeline.manifest import new_manifest, read_manifest, write_manifest
from llava.training.pipeline.plan import (SKIP, StagePlan, check_selection, current_record, final_output_ready, plan,
                                             start_path)
from llava.training.pipeline.spec import Pipeline, read_pipeline, stage_argv
from llava.training.run_lock import run_lock
from llava.training.step_axis import STEP_OFFSET_ENV, write_flags_text

logger = logging.getLogger(__name__)


@dataclass
class PipelineArguments:
    """The flags of a pipeline run, beside the training flags that override its `defaults`."""

    stages: str | None = field(
        default=None, metadata={"help": "Comma-separated names of the stages to run (default: all). A stage whose "
                                        "start stage is neither done nor selected is refused."})
    dry_run: bool = field(
        default=False, metadata={"help": "Print the plan (per stage: start model, trainable parameters and learning "
                                         "rate per component, the data mixture, steps, output folder, what this "
                                         "run would do) and exit; loads no weights and writes nothing."})
    restart_from: str | None = field(
        default=None, metadata={"help": "Retrain this stage and every later one: their folders and records are "
                                        "deleted first (needed after their flags, data or start model changed)."})
    launcher: str | None = field(
        default=None, metadata={"help": "The command that starts each stage's process, before `-m llava.train`, "
                                        "e.g. 'torchrun --nproc_per_node 8' (default: this Python)."})


def run_pipeline(argv: list[str]) -> int:
    """Run (or with --dry_run, describe) the pipeline of file `argv[0]`; the exit status of the first stage that
    fails, else 0."""
    path = argv[0]
    parser = HfArgumentParser(PipelineArguments)
    parser.prog = f"train_llava.py {path}"
    options, overrides = parser.parse_args_into_dataclasses(args=argv[1:], return_remaining_strings=True)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigurationError(
            f"{path} is a pipeline: start it as one process, and say how each stage starts its processes with "
            "--launcher, e.g. `python train_llava.py pipeline.yaml --launcher 'torchrun --nproc_per_node 8'`.")
    known = {action.dest for action in HfArgumentParser(RUN_DATACLASSES)._actions}
    pipeline = read_pipeline(path, overrides, known)
    selected = check_selection(pipeline, options.stages, options.restart_from)
    mixtures = {}
    for stage in pipeline.stages:  # every stage, so a broken later one stops the run before the first trains
        where = f"{pipeline.path}: stage {stage.name}"
        try:
            args = parse_args(stage_argv(stage, start_path(pipeline, stage)))
            mixtures[stage.name] = read_mixture(args.data.data_path, args.data.image_folder)
        except ConfigurationError as error:
            raise ConfigurationError(f"{where}: {error}") from None
        except DataError as error:
            raise DataError(f"{where}: {error}", kind=error.kind) from None
    if options.dry_run:
        plans = plan(pipeline, read_manifest(pipeline.output_dir), mixtures, selected, options.restart_from)
        print(describe_plan(pipeline, plans, mixtures, read_manifest(pipeline.output_dir)))
        return 0
    with run_lock(pipeline.output_dir):
        manifest = read_manifest(pipeline.output_dir)
        plans = plan(pipeline, manifest, mixtures, selected, options.restart_from)
        manifest = manifest or new_manifest(pipeline.path)
        if options.restart_from:
            _clear_from(pipeline, manifest, options.restart_from)
        launcher = shlex.split(options.launcher) if options.launcher else [sys.executable]
        for stage_plan in plans:
            status = _run_stage(pipeline, stage_plan, manifest, mixtures[stage_plan.stage.name], launcher)
            if status:
                logger.error("Stage %s stopped with exit status %d; rerun the same command to resume it.",
                             stage_plan.stage.name, status)
                return status
    return 0


def _clear_from(pipeline: Pipeline, manifest: dict, restart_from: str) -> None:
    """Forget `restart_from` and every later stage: records first (a kill then leaves folders the next run
    deletes), then their folders."""
    names = pipeline.names[pipeline.names.index(restart_from):]
    for name in names:
        manifest["stages"].pop(name, None)
    write_manifest(pipeline.output_dir, manifest)
    for name in names:
        logger.warning("--restart_from %s: deleting %s", restart_from, pipeline.stage(name).output_dir)
        shutil.rmtree(pipeline.stage(name).output_dir, ignore_errors=True)


def step_offset(pipeline: Pipeline, name: str, manifest: dict) -> int:
    """Where stage `name`'s steps start on the pipeline's TensorBoard step axis: the steps of the stages before it."""
    earlier = pipeline.names[:pipeline.names.index(name)]
    return sum(manifest["stages"].get(other, {}).get("steps", 0) for other in earlier)


def _run_stage(pipeline: Pipeline, stage_plan: StagePlan, manifest: dict, mixture, launcher: list[str]) -> int:
    stage = stage_plan.stage
    if stage_plan.action == SKIP:
        logger.info("Stage %s is done (%s verified); skipping it.", stage.name, stage.output_dir)
        return 0
    manifest["stages"][stage.name] = current_record(pipeline, stage, mixture, manifest)
    write_manifest(pipeline.output_dir, manifest)
    offset = step_offset(pipeline, stage.name, manifest)
    argv = stage_argv(stage, stage_plan.start_path)
    # A final output already published means the stage's process finished and was killed before the manifest said
    # so: it is this stage's (its flags were recorded before it started), nothing to rerun.
    if not final_output_ready(stage.output_dir):
        logger.info("Stage %s (%s): %s", stage.name, stage_plan.action, shlex.join(["-m", "llava.train", *argv]))
        os.makedirs(stage.output_dir, exist_ok=True)
        write_flags_text(os.path.join(stage.output_dir, "runs"), stage.name, argv, offset)
        env = {**os.environ, "TENSORBOARD_LOGGING_DIR": os.path.join(stage.output_dir, "runs"),
               STEP_OFFSET_ENV: str(offset)}
        status = subprocess.run([*launcher, "-m", "llava.train", *argv], env=env).returncode
        if status:
            return status
    record = manifest["stages"][stage.name]
    record.update(status="done", final_output_sha256=model_digest(stage.output_dir),
                  steps=_read(stage.output_dir, TRAINER_STATE_NAME).get("global_step", 0),
                  selection_sha256=_read(stage.output_dir, RECORD_NAME).get("selection_sha256"))
    write_manifest(pipeline.output_dir, manifest)
    logger.info("Stage %s done: %s", stage.name, stage.output_dir)
    return 0


def _read(folder: str, name: str) -> dict:
    try:
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}
