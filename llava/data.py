"""Training data on disk: LLaVA JSON/JSONL records -> `Sample`s, and their images (paths checked, files decoded).

Turning a sample's messages into token ids and labels is `llava.conversation`'s job.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import stat
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps

from llava.conversation import Message
from llava.errors import DataError
from llava.sources import EmbeddedImage, embedded_image, is_embedded, is_table, open_table, read_table_records

logger = logging.getLogger(__name__)

# What marks an image in a sample's text (the processor's default image token, `--image_token`).
IMAGE_PLACEHOLDER = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class Sample:
    """One conversation: its `messages` (image placeholders left in their text), the image paths in placeholder
    order, and where it came from (`location`: "file:line" or "file[index]"; `source`: the file's position in
    --data_path, which says where its images are, see `ImageReader`)."""

    id: str
    location: str
    messages: list[Message]
    images: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)  # the record's other fields, e.g. "answer_type" for evaluation
    source: int = 0

    def describe(self) -> str:
        return f"{self.location} (id {self.id!r})"


# --------------------------------------------------------------------------------------------- reading

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
        data = f.read()
    text = _decode(data, path)
    bytes_per_character, read = len(data) / max(1, len(text)), 0
    del data
    for index, (record, end) in enumerate(_json_list_items(text, path)):
        advance(round(end * bytes_per_character) - read)
        read = round(end * bytes_per_character)
        yield f"{path}[{index}]", record
    advance(round(len(text) * bytes_per_character) - read)


_SPACE = re.compile(r"[ \t\n\r]*")


def _json_list_items(text: str, where: str) -> Iterator[tuple[object, int]]:
    """The items of the JSON list in `text`, parsed one at a time, each with the position where it ends.

    Why not `json.loads`: parsed records take ~5x their text's size (a 650 MB mix665k file is 3.1 GB as Python
    objects), and only a chunk of them is needed at a time; this holds the text and one chunk's records."""
    decoder = json.JSONDecoder()
    position = _SPACE.match(text).end()
    if not text.startswith("[", position):
        kind = type(_parse_json(text, where)).__name__  # a malformed file is reported as such, else what it holds
        raise DataError(f"{where}: expected a JSON list of samples, got {kind}. Use a .jsonl file for one sample "
                        "per line.", kind="malformed_json")
    position = _SPACE.match(text, position + 1).end()
    if text.startswith("]", position):
        _check_end(text, position + 1, where)
        return
    while True:
        try:
            record, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise _json_error(error, where) from None
        except RecursionError:
            raise _too_deep(where) from None
        yield record, position
        position = _SPACE.match(text, position).end()
        if text.startswith(",", position):
            position = _SPACE.match(text, position + 1).end()
        elif text.startswith("]", position):
            _check_end(text, position + 1, where)
            return
        else:
            raise _json_error(json.JSONDecodeError("Expecting ',' delimiter", text, position), where)


def _check_end(text: str, position: int, where: str) -> None:
    position = _SPACE.match(text, position).end()
    if position != len(text):
        raise _json_error(json.JSONDecodeError("Extra data", text, position), where)


