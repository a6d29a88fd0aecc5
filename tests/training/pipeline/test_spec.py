"""Bad pipeline files and flags are refused before any model loads (nothing written), naming the stage, the key or
flag, and the fix."""

import os
import re

import pytest
import yaml

from llava.data.types import ConfigurationError, DataError
from llava.train import main
from llava.training.parsing import flag_names
from llava.training.pipeline.manifest import manifest_path, new_manifest, write_manifest
from llava.training.pipeline.spec import read_pipeline
from tests.helpers.pipelines import STAGES, write_pipeline

ALIGN, INSTRUCT = STAGES


def refused(path, *flags, error=ConfigurationError):
    with pytest.raises(error) as info:
        main([path, *flags])
    assert not os.path.exists(os.path.join(os.path.dirname(path), "out", "align")), "something ran"
    return str(info.value)


@pytest.mark.parametrize("stages, expected", [
    ([ALIGN, {**INSTRUCT, "learning_rat": 1}], r"stage instruct: unknown keys \['learning_rat'\]"),
    ([{**ALIGN, "from": "instruct"}, INSTRUCT], "from: instruct names a later stage"),
    ([ALIGN, {**INSTRUCT, "from": "instruct"}], "from: instruct names this stage itself"),
    ([ALIGN, {**INSTRUCT, "from": "aling"}], "from: aling names no stage"),
    ([ALIGN, {**INSTRUCT, "name": "align"}], "two stages are named 'align'"),
    ([ALIGN, {**INSTRUCT, "name": "runs"}], "has name 'runs'"),
    ([ALIGN, {**INSTRUCT, "output_dir": "x"}], "stage instruct: output_dir is the pipeline's to set"),
    ([ALIGN, {**INSTRUCT, "model_name_or_path": "x"}], "stage instruct: model_name_or_path names a start model"),
    ([{**ALIGN, "lora_enable": True}, INSTRUCT], "stage align: --lora_enable True puts adapters on the language"),
    ([ALIGN, {**INSTRUCT, "vision_lr": 1e-4}], "stage instruct: --vision_lr 0.0001 is the learning rate of a "
                                               "component that --freeze_vision_model True keeps fixed"),
    ([ALIGN, {**INSTRUCT, "lora_enable": True, "freeze_language_model": True}], "stage instruct: --lora_enable"),
    ([ALIGN, {**INSTRUCT, "learning_rate": [1, {"a": 1}]}], "stage instruct: learning_rate: .* is not a flag value"),
])
def test_bad_stage_is_refused_naming_it(parts, tmp_path, stages, expected):
    assert re.search(expected, refused(write_pipeline(tmp_path, parts, stages)))


def test_unknown_top_level_key_and_missing_output_dir(parts, tmp_path):
    path = write_pipeline(tmp_path, parts, output_dir=None)
    assert "no output_dir" in refused(path)
    with open(path) as f:
        content = yaml.safe_load(f)
    with open(path, "w") as f:
        yaml.safe_dump({**content, "stage": []}, f)
    assert "unknown keys ['stage']" in refused(path)


def test_missing_data_file_of_a_later_stage(parts, tmp_path):
    path = write_pipeline(tmp_path, parts, [ALIGN, {**INSTRUCT, "data_path": str(tmp_path / "gone.json")}])
    assert "stage instruct" in refused(path, error=DataError) and "gone.json" in refused(path, error=DataError)


@pytest.mark.parametrize("flags", [[], ["--dry_run", "True"]])
def test_missing_tower_folder_of_the_first_stage(parts, tmp_path, flags):
    path = write_pipeline(tmp_path, parts, vision_model_name_or_path=str(tmp_path / "no_tower"))
    assert re.search(r"stage align: --vision_model_name_or_path .*no_tower: no such folder", refused(path, *flags))


