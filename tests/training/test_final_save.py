"""Nothing lost, nothing overwritten: the final output is replaced atomically (a SIGKILL inside the first or a
repeated final save leaves the previous output loadable), one run per output_dir, foreign checkpoint-N folders are
verified and never deleted, a full disk is named, and SIGTERM to the whole process group with DataLoader workers
still saves a checkpoint."""

import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from llava.model.final_output import (FINAL_MARKER, PUBLISHING, STAGING, IncompleteFinalOutputError, check_final_output,
                                      finish_interrupted_publish, prepare_staging, publish_final_output)
from llava.model.modeling import LlavaForConditionalGeneration
from llava.reporting import run_command
from llava.train import main
from llava.training.checkpoint_errors import OutOfSpaceError
from llava.training.checkpoints import (COMPLETE_MARKER, ForeignCheckpointError, begin_save, is_complete,
                                        resolve_resume_checkpoint, rotate_checkpoints)
from llava.training.preemption import PREEMPTED_EXIT_CODE
from llava.training.run_lock import LOCK_NAME, OutputDirBusyError, _still_named, check_writable, run_lock
from tests.helpers.outputs import REPO, assert_loads_and_generates
from tests.helpers.runs import CHECKPOINTED, Run, fake_checkpoint

# --------------------------------------------------------------------------------------------- foreign checkpoints


def foreign_checkpoint(output_dir, step, state=True, weights="good"):
    """A checkpoint-N as plain transformers writes it (no marker of ours)."""
    path = os.path.join(output_dir, f"checkpoint-{step}")
    os.makedirs(path)
    if state:
        with open(os.path.join(path, "trainer_state.json"), "w") as f:
            json.dump({"global_step": step}, f)
    if weights:
        save_file({"w": torch.zeros(256)}, os.path.join(path, "model.safetensors"))
        if weights == "truncated":
            with open(os.path.join(path, "model.safetensors"), "r+b") as f:
                f.truncate(300)
    return path


def test_resume_true_picks_the_newest_valid_foreign_checkpoint(tmp_path):
    out = str(tmp_path)
    fake_checkpoint(out, 2)
    foreign_checkpoint(out, 3, state=False)  # older than a valid one: left alone
    six = foreign_checkpoint(out, 6)
    fake_checkpoint(out, 8, complete=False)  # our own killed save: skipped as before
    assert resolve_resume_checkpoint("True", out) == six


@pytest.mark.parametrize("defect, reason", [(dict(state=False), "no readable trainer_state.json"),
                                            (dict(weights=None), "no safetensors weights"),
                                            (dict(weights="truncated"), "weights do not load")])
def test_resume_true_refuses_invalid_foreign_checkpoints_with_the_list(tmp_path, defect, reason):
    out = str(tmp_path)
    fake_checkpoint(out, 2)
    bad = foreign_checkpoint(out, 4, **defect)
    with pytest.raises(ForeignCheckpointError, match="(?s)cannot be resumed from.*" + reason) as error:
        resolve_resume_checkpoint("True", out)
    assert bad in str(error.value) and "checkpoint-2" in str(error.value) and "Move those folders" in str(error.value)
    assert os.listdir(bad)  # nothing deleted


def test_rotation_and_saves_never_delete_foreign_folders(tmp_path):
    out = str(tmp_path)
    foreign = foreign_checkpoint(out, 1)
    for step in (2, 4, 6):
        fake_checkpoint(out, step)
    rotate_checkpoints(out, 1, newest=os.path.join(out, "checkpoint-6"))
    assert sorted(os.listdir(out)) == ["checkpoint-1", "checkpoint-6"]
    begin_save(foreign)  # a save at the foreign folder's step moves it aside
    (aside,) = [name for name in os.listdir(out) if name.startswith("checkpoint-1.foreign-")]
    assert os.path.isfile(os.path.join(out, aside, "model.safetensors")) and os.listdir(foreign) == [
        "checkpoint_saving.json"]


# --------------------------------------------------------------------------------------------- publishing


def staged_output(output_dir, files):
    staging = prepare_staging(output_dir)
    for name, text in files.items():
        with open(os.path.join(staging, name), "w") as f:
            f.write(text)


