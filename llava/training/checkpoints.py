"""Crash-safe checkpoints: which checkpoint-N folders are complete, which one a restart resumes from, and which
ones rotation deletes.

A checkpoint-N folder counts as complete only once `checkpoint_complete.json` is in it. `LlavaTrainer` writes
`checkpoint_saving.json` into the folder before anything else and that marker last: after every process has
written its part (weights, optimizer, scheduler, RNG states, FSDP shards, trainer state) and the files are flushed
to disk. A process killed at any moment, even in the middle of a save, therefore leaves either a complete
checkpoint or a folder marked as one of our saves in progress, which is never resumed from and is deleted when that
step is saved again (or by rotation). Rotation runs only after the new checkpoint is complete and marks a folder as
in progress before deleting its files, so a half-deleted checkpoint is never taken for a complete one.

A checkpoint-N folder with neither marker is foreign (plain transformers, another trainer, an older version of
this project): it is never deleted. `--resume_from_checkpoint True` verifies it (trainer state present, weights
readable) and resumes from it when it is the newest valid checkpoint; a save at its step moves it aside.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time

from safetensors import safe_open
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from llava.training.checkpoint_errors import ForeignCheckpointError, MissingCheckpointError
from llava.utils.files import fsync_dir, fsync_tree, write_json_atomically

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "checkpoint_complete.json"
SAVING_MARKER = "checkpoint_saving.json"  # ours, written first: a save (or deletion) of ours is in progress
_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def is_complete(path: str) -> bool:
    """True for a checkpoint folder whose save finished: its marker is there and every file it lists still is."""
    try:
        with open(os.path.join(path, COMPLETE_MARKER), encoding="utf-8") as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all(os.path.exists(os.path.join(path, name)) for name in files)


def checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every checkpoint-N folder in `output_dir`, complete or not, oldest step first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_NAME.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def is_foreign(path: str) -> bool:
    """True for a checkpoint folder none of our saves wrote (no marker of ours): never ours to delete."""
    return not is_complete(path) and not os.path.exists(os.path.join(path, SAVING_MARKER))


def foreign_checkpoint_problem(path: str) -> str | None:
    """Why a foreign checkpoint cannot be resumed from, or None when it can: its trainer state reads and every
    safetensors weight file it has (model, adapter, or the shards of an index) opens with all its tensors."""
    try:
        with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as f:
            int(json.load(f)["global_step"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"no readable trainer_state.json ({type(error).__name__}: {error})"
    files = [name for name in (SAFE_WEIGHTS_NAME, "adapter_model.safetensors")
             if os.path.isfile(os.path.join(path, name))]
    try:
        if os.path.isfile(os.path.join(path, SAFE_WEIGHTS_INDEX_NAME)):
            with open(os.path.join(path, SAFE_WEIGHTS_INDEX_NAME), encoding="utf-8") as f:
                files += sorted(set(json.load(f)["weight_map"].values()))
        if not files:
            return "no safetensors weights"
        for name in files:
            with safe_open(os.path.join(path, name), framework="pt") as weights:  # checks the size: truncation
                weights.keys()
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types for truncated files
        return f"weights do not load ({type(error).__name__}: {error})"
    return None


def latest_complete_checkpoint(output_dir: str) -> str | None:
    """The complete checkpoint with the highest step in `output_dir`, or None (no checkpoint, or none complete)."""
    complete = [path for _, path in checkpoints(output_dir) if is_complete(path)]
    return complete[-1] if complete else None


def latest_resumable_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint to resume from: complete ones of ours and foreign ones that verify.

    Raises:
        ForeignCheckpointError: foreign folders that do not verify are newer than that checkpoint (resuming
            would train over their steps and replace them); the message lists them and the fix.
    """
    resumable, invalid = [], []
    for step, path in checkpoints(output_dir):
        if is_complete(path):
            resumable.append((step, path))
        elif is_foreign(path):
            problem = foreign_checkpoint_problem(path)
            if problem is None:
                resumable.append((step, path))
            else:
                invalid.append((step, path, problem))
    latest_step, latest = resumable[-1] if resumable else (-1, None)
    newer = [(path, problem) for step, path, problem in invalid if step > latest_step]
    if newer:
        listing = "\n".join(f"  {path}: {problem}" for path, problem in newer)
        raise ForeignCheckpointError(
            f"--resume_from_checkpoint True: {output_dir} holds checkpoint folders that this project did not write "
            f"(no {COMPLETE_MARKER}) and that cannot be resumed from:\n{listing}\n"
            f"The newest valid checkpoint is {latest or 'none'}. Nothing was deleted. Move those folders out of "
            "--output_dir (or delete them), or pass --resume_from_checkpoint <folder> to pick one yourself.")
    if latest is not None and is_foreign(latest):
        logger.warning("%s has no %s (written by another tool or an older version?); its trainer state and "
                       "weights verify, so training resumes from it.", latest, COMPLETE_MARKER)
    return latest


