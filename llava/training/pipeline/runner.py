"""`python train_llava.py pipeline.yaml [--stages a,b] [--dry_run True] [--restart_from s] [flags]`: check every
stage, then run the stages in order, one `python -m llava.train` process each, recording each in the manifest.

Why a process per stage: each stage's memory (model, optimizer states, allocator caches, dataloader workers) is
surely returned before the next loads, and a stage is exactly the command a single run would be. The pipeline
process itself loads no weights and, started from the command line, no torch either: the checks that need
transformers run in a process of their own first (`check`), so the pipeline's peak is its largest stage's plus
~60 MB. Under a multi-GPU launcher each stage's process group is the launcher's (`--launcher "torchrun
--nproc_per_node 8"`), so the pipeline runs once, not once per GPU.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading

from llava.data.mixture import RECORD_NAME, read_mixture
from llava.data.types import USER_ERROR_EXIT_CODE, ConfigurationError
from llava.training.pipeline.arguments import FLAG_NAMES_ENV, PipelineArguments, parse_pipeline_arguments
from llava.training.pipeline.digests import model_digest
from llava.training.pipeline.manifest import new_manifest, read_manifest, write_manifest
from llava.training.pipeline.plan import (SKIP, StagePlan, check_selection, current_record, final_output_ready, plan,
                                             start_path)
from llava.training.pipeline.spec import Pipeline, read_pipeline, stage_argv
from llava.training.run_lock import run_lock
from llava.training.step_axis import STAGE_ENV, STEP_OFFSET_ENV

logger = logging.getLogger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"  # transformers.trainer's, without importing it


def run_pipeline(argv: list[str]) -> int:
    """Run (or with --dry_run, describe) the pipeline of file `argv[0]`; the exit status of the first stage that
    fails (or of the checks' process), else 0."""
    path = argv[0]
    options, overrides = parse_pipeline_arguments(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigurationError(
            f"{path} is a pipeline: start it as one process, and say how each stage starts its processes with "
            "--launcher, e.g. `python train_llava.py pipeline.yaml --launcher 'torchrun --nproc_per_node 8'`.")
    known = _checked_flag_names(argv, options, overrides)
    if not isinstance(known, set):
        return known  # the checks' process exited with this status, having said why
    if options.dry_run:
        return 0
    pipeline = read_pipeline(path, overrides, known)
    selected = check_selection(pipeline, options.stages, options.restart_from)
    # Checked above (the stage's flags parse, its files exist); read again here from the same flags.
    mixtures = {stage.name: read_mixture(stage.flags["data_path"], stage.flags.get("image_folder"))
                for stage in pipeline.stages}
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
                logger.error("Stage %s stopped with exit status %d; %s", stage_plan.stage.name, status,
                             "fix what its error line names, then rerun the same command." if
                             status == USER_ERROR_EXIT_CODE else "rerun the same command to resume it.")
                return status
    return 0


def _checked_flag_names(argv: list[str], options: PipelineArguments, overrides: list[str]) -> set[str] | int:
    """Run `check.check_pipeline`: here when this process holds torch already (called from Python: its errors are
    raised), else in a child process (the command line: this process stays small); the training flags' names, or
    the child's exit status when it failed."""
    if "torch" in sys.modules:
        from llava.training.pipeline.check import check_pipeline

        return check_pipeline(argv[0], options, overrides)
    with tempfile.TemporaryDirectory() as folder:
        names_file = os.path.join(folder, "flag_names.json")
        status = subprocess.run([sys.executable, "-m", "llava.train", *argv],
                                env={**os.environ, FLAG_NAMES_ENV: names_file}).returncode
        if status:
            return status
        with open(names_file, encoding="utf-8") as f:
            return set(json.load(f))


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
        env = {**os.environ, "TENSORBOARD_LOGGING_DIR": os.path.join(stage.output_dir, "runs"),
               STEP_OFFSET_ENV: str(offset), STAGE_ENV: stage.name}
        status = _run_passing_on_sigterm([*launcher, "-m", "llava.train", *argv], env)
        if status:
            return status
    record = manifest["stages"][stage.name]
    record.update(status="done", final_output_sha256=model_digest(stage.output_dir),
                  steps=_read(stage.output_dir, TRAINER_STATE_NAME).get("global_step", 0),
                  selection_sha256=_read(stage.output_dir, RECORD_NAME).get("selection_sha256"))
    write_manifest(pipeline.output_dir, manifest)
    logger.info("Stage %s done: %s", stage.name, stage.output_dir)
    return 0


def _run_passing_on_sigterm(command: list[str], env: dict) -> int:
    """Run a stage's `command` to its end and return its exit status; a SIGTERM to this process meanwhile is passed
    on to it (it saves a checkpoint and exits 143) instead of ending this one first (the stage would be killed, or
    orphaned with this pipeline's lock left behind)."""
    process = subprocess.Popen(command, env=env)
    if threading.current_thread() is not threading.main_thread():
        return process.wait()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: process.send_signal(signum))
    try:
        return process.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)


def _read(folder: str, name: str) -> dict:
    try:
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}
