"""Digests of what decides a stage's result: its flags (less those that only say how it runs or logs), its data
(the mixture's files as stamped on disk), and model folders (the start model, the final output), by content."""

from __future__ import annotations

import hashlib
import json
import os

from llava.data.mixture import Mixture
from llava.model.final_output import FINAL_MARKER, marked_files

# Flags that change how a stage runs, saves or logs, never the weights it ends with: changing one between two
# runs of a pipeline keeps the stage's checkpoints and output valid.
NEUTRAL_FLAGS = frozenset({
    "output_dir", "resume_from_checkpoint", "logging_steps", "logging_strategy", "logging_first_step",
    "logging_nan_inf_filter", "save_steps", "save_strategy", "save_total_limit", "save_on_each_node",
    "save_only_model", "checkpoint_weights", "report_to", "run_name", "project", "trackio_space_id", "disable_tqdm",
    "log_level", "log_level_replica", "log_on_each_node", "dataloader_num_workers", "dataloader_prefetch_factor",
    "dataloader_persistent_workers", "dataloader_pin_memory", "data_cache_dir", "sample_data_path",
    "sample_image_folder", "num_logged_samples", "ddp_timeout", "push_to_hub", "hub_model_id", "hub_strategy",
    "hub_token", "hub_private_repo", "hub_always_push", "hub_revision", "overwrite_output_dir",
})
_CHUNK = 16 << 20


def json_digest(value) -> str:
    """sha256 of `value` as canonical JSON (keys sorted, no spaces)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def result_flags(flags: dict[str, str]) -> dict[str, str]:
    """The flags that can change a stage's result."""
    return {key: value for key, value in flags.items() if key not in NEUTRAL_FLAGS}


def data_digest(mixture: Mixture) -> str:
    """The mixture's sources (absolute paths, amounts, image folders) and their files' sizes and modification
    times: what a stage selects its samples from (the selection itself is decided, and recorded, by the run)."""
    return json_digest([[os.path.abspath(source.path), source.amount.text if source.amount else None,
                         os.path.abspath(source.image_folder) if source.image_folder else None, stamps]
                        for source, stamps in zip(mixture.sources, mixture.file_stamps)])


def model_digest(path: str) -> str | None:
    """The content digest of a model folder: a final output's files (those its marker lists), else the files at
    the top of the folder (a checkpoint or downloaded model; not the checkpoint-N/ and runs/ inside). None for a
    hub id, which names its model without a local copy to hash."""
    if not os.path.isdir(path):
        return None
    if os.path.isfile(os.path.join(path, FINAL_MARKER)):
        names = marked_files(path)
    else:
        names = [entry.name for entry in os.scandir(path) if entry.is_file() and not entry.name.endswith(".lock")]
    return files_digest(path, names)


def files_digest(root: str, names: list[str]) -> str:
    """sha256 over the relative path and content of every file under `root` named by `names` (folders walked)."""
    digest = hashlib.sha256()
    for name in sorted(names):
        path = os.path.join(root, name)
        files = [path] if not os.path.isdir(path) else sorted(
            os.path.join(folder, file) for folder, _, found in os.walk(path) for file in found)
        for file in files:
            # name and size first: no two different trees hash the same stream
            digest.update(f"{os.path.relpath(file, root)}\0{os.path.getsize(file)}\0".encode("utf-8"))
            with open(file, "rb") as f:
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
    return digest.hexdigest()