def resolve_resume_checkpoint(value: str | bool | None, output_dir: str) -> str | None:
    """What `--resume_from_checkpoint` means: a checkpoint folder to resume from, or None to start fresh.

    "True" is the latest resumable checkpoint in `output_dir` (see `latest_resumable_checkpoint`), or None when
    there is none yet, so one command can be rerun after any crash or preemption (transformers' own True raises
    when there is none). "False"/None start fresh. Anything else is an explicit folder, used as given; one without
    the completion marker (written by another tool, or by a save that was interrupted) is loaded with a warning.

    Raises:
        MissingCheckpointError: an explicit folder that does not exist.
        ForeignCheckpointError: see `latest_resumable_checkpoint`.
    """
    if value is None or str(value).lower() in ("false", ""):
        return None
    if str(value).lower() == "true":
        latest = latest_resumable_checkpoint(output_dir)
        if latest is None:
            logger.info("--resume_from_checkpoint True: no complete checkpoint in %s yet, training from the start.",
                        output_dir)
        else:
            logger.info("--resume_from_checkpoint True: resuming from %s.", latest)
        return latest
    path = str(value)
    if not os.path.isdir(path):
        raise MissingCheckpointError(f"--resume_from_checkpoint {path}: no such folder. Pass a checkpoint-N folder, or "
                                "True to resume from the latest complete checkpoint in --output_dir.")
    if not is_complete(path):
        logger.warning("%s has no %s: it was written by another tool, or its save was interrupted. Loading it "
                       "anyway; --resume_from_checkpoint True would only pick complete checkpoints.", path,
                       COMPLETE_MARKER)
    return path


def begin_save(path: str) -> None:
    """Claim checkpoint folder `path` for a save of ours: an existing folder of ours at that step (a complete one,
    or the leftover of a killed save) is deleted; a foreign one is moved aside, never overwritten; then the
    folder gets `SAVING_MARKER` before any file."""
    if os.path.isdir(path):
        if is_foreign(path):
            aside = f"{path}.foreign-{time.strftime('%Y%m%d-%H%M%S')}"
            logger.warning("%s was not written by this project (no %s); moving it to %s instead of saving over it.",
                           path, COMPLETE_MARKER, aside)
            os.rename(path, aside)
        else:
            remove_checkpoint(path)
    os.makedirs(path)
    write_json_atomically(os.path.join(path, SAVING_MARKER), {"pid": os.getpid()})


def mark_complete(path: str, step: int) -> None:
    """Declare checkpoint `path` complete: flush its files, write the marker atomically, then drop `SAVING_MARKER`."""
    fsync_tree(path)
    # Not the markers themselves, nor another node's temporary marker (--save_on_each_node on a shared filesystem).
    files = sorted(name for name in os.listdir(path)
                   if name != SAVING_MARKER and not name.startswith(COMPLETE_MARKER))
    write_json_atomically(os.path.join(path, COMPLETE_MARKER), {"global_step": step, "files": files})
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(path, SAVING_MARKER))
    fsync_dir(path)


def remove_checkpoint(path: str) -> None:
    """Delete a checkpoint folder of ours: first marked as in progress, then its complete marker, then its files, so
    a deletion cut short leaves a leftover of ours, never a complete-looking one with files missing (nor a folder
    that looks foreign and would be kept forever). A folder already gone (another node's process deleted it first,
    --save_on_each_node on a shared filesystem) is fine."""
    try:
        write_json_atomically(os.path.join(path, SAVING_MARKER), {"pid": os.getpid(), "deleting": True})
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(path, COMPLETE_MARKER))
        fsync_dir(path)
    except FileNotFoundError:
        return
    # The in-progress marker goes last: a deletion killed half-way must still look like a leftover of ours.
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(path):
            if entry.name == SAVING_MARKER:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(entry.path)
    shutil.rmtree(path, ignore_errors=True)


def rotate_checkpoints(output_dir: str, keep: int | None, newest: str, protected: str | None = None) -> None:
    """Apply `--save_total_limit`, after `newest` is complete: keep `newest`, `protected` (the best model's
    checkpoint, if any) and the most recent complete ones up to `keep` in all; delete the other complete ones and
    the leftovers of our killed saves. Foreign folders are never deleted. `keep` None or <= 0 deletes nothing, as in
    transformers.
    """
    if keep is None or keep <= 0:
        return
    found = [path for _, path in checkpoints(output_dir) if not is_foreign(path)]
    kept = {os.path.abspath(newest)} | ({os.path.abspath(protected)} if protected else set())
    for path in reversed([p for p in found if is_complete(p)]):
        if len(kept) >= keep:
            break
        kept.add(os.path.abspath(path))
    for path in found:
        if os.path.abspath(path) not in kept:
            logger.info("Deleting %s (--save_total_limit %d)", path, keep)
            remove_checkpoint(path)
