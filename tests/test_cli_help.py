"""`--help` of every command-line entry point prints its flags (all use HfArgumentParser dataclasses)."""

import importlib
import os
import pkgutil
import re
import subprocess
import sys

import pytest

import llava
from tests.helpers.outputs import REPO

# A flag each command must list; a new entry point without a row here fails `test_every_entry_point_is_listed`.
EXPECTED_FLAG = {
    "llava.train": "--freeze_language_model",
    "llava.generate": "--prompt",
    "llava.evaluate": "--data_path",
    "llava.lmms_eval_score": "--lmms_eval_python",
    "llava.inspect_data": "--num_samples",
    "llava.validate_data": "--num_workers",
    "llava.merge_lora": "--base_model_name_or_path",
    "llava.demo.run": "--full",
    "llava.demo.smollm2": "--cache_dir",
    "llava.demo.pretrain_vision": "--max_minutes",
    "llava.demo.easy_vqa": "--max_images",
}
# Flags of training that a command which loads no weights and trains nothing must not offer.
NOT_OFFERED = {"llava.inspect_data": ["--load_in_4bit", "--skip_invalid_samples", "--data_cache_dir", "--dtype"],
               "llava.validate_data": ["--load_in_4bit", "--skip_invalid_samples", "--sample_data_path", "--dtype"]}


def entry_points() -> list[str]:
    """Modules of the package that run as `python -m <module>`."""
    names = []
    for module in pkgutil.walk_packages(llava.__path__, "llava."):
        path = importlib.util.find_spec(module.name).origin
        with open(path, encoding="utf-8") as f:
            if 'if __name__ == "__main__":' in f.read():
                names.append(module.name)
    return sorted(names)


def test_every_entry_point_is_listed():
    assert entry_points() == sorted(EXPECTED_FLAG)


@pytest.mark.parametrize("module", sorted(EXPECTED_FLAG))
def test_help_lists_the_flags(module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module).main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and EXPECTED_FLAG[module] in out
    offered = set(re.findall(r"^\s+(--\w+)", out, flags=re.M))
    assert offered >= {EXPECTED_FLAG[module]} and offered.isdisjoint(NOT_OFFERED.get(module, [])), module


def test_train_llava_script_help():
    result = subprocess.run([sys.executable, "train_llava.py", "--help"], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--freeze_vision_model" in result.stdout and "--recompute_mlp_activations" in result.stdout
    assert "llava_onevision" in result.stdout and "--vision_aspect_ratio" in result.stdout