def _decode(data: bytes, where: str) -> str:
    """`data` as UTF-8 text; other encodings (Latin-1 exports, say) are refused where they start."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataError(f"{where}: not UTF-8 text (byte {data[error.start]:#04x} at line {line}); re-encode the "
                        "file as UTF-8, e.g. `iconv -f latin1 -t utf-8`.", kind="not_utf8") from None


def _parse_json(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise _json_error(error, where) from None
    except RecursionError:
        raise _too_deep(where) from None


def _json_error(error: json.JSONDecodeError, where: str) -> DataError:
    position = f"column {error.colno}" if error.lineno == 1 else f"line {error.lineno}, column {error.colno}"
    return DataError(f"{where}: malformed JSON at {position}: {error.msg}", kind="malformed_json")


def _too_deep(where: str) -> DataError:
    return DataError(f"{where}: JSON nested too deeply to parse; a LLaVA sample needs only a few levels.",
                     kind="malformed_json")


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
        raise DataError(f"{where}: 'image' must be a path or a list of paths, got {json.dumps(images)[:80]}; "
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
    table: see `llava.sources`), in order; `advance(n)` is called as each n bytes of the JSON files are read (a
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


# --------------------------------------------------------------------------------------------- images

def resolve_image_path(image_folder: str | None, relative: str, sample: Sample,
                       allow_absolute: bool = False) -> str:
    """`relative` inside `image_folder`, symlinks resolved; refuse absolute paths, `..` escapes and symlinks that
    point out of the folder (untrusted data) unless allowed."""
    if image_folder is None and not (allow_absolute and os.path.isabs(relative)):
        raise DataError(f"{sample.describe()} has images but --image_folder is not set; pass the folder its "
                        "image paths are relative to.", kind="no_image_folder")
    if allow_absolute:
        return os.path.join(image_folder or "", relative)
    folder = os.path.realpath(image_folder)
    path = os.path.realpath(os.path.join(folder, relative))  # symlinks resolved: a link out of the folder leaves it
    if os.path.isabs(relative) or not path.startswith(folder + os.sep):
        raise DataError(f"{sample.describe()}: image path {relative!r} leaves --image_folder; use a path relative "
                        "to it, or pass --allow_absolute_image_paths True if you trust this data.",
                        kind="image_path_escapes_folder")
    return path


class ImageReader:
    """Where one --data_path source's images are: its image references are paths inside its image folder, or
    (tables) references to bytes embedded in its rows, read from the table opened on first use."""

    def __init__(self, path: str, image_folder: str | None, allow_absolute: bool = False):
        self.path, self.image_folder, self.allow_absolute = path, image_folder, allow_absolute
        self.is_table = is_table(path)
        self._table = None

    def file(self, reference: str, sample: Sample) -> str | EmbeddedImage:
        """The image file (or bytes) that `reference`, one of `sample.images`, names."""
        if self.is_table and is_embedded(reference):
            if self._table is None:
                self._table = open_table(self.path)
            return embedded_image(self._table, self.path, reference)
        return resolve_image_path(self.image_folder, reference, sample, self.allow_absolute)

    def __getstate__(self) -> dict:  # a spawned DataLoader worker opens the table itself
        return {**self.__dict__, "_table": None}


def image_readers(data_paths: list[str], image_folder: str | None | list[str | None],
                  allow_absolute: bool = False) -> list[ImageReader]:
    """One `ImageReader` per file: `image_folder` is every file's image folder, or a list of one per file."""
    folders = image_folder if isinstance(image_folder, list) else [image_folder] * len(data_paths)
    return [ImageReader(path, folder, allow_absolute) for path, folder in zip(data_paths, folders)]


class NotARegularFile(OSError):
    """An image path that names a FIFO, device, socket or folder: opening it could block forever."""


def load_image(path: str | EmbeddedImage, max_pixels: int | None = None) -> Image.Image:
    """Open an image as RGB, honouring EXIF orientation (phone photos) and converting every PIL mode (see `to_rgb`);
    above `max_pixels` (--max_image_pixels) it is downsized, see `downsize_image`.

    Every reader of images (training data, the sample callback, inference) comes through here, so they all
    preprocess alike. Images above PIL's pixel limit (`Image.MAX_IMAGE_PIXELS`, ~89 MP) are refused as likely
    decompression bombs rather than decoded. Anything but a regular file is refused before it is opened: reading
    a FIFO would wait forever for a writer.
    """
    with _opened(path) as image:
        return downsize_image(to_rgb(ImageOps.exif_transpose(image)), max_pixels)


