"""A user's mistake ends a command with one line naming the file and the fix, exit status 2, and no traceback
(`llava.reporting`); `TRAIN_LLAVA_TRACEBACK=1` shows the traceback."""

import os
import subprocess
import sys

import pytest

from tests.helpers.outputs import REPO

BAD_FILES = {  # file name -> (content, what the line must say)
    "missing.json": (None, "data file {path} not found"),
    "empty.json": ("", "{path}: malformed JSON at column 1"),
    "truncated.json": ('[{"id": "a", "conversations": [{"from": "human", "value": "Hi"}', "{path}: malformed JSON"),
    "deep.json": ("[" * 100000 + "]" * 100000, "{path}: JSON nested too deeply"),
    "no:such.json": (None, "data file {path} not found"),
}


def command(name: str, parts: dict, data_path: str, out: str) -> list[str]:
    model = ["--vision_model_name_or_path", parts["vision"], "--language_model_name_or_path", parts["lm"],
             "--data_path", data_path, "--image_folder", parts["images"]]
    if name == "train":
        return [sys.executable, "train_llava.py", *model, "--output_dir", out, "--report_to", "none"]
    return [sys.executable, "-m", "llava.validate_data", *model]


def run(argv: list[str], **env) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **env})


@pytest.mark.parametrize("name", ["train", "validate_data"])
@pytest.mark.parametrize("file", sorted(BAD_FILES))
def test_a_bad_data_file_is_one_line_without_traceback(parts, tmp_path, name, file):
    content, expected = BAD_FILES[file]
    path = tmp_path / file
    if content is not None:
        path.write_text(content)
    out = tmp_path / "out"
    result = run(command(name, parts, str(path), str(out)))
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr and len(errors) == 1, result.stderr[-2000:]
    assert expected.format(path=path) in errors[0]
    if content is None:  # refused before anything loads: not even the output_dir is made
        assert not out.exists()


def test_the_traceback_is_there_when_asked_for(parts, tmp_path):
    result = run(command("train", parts, str(tmp_path / "missing.json"), str(tmp_path / "out")),
                 TRAIN_LLAVA_TRACEBACK="1")
    assert result.returncode == 1 and "Traceback" in result.stderr and "DataError" in result.stderr


def test_a_bad_flag_is_one_line(parts, tmp_path):
    argv = command("train", parts, parts["data"], str(tmp_path / "out")) + ["--vision_lr", "1e-3"]
    result = run(argv)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: --vision_lr 0.001 is the learning rate of a component that --freeze_vision_model True keeps " \
           "fixed" in result.stderr
