"""Tokenized training data kept compact, and cached on disk so later runs and every rank of a node reuse it.

`TokenStore` holds every sample's token ids (int32, one image token per image: expanded only when a batch is
built), trained flags and the token count of each image (one number per image: anyres images differ) in flat arrays
with offsets per sample, ~1.5 KB for a typical LLaVA-1.5 sample
instead of ~62 KB as expanded Python lists. On disk it is three `.npy` files read back memory-mapped, beside the
samples' ids, locations and image paths (JSON lines) and the problems of the invalid ones.

A cache folder is keyed by everything the tokens depend on: the data files (path, size, modification time; a
`save_to_disk` folder's files), the tokenizer and chat template, the image-token count, `--model_max_length`, each
source's image folder and this format's version. Not by a mixture's amounts: the selection is made from the cached
samples (`llava.data.mixture`), so every amount reuses one cache. It is built in a temporary folder, completed with a
marker and renamed into place, so a run killed while building leaves nothing that a later run would take for a
cache; processes of one node wait on a lock while the first one builds.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from llava.data.types import DataError, Sample
from llava.utils.files import fsync_dir, fsync_tree, write_json_atomically
from llava.utils.memory import memory_line

logger = logging.getLogger(__name__)

CACHE_FORMAT = 3  # bump when what is stored, or how samples are tokenized, changes
_COMPLETE = "complete.json"
_ARRAYS = ("input_ids", "trained", "offsets", "lengths", "image_tokens", "image_offsets")


class TokenStore:
    """Token ids, trained flags and image token counts of N samples in flat arrays; `store[i]` is sample i's
    (input_ids, trained, image_tokens).

    `lengths[i]` is sample i's length with image tokens expanded, for length-grouped batching.
    """

    def __init__(self, input_ids: np.ndarray, trained: np.ndarray, offsets: np.ndarray, lengths: np.ndarray,
                 image_tokens: np.ndarray, image_offsets: np.ndarray):
        self.input_ids, self.trained, self.offsets, self.lengths = input_ids, trained, offsets, lengths
        self.image_tokens, self.image_offsets = image_tokens, image_offsets

    @classmethod
    def from_samples(cls, encoded: list[dict[str, np.ndarray]], lengths: list[int]) -> TokenStore:
        input_ids, offsets = _flat([e["input_ids"] for e in encoded], np.int32)
        trained, _ = _flat([e["trained"] for e in encoded], bool)
        image_tokens, image_offsets = _flat([e["image_tokens"] for e in encoded], np.int32)
        return cls(input_ids, trained, offsets, np.asarray(lengths, dtype=np.int32), image_tokens, image_offsets)

    @classmethod
    def concatenate(cls, stores: list[TokenStore]) -> TokenStore:
        if not stores:
            return cls.from_samples([], [])
        return cls(np.concatenate([s.input_ids for s in stores]), np.concatenate([s.trained for s in stores]),
                   _joined_offsets([s.offsets for s in stores]), np.concatenate([s.lengths for s in stores]),
                   np.concatenate([s.image_tokens for s in stores]),
                   _joined_offsets([s.image_offsets for s in stores]))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        start, end = self.offsets[index], self.offsets[index + 1]
        first, last = self.image_offsets[index], self.image_offsets[index + 1]
        return self.input_ids[start:end], self.trained[start:end], self.image_tokens[first:last]

    def save(self, folder: str) -> None:
        for name in _ARRAYS:
            np.save(os.path.join(folder, f"{name}.npy"), getattr(self, name))

    @classmethod
    def load(cls, folder: str) -> TokenStore:
        """Memory-mapped: pages are read on use and shared by every process of the node."""
        return cls(*(np.load(os.path.join(folder, f"{name}.npy"), mmap_mode="r") for name in _ARRAYS))


def _flat(arrays: list[np.ndarray], dtype) -> tuple[np.ndarray, np.ndarray]:
    """`arrays` back to back (of `dtype`), and the offset where each starts (plus the total at the end)."""
    sizes = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    flat = np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype)
    return flat, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def _joined_offsets(parts: list[np.ndarray]) -> np.ndarray:
    """The offsets of flat arrays laid back to back, each part's `[0, ..., total]` shifted by the totals before it."""
    shifts = np.concatenate([[0], np.cumsum([part[-1] for part in parts])[:-1]])
    return np.concatenate([parts[0][:1]] + [part[1:] + shift for part, shift in zip(parts, shifts)])


