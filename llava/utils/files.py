"""Files that survive a crash (flushed, replaced atomically) and where train_llava keeps what it builds once.

The cache folder holds the demo's converted SmolLM2, tokenized training data (`tokenized/`) and the tests'
transformers-4.57 venv: `$TRAIN_LLAVA_CACHE` when set, else `~/.cache/train_llava`.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from pathlib import Path

CACHE_ENV = "TRAIN_LLAVA_CACHE"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "train_llava")


def write_json_atomically(path: str, value) -> None:
    """Write `value` as JSON to `path` so that `path` holds either its old content or all of the new one, on disk."""
    # Unique per process: with --save_on_each_node on a shared filesystem, every node's main process writes it.
    temporary = f"{path}.{socket.gethostname()}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump(value, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    fsync_dir(os.path.dirname(path) or ".")


def update_json(path: str, update: Callable[[dict], None]) -> None:
    """Rewrite the JSON object in `path` after `update(values)` changed it in place (indented, keys sorted)."""
    with open(path, encoding="utf-8") as f:
        values = json.load(f)
    update(values)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(values, f, indent=2, sort_keys=True)
        f.write("\n")


def follow_umask(folder: str, suffix: str = ".safetensors") -> None:
    """Give the files of `folder` ending with `suffix` the mode every other file gets (0666 less the umask).

    Why: safetensors writes its files with mode 0600, so an evaluation or serving job under another user, or a
    group-shared output folder, could read every file of a checkpoint but its weights."""
    umask = os.umask(0)
    os.umask(umask)
    for entry in os.scandir(folder):
        if entry.is_file(follow_symlinks=False) and entry.name.endswith(suffix):
            os.chmod(entry.path, 0o666 & ~umask)


def fsync_tree(path: str) -> None:
    """Flush every file under `path`, then the folders themselves, so a machine crash cannot lose what a marker
    vouches for (a killed process loses nothing: its writes are already in the OS)."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
