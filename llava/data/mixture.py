"""`--data_path` as a mixture of sources: which files, how much of each, where each one's images are.

    --data_path a.json,b.jsonl              every sample of each file once (no amounts: the plain form)
    --data_path a.json:0.7,b.parquet:2000   amounts: 70% of a.json's samples, 2000 of b.parquet's
    --data_path mixture.yaml                a mixture file (also .json: a mapping, where a data file is a list)

A mixture file:

    sources:
      - path: llava_v1_5_mix665k.json       # relative paths are relative to the mixture file
        amount: 0.5
        image_folder: /data/llava/images    # default: --image_folder
      - path: extra/train.parquet
        amount: 200%

An amount with a decimal point or a `%` is a fraction of the source's valid samples, an integer a sample count;
either may exceed the source (2.0: every sample twice; 2500 of 1000: two copies plus 500). Whole copies take every
sample; the rest is drawn without replacement under the seed (--data_seed, else --seed), so the selection is made
once the samples are checked, from the valid ones, and the tokenized-data cache, keyed by files and image folders,
serves every amount. The selection is logged as a table, and recorded (`RECORD_NAME`, in output_dir and every
checkpoint-N) with a digest of the selected samples in order: resuming a checkpoint under a mixture that selects
other samples is refused, since Trainer's data skipping would then land on other batches.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass

import numpy as np

from llava.data.types import DataError
from llava.utils.files import write_json_atomically

logger = logging.getLogger(__name__)

RECORD_NAME = "data_mixture.json"
SOURCE_KEYS = ("path", "amount", "image_folder")
_COUNT = re.compile(r"\d+")
_FRACTION = re.compile(r"\d+\.\d*|\.\d+")
_PERCENT = re.compile(r"(\d+(?:\.\d*)?|\.\d+)%")
_POSITION = re.compile(r"(\[\d+\]|:\d+)$")  # how a sample's location ends: "[index]" or ":line"


@dataclass(frozen=True)
class Amount:
    """How much of a source to take: a fraction of its valid samples, or a sample count."""

    text: str  # as written, for the log and the record
    value: float
    fraction: bool

    def count(self, available: int) -> int:
        return math.floor(self.value * available + 0.5) if self.fraction else int(self.value)


def parse_amount(value, where: str) -> Amount:
    """`value` (a string from the flag, or a YAML/JSON number or string) as an `Amount`; refused when it does not
    parse or is not positive."""
    text = str(value).strip()
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise DataError(f"{where}: amount {value!r} is not a number.", kind="bad_mixture")
    if isinstance(value, float) or _FRACTION.fullmatch(text):
        amount = Amount(text, float(text), fraction=True)
    elif isinstance(value, int) or _COUNT.fullmatch(text):
        amount = Amount(text, int(text), fraction=False)
    elif _PERCENT.fullmatch(text):
        amount = Amount(text, float(text[:-1]) / 100, fraction=True)
    else:
        problem = "is negative" if text.startswith("-") else "does not parse"
        raise DataError(f"{where}: amount {text!r} {problem}; give a sample count (2000), a fraction of the "
                        "source (0.5, 2.0) or a percentage (50%).", kind="bad_mixture")
    if not math.isfinite(amount.value) or amount.value <= 0:
        raise DataError(f"{where}: amount {text!r} is not positive; leave the source out to take none of it.",
                        kind="bad_mixture")
    return amount


@dataclass(frozen=True)
class Source:
    path: str
    amount: Amount | None  # None: every sample once
    image_folder: str | None


@dataclass(frozen=True)
class Mixture:
    sources: tuple[Source, ...]

    @functools.cached_property
    def file_stamps(self) -> list[list[list]]:
        """Per source, `file_stamps` of its path: read once, for the token cache's key and the mixture record."""
        return [file_stamps(source.path) for source in self.sources]

    @property
    def paths(self) -> list[str]:
        return [source.path for source in self.sources]

    @property
    def image_folders(self) -> list[str | None]:
        return [source.image_folder for source in self.sources]


def file_stamps(path: str) -> list[list]:
    """[absolute path, size, modification time (ns)] of the files that stand for the data at `path`: itself, or a
    folder's files (a `save_to_disk` dataset): what says the data changed, for the token cache and the mixture
    record."""
    names = [path] if not os.path.isdir(path) else sorted(
        os.path.join(root, name) for root, _, names in os.walk(path) for name in names)
    stamps = []
    for name in names:
        stat = os.stat(name)
        stamps.append([os.path.abspath(name), stat.st_size, stat.st_mtime_ns])
    return stamps


