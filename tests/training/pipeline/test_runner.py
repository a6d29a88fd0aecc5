"""A pipeline run end to end, then run again: done stages are skipped after their final output is verified, a
finished but unrecorded stage is recorded without rerunning it, changed stages are refused until --restart_from,
and TensorBoard shows the stages on one step axis."""

import glob
import json
import logging
import os

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from llava.data.types import ConfigurationError
from llava.train import main
from llava.training.pipeline.manifest import read_manifest, write_manifest
from tests.helpers.pipelines import final_weights, write_pipeline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def done(parts, tmp_path_factory):
    """A finished two-stage pipeline that logs to TensorBoard (the tests below run in order, on it)."""
    folder = tmp_path_factory.mktemp("pipeline")
    path = write_pipeline(folder, parts, report_to="tensorboard")
    assert main([path]) == 0
    return path, str(folder / "out")


def stage_runs(caplog):
    return [r.getMessage().split(" (")[0] for r in caplog.records if r.getMessage().startswith("Stage ") and " (" in
            r.getMessage() and "-m llava.train" in r.getMessage()]


def test_manifest_records_each_stage(done):
    path, out = done
    manifest = read_manifest(out)
    assert manifest["pipeline"] == path and list(manifest["stages"]) == ["align", "instruct"]
    align, instruct = manifest["stages"].values()
    assert align["status"] == instruct["status"] == "done" and align["steps"] == instruct["steps"] == 3
    assert align["flags"]["learning_rate"] == "1e-2" and instruct["flags"]["freeze_language_model"] == "False"
    assert instruct["start"] == {"stage": "align"} and instruct["start_sha256"] == align["final_output_sha256"]
    assert set(align["start"]) == {"vision_model_name_or_path", "language_model_name_or_path"}
    assert all(len(align[key]) == 64 for key in ("config_sha256", "data_sha256", "selection_sha256"))


def test_tensorboard_steps_continue_across_stages(done):
    _, out = done
    steps = {}
    for name in ("align", "instruct"):
        events = EventAccumulator(os.path.join(out, name, "runs"))
        events.Reload()
        steps[name] = [e.step for e in events.Scalars("train/loss")]
        assert f"pipeline/{name}/flags" in " ".join(events.Tags()["tensors"])
    assert steps == {"align": [1, 2, 3], "instruct": [4, 5, 6]}
    assert not glob.glob(os.path.join(out, "runs"))  # one run folder per stage, no other


def test_rerun_skips_done_stages_and_accepts_neutral_changes(done, caplog):
    path, out = done
    caplog.set_level(logging.INFO, logger="llava")
    assert main([path, "--logging_steps", "2", "--dataloader_num_workers", "0"]) == 0
    assert stage_runs(caplog) == []
    assert sum("is done" in r.getMessage() for r in caplog.records) == 2


def test_changed_data_is_refused_naming_the_first_stage(done, parts):
    path, out = done
    stat = os.stat(parts["data"])
    os.utime(parts["data"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        with pytest.raises(ConfigurationError, match=r"stage align changed since it ran:\n  - its data .*\n.*those "
                                                     r"of instruct.*--restart_from align"):
            main([path])
    finally:
        os.utime(parts["data"], ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_finished_but_unrecorded_stage_is_recorded_without_rerunning(done, caplog):
    """A kill after a stage's final output is published and before the manifest says so."""
    path, out = done
    manifest = read_manifest(out)
    expected = manifest["stages"]["instruct"]["final_output_sha256"]
    manifest["stages"]["instruct"] = {key: value for key, value in manifest["stages"]["instruct"].items()
                                      if key not in ("final_output_sha256", "steps", "selection_sha256")}
    manifest["stages"]["instruct"]["status"] = "running"
    write_manifest(out, manifest)
    caplog.set_level(logging.INFO, logger="llava")
    assert main([path]) == 0
    assert stage_runs(caplog) == []
    assert read_manifest(out)["stages"]["instruct"]["final_output_sha256"] == expected


def test_changed_stage_retrains_only_with_restart_from(done, caplog):
    path, out = done
    align_before, instruct_before = final_weights(os.path.join(out, "align")), final_weights(os.path.join(out, "instruct"))
    with pytest.raises(ConfigurationError, match=r"stage instruct changed since it ran:\n  - --learning_rate: 1e-3 "
                                                 r"then, 5e-3 now\n.*--restart_from instruct"):
        main([path, "--instruct.learning_rate", "5e-3"])
    caplog.set_level(logging.INFO, logger="llava")
    assert main([path, "--instruct.learning_rate", "5e-3", "--restart_from", "instruct"]) == 0
    assert stage_runs(caplog) == ["Stage instruct"]
    after = final_weights(os.path.join(out, "instruct"))
    assert all((final_weights(os.path.join(out, "align"))[k] == v).all() for k, v in align_before.items())
    assert any(not (after[k] == v).all() for k, v in instruct_before.items())
    record = read_manifest(out)["stages"]["instruct"]
    assert record["status"] == "done" and record["flags"]["learning_rate"] == "5e-3"
    with open(os.path.join(out, "instruct", "trainer_state.json")) as f:
        assert json.load(f)["global_step"] == 3
