"""Refusals that torch and transformers raise while loading the files a run names, turned into one-line user
errors that name the file or folder and the fix (the commands print them without a traceback, see
`llava.reporting`).

- A pickle that `torch.load(weights_only=True)` refuses (a `.bin`/`.pt`/`.pth` file that would run code when
  loaded: a model's weights, or a checkpoint's optimizer, scheduler or RNG state): torch's message names neither the
  file nor its folder, so the files are scanned here for the global it names (without loading them).
- A model folder with custom code (`auto_map` in its config) loaded without `--trust_remote_code True`.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
from collections.abc import Iterator

from llava.data.types import ConfigurationError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle")
_GLOBAL = re.compile(r"GLOBAL ([\w.]+\w)")
_CUSTOM_CODE = re.compile(r"The repository (.+?) contains custom code which must be executed")


@contextlib.contextmanager
def naming_library_refusals(folders: list[str]) -> Iterator[None]:
    """Raise the refusals above, met in the block, as `ConfigurationError`s. `folders`: where the block reads
    files from (model folders, the output_dir whose checkpoint-N a resume reads); searched only on a refusal.

    Raises:
        ConfigurationError: the refused file (or folder) and what to do.
    """
    try:
        yield
    except pickle.UnpicklingError as error:
        raise ConfigurationError(refused_pickle_message(str(error), folders)) from None
    except ValueError as error:
        match = _CUSTOM_CODE.search(str(error))
        if not match:
            raise
        raise ConfigurationError(
            f"{match.group(1)} holds custom code (its config.json's auto_map names Python files in the folder) that "
            "must run to load it, and this run does not trust it. Read that code, then pass --trust_remote_code "
            "True to run it; or use a model that transformers supports without it.") from None


def refused_pickle_message(message: str, folders: list[str]) -> str:
    """What to say about a pickle torch refused with `message`: the files in `folders` (and their checkpoint-N
    subfolders) that import the global it names, or, failing that, the folders searched."""
    match = _GLOBAL.search(message)
    named = match.group(1) if match else None
    files = [path for path in _pickle_files(folders) if named and named in _unsafe_globals(path)]
    what = f"imports {named}" if named else "holds an object torch refuses to rebuild"
    where = ", ".join(files) if files else f"a pickled file in {', '.join(dict.fromkeys(folders))}"
    return (f"{where}: refused by torch.load(weights_only=True): the pickle {what}, which loading would run (a "
            "malicious or corrupted file). Replace it with a file from a source you trust (a model's "
            "model.safetensors, or a checkpoint-N this project wrote), or delete that checkpoint-N to resume from an "
            "earlier one.")


def _pickle_files(folders: list[str]) -> list[str]:
    files = []
    for folder in dict.fromkeys(folders):
        if not os.path.isdir(folder):
            continue
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.is_file() and entry.name.endswith(PICKLE_SUFFIXES):
                files.append(entry.path)
            elif entry.is_dir() and entry.name.startswith("checkpoint-"):
                files.extend(_pickle_files([entry.path]))
    return files


def _unsafe_globals(path: str) -> list[str]:
    """The globals that pickle `path` imports beyond torch's weights-only allowlist (read without loading it)."""
    from torch.serialization import get_unsafe_globals_in_checkpoint

    try:
        return get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - not a torch file: it holds no global torch named
        return []