def read_mixture(data_path: str, image_folder: str | None) -> Mixture:
    """The mixture that `--data_path` names (see the module docstring); `image_folder` (--image_folder) is the
    default of every source. Amounts, mixture files and every file and folder they name are checked here, before
    anything loads: a missing one is refused with its name (a missing image folder once, not once per sample)."""
    entries = [entry.strip() for entry in data_path.split(",") if entry.strip()]
    if not entries:
        raise DataError(f"--data_path {data_path!r} names no data file; give one or more .json/.jsonl/.parquet/"
                        ".arrow files (comma-separated) or a mixture file.", kind="missing_data_file")
    if image_folder is not None and not os.path.isdir(image_folder):
        problem = "is not a folder" if os.path.exists(image_folder) else "no such folder"
        raise DataError(f"--image_folder {image_folder}: {problem}; pass the folder that the samples' image paths "
                        "are relative to (or leave the flag out for text-only data).", kind="missing_image_folder")
    if len(entries) == 1 and _is_mixture_file(entries[0]):
        return _read_mixture_file(entries[0], image_folder)
    sources = []
    for entry in entries:
        path, amount = _path_and_amount(entry)
        if _is_mixture_file(path):
            raise DataError(f"--data_path {entry}: a mixture file must be the whole --data_path, without an "
                            "amount; list its sources there instead.", kind="bad_mixture")
        _check_exists(path, f"--data_path {path}")
        sources.append(Source(path, amount, image_folder))
    return Mixture(tuple(sources))


def _path_and_amount(entry: str) -> tuple[str, Amount | None]:
    """`entry` of a comma-separated --data_path as (path, amount): `path:amount` when the part before the last
    colon names a file (or the part after it reads as an amount); otherwise the whole entry is a path, colons and
    all (`no:such.json`)."""
    if ":" not in entry or os.path.exists(entry):
        return entry, None
    path, _, text = entry.rpartition(":")
    if os.path.exists(path):
        return path, parse_amount(text, f"--data_path {entry}")
    try:
        return path, parse_amount(text, f"--data_path {entry}")
    except DataError:
        return entry, None  # not an amount: a (missing) file whose name has a colon


def _is_mixture_file(path: str) -> bool:
    """A .yaml/.yml file, or a .json file holding a mapping (a LLaVA .json data file is a list)."""
    if path.lower().endswith((".yaml", ".yml")):
        return True
    if not path.lower().endswith(".json") or not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        start = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return start.startswith(b"{")


def _read_mixture_file(path: str, image_folder: str | None) -> Mixture:
    return Mixture(tuple(_source(entry, f"{path}: sources[{index}]", path, image_folder)
                         for index, entry in enumerate(_mixture_entries(path))))


def _mixture_entries(path: str) -> list:
    """The 'sources' entries of mixture file `path`, unchecked; refused when the file is missing or malformed."""
    import yaml  # only mixture files need it

    if not os.path.isfile(path):
        raise DataError(f"--data_path {path}: mixture file not found.", kind="bad_mixture")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        content = json.loads(text) if path.lower().endswith(".json") else yaml.safe_load(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: malformed JSON at line {error.lineno}, column {error.colno}: {error.msg}",
                        kind="bad_mixture") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        position = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise DataError(f"{path}: malformed YAML{position}: {getattr(error, 'problem', None) or error}",
                        kind="bad_mixture") from None
    if not isinstance(content, dict) or not isinstance(content.get("sources"), list) or not content["sources"]:
        raise DataError(f"{path}: a mixture file is a mapping with a non-empty 'sources' list of {{path, amount, "
                        "image_folder}} entries (a LLaVA .json data file is a list of samples).", kind="bad_mixture")
    if set(content) != {"sources"}:
        raise DataError(f"{path}: unknown keys {sorted(set(content) - {'sources'})}; a mixture file holds only "
                        "'sources'.", kind="bad_mixture")
    return content["sources"]


def _source(entry, where: str, mixture_file: str, image_folder: str | None) -> Source:
    """One entry of `mixture_file`'s 'sources', its relative paths taken from the mixture file's folder."""
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not entry["path"]:
        raise DataError(f"{where}: each source is a mapping with a 'path' (and optional 'amount', "
                        f"'image_folder'), got {json.dumps(entry, default=repr)[:80]}.", kind="bad_mixture")
    where = f"{where} ({entry['path']})"
    unknown = sorted(set(entry) - set(SOURCE_KEYS))
    if unknown:
        raise DataError(f"{where}: unknown keys {unknown}; a source has {', '.join(SOURCE_KEYS)}.",
                        kind="bad_mixture")
    base = os.path.dirname(mixture_file)
    path = os.path.join(base, entry["path"])
    _check_exists(path, where)
    if _is_mixture_file(path):
        raise _nested_mixture(path, where, mixture_file)
    amount = None if entry.get("amount") is None else parse_amount(entry["amount"], where)
    folder = entry.get("image_folder")
    if folder is not None:
        if not isinstance(folder, str) or not os.path.isdir(os.path.join(base, folder)):
            raise DataError(f"{where}: image_folder {folder!r} is not a folder.", kind="bad_mixture")
        image_folder = os.path.join(base, folder)
    return Source(path, amount, image_folder)


