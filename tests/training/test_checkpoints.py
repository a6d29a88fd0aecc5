"""Crash-safe checkpoints: completeness, the choice `--resume_from_checkpoint True` makes, rotation, and a stage-2
run killed (SIGKILL, also in the middle of a save) and preempted (SIGTERM) several times, rerun each time with the
same command, that ends at its last step with a model plain transformers loads."""

import glob
import json
import logging
import os
import random
import signal
import time

import pytest
from transformers.trainer_utils import get_last_checkpoint

from llava.train import main
from llava.training.checkpoints import (COMPLETE_MARKER, is_complete, latest_complete_checkpoint,
                                        resolve_resume_checkpoint, rotate_checkpoints)
from llava.training.preemption import PREEMPTED_EXIT_CODE
from tests.helpers.outputs import assert_loads_and_generates
from tests.helpers.runs import CHECKPOINTED, Run, StepCounter, fake_checkpoint

# --------------------------------------------------------------------------------------------- units


def test_latest_complete_checkpoint_skips_incomplete_folders(tmp_path):
    out = str(tmp_path)
    assert latest_complete_checkpoint(out) is None and latest_complete_checkpoint(str(tmp_path / "missing")) is None
    two = fake_checkpoint(out, 2)
    fake_checkpoint(out, 4, complete=False)  # killed while saving
    lost_file = fake_checkpoint(out, 6)
    os.remove(os.path.join(lost_file, "model.safetensors"))  # a file the marker lists went missing
    os.makedirs(os.path.join(out, "checkpoint-8.tmp"))
    assert [is_complete(p) for p in (two, os.path.join(out, "checkpoint-4"), lost_file)] == [True, False, False]
    assert latest_complete_checkpoint(out) == two
    assert get_last_checkpoint(out) == lost_file  # what transformers alone would resume from


def test_resume_flag_values(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="llava")
    out = str(tmp_path)
    assert resolve_resume_checkpoint("True", out) is None and resolve_resume_checkpoint(True, out) is None
    assert "training from the start" in caplog.text
    assert resolve_resume_checkpoint("False", out) is None and resolve_resume_checkpoint(None, out) is None
    incomplete = fake_checkpoint(out, 4, complete=False)
    assert resolve_resume_checkpoint(incomplete, out) == incomplete and f"has no {COMPLETE_MARKER}" in caplog.text
    assert resolve_resume_checkpoint("true", out) is None
    with pytest.raises(FileNotFoundError, match="--resume_from_checkpoint"):
        resolve_resume_checkpoint(str(tmp_path / "checkpoint-9"), out)


def test_rotation_keeps_the_newest_complete_ones_and_drops_leftovers(tmp_path):
    out = str(tmp_path)
    for step, complete in [(2, True), (4, False), (6, True), (8, True)]:
        fake_checkpoint(out, step, complete)
    rotate_checkpoints(out, None, newest=os.path.join(out, "checkpoint-8"))
    assert len(os.listdir(out)) == 4  # no limit: nothing deleted
    rotate_checkpoints(out, 2, newest=os.path.join(out, "checkpoint-8"))
    assert sorted(os.listdir(out)) == ["checkpoint-6", "checkpoint-8"]
    # The new checkpoint is kept even when older steps sort after it (a run resumed from an earlier checkpoint).
    fake_checkpoint(out, 3)
    rotate_checkpoints(out, 1, newest=os.path.join(out, "checkpoint-3"))
    assert os.listdir(out) == ["checkpoint-3"]


# --------------------------------------------------------------------------------------------- in-process runs


def test_lora_checkpoints_are_marked_json_only_resumed_and_never_overrun(parts, llava_checkpoint, tmp_path):
    out = tmp_path / "lora"
    flags = ["--model_name_or_path", llava_checkpoint, "--data_path", parts["data"], "--image_folder",
             parts["images"], "--output_dir", str(out), *CHECKPOINTED, "--lora_enable", "True", "--lora_r", "4",
             "--merge_lora", "False", "--save_total_limit", "3"]
    main([*flags, "--max_steps", "4"])
    assert all(is_complete(p) for p in glob.glob(str(out / "checkpoint-*"))) and (out / "checkpoint-4").is_dir()
    assert not glob.glob(str(out / "**" / "*.bin"), recursive=True)  # training_args.bin is written as JSON
    with open(out / "checkpoint-4" / "training_args.json") as f:
        assert json.load(f)["save_total_limit"] == 3
    # 3 steps per epoch: Trainer alone would run a 6th step when rerun after reaching step 5.
    for expected in ([5], []):
        counter = StepCounter()
        trainer = main([*flags, "--max_steps", "5"], callbacks=[counter])
        assert counter.steps == expected and trainer.state.global_step == 5