@pytest.mark.parametrize("flags, expected", [
    (["--learning_rate", "1e-4"], "every stage sets its own learning_rate, so it would change nothing. Override one "
                                  "stage's with --align.learning_rate 1e-4"),
    (["--aling.learning_rate", "1e-4"], "no stage 'aling'"),
    (["--align.learning_rat", "1e-4"], "no flag --learning_rat"),
    (["--stages", "align,aling"], "--stages aling: .* has no such stage; its stages are align, instruct"),
    (["--restart_from", "x"], "--restart_from x"),
    (["--stages", "instruct"], "stage instruct starts from stage align's final output, which is not finished; add "
                               "align to --stages"),
    (["--align.vision_lr", "1e-3"], "stage align: --vision_lr"),
])
def test_bad_command_line_is_refused(parts, tmp_path, flags, expected):
    assert re.search(expected, refused(write_pipeline(tmp_path, parts), *flags))


def test_output_dir_of_another_pipeline_is_refused(parts, tmp_path):
    path = write_pipeline(tmp_path, parts)
    os.makedirs(tmp_path / "out")
    write_manifest(str(tmp_path / "out"), new_manifest("/elsewhere/other.yaml"))
    message = refused(path)
    assert "holds the manifest of another pipeline (/elsewhere/other.yaml" in message
    assert "another --output_dir" in message


@pytest.mark.parametrize("damage", ["truncated", "edited"])
def test_damaged_manifest_is_refused(parts, tmp_path, damage):
    path = write_pipeline(tmp_path, parts)
    os.makedirs(tmp_path / "out")
    write_manifest(str(tmp_path / "out"), new_manifest(path))
    with open(manifest_path(str(tmp_path / "out"))) as f:
        text = f.read()
    with open(manifest_path(str(tmp_path / "out")), "w") as f:
        f.write(text[:-10] if damage == "truncated" else text.replace('"stages": {}', '"stages": {"align": {}}'))
    message = refused(path)
    assert ("not readable JSON" if damage == "truncated" else "does not match its digest") in message
    assert "not trusted" in message


def test_dry_run_prints_the_plan_and_writes_nothing(parts, tmp_path, capsys):
    path = write_pipeline(tmp_path, parts, [ALIGN, {**INSTRUCT, "projector_lr": "1e-2"}])
    assert main([path, "--dry_run", "True", "--instruct.max_steps", "5"]) == 0
    out = capsys.readouterr().out
    assert not os.path.exists(tmp_path / "out")
    align, instruct = out.split("stage align: trains")[1].split("stage instruct: trains")
    assert f"start:  vision tower {parts['vision']} + language model {parts['lm']}" in align
    assert "start:  stage align's final output" in instruct and str(tmp_path / "out" / "instruct") in instruct
    rows = {line.split()[0]: line.split()[1:] for line in instruct.splitlines() if line.strip()}
    assert rows["projector"][-1] == "0.01" and rows["language_model"][-1] == "0.001" and rows["vision_tower"][-1] == "frozen"
    assert rows["vision_tower"][1] == "0" and rows["language_model"][0] == rows["language_model"][1]
    assert [line.split()[2] for line in align.splitlines() if line.split()[:1] == ["language_model"]] == ["0"]
    assert "steps: 3 (--max_steps)" in align and "steps: 5 (--max_steps)" in instruct
    assert parts["data"] in instruct and "100.0%" in instruct


def test_flags_that_set_up_a_new_model_under_defaults_go_to_the_first_stage_only(parts, tmp_path):
    path = write_pipeline(tmp_path, parts, architecture="llava_next", image_grid_pinpoints="[[32, 64]]",
                          image_aspect_ratio="pad")
    first, later = read_pipeline(path, [], flag_names()).stages
    assert first.flags["image_grid_pinpoints"] == "[[32, 64]]" and first.flags["image_aspect_ratio"] == "pad"
    assert "image_grid_pinpoints" not in later.flags and "image_aspect_ratio" not in later.flags
    assert later.flags["architecture"] == "llava_next"  # a later stage may still turn a llava checkpoint into one