def _nested_mixture(path: str, where: str, mixture_file: str) -> DataError:
    """The refusal of source `path` of `mixture_file`, a mixture file itself (its data would otherwise be read as
    a data file, "malformed JSON"): a mixture cycle, naming its files, when the mixture files it names lead back to
    one on the way; else a nested mixture. Mixture files do not nest (what would an amount of a mixture take?)."""
    cycle = _cycle([mixture_file], path)
    if cycle:
        return DataError(f"{where}: mixture cycle: {' -> '.join(cycle)}; each names the next as a source. A "
                         "mixture file's sources are data files: list theirs in one mixture file.", kind="bad_mixture")
    return DataError(f"{where}: {path} is a mixture file too, and mixture files do not nest; list its sources in "
                     f"{mixture_file} instead.", kind="bad_mixture")


def _cycle(chain: list[str], path: str) -> list[str] | None:
    """`chain` (mixture files, each naming the next) followed on by `path` and the mixture files it names, until a
    file comes again: that file and the ones up to its return, or None when none comes again."""
    seen = [os.path.realpath(file) for file in chain]
    if os.path.realpath(path) in seen:
        return chain[seen.index(os.path.realpath(path)):] + [path]
    for nested in _mixture_sources(path):
        cycle = _cycle([*chain, path], nested)
        if cycle:
            return cycle
    return None


def _mixture_sources(path: str) -> list[str]:
    """The sources of mixture file `path` that are mixture files too; none when `path` does not read (it is then
    refused as nested all the same)."""
    try:
        entries = _mixture_entries(path)
    except DataError:
        return []
    paths = [os.path.join(os.path.dirname(path), entry["path"]) for entry in entries
             if isinstance(entry, dict) and isinstance(entry.get("path"), str) and entry["path"]]
    return [source for source in paths if _is_mixture_file(source)]


def _check_exists(path: str, where: str) -> None:
    if not os.path.exists(path):
        raise DataError(f"{where}: data file {path} not found.", kind="missing_data_file")


# --------------------------------------------------------------------------------------------- selection

@dataclass(frozen=True)
class Selection:
    indices: np.ndarray  # into the prepared (valid) samples, in training order
    available: list[int]  # valid samples per source
    taken: list[int]
    seed: int
    digest: str  # sha256 of the selected samples' locations (absolute paths) and ids, in order


def select(mixture: Mixture, samples: list, seed: int) -> Selection:
    """What each source's amount takes of its valid samples (`sample.source` says whose): whole copies in file
    order, then a seeded draw without replacement, kept in file order; sources follow each other, and the
    Trainer's sampler (seeded too) interleaves them."""
    by_source = [[] for _ in mixture.sources]
    for index, sample in enumerate(samples):
        by_source[sample.source].append(index)
    chosen, taken = [], []
    for position, (source, rows) in enumerate(zip(mixture.sources, by_source)):
        rows = np.asarray(rows, dtype=np.int64)
        count = len(rows) if source.amount is None or not len(rows) else source.amount.count(len(rows))
        _check_copies(source, count, len(rows))
        copies, rest = divmod(count, len(rows)) if len(rows) else (0, 0)
        draw = np.random.default_rng([seed % 2**32, position]).permutation(len(rows))[:rest]
        chosen.append(np.concatenate([np.tile(rows, copies), rows[np.sort(draw)]]))
        taken.append(count)
    indices = np.concatenate(chosen)
    # Hashed: the file's absolute path and the sample's position in it (a location names the file as it was given,
    # maybe when the cache was built), so that the same files named from elsewhere select the same samples.
    paths = [os.path.abspath(source.path) for source in mixture.sources]
    digest = hashlib.sha256()
    for index in indices:
        sample = samples[index]
        position = _POSITION.search(sample.location).group()
        digest.update(f"{paths[sample.source]}{position}\t{sample.id}\n".encode("utf-8"))
    return Selection(indices, [len(rows) for rows in by_source], taken, seed, digest.hexdigest())


# More copies of one source than this is taken for a typo (1e11 samples of a 48-sample file), not a recipe.
MAX_COPIES = 1000


def _check_copies(source: Source, count: int, available: int) -> None:
    if available and count > MAX_COPIES * available:
        raise DataError(f"--data_path {source.path}: amount {source.amount.text} takes {count:,} samples of its "
                        f"{available:,} valid ones, {count // available:,} copies of each; more than {MAX_COPIES} "
                        "copies of a source is refused as a likely typo. Give a smaller amount.", kind="bad_mixture")