def test_an_interrupted_publish_is_refused_then_finished(tmp_path):
    out = str(tmp_path)
    staged_output(out, {"model-1-of-2.safetensors": "old a", "model-2-of-2.safetensors": "old b", "config.json": "1"})
    publish_final_output(out)
    assert sorted(os.listdir(out)) == ["config.json", FINAL_MARKER, "model-1-of-2.safetensors",
                                       "model-2-of-2.safetensors"]
    staged_output(out, {"model.safetensors": "new", "config.json": "2"})
    # Killed right after the journal and the first rename: the folder is refused until the move is finished.
    original_replace = os.replace
    calls = []

    def killed_after_one(source, target):
        if STAGING in source and calls:
            raise KeyboardInterrupt  # stands in for the kill
        calls.append(source)
        original_replace(source, target)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "replace", killed_after_one)
        with pytest.raises(KeyboardInterrupt):
            publish_final_output(out)
    assert os.path.exists(os.path.join(out, PUBLISHING))
    for load in (check_final_output, LlavaForConditionalGeneration.from_pretrained):
        with pytest.raises(IncompleteFinalOutputError, match="half-written final output.*rerun the training"):
            load(out)
    finish_interrupted_publish(out)
    assert sorted(os.listdir(out)) == ["config.json", FINAL_MARKER, "model.safetensors"]  # old shards gone
    assert open(os.path.join(out, "config.json")).read() == "2"
    check_final_output(out)
    os.remove(os.path.join(out, "config.json"))
    with pytest.raises(IncompleteFinalOutputError, match=r"lists \['config.json'\]"):
        check_final_output(out)


# --------------------------------------------------------------------------------------------- run lock

def test_a_second_run_is_refused_and_a_dead_runs_lock_is_taken_over(tmp_path, caplog):
    out = str(tmp_path / "out")
    with run_lock(out):
        with pytest.raises(OutputDirBusyError, match=f"in use by another run: pid {os.getpid()} on "):
            with run_lock(out):
                pass
        with pytest.MonkeyPatch.context() as patch:  # the job's other ranks do not lock each other out
            patch.setenv("RANK", "1")
            with run_lock(out):
                pass
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from llava.training.run_lock import run_lock\n"
                               f"with run_lock({out!r}):\n    print('locked', flush=True); time.sleep(600)"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(OutputDirBusyError, match=f"pid {holder.pid} "):
        with run_lock(out):
            pass
    holder.kill()
    holder.wait()
    with run_lock(out):
        assert f"taking over the lock of a run that ended without releasing it (pid {holder.pid} " in caplog.text
        opened_meanwhile = open(os.path.join(out, LOCK_NAME))  # by a run that starts as this one ends
    assert not os.path.exists(os.path.join(out, LOCK_NAME))  # released: nothing left beside the model's files
    assert not _still_named(opened_meanwhile, os.path.join(out, LOCK_NAME))  # that run would lock a new file
    opened_meanwhile.close()


STALLED_MODEL_LOAD = """
import sys, time
import llava.training.run as run
loading = run.model_for_training

def stalled(*args, **kwargs):
    open(sys.argv[1], "w").close()
    time.sleep(120)
    return loading(*args, **kwargs)

run.model_for_training = stalled
from llava.reporting import run_command
from llava.train import main
run_command(lambda: main(sys.argv[2:]))
"""


def test_sigterm_while_the_model_loads_exits_143_and_removes_the_lock(parts, tmp_path):
    """Before training (no checkpoint to save yet) SIGTERM ended the run on the spot, lock file left behind."""
    out, started = tmp_path / "out", str(tmp_path / "loading")
    run = Run("-c", [STALLED_MODEL_LOAD, started, "--vision_model_name_or_path", parts["vision"],
                     "--language_model_name_or_path", parts["lm"], "--data_path", parts["data"], "--image_folder",
                     parts["images"], "--output_dir", str(out), *CHECKPOINTED, "--max_steps", "2"],
              tmp_path / "log")
    run.wait_for(lambda: os.path.exists(started))
    assert os.path.exists(out / LOCK_NAME)
    assert run.stop(signal.SIGTERM) == PREEMPTED_EXIT_CODE, run.log()[-3000:]
    assert not os.path.exists(out / LOCK_NAME)


