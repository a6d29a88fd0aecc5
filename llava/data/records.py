"""Training data on disk, record by record: LLaVA JSON/JSONL (streamed) and table rows -> `Sample`s.

Two record forms: LLaVA's (`conversations` of {"from", "value"}, `image`) and the `messages` form of TRL and
LLaMA-Factory (`messages` of {"role", "content"}, `images`). Tables are read by `llava.data.tables`; turning a
sample's messages into token ids and labels is `llava.data.encoder`'s job.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator

from llava.data.json_list import json_list_items, malformed_json, not_utf8, too_deep
from llava.data.tables import is_table, read_table_records
from llava.data.types import IMAGE_PLACEHOLDER, DataError, Message, Sample

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def read_records(path: str, advance: Callable[[int], None] = lambda size: None):
    """Yield (location, record) from a LLaVA .json list or a .jsonl file (one object per line; the suffix in any case),
    calling `advance(n)` as each n bytes of the file are read (for progress and its ETA).

    A malformed JSONL line (bad JSON, bytes that are not UTF-8, nesting too deep to parse) is yielded as
    (location, DataError) so one bad line does not hide the rest; a malformed .json file raises where the error is,
    since nothing after it can be located.
    """
    with open(path, "rb") as f:
        if path.lower().endswith(".jsonl"):
            for line_number, line in enumerate(f, start=1):
                advance(len(line))
                if line.strip():
                    location = f"{path}:{line_number}"
                    try:
                        yield location, _parse_json(_decode(line, location).strip(), location)
                    except DataError as error:
                        yield location, error
            return
        items = json_list_items(f, path, advance, lambda text: _not_a_list(text, path))
        for index, record in enumerate(items):
            yield f"{path}[{index}]", record


def _not_a_list(text: str, where: str) -> DataError:
    """The error for a .json file that holds something else than a list: its own parse error if it is malformed."""
    kind = type(_parse_json(text, where)).__name__
    return DataError(f"{where}: expected a JSON list of samples, got {kind}. Use a .jsonl file for one sample per "
                     "line.", kind="malformed_json")


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise not_utf8(where, data, error.start) from None


def _parse_json(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise malformed_json(where, error.msg, error.lineno, error.colno) from None
    except RecursionError:
        raise too_deep(where) from None


VIDEO_FIELDS = {"video", "videos"}


def to_sample(record: dict, location: str) -> Sample:
    """Turn one record into a `Sample`; raise `DataError` naming the sample when it is malformed.

    Two forms: LLaVA's (`conversations` of {"from": human|gpt|system, "value": text}, `image` a path or a list) and
    the `messages` form of TRL and LLaMA-Factory (`messages` of {"role", "content"}, `images` a list), where content
    is a string or a list of parts, {"type": "text", "text": ...} and {"type": "image"} (one `<image>` each)."""
    if isinstance(record, DataError):
        raise record
    if not isinstance(record, dict):
        raise DataError(f"{location}: a sample must be a JSON object, got {type(record).__name__}.",
                        kind="malformed_sample")
    sample_id = str(record.get("id", location))
    where = f"{location} (id {sample_id!r})"
    turns = record.get("conversations", record.get("messages"))
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: needs a non-empty 'conversations' list of {{'from', 'value'}} turns (or "
                        "'messages' of {'role', 'content'}).", kind="malformed_sample")
    messages = []
    for turn_index, turn in enumerate(turns):
        role = ROLES.get(str(turn.get("from", turn.get("role", ""))).lower()) if isinstance(turn, dict) else None
        if role is None:
            raise DataError(f"{where}: turn {turn_index} has an unknown role; use 'from' with one of "
                            f"{sorted(ROLES)}.", kind="unknown_role")
        content = _text_of(turn.get("value", turn.get("content")))
        if not isinstance(content, str):
            raise DataError(f"{where}: turn {turn_index} needs a string 'value' (or 'content': a string or a list "
                            "of text and image parts).", kind="malformed_sample")
        if not content.strip():
            raise DataError(f"{where}: turn {turn_index} ({role}) has empty text; remove the turn or fill it in.",
                            kind="empty_text")
        _check_encodable(content, f"{where}: turn {turn_index}")
        messages.append(Message(role, content, trained=role == "assistant"))
    images = _image_paths(record, where)
    for key in sorted(VIDEO_FIELDS & record.keys()):  # kept as metadata it would train the sample without its video
        raise DataError(f"{where}: has a {key!r} field, but video samples are not supported yet (they need "
                        "LLaVA-OneVision's video processor); remove the field, or give the frames as 'images' with "
                        "one <image> placeholder each.", kind="video_unsupported")
    metadata = {k: v for k, v in record.items() if k not in ("id", "image", "images", "conversations", "messages")}
    return Sample(id=sample_id, location=location, messages=messages, images=images, metadata=metadata)


def _text_of(content):
    """A message's content as one string: a list of {"type": "text"|"image"} parts becomes its texts, with an image
    placeholder (`<image>` and a newline) where each image part is. Anything else is returned as it is."""
    if not isinstance(content, list) or not all(isinstance(part, dict) for part in content):
        return content
    pieces = []
    for part in content:
        if part.get("type") == "image":
            pieces.append(IMAGE_PLACEHOLDER + "\n")
        elif part.get("type") == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        else:
            return None  # an unknown part: refused by the caller as malformed
    return "".join(pieces)


def _image_paths(record: dict, where: str) -> list[str]:
    """The record's image paths: its "image" (or "images") as one path or a list of paths; absent, null or []
    means a text-only sample. Anything else (a number, a bool, a dict, an empty path) is refused, never read as
    paths or as "no image"."""
    images = record.get("image", record.get("images"))
    if images is None:
        return []
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(image, str) and image for image in images):
        shown = json.dumps(images, default=repr)[:80]  # repr: what JSON cannot hold (bytes, dates)
        raise DataError(f"{where}: 'image' must be a path or a list of paths, got {shown}; "
                        "leave it out for a text-only sample.", kind="malformed_sample")
    for image in images:
        _check_encodable(image, f"{where}: image path")
    return images


def _check_encodable(text: str, where: str) -> None:
    """Refuse text with lone surrogates ("\\ud800" in JSON): no tokenizer or file system can take it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise DataError(f"{where} contains {text[error.start]!r}, a lone UTF-16 surrogate (broken escape in the "
                        "JSON); fix or remove it.", kind="invalid_text") from None


def iter_samples(data_paths: list[str], advance: Callable[[int], None] = lambda size: None):
    """Yield a `Sample`, or the `DataError` of a malformed record, for every record of every file (JSON, or a
    table: see `llava.data.tables`), in order; `advance(n)` is called as each n bytes of the JSON files are read (a
    table file counts once it has been read)."""
    for source, path in enumerate(data_paths):
        if not (os.path.isfile(path) or os.path.isdir(path)):
            raise DataError(f"--data_path file not found: {path}", kind="missing_data_file")
        table = is_table(path)
        for location, record in read_table_records(path) if table else read_records(path, advance):
            try:
                sample = to_sample(record, location)
            except DataError as error:
                yield error
                continue
            sample.source = source
            yield sample
        if table and os.path.isfile(path):
            advance(os.path.getsize(path))


def load_samples(data_paths: list[str]) -> list[Sample]:
    """Read and mix every file of `--data_path`; the first malformed record raises its `DataError`."""
    samples = []
    for item in iter_samples(data_paths):
        if isinstance(item, DataError):
            raise item
        samples.append(item)
    return samples
