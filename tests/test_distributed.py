"""Two processes on CPU (gloo): the same entry point under torchrun (DDP), under real FSDP, and under
`accelerate launch` with the shipped FSDP config; every output and checkpoint loads with plain transformers."""

import glob
import json
import os
import subprocess
import sys

import pytest

from llava.checkpoints import is_complete
from tests.test_train_cli import REPO, assert_loads_and_generates

TRAIN = ["--per_device_train_batch_size", "1", "--logging_steps", "1", "--save_steps", "2", "--learning_rate", "1e-2",
         "--seed", "0", "--resume_from_checkpoint", "True"]
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
            parts["images"], "--output_dir", str(out), *TRAIN, *extra]


def trainer_state(path):
    with open(os.path.join(path, "trainer_state.json")) as f:
        return json.load(f)


def assert_complete_two_process_checkpoints(out, steps):
    for step in steps:
        path = os.path.join(out, f"checkpoint-{step}")
        assert is_complete(path), path
        assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(os.listdir(path))
    assert not glob.glob(os.path.join(out, "**", "training_args.bin"), recursive=True)


def test_ddp_trains_one_run_over_both_processes(parts, llava_checkpoint, tmp_path):
    """No --use_cpu: without a GPU it is switched on, else each process would train alone on all the data. The
    unfrozen tower (its last layer gets no gradient) under gradient checkpointing needs find_unused_parameters;
    TensorBoard sample answers come from the main process only."""
    out = tmp_path / "ddp"
    rc, log = launch(TORCHRUN, "train_llava.py", stage2_flags(
        parts, llava_checkpoint, out, "--max_steps", "4", "--freeze_vision_model", "False",
        "--gradient_checkpointing", "True", "--sample_data_path", parts["data"], "--num_logged_samples", "1",
        "--report_to", "tensorboard"), tmp_path / "ddp.log")
    assert rc == 0, log[-4000:]
    assert "training on CPU with gloo" in log
    # 6 samples, 1 per process per step: 3 steps per epoch when both processes share the data.
    assert trainer_state(str(out))["epoch"] == pytest.approx(4 / 3, abs=0.01)
    assert_complete_two_process_checkpoints(str(out), [2, 4])
    assert len(glob.glob(str(out / "runs" / "samples" / "events.*"))) == 1
    assert_loads_and_generates(str(out))
    assert_loads_and_generates(str(out / "checkpoint-4"))


def test_fsdp_shards_saves_loadable_checkpoints_and_resumes(parts, llava_checkpoint, tmp_path):
    """Real FSDP2 (see tests/fsdp_on_cpu.py). The data mixes text-only and image samples, so at batch size 1 the two
    processes often disagree on whether the tower runs; sample answers need every process under sharding."""
    out = tmp_path / "fsdp"
    fsdp = ["--fsdp", "full_shard auto_wrap", "--use_cpu", "True", "--report_to", "tensorboard",
            "--sample_data_path", parts["data"], "--num_logged_samples", "1"]
    rc, log = launch(TORCHRUN, "tests/fsdp_on_cpu.py", stage2_flags(parts, llava_checkpoint, out, "--max_steps", "4",
                                                                     *fsdp), tmp_path / "fsdp.log")
    assert rc == 0, log[-4000:]
    assert_complete_two_process_checkpoints(str(out), [2, 4])
    assert os.path.isfile(out / "checkpoint-4" / "pytorch_model_fsdp.bin")  # FSDP's own resume files
    assert_loads_and_generates(str(out / "checkpoint-4"))
    rc, log = launch(TORCHRUN, "tests/fsdp_on_cpu.py", stage2_flags(parts, llava_checkpoint, out, "--max_steps", "6",
                                                                     *fsdp), tmp_path / "fsdp_resumed.log")
    assert rc == 0, log[-4000:]
    assert f"resuming from {out / 'checkpoint-4'}" in log
    assert trainer_state(str(out))["global_step"] == 6
    assert_loads_and_generates(str(out))


def test_accelerate_launch_with_the_fsdp_config_trains_lora(parts, llava_checkpoint, tmp_path):
    """configs/fsdp.yaml as shipped: on CPU accelerate runs DDP (and we say so); LoRA adapters plus the projector
    train, and the main process merges them into the output."""
    out = tmp_path / "accelerate"
    rc, log = launch(ACCELERATE, "train_llava.py", stage2_flags(
        parts, llava_checkpoint, out, "--max_steps", "4", "--lora_enable", "True", "--lora_r", "4",
        "--report_to", "none"), tmp_path / "accelerate.log")
    assert rc == 0, log[-4000:]
    assert "FSDP is ignored on CPU" in log
    assert_complete_two_process_checkpoints(str(out), [2, 4])
    assert os.path.isfile(out / "checkpoint-4" / "adapter_model.safetensors")
    assert_loads_and_generates(str(out))
