"""Training data in tables: local `.parquet` and `.arrow` files and `datasets.save_to_disk` folders, read through
`datasets` (imported only when a table is read: it costs start-up time).

Rows take either record form (`conversations` + `image`, or `messages` + `images`), as JSON records do. An image
column holds paths (strings), or images embedded as `datasets.Image` does it ({"bytes", "path"} structs, as in HF
datasets such as llava-instruct-mix-vsft). An embedded image is referenced, not copied: the sample keeps
`embedded_reference(row, k)` in place of a path, and the bytes are read from the memory-mapped table when the
image is checked or loaded (`embedded_image`). Parquet is converted once into `datasets`' Arrow cache (its usual
`load_dataset("parquet")`), since random access to a row needs the memory-mapped Arrow form.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator

from llava.data.types import DataError

TABLE_SUFFIXES = (".parquet", ".arrow")
IMAGE_COLUMNS = ("image", "images")  # the record forms' image fields: `to_sample` takes "image" first
_EMBEDDED = "embedded:"
_BATCH_ROWS = 1000
_NO_IMAGE = object()  # an image struct with neither bytes nor a path


class _Unreadable:
    """An image cell `to_sample` must not see as a path: why it is refused, in words."""

    def __init__(self, why: str):
        self.why = why


def is_table(path: str) -> bool:
    """A parquet or arrow file, or a folder (a `save_to_disk` dataset)."""
    return path.lower().endswith(TABLE_SUFFIXES) or os.path.isdir(path)


def open_table(path: str):
    """The `datasets.Dataset` at `path`, memory-mapped, in the "arrow" format (rows as Arrow, nothing decoded)."""
    import datasets

    try:
        if os.path.isdir(path):
            table = datasets.load_from_disk(path)
        elif path.lower().endswith(".parquet"):
            table = datasets.load_dataset("parquet", data_files=path, split="train")
        else:
            table = datasets.Dataset.from_file(path)
    except FileNotFoundError as error:
        raise DataError(f"--data_path {path}: not a `datasets.save_to_disk` folder or table file ({error}).",
                        kind="malformed_table") from None
    except Exception as error:  # noqa: BLE001 - pyarrow and datasets raise many types for unreadable files
        raise DataError(f"--data_path {path}: cannot read it as a table ({type(error).__name__}: {error}).",
                        kind="malformed_table") from None
    if isinstance(table, datasets.DatasetDict):
        raise DataError(f"--data_path {path} holds several splits ({', '.join(table)}); name one split's folder, "
                        f"e.g. {os.path.join(path, next(iter(table)))}.", kind="malformed_table")
    return table.with_format("arrow")


def read_table_records(path: str) -> Iterator[tuple[str, dict | DataError]]:
    """Yield (location "path[row]", record) for every row, image columns as paths or embedded references."""
    table = open_table(path)
    image_columns = [name for name in IMAGE_COLUMNS if name in table.column_names]
    start = 0
    for batch in table.iter(batch_size=_BATCH_ROWS):
        records = batch.drop_columns(image_columns).to_pylist()  # image bytes never become Python objects
        for name in image_columns:
            for record, value in zip(records, _image_references(batch.column(name), start)):
                record[name] = value
        for row, record in enumerate(records, start=start):
            location, problem = f"{path}[{row}]", _image_problem(record)
            yield location, record if problem is None else DataError(
                f"{location} (id {str(record.get('id', location))!r}): {problem}", kind="malformed_sample")
        start += batch.num_rows


def _image_references(column, start: int) -> list:
    """A batch's image column as what `to_sample` reads, per row: None, a path, or a list of them; embedded images
    ({"bytes", "path"} structs as `datasets.Image` stores them, or plain binary cells) become
    `embedded_reference(row, k)`; cells that are no image (neither bytes nor a path, a timestamp, a path that
    poses as an embedded reference) become `_NO_IMAGE` or `_Unreadable`, refused by `_image_problem`."""
    import pyarrow as pa

    column = column.combine_chunks()
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        flat = _cell_references(column.flatten())
        offsets, valid = column.offsets.to_pylist(), column.is_valid().to_pylist()
        return [[_numbered(flat[i], start + row, i - begin) for i in range(begin, end)] if valid[row] else None
                for row, (begin, end) in enumerate(zip(offsets, offsets[1:]))]
    return [_numbered(cell, start + row, 0) for row, cell in enumerate(_cell_references(column))]


def _cell_references(cells) -> list:
    """Per cell: None, a path, `_EMBEDDED` (bytes there; numbered by `_numbered`), or why it is no image."""
    import pyarrow as pa

    kind = cells.type
    if pa.types.is_struct(kind):
        return [None if image is None else _EMBEDDED if image[0] else image[1] or _NO_IMAGE
                for image in _struct_images(cells)]
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return [None if present is False else _EMBEDDED for present in cells.is_valid().to_pylist()]
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return [_Unreadable(f"image path {path!r} begins with {_EMBEDDED!r}, which names bytes embedded in a "
                            "table; rename the file") if path is not None and path.startswith(_EMBEDDED) else path
                for path in cells.to_pylist()]
    return [None if present is False else _Unreadable(
        f"its image column holds {kind} values, neither paths (strings) nor image bytes (binary, or "
        "{bytes, path} structs as datasets.Image writes them)") for present in cells.is_valid().to_pylist()]


def _numbered(cell, row: int, k: int):
    return embedded_reference(row, k) if cell is _EMBEDDED else cell


def _struct_images(images) -> list:
    """Per {"bytes", "path"} struct of `images`: None when null, else (has bytes, path)."""
    names = {images.type.field(i).name for i in range(images.type.num_fields)}
    nothing = [None] * len(images)
    has_bytes = images.field("bytes").is_valid().to_pylist() if "bytes" in names else nothing
    paths = images.field("path").to_pylist() if "path" in names else nothing
    return [(embedded, path) if present else None
            for present, embedded, path in zip(images.is_valid().to_pylist(), has_bytes, paths)]


def _image_problem(record: dict) -> str | None:
    """Why an image cell of `record` is no image (with the fix), None when every one is a path or embedded bytes."""
    images = record.get("image", record.get("images"))
    for k, image in enumerate(images if isinstance(images, list) else [images]):
        if image is _NO_IMAGE:
            return f"image {k} has neither bytes nor a path; fill it in or drop the row."
        if isinstance(image, _Unreadable):
            return f"image {k}: {image.why}."
    return None


def embedded_reference(row: int, k: int) -> str:
    """What a sample holds in place of a path for image `k` of table row `row`."""
    return f"{_EMBEDDED}{row}:{k}"


def is_embedded(reference: str) -> bool:
    return reference.startswith(_EMBEDDED)


class EmbeddedImage(io.BytesIO):
    """An embedded image's bytes, named by where they are (table, row, column) in error messages, whether they format
    it with str or, as PIL names a file it cannot identify, with repr (str falls back to it)."""

    def __init__(self, data: bytes, where: str):
        super().__init__(data)
        self.where = where

    def __repr__(self) -> str:
        return self.where


def embedded_image(table, path: str, reference: str) -> EmbeddedImage:
    """The bytes behind `reference` in `table` (read from `path` by `open_table`)."""
    row, k = map(int, reference[len(_EMBEDDED):].split(":"))
    column = next(name for name in IMAGE_COLUMNS if name in table.column_names)
    import pyarrow as pa

    value = table[row].column(column)[0]
    image = value[k] if isinstance(value, pa.ListScalar) else value
    data = image["bytes"].as_py() if isinstance(image, pa.StructScalar) else image.as_py()
    return EmbeddedImage(data, f"{path}[{row}] column {column!r} image {k} (embedded)")
