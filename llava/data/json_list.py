"""The items of a JSON list file, parsed one at a time from a window of its text.

Why not `json.load`: parsed records take ~5x their text's size (mix665k, 1.05 GB, is ~5 GB as Python objects), and
only a chunk of them is needed at a time. Why not the whole text either: Python holds a string at 1, 2 or 4 bytes
per character, the widest it contains, so one emoji in a ShareGPT answer turns a 1 GB file into a 4 GB string (and
the bytes it was decoded from are held beside it while decoding). Only a window of the text is held here.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Callable, Iterator
from typing import BinaryIO

from llava.data.types import DataError

_SPACE = re.compile(r"[ \t\n\r]*")
# Bytes read and decoded at a time; a record longer than this grows the window until it fits.
_WINDOW_BYTES = 1 << 23


class _Window:
    """A stretch of a file's UTF-8 text with its position in the file (line and column of its first character,
    for error messages), extended by reading on and trimmed of what was parsed."""

    def __init__(self, file: BinaryIO, where: str, advance: Callable[[int], None]):
        self.file, self.where, self.advance = file, where, advance
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.text = ""
        self.line, self.column = 1, 1  # of text[0] in the file
        self.lines_read = 0  # newlines in the bytes read, for a decoding error's line
        self.at_end = False

    def read_more(self) -> bool:
        """Append the next window of the file; False at its end."""
        if self.at_end:
            return False
        data = self.file.read(_WINDOW_BYTES)
        self.advance(len(data))
        self.at_end = not data
        pending = self.decoder.getstate()[0]  # the start of a character cut by the previous window's edge
        try:
            self.text += self.decoder.decode(data, final=self.at_end)
        except UnicodeDecodeError as error:  # its position counts from the pending bytes
            raise not_utf8(self.where, pending + data, error.start, self.lines_read) from None
        self.lines_read += data.count(b"\n")
        return True

    def skip_space(self, position: int) -> int:
        """The first position at or after `position` that is not JSON whitespace (len(text) at the file's end)."""
        while True:
            position = _SPACE.match(self.text, position).end()
            if position < len(self.text) or not self.read_more():
                return position

    def starts_with(self, character: str, position: int) -> bool:
        return self.text.startswith(character, position)

    def value(self, decoder: json.JSONDecoder, position: int):
        """(value, end) of the JSON value at `position`, reading on while it runs past the window."""
        while True:
            try:
                value, end = decoder.raw_decode(self.text, position)
            except json.JSONDecodeError as error:
                if self.read_more():
                    continue
                raise self.error(error.msg, error.pos) from None
            except RecursionError:
                raise too_deep(self.where) from None
            # A number cut by the window's edge parses as a shorter one ("1.5e3|00" as 1.5e3): it ends only where
            # a character that cannot continue it follows.
            cut = isinstance(value, (int, float)) and not isinstance(value, bool) and (
                end == len(self.text) or self.text[end] in "0123456789.eE+-")
            if not (cut and self.read_more()):
                return value, end

    def drop_before(self, position: int) -> int:
        """Forget the text before `position` (once it is large); the position of the same character afterwards."""
        if position < _WINDOW_BYTES:
            return position
        self.line, self.column = self._line_and_column(position)
        self.text = self.text[position:]
        return 0

    def rest(self) -> str:
        while self.read_more():
            pass
        return self.text

    def error(self, message: str, position: int) -> DataError:
        return malformed_json(self.where, message, *self._line_and_column(position))

    def _line_and_column(self, position: int) -> tuple[int, int]:
        """Where `text[position]` is in the file (both from 1)."""
        newlines = self.text.count("\n", 0, position)
        if not newlines:
            return self.line, self.column + position
        return self.line + newlines, position - self.text.rfind("\n", 0, position)


def malformed_json(where: str, message: str, line: int, column: int) -> DataError:
    shown = f"column {column}" if line == 1 else f"line {line}, column {column}"
    return DataError(f"{where}: malformed JSON at {shown}: {message}", kind="malformed_json")


def too_deep(where: str) -> DataError:
    return DataError(f"{where}: JSON nested too deeply to parse; a LLaVA sample needs only a few levels.",
                     kind="malformed_json")


def not_utf8(where: str, data: bytes, start: int, lines_before: int = 0) -> DataError:
    """`data[start]` does not decode (Latin-1 exports, say); `lines_before`: newlines of the file before `data`."""
    line = lines_before + data.count(b"\n", 0, max(0, start)) + 1
    byte = f"byte {data[start]:#04x}" if 0 <= start < len(data) else "a cut-off character"
    return DataError(f"{where}: not UTF-8 text ({byte} at line {line}); re-encode the file as UTF-8, e.g. "
                     "`iconv -f latin1 -t utf-8`.", kind="not_utf8")


def json_list_items(file: BinaryIO, where: str, advance: Callable[[int], None],
                    not_a_list: Callable[[str], DataError]) -> Iterator[object]:
    """The items of the JSON list in `file` (opened in binary), one at a time; `advance(n)` is called as each n
    bytes are read. A file that holds another JSON value raises `not_a_list(its text)`; a malformed one raises a
    `DataError` with the line and column where it breaks."""
    window = _Window(file, where, advance)
    decoder = json.JSONDecoder()
    position = window.skip_space(0)
    if not window.starts_with("[", position):
        raise not_a_list(window.rest())
    position = window.skip_space(position + 1)
    if window.starts_with("]", position):
        return _check_end(window, position + 1)
    while True:
        record, position = window.value(decoder, position)
        yield record
        position = window.skip_space(window.drop_before(position))
        if window.starts_with(",", position):
            position = window.skip_space(position + 1)
        elif window.starts_with("]", position):
            return _check_end(window, position + 1)
        else:
            raise window.error("Expecting ',' delimiter", position)


def _check_end(window: _Window, position: int) -> None:
    position = window.skip_space(position)
    if position != len(window.text):
        raise window.error("Extra data", position)
