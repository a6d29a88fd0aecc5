"""Images of training samples: paths checked against their folder, headers checked, files decoded to RGB.

Every reader of images (training data, its checking pass, the sample callback, inference) comes through
`load_image`, so they all preprocess alike.
"""

from __future__ import annotations

import contextlib
import math
import os
import stat
import warnings
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageOps

from llava.data.tables import EmbeddedImage, embedded_image, is_embedded, is_table, open_table
from llava.data.types import DataError, Sample


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
    width, height = downsized_size(image.width, image.height, max_pixels)
    if (width, height) == image.size:
        return image
    return image.resize((width, height), Image.Resampling.BICUBIC, reducing_gap=3.0)


def downsized_size(width: int, height: int, max_pixels: int | None) -> tuple[int, int]:
    """(width, height) of an image of that size after `downsize_image`: the checking pass counts an anyres image's
    tokens from its header alone, so it must know the size the image processor will get without decoding."""
    if not max_pixels or width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    return max(1, math.floor(width * scale)), max(1, math.floor(height * scale))


# EXIF orientations that `ImageOps.exif_transpose` turns by 90 degrees: width and height swap.
_QUARTER_TURNS = {5, 6, 7, 8}


def _orientation(image: Image.Image) -> int | None:
    """The EXIF orientation tag, read without decoding pixels: PIL's PNG `getexif` decodes the whole image to find
    an eXIf chunk after the pixel data, so PNGs give only what precedes it (a later chunk: the count is checked
    again when the image loads, see `LlavaDataset`)."""
    if image.format != "PNG":
        return image.getexif().get(0x0112)
    exif = Image.Exif()
    if image.info.get("exif"):
        exif.load(image.info["exif"])
    return exif.get(0x0112)


def _loaded_size(image: Image.Image, max_pixels: int | None) -> tuple[int, int]:
    """(height, width) that `load_image` gives for the opened, undecoded `image`."""
    width, height = image.size
    if _orientation(image) in _QUARTER_TURNS:
        width, height = height, width
    width, height = downsized_size(width, height, max_pixels)
    return height, width


def check_image(path: str | EmbeddedImage, sample: Sample, decode: bool = False, max_pixels: int | None = None
                ) -> tuple[int, int]:
    """The (height, width) that `load_image(path, max_pixels)` will give; raise a `DataError` naming the sample if
    the image at `path` is missing, not a regular file, not an image or too large, or (`decode`) if its pixel data
    does not decode (truncated, or a format this machine's PIL cannot decode, such as EPS without Ghostscript).

    By default only the header is read: decoding every image of a 665k-sample mix before the first step costs
    minutes. Pixel data that turns out corrupt when a batch decodes it fails then, under the same
    --skip_invalid_samples policy (`LlavaDataset`)."""
    try:
        with _opened(path) as image:
            if decode:
                image.load()
            return _loaded_size(image, max_pixels)
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


def header_sizes(sample: Sample, reader: ImageReader, max_pixels: int | None = None) -> list[tuple[int, int]]:
    """(height, width) of each of `sample`'s images after `load_image(..., max_pixels)`, read from their headers and
    checked (`check_image`), as the checking pass reads them: what an anyres image's token count needs, without
    decoding it."""
    return [check_image(reader.file(reference, sample), sample, max_pixels=max_pixels) for reference in sample.images]
