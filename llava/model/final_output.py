"""The run's final output (the files at the top of output_dir, beside checkpoint-N/ and runs/), replaced atomically.

Writing the final model in place would leave a half-written `model.safetensors` where a complete one was, whenever a
save is killed: the first one (preemption) or a rerun of a finished command, which saves again. So a final save
goes into `STAGING/` inside output_dir first and is flushed to disk; only then is it published:

1. `PUBLISHING` (a journal: the new files, and the previous output's files) is written atomically;
2. each staged entry replaces its namesake at the top of output_dir (one rename each), files of the previous
   output that the new one lacks (old weight shards) are deleted;
3. `FINAL_MARKER`, listing the output's files, is written, then STAGING and the journal are removed.

Killed during 1, the previous output is untouched (and loads); killed during 2 or 3, the journal is there:
loading refuses the folder (`check_final_output`) and the next run on that output_dir finishes the move
(`finish_interrupted_publish`), since every new file is complete in STAGING or already in place.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil

from llava.utils.files import fsync_dir, fsync_tree, write_json_atomically

logger = logging.getLogger(__name__)

STAGING = ".final_output.staging"
PUBLISHING = "final_output_publishing.json"
FINAL_MARKER = "final_output_complete.json"


class IncompleteFinalOutputError(OSError):
    """A final output whose publication was interrupted, or whose marker lists files that are gone."""


def staging_folder(output_dir: str) -> str:
    return os.path.join(output_dir, STAGING)


def prepare_staging(output_dir: str) -> str:
    """An empty staging folder (a leftover of a killed save is removed first, after any interrupted publish of it
    is finished)."""
    finish_interrupted_publish(output_dir)
    staging = staging_folder(output_dir)
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    return staging


def publish_final_output(output_dir: str) -> None:
    """Move the complete, staged final output into place (steps 1-3 of the module docstring)."""
    staging = staging_folder(output_dir)
    fsync_tree(staging)
    previous = marked_files(output_dir)
    write_json_atomically(os.path.join(output_dir, PUBLISHING),
                          {"files": sorted(os.listdir(staging)), "previous": previous})
    _move_into_place(output_dir)


def finish_interrupted_publish(output_dir: str) -> None:
    """Complete a publication that a kill interrupted (its journal is still there); nothing to do otherwise."""
    if os.path.isfile(os.path.join(output_dir, PUBLISHING)):
        logger.warning("%s: the last final save was interrupted while moving its files into place; finishing it.",
                       output_dir)
        _move_into_place(output_dir)


def _move_into_place(output_dir: str) -> None:
    """Steps 2 and 3, from wherever a previous attempt stopped: every rename is repeatable."""
    with open(os.path.join(output_dir, PUBLISHING), encoding="utf-8") as f:
        journal = json.load(f)
    staging = staging_folder(output_dir)
    for name in journal["files"]:
        if os.path.lexists(os.path.join(staging, name)):
            _replace(os.path.join(staging, name), os.path.join(output_dir, name))
    for name in set(journal["previous"]) - set(journal["files"]):
        _remove(os.path.join(output_dir, name))
    fsync_dir(output_dir)
    write_json_atomically(os.path.join(output_dir, FINAL_MARKER), {"files": journal["files"]})
    shutil.rmtree(staging, ignore_errors=True)
    os.remove(os.path.join(output_dir, PUBLISHING))
    fsync_dir(output_dir)


def _replace(source: str, target: str) -> None:
    """Rename `source` to `target`, replacing it; a folder (a LoRA output's adapter/) via `target`.old, which a
    repeated call cleans up."""
    if not os.path.isdir(source):
        os.replace(source, target)
        return
    old = target + ".old"
    if os.path.isdir(target):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
    os.rename(source, target)
    shutil.rmtree(old, ignore_errors=True)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def marked_files(output_dir: str) -> list[str]:
    """The files `FINAL_MARKER` lists (the current final output), or [] when there is none."""
    try:
        with open(os.path.join(output_dir, FINAL_MARKER), encoding="utf-8") as f:
            return list(json.load(f)["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


def check_final_output(path: str) -> None:
    """Refuse to load a run's final output that is half-published or lost files its marker lists. Folders without
    our marker (hub downloads, plain `save_pretrained`, checkpoint-N) are not ours to judge and pass.

    Raises:
        IncompleteFinalOutputError: the message says how to finish or recover it.
    """
    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        return
    if os.path.isfile(os.path.join(path, PUBLISHING)):
        raise IncompleteFinalOutputError(
            f"{path} is a half-written final output: a final save was killed while moving its files into place. "
            f"The complete new files are in {os.path.join(path, STAGING)}; rerun the training command with the "
            "same --output_dir (it finishes the move), or load the newest checkpoint-N in it.")
    missing = [name for name in marked_files(path) if not os.path.lexists(os.path.join(path, name))]
    if missing:
        raise IncompleteFinalOutputError(f"{path} is an incomplete final output: {FINAL_MARKER} lists {missing}, "
                                         "which are gone. Rerun the training command, or load a checkpoint-N.")