def mixture_table(mixture: Mixture, selection: Selection) -> str:
    """Per source: valid samples, amount, samples taken, share of the mixture."""
    total = max(sum(selection.taken), 1)
    rows = [(source.path, str(available), source.amount.text if source.amount else "all", str(taken),
             f"{100 * taken / total:.1f}%")
            for source, available, taken in zip(mixture.sources, selection.available, selection.taken)]
    rows = [("source", "valid", "amount", "taken", "share"), *rows,
            ("total", str(sum(selection.available)), "", str(sum(selection.taken)), "100.0%")]
    widths = [max(len(row[column]) for row in rows) for column in range(5)]
    return "\n".join("  " + row[0].ljust(widths[0]) + "".join(f"  {cell:>{width}}" for cell, width in
                                                              zip(row[1:], widths[1:])) for row in rows)


def apply_mixture(mixture: Mixture, dataset, seed: int):
    """`dataset` (every valid sample of the mixture's files) narrowed to the mixture's selection, and the record
    of it (`mixture_record`); the table is logged. A mixture that selects nothing is refused."""
    selection = select(mixture, dataset.samples, seed)
    table = mixture_table(mixture, selection)
    if not len(selection.indices):
        raise DataError(f"the data mixture selects no samples:\n{table}", kind="no_samples")
    logger.info("Data mixture (seed %d):\n%s", seed, table)
    return dataset.select(selection.indices), mixture_record(mixture, selection)


# --------------------------------------------------------------------------------------------- record and resume

def mixture_record(mixture: Mixture, selection: Selection) -> dict:
    """What the run trains on, as JSON: each source's files (size, modification time), amount, image folder and
    counts, the seed, and the digest of the selected samples in order."""
    sources = []
    for source, stamps, available, taken in zip(mixture.sources, mixture.file_stamps, selection.available,
                                                selection.taken):
        sources.append({"path": os.path.abspath(source.path), "files": stamps,
                        "amount": source.amount.text if source.amount else None,
                        "image_folder": os.path.abspath(source.image_folder) if source.image_folder else None,
                        "valid": available, "taken": taken})
    return {"sources": sources, "seed": selection.seed, "samples": int(sum(selection.taken)),
            "selection_sha256": selection.digest}


def write_record(folder: str, record: dict) -> None:
    write_json_atomically(os.path.join(folder, RECORD_NAME), record)


def check_resumed_mixture(record: dict, checkpoint: str | None) -> None:
    """Refuse to resume `checkpoint` when its run selected other samples (or another order) than `record`; the
    message names what differs and the fix. Differences that select the same samples (an amount written another
    way, a file touched) are only logged."""
    if checkpoint is None:
        return
    path = os.path.join(checkpoint, RECORD_NAME)
    if not os.path.isfile(path):
        logger.warning("%s has no %s (an older or foreign checkpoint): the data mixture it was trained on is "
                       "unknown, so it is not compared with this run's.", checkpoint, RECORD_NAME)
        return
    with open(path, encoding="utf-8") as f:
        recorded = json.load(f)
    differences = _differences(recorded, record)
    if recorded.get("selection_sha256") != record["selection_sha256"]:
        listing = "\n".join(f"  - {line}" for line in differences or
                            ["the selected samples differ (ids or positions in the files)"])
        raise DataError(f"--resume_from_checkpoint {checkpoint}: that run trained on another data mixture:\n"
                        f"{listing}\nResuming would continue on other samples than the interrupted run. Rerun with "
                        f"the original --data_path and --seed (see {path}), or train into a new --output_dir.",
                        kind="mixture_changed")
    if differences:
        logger.warning("Resuming %s: the data mixture selects the same samples as before, although %s.", checkpoint,
                       "; ".join(differences))


def _differences(recorded: dict, current: dict) -> list[str]:
    """What differs between two records, in words ("then" is the checkpoint's run, "now" this one)."""
    lines = []
    if recorded.get("seed") != current["seed"]:
        lines.append(f"seed: {recorded.get('seed')} then, {current['seed']} now")
    then, now = recorded.get("sources", []), current["sources"]
    if [s.get("path") for s in then] != [s["path"] for s in now]:
        return lines + [f"sources: {[s.get('path') for s in then]} then, {[s['path'] for s in now]} now"]
    for old, new in zip(then, now):
        for key in ("amount", "image_folder", "valid", "taken"):
            if old.get(key) != new[key]:
                lines.append(f"{new['path']}: {key} {old.get(key)} then, {new[key]} now")
        if old.get("files") != new["files"]:
            lines.append(f"{new['path']}: changed on disk since (size or modification time)")
    return lines