@dataclass
class PreparedData:
    """What training needs of the data: the valid samples (without their texts), their tokens, and one problem per
    invalid sample (or record)."""

    samples: list[Sample]
    store: TokenStore
    problems: list[DataError]
    warnings: list[DataError] = field(default_factory=list)  # trained anyway, but likely not what was meant

    @property
    def num_records(self) -> int:
        return len(self.samples) + len(self.problems)

    def report(self, limit: int | None = None) -> str:
        """One line per problem, then per warning, each followed by a count per kind."""
        lines = _listing(self.problems, limit, f"of {self.num_records} samples invalid")
        if self.warnings:
            lines += _listing(self.warnings, limit, "warnings (trained anyway)")
        return "\n".join(lines)


def _listing(errors: list[DataError], limit: int | None, summary: str) -> list[str]:
    shown = errors if limit is None else errors[:limit]
    lines = [f"  [{e.kind}] {e}" for e in shown]
    if len(shown) < len(errors):
        lines.append(f"  ... and {len(errors) - len(shown)} more")
    counts = Counter(e.kind for e in errors)
    lines.append(f"{len(errors)} {summary}: " + ", ".join(f"{kind} {n}" for kind, n in counts.most_common()))
    return lines


def cache_key(file_stamps: list[list[list]], fingerprint: dict) -> str:
    """A name for the cache of the data files stamped `file_stamps` (per source, `llava.data.mixture.file_stamps`)
    as tokenized under `fingerprint` (tokenizer, template, limits)."""
    files = [stamp for stamps in file_stamps for stamp in stamps]
    text = json.dumps({"format": CACHE_FORMAT, "files": files, **fingerprint}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def save_prepared(data: PreparedData, folder: str) -> None:
    data.store.save(folder)
    with open(os.path.join(folder, "samples.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps([s.id, s.location, s.images, s.source]) + "\n" for s in data.samples)
    with open(os.path.join(folder, "problems.json"), "w", encoding="utf-8") as f:
        json.dump({name: [[str(e), e.kind] for e in getattr(data, name)] for name in ("problems", "warnings")}, f)


def load_prepared(folder: str) -> PreparedData:
    with open(os.path.join(folder, "samples.jsonl"), encoding="utf-8") as f:
        samples = [Sample(id=i, location=location, messages=[], images=images, source=source)
                   for i, location, images, source in map(json.loads, f)]
    with open(os.path.join(folder, "problems.json"), encoding="utf-8") as f:
        errors = {name: [DataError(message, kind) for message, kind in listed] for name, listed in json.load(f).items()}
    store = TokenStore.load(folder)
    if len(store) != len(samples):
        raise ValueError(f"{folder}: {len(store)} tokenized samples but {len(samples)} sample records")
    return PreparedData(samples, store, errors["problems"], errors["warnings"])


def cached(cache_dir: str | None, key: str, build: Callable[[], PreparedData]) -> PreparedData:
    """`build()`'s result, from `cache_dir/key` when a complete cache is there, else built and stored there.

    A folder without its completion marker, or one that does not read back, is rebuilt. `cache_dir` None: no cache.
    """
    if cache_dir is None:
        return build()
    os.makedirs(cache_dir, exist_ok=True)
    folder = os.path.join(cache_dir, key)
    with _locked(folder + ".lock"):
        if os.path.isfile(os.path.join(folder, _COMPLETE)):
            try:
                data = load_prepared(folder)
                logger.info("Tokenized data from the cache %s (%d samples; %s).", folder, len(data.samples),
                            memory_line())
                return data
            except (OSError, ValueError) as error:
                logger.warning("Rebuilding the unreadable data cache %s: %s", folder, error)
        shutil.rmtree(folder, ignore_errors=True)
        _remove_leftovers(cache_dir, key)
        data = build()
        temporary = tempfile.mkdtemp(prefix=f".{key}-", dir=cache_dir)
        try:
            save_prepared(data, temporary)
            fsync_tree(temporary)  # on disk before the marker vouches for it: a machine crash leaves no bad cache
            write_json_atomically(os.path.join(temporary, _COMPLETE),
                                  {"samples": len(data.samples), "problems": len(data.problems)})
            try:
                os.rename(temporary, folder)
                fsync_dir(cache_dir)
            except OSError:  # another machine sharing the folder (no working lock across NFS) finished first
                if not os.path.isfile(os.path.join(folder, _COMPLETE)):
                    raise
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
        logger.info("Tokenized data cached in %s (%s).", folder, memory_line())
        return data


def _remove_leftovers(cache_dir: str, key: str) -> None:
    """Delete the temporary folders of builds of `key` that a kill interrupted: only the holder of the key's lock
    builds, and it holds it now, so any such folder belongs to a process that is gone."""
    for name in os.listdir(cache_dir):
        if name.startswith(f".{key}-"):
            shutil.rmtree(os.path.join(cache_dir, name), ignore_errors=True)


@contextmanager
def _locked(path: str) -> Iterator[None]:
    """An exclusive advisory lock: the processes of a node build one cache while the others wait, then read it."""
    with open(path, "a", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
