"""A pipeline killed with SIGKILL anywhere (inside a stage, in a final save, between stages), then run again with
the same command, ends with final weights bitwise equal to those of an uninterrupted pipeline."""

import contextlib
import json
import os
import signal
import sys

import pytest
import torch

from llava.training.checkpoints import is_complete
from llava.training.pipeline.manifest import manifest_path
from llava.training.preemption import PREEMPTED_EXIT_CODE
from llava.training.run_lock import LOCK_NAME
from tests.helpers.pipelines import final_weights, write_pipeline
from tests.helpers.runs import Run

pytestmark = pytest.mark.slow


def run_to_end(path, log):
    run = Run("train_llava.py", [path], log)
    assert run.wait() == 0, run.log()[-3000:]
    return run.log()


def stage_status(out, name):
    try:
        with open(manifest_path(out)) as f:
            return json.load(f)["stages"].get(name, {}).get("status")
    except (OSError, ValueError):  # not written yet
        return None


@pytest.fixture(scope="module")
def uninterrupted(parts, tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    run_to_end(write_pipeline(folder, parts), str(folder / "log"))
    return {name: final_weights(folder / "out" / name) for name in ("align", "instruct")}


KILL_POINTS = {
    # after align's checkpoint-2: the rerun resumes align from it, at step 3
    "inside_a_stage": lambda out, started: is_complete(os.path.join(out, "align", "checkpoint-2")),
    # instruct's weights are in its staging folder, the rest of its final output is not
    "in_a_final_save": lambda out, started: os.path.exists(started),
    # align is recorded done; instruct has not trained (or just begun)
    "between_stages": lambda out, started: stage_status(out, "align") == "done",
}


@pytest.mark.parametrize("point", KILL_POINTS)
def test_killed_pipeline_rerun_ends_bitwise_equal(parts, tmp_path, uninterrupted, point):
    path = write_pipeline(tmp_path, parts)
    out, started = str(tmp_path / "out"), str(tmp_path / "stall_started")
    launcher = f"{sys.executable} tests/helpers/stalling_final_save.py"
    run = Run("train_llava.py", [path, "--launcher", launcher], str(tmp_path / "killed.log"), new_session=True,
              env={"STALL_STAGE": "instruct", "STALL_STARTED": started})
    run.wait_for(lambda: KILL_POINTS[point](out, started))
    os.killpg(run.process.pid, signal.SIGKILL)
    run.process.wait()
    log = run_to_end(path, str(tmp_path / "rerun.log"))
    if point == "between_stages":
        assert "Stage align is done" in log
    for name, expected in uninterrupted.items():
        got = final_weights(tmp_path / "out" / name)
        assert got.keys() == expected.keys()
        unequal = [key for key in expected if not torch.equal(got[key], expected[key])]
        assert unequal == [], f"{name}: {unequal[:5]}"


def test_sigterm_to_the_pipeline_alone_stops_its_stage_with_a_checkpoint_and_no_lock(parts, tmp_path):
    """A SIGTERM sent to the pipeline's process only (`kill <pid>`) is passed on to the stage training: it saves a
    checkpoint and exits 143, as the pipeline then does, with no lock left in either output_dir. (The pipeline
    ended at once, its lock left behind and its stage training on, orphaned.)"""
    stages = [{"name": "align", "freeze_language_model": True, "learning_rate": "1e-2", "max_steps": 400,
               "save_steps": 1000}]
    path = write_pipeline(tmp_path, parts, stages=stages)
    out = tmp_path / "out"
    run = Run("train_llava.py", [path], str(tmp_path / "log"), new_session=True)
    try:
        run.wait_for(run.training)
        assert run.stop(signal.SIGTERM) == PREEMPTED_EXIT_CODE, run.log()[-3000:]
    finally:  # the stage too, wherever the test failed
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.process.pid, signal.SIGKILL)
    checkpoints = [name for name in os.listdir(out / "align") if name.startswith("checkpoint-")]
    assert len(checkpoints) == 1 and is_complete(str(out / "align" / checkpoints[0]))
    assert not os.path.exists(out / LOCK_NAME) and not os.path.exists(out / "align" / LOCK_NAME)