# --------------------------------------------------------------------------------------------- kills and restarts

MAX_STEPS = 30


@pytest.fixture(scope="module")
def restarted(parts, llava_checkpoint, tmp_path_factory):
    """A 30-step stage-2 run with `--resume_from_checkpoint True`: killed in the middle of saving checkpoint-4,
    killed with SIGKILL at random moments, stopped with SIGTERM, and finally run to the end, always with the
    same flags. Returns what each phase left behind."""
    root = tmp_path_factory.mktemp("restarts")
    out = str(root / "out")
    flags = ["--model_name_or_path", llava_checkpoint, "--data_path", parts["data"], "--image_folder",
             parts["images"], "--output_dir", out, *CHECKPOINTED, "--max_steps", str(MAX_STEPS), "--save_total_limit", "2",
             "--freeze_vision_model", "False"]
    phases = {}
    started = str(root / "save-started")
    run = Run("tests/helpers/slow_checkpoint_save.py", flags, root / "mid_save.log",
              env={"SLOW_SAVE_STEP": "4", "SLOW_SAVE_STARTED": started})
    run.wait_for(lambda: os.path.exists(started))
    phases["mid_save"] = {"rc": run.stop(signal.SIGKILL), "log": run.log(), "latest": latest_complete_checkpoint(out),
                          "transformers_latest": get_last_checkpoint(out)}
    delays = random.Random(0)
    for name, sig in [("kill_1", signal.SIGKILL), ("sigterm", signal.SIGTERM), ("kill_2", signal.SIGKILL)]:
        run = Run("train_llava.py", flags, root / f"{name}.log")
        run.wait_for(run.training)
        time.sleep(delays.uniform(0.0, 1.0))
        phases[name] = {"rc": run.stop(sig), "log": run.log(), "latest": latest_complete_checkpoint(out)}
    final = Run("train_llava.py", flags, root / "final.log")
    phases["final"] = {"rc": final.process.wait(timeout=300), "log": final.log()}
    return out, phases


def test_a_checkpoint_killed_mid_save_is_never_resumed_from(restarted):
    out, phases = restarted
    mid_save = phases["mid_save"]
    assert "no complete checkpoint" in mid_save["log"] and mid_save["rc"] == -signal.SIGKILL
    assert mid_save["latest"] == os.path.join(out, "checkpoint-2")
    assert mid_save["transformers_latest"] == os.path.join(out, "checkpoint-4")  # the half-written one
    assert f"resuming from {os.path.join(out, 'checkpoint-2')}" in phases["kill_1"]["log"]


def test_sigterm_saves_a_checkpoint_and_exits_with_the_documented_status(restarted):
    out, phases = restarted
    sigterm = phases["sigterm"]
    assert sigterm["rc"] == PREEMPTED_EXIT_CODE, sigterm["log"][-3000:]
    assert "SIGTERM received: saving checkpoint-" in sigterm["log"] and sigterm["latest"] is not None
    step = int(sigterm["latest"].rsplit("-", 1)[1])
    assert f"saving checkpoint-{step} and stopping" in sigterm["log"]
    assert f"resuming from {sigterm['latest']}" in phases["kill_2"]["log"]


def test_the_rerun_command_reaches_the_last_step_with_a_loadable_model(restarted):
    out, phases = restarted
    assert phases["final"]["rc"] == 0, phases["final"]["log"][-3000:]
    with open(os.path.join(out, "trainer_state.json")) as f:
        assert json.load(f)["global_step"] == MAX_STEPS
    checkpoints = glob.glob(os.path.join(out, "checkpoint-*"))
    assert os.path.join(out, f"checkpoint-{MAX_STEPS}") in checkpoints and len(checkpoints) <= 2
    assert all(is_complete(path) for path in checkpoints)
    assert_loads_and_generates(out)
    assert_loads_and_generates(os.path.join(out, f"checkpoint-{MAX_STEPS}"))
