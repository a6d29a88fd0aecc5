"""Runs of the real CLI for tests: in-process step counting, background runs that can be killed or signalled, and
checkpoint folders built by hand."""

import os
import subprocess
import sys
import time

from transformers import TrainerCallback

from llava.training.checkpoints import SAVING_MARKER, mark_complete
from tests.helpers.outputs import REPO


def train_cli(*flags) -> None:
    """`python train_llava.py FLAGS` in a process of its own, as a user runs it; fails the test with its stderr."""
    result = subprocess.run([sys.executable, "train_llava.py", *flags], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]


class StepCounter(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def fake_checkpoint(output_dir, step, complete=True):
    """A checkpoint-N of ours: complete, or (complete False) left by a save that was killed."""
    path = os.path.join(output_dir, f"checkpoint-{step}")
    os.makedirs(path)
    with open(os.path.join(path, SAVING_MARKER), "w") as f:
        f.write("{}")
    with open(os.path.join(path, "model.safetensors"), "w") as f:
        f.write("weights")
    if complete:
        mark_complete(path, step)
    return path


# Training flags of runs that save every 2 steps and resume from their own checkpoints when rerun.
CHECKPOINTED = ["--per_device_train_batch_size", "2", "--logging_steps", "1", "--save_steps", "2",
                "--learning_rate", "1e-2", "--report_to", "none", "--seed", "0", "--resume_from_checkpoint", "True"]


def _this_checkout_first():
    """PYTHONPATH putting this checkout's `llava` first, for scripts run by path (an installed copy may be another's)."""
    return {"PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}


class Run:
    """One `python <script> <flags>` in the background, its output in a file."""

    def __init__(self, script, flags, log_path, env=None, new_session=False):
        """`new_session`: in a process group of its own, as a scheduler starts a job (so the group can be signalled)."""
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.process = subprocess.Popen([sys.executable, script, *flags], cwd=REPO, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=new_session,
                                            env={**os.environ, **_this_checkout_first(), **(env or {})})

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def wait_for(self, condition, timeout=240):
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.process.poll() is None, f"exited early ({self.process.returncode}):\n{self.log()[-3000:]}"
            assert time.monotonic() < deadline, self.log()[-3000:]
            time.sleep(0.05)

    def training(self):
        """True once this run has logged a training step."""
        return "'loss'" in self.log()

    def wait(self):
        return self.process.wait(timeout=300)

    def stop(self, sig):
        self.process.send_signal(sig)
        return self.process.wait(timeout=120)
