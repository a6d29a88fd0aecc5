"""Crash-safe checkpoints: which checkpoint-N folders are complete, which one a restart resumes from, and which
ones rotation deletes.

A checkpoint-N folder counts as complete only once `checkpoint_complete.json` is in it. `LlavaTrainer` writes that
marker last: after every process has written its part (weights, optimizer, scheduler, RNG states, FSDP shards,
trainer state) and the files are flushed to disk. A process killed at any moment, even in the middle of a save,
therefore leaves either a complete checkpoint or a folder without the marker, which is never resumed from and is
deleted when that step is saved again (or by rotation). Rotation runs only after the new checkpoint is complete and
deletes a folder's marker before its files, so a half-deleted checkpoint is never taken for a complete one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "checkpoint_complete.json"
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


def latest_complete_checkpoint(output_dir: str) -> str | None:
    """The complete checkpoint with the highest step in `output_dir`, or None (no checkpoint, or none complete)."""
    complete = [path for _, path in checkpoints(output_dir) if is_complete(path)]
    return complete[-1] if complete else None


def resolve_resume_checkpoint(value: str | bool | None, output_dir: str) -> str | None:
    """What `--resume_from_checkpoint` means: a checkpoint folder to resume from, or None to start fresh.

    "True" is the latest *complete* checkpoint in `output_dir`, or None when there is none yet, so one command
    can be rerun after any crash or preemption (transformers' own True raises when there is none). "False"/None
    start fresh. Anything else is an explicit folder, used as given; one without the completion marker (written
    by another tool, or by a save that was interrupted) is loaded with a warning.

    Raises:
        FileNotFoundError: an explicit folder that does not exist.
    """
    if value is None or str(value).lower() in ("false", ""):
        return None
    if str(value).lower() == "true":
        latest = latest_complete_checkpoint(output_dir)
        if latest is None:
            logger.info("--resume_from_checkpoint True: no complete checkpoint in %s yet, training from the start.",
                        output_dir)
        else:
            logger.info("--resume_from_checkpoint True: resuming from %s.", latest)
        return latest
    path = str(value)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--resume_from_checkpoint {path}: no such folder. Pass a checkpoint-N folder, or "
                                "True to resume from the latest complete checkpoint in --output_dir.")
    if not is_complete(path):
        logger.warning("%s has no %s: it was written by another tool, or its save was interrupted. Loading it "
                       "anyway; --resume_from_checkpoint True would only pick complete checkpoints.", path,
                       COMPLETE_MARKER)
    return path


def _fsync_tree(path: str) -> None:
    """Flush every file under `path`, then the folders themselves, so a machine crash cannot lose what the marker
    vouches for (a killed process loses nothing: its writes are already in the OS)."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(root)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mark_complete(path: str, step: int) -> None:
    """Declare checkpoint `path` complete: flush its files, then write the marker atomically (temp file + rename)."""
    _fsync_tree(path)
    files = sorted(name for name in os.listdir(path) if not name.startswith(COMPLETE_MARKER))
    # Unique per process: with --save_on_each_node on a shared filesystem, every node's main process marks it.
    temporary = os.path.join(path, f"{COMPLETE_MARKER}.{socket.gethostname()}.{os.getpid()}.tmp")
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump({"global_step": step, "files": files}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, os.path.join(path, COMPLETE_MARKER))
    _fsync_dir(path)


def remove_checkpoint(path: str) -> None:
    """Delete a checkpoint folder, its marker first: a deletion cut short leaves an incomplete folder, never a
    complete-looking one with files missing."""
    marker = os.path.join(path, COMPLETE_MARKER)
    try:
        os.remove(marker)
        _fsync_dir(path)
    except FileNotFoundError:  # none, or another node's process (--save_on_each_node, shared filesystem) was first
        pass
    shutil.rmtree(path, ignore_errors=True)


def rotate_checkpoints(output_dir: str, keep: int | None, newest: str, protected: str | None = None) -> None:
    """Apply `--save_total_limit`, after `newest` is complete: keep `newest`, `protected` (the best model's
    checkpoint, if any) and the most recent complete ones up to `keep` in all; delete the other complete ones and
    every incomplete folder (leftovers of killed saves). `keep` None or <= 0 deletes nothing, as in transformers.
    """
    if keep is None or keep <= 0:
        return
    found = [path for _, path in checkpoints(output_dir)]
    kept = {os.path.abspath(newest)} | ({os.path.abspath(protected)} if protected else set())
    for path in reversed([p for p in found if is_complete(p)]):
        if len(kept) >= keep:
            break
        kept.add(os.path.abspath(path))
    for path in found:
        if os.path.abspath(path) not in kept:
            logger.info("Deleting %s (--save_total_limit %d)", path, keep)
            remove_checkpoint(path)