@contextlib.contextmanager
def _opened(path: str | EmbeddedImage) -> Iterator[Image.Image]:
    """The image at `path` (or in its bytes), its header read and its pixels not yet decoded; refused when it is
    not a regular file or too large (see `load_image`)."""
    if isinstance(path, str) and not stat.S_ISREG(os.stat(path).st_mode):
        raise NotARegularFile(f"{path} is not a regular file (a FIFO, device, socket or folder)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            yield image


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB, whatever its mode.

    Why not `convert("RGB")` alone: PIL clips 16- and 32-bit grayscale ("I;16", "I") and float ("F") pixels to
    0-255 (a 16-bit gradient becomes almost white), and drops alpha, showing whatever colour transparent pixels
    hold. Here "I;16*" values are scaled from 16 to 8 bits; "I" (32-bit) ones are taken as 8-bit within 0-255, as
    16-bit within 0-65535 (how older Pillow opens 16-bit PNGs), else scaled by their range; "F" ones within 0-1
    are scaled by 255, else treated like "I". Transparency (RGBA, LA, PA, P with a transparent colour) is
    composited over white.
    """
    if image.mode.startswith("I") or image.mode == "F":
        image = Image.fromarray(_to_uint8(np.asarray(image), image.mode), mode="L")
    if (image.mode == "P" and "transparency" in image.info) or image.mode in ("PA", "La"):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _to_uint8(pixels: np.ndarray, mode: str) -> np.ndarray:
    """Grayscale pixels of a 16-bit, 32-bit or float PIL mode scaled to 0-255."""
    pixels = pixels.astype(np.float64)
    if mode.startswith("I;16"):
        scaled = pixels / 257.0
    elif mode == "F" and pixels.min() >= 0.0 and pixels.max() <= 1.0:
        scaled = pixels * 255.0
    elif pixels.min() >= 0.0 and pixels.max() <= 255.0:
        scaled = pixels
    elif mode == "I" and pixels.min() >= 0.0 and pixels.max() <= 65535.0:  # 16-bit PNGs in older Pillow
        scaled = pixels / 257.0
    else:
        low, high = pixels.min(), pixels.max()
        scaled = (pixels - low) * (255.0 / (high - low)) if high > low else np.zeros_like(pixels)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def downsize_image(image: Image.Image, max_pixels: int | None) -> Image.Image:
    """`image` shrunk, keeping its aspect ratio, to at most `max_pixels` pixels (unchanged when within or None).

    Why before the image processor: it resizes to a few hundred pixels anyway, but a 40 MP photo would first be
    converted to float arrays (~500 MB) in a DataLoader worker.
    """
    if not max_pixels or image.width * image.height <= max_pixels:
        return image
    scale = math.sqrt(max_pixels / (image.width * image.height))
    size = (max(1, math.floor(image.width * scale)), max(1, math.floor(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def check_image(path: str | EmbeddedImage, sample: Sample) -> None:
    """Raise a `DataError` naming the sample if the image at `path` is missing, not a regular file, not an image
    or too large.

    Only the header is read: decoding every image of a 665k-sample mix before the first step would cost minutes.
    Pixel data that turns out corrupt when a batch decodes it fails then, under the same --skip_invalid_samples
    policy (`LlavaDataset`)."""
    try:
        with _opened(path):
            pass
    except FileNotFoundError:
        raise DataError(f"{sample.describe()}: image not found: {path}", kind="missing_image") from None
    except NotARegularFile as error:
        raise DataError(f"{sample.describe()}: {error}; point the sample at an image file.",
                        kind="not_a_regular_file") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        raise DataError(f"{sample.describe()}: image {path} refused as a possible decompression bomb ({error}); "
                        "downscale it.", kind="image_too_large") from None
    except (OSError, SyntaxError, ValueError) as error:  # PIL's ways of saying "not a (complete) image"
        raise DataError(f"{sample.describe()}: unreadable or corrupt image {path}: {error}",
                        kind="corrupt_image") from None