def test_a_read_only_output_dir_is_refused_up_front(tmp_path):
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    os.chmod(tmp_path, 0o755)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # root writes anywhere: check as an ordinary user
        try:
            if os.geteuid() == 0:
                os.setuid(65534)
            check_writable(str(folder))
            message = "accepted"
        except PermissionError as error:
            message = str(error)
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    message = os.read(read, 10000).decode()
    assert message.startswith(f"--output_dir {folder} is not writable (Permission denied)"), message
    check_writable(str(tmp_path / "new" / "nested"))  # created when missing


# --------------------------------------------------------------------------------------------- full disk

def test_a_full_disk_during_the_optimizer_save_is_named_and_the_previous_checkpoint_kept(
        parts, llava_checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "out"
    original_save = torch.save

    def disk_full_at_step_4(obj, f, *args, **kwargs):
        if str(f).endswith(os.path.join("checkpoint-4", "optimizer.pt")):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1024 vs 952")
        return original_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_at_step_4)
    with pytest.raises(OSError, match="No space left on device while saving .*checkpoint-4.*checkpoint-2.*is kept"):
        main(["--model_name_or_path", llava_checkpoint, "--data_path", parts["data"], "--image_folder",
              parts["images"], "--output_dir", str(out), *CHECKPOINTED, "--max_steps", "4"])
    assert is_complete(str(out / "checkpoint-2")) and not is_complete(str(out / "checkpoint-4"))


