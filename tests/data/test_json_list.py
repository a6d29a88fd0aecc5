"""llava.data.json_list: a JSON list read item by item from a window of its text gives what `json.loads` gives, and
errors at the line and column where the file breaks, whichever window they fall in."""

import json

import pytest

from llava.data import json_list
from llava.data.records import read_records
from llava.data.types import DataError

RECORDS = [{"id": "ü 😀", "conversations": [{"from": "human", "value": "日本語 " * 5}]}, 12345678, 1.5e300, True,
           None, "x" * 40, [], {"nested": {"a": [1, 2.5, None, True]}}]


@pytest.fixture(params=[1, 3, 7, 64, 1 << 23], ids=lambda size: f"window{size}")
def window(request, monkeypatch):
    """Windows down to one byte: every record, number, multi-byte character and delimiter crosses a window edge."""
    monkeypatch.setattr(json_list, "_WINDOW_BYTES", request.param)
    return request.param


def test_items_equal_json_loads_at_every_window_size(tmp_path, window):
    path = tmp_path / "data.json"
    path.write_text(" \n[ " + ",\n  ".join(json.dumps(r, ensure_ascii=False) for r in RECORDS) + " ]\n",
                    encoding="utf-8")
    read = []
    assert [record for _, record in read_records(str(path), read.append)] == json.loads(path.read_text("utf-8"))
    assert sum(read) == path.stat().st_size  # the progress bar reaches the end


@pytest.mark.parametrize("text, message", [
    ('[{"id": "a"},\n {"id": "b" "x": 1}]', r"line 2, column 13: Expecting ',' delimiter"),
    ('[{"id": "a"} {"id": "b"}]', r"column 14: Expecting ',' delimiter"),
    ('[{"id": "a"}] trailing', r"column 15: Extra data"),
    ('[{"id": "a"},', r"column 14: Expecting value"),
    ('[' + '{"id": "abcdefgh"},\n' * 30 + '{"id": "b"} x]', r"line 31, column 13: Expecting ',' delimiter"),
    ('[' + '{"id": "日本語"},' * 30 + '{"id": ]', r"column 429: Expecting value"),
    ('{"id": "a"}', r"expected a JSON list of samples, got dict"),
    ('{"id": ', r"malformed JSON at column 8"),
    ('[' + '[' * 100_000 + ']' * 100_000 + ']', r"nested too deeply"),
])
def test_errors_give_the_position_in_the_file(tmp_path, window, text, message):
    path = tmp_path / "data.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        list(read_records(str(path)))


def test_bytes_that_are_not_utf8_are_refused_with_their_line(tmp_path, window):
    path = tmp_path / "latin1.json"
    path.write_bytes(b'[{"id": "a"},\n{"id": "b"},\n{"id": "caf\xe9"}]')
    with pytest.raises(DataError, match=r"not UTF-8 text \(byte 0xe9 at line 3\)"):
        list(read_records(str(path)))


def test_the_text_held_stays_near_one_window(tmp_path, monkeypatch):
    """A file many windows long is never held whole: the window is trimmed as records are parsed."""
    monkeypatch.setattr(json_list, "_WINDOW_BYTES", 4096)
    path = tmp_path / "big.json"
    path.write_text(json.dumps([{"id": str(i), "text": "😀" * 50} for i in range(5000)], ensure_ascii=False),
                    encoding="utf-8")
    largest = 0
    original = json_list._Window.drop_before

    def watched(self, position):
        nonlocal largest
        largest = max(largest, len(self.text))
        return original(self, position)

    monkeypatch.setattr(json_list._Window, "drop_before", watched)
    assert len(list(read_records(str(path)))) == 5000
    assert largest < 3 * 4096 < path.stat().st_size / 50
