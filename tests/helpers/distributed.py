"""Two-process jobs on CPU (gloo) launched as users launch them: torchrun, accelerate launch."""

import glob
import json
import os
import subprocess
import sys

from llava.training.checkpoints import is_complete
from tests.helpers.outputs import REPO

TWO_PROCESS_TRAIN = ["--per_device_train_batch_size", "1", "--logging_steps", "1", "--save_steps", "2",
                     "--learning_rate", "1e-2", "--seed", "0", "--resume_from_checkpoint", "True"]


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/fsdp.yaml",
              "--num_processes", "2", "--main_process_port", "0"]


def launch(launcher, script, flags, log_path):
    """Run a 2-process job (one thread each: the CI machine has 2 cores); return its exit status and output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with open(log_path, "w") as log:
        rc = subprocess.run([*launcher, script, *flags], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
                            timeout=600).returncode
    with open(log_path, errors="replace") as f:
        return rc, f.read()


def stage2_flags(parts, llava_checkpoint, out, *extra):
    return ["--model_name_or_path", llava_checkpoint, "--data_path", parts["data"], "--image_folder",
            parts["images"], "--output_dir", str(out), *TWO_PROCESS_TRAIN, *extra]


def trainer_state(path):
    with open(os.path.join(path, "trainer_state.json")) as f:
        return json.load(f)


def assert_complete_two_process_checkpoints(out, steps):
    for step in steps:
        path = os.path.join(out, f"checkpoint-{step}")
        assert is_complete(path), path
        assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(os.listdir(path))
    assert not glob.glob(os.path.join(out, "**", "training_args.bin"), recursive=True)