def safetensors_disk_full(monkeypatch, folder_name):
    """safetensors' own error for a full disk (as a 25 MB tmpfs gave it) while it writes into `folder_name`."""
    import transformers.modeling_utils
    from safetensors import SafetensorError

    original = transformers.modeling_utils.safe_save_file

    def write(tensors, filename, *args, **kwargs):
        if os.path.basename(os.path.dirname(str(filename))) == folder_name:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return original(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", write)


def test_safetensors_filling_the_disk_in_checkpoint_4_is_one_error_line_and_checkpoint_2_is_kept(
        parts, llava_checkpoint, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    safetensors_disk_full(monkeypatch, "checkpoint-4")
    with pytest.raises(SystemExit) as exit_info:
        run_command(lambda: main(["--model_name_or_path", llava_checkpoint, "--data_path", parts["data"],
                                  "--image_folder", parts["images"], "--output_dir", str(out), *CHECKPOINTED,
                                  "--max_steps", "4"]))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-2] == (
        f"error: No space left on device while saving {out / 'checkpoint-4'} (Error while serializing: I/O error: "
        "No space left on device (os error 28)). That folder is incomplete and will not be resumed from; the "
        f"previous checkpoint, {out / 'checkpoint-2'}, is kept. Free space (or lower --save_total_limit) and rerun "
        "with --resume_from_checkpoint True.")
    assert is_complete(str(out / "checkpoint-2")) and not is_complete(str(out / "checkpoint-4"))
    assert not os.path.exists(out / LOCK_NAME)


def test_a_full_disk_in_the_final_save_keeps_the_published_output_and_the_checkpoint(
        parts, llava_checkpoint, tmp_path, monkeypatch):
    """A rerun of a finished command saves its final output again: the disk filling up meanwhile replaces nothing,
    the partial copy is removed (its space given back), and a rerun with space again publishes it."""
    out = tmp_path / "out"
    run = ["--model_name_or_path", llava_checkpoint, "--data_path", parts["data"], "--image_folder", parts["images"],
           "--output_dir", str(out), *CHECKPOINTED, "--max_steps", "2"]
    main(run)
    published = digest(out / "model.safetensors")
    with monkeypatch.context() as patch:
        safetensors_disk_full(patch, STAGING)
        with pytest.raises(OutOfSpaceError, match=rf"^No space left on device while writing the final output of "
                                                  rf"{out} \(Error while serializing: .*\)\. Nothing there was "
                                                  r"replaced .* the last checkpoint, .*checkpoint-2, is kept"):
            main(run)
    assert not os.path.exists(out / STAGING) and not os.path.exists(out / PUBLISHING)
    assert digest(out / "model.safetensors") == published and is_complete(str(out / "checkpoint-2"))
    check_final_output(str(out))
    main(run)
    check_final_output(str(out))


# --------------------------------------------------------------------------------------------- kills

MAX_STEPS = 12


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def killed_runs(parts, llava_checkpoint, tmp_path_factory):
    """One output_dir, always the same flags: SIGTERM to the process group of a run with 2 DataLoader workers; a
    SIGKILL inside the first final save while a second run tries the same output_dir; a rerun to the end; a
    SIGKILL inside the repeated final save of a rerun of the finished run."""
    root = tmp_path_factory.mktemp("final")
    out = str(root / "out")
    flags = ["--model_name_or_path", llava_checkpoint, "--data_path", parts["data"], "--image_folder",
             parts["images"], "--output_dir", out, *CHECKPOINTED, "--max_steps", str(MAX_STEPS), "--save_steps", "4"]
    phases = {}
    job = Run("train_llava.py", [*flags, "--dataloader_num_workers", "2"], root / "sigterm.log",
              new_session=True)
    job.wait_for(job.training)
    os.killpg(job.process.pid, signal.SIGTERM)
    phases["sigterm"] = {"rc": job.wait(), "log": job.log(), "checkpoints": sorted(os.listdir(out))}

    def killed_in_final_save(name, busy_check=False):
        started = str(root / f"{name}.started")
        job = Run("tests/helpers/stalling_final_save.py", flags, root / f"{name}.log", env={"STALL_STARTED": started},
                  new_session=True)
        job.wait_for(lambda: os.path.exists(started))
        phase = {"pid": job.process.pid}
        if busy_check:
            second = Run("train_llava.py", flags, root / "second.log", new_session=True)
            phase["second_rc"], phase["second_log"] = second.wait(), second.log()
        os.killpg(job.process.pid, signal.SIGKILL)
        job.wait()
        phase["top_level"] = sorted(os.listdir(out))
        return phase

    phases["first_final"] = killed_in_final_save("first_final", busy_check=True)
    job = Run("train_llava.py", flags, root / "finish.log", new_session=True)
    phases["finish"] = {"rc": job.wait(), "log": job.log(), "digest": digest(os.path.join(out, "model.safetensors"))}
    phases["repeated_final"] = killed_in_final_save("repeated_final")
    return out, phases


def test_sigterm_to_the_process_group_with_workers_saves_a_checkpoint(killed_runs):
    out, phases = killed_runs
    sigterm = phases["sigterm"]
    assert sigterm["rc"] == PREEMPTED_EXIT_CODE, sigterm["log"][-3000:]
    assert "SIGTERM received: saving checkpoint-" in sigterm["log"] and "killed by signal" not in sigterm["log"]
    assert any(is_complete(os.path.join(out, name)) for name in sigterm["checkpoints"] if name.startswith("checkp"))


def test_a_second_run_on_a_busy_output_dir_is_refused_at_once(killed_runs):
    out, phases = killed_runs
    first = phases["first_final"]
    assert first["second_rc"] == 2  # a user's error: one line, no traceback
    assert f"error: --output_dir {out} is in use by another run: pid {first['pid']} on " in first["second_log"]
    assert "Traceback" not in first["second_log"]
    assert "'loss'" not in first["second_log"]


def test_a_kill_inside_the_first_final_save_leaves_no_half_written_model(killed_runs):
    out, phases = killed_runs
    assert "model.safetensors" not in phases["first_final"]["top_level"]
    assert STAGING in phases["first_final"]["top_level"]
    finish = phases["finish"]
    assert finish["rc"] == 0, finish["log"][-3000:]
    assert "taking over the lock of a run that ended without releasing it" in finish["log"]


def test_a_kill_inside_a_repeated_final_save_keeps_the_finished_model(killed_runs):
    out, phases = killed_runs
    assert FINAL_MARKER in phases["repeated_final"]["top_level"]
    assert digest(os.path.join(out, "model.safetensors")) == phases["finish"]["digest"]
    check_final_output(out)
    LlavaForConditionalGeneration.from_pretrained(out)
    assert_loads_and_generates(out)
    with open(os.path.join(out, "trainer_state.json")) as f:
        assert json.load(f)["global_step"] == MAX_STEPS
    assert all(COMPLETE_MARKER in os.listdir(os.path.join(out, name)) for name in os.listdir(out)
               if name.startswith("checkpoint-"))
