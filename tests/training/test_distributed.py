"""Two processes on CPU (gloo): the same entry point under torchrun (DDP), under real FSDP, and under
`accelerate launch` with the shipped FSDP config; every output and checkpoint loads with plain transformers."""

import glob
import os

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.distributed import (ACCELERATE, TORCHRUN, assert_complete_two_process_checkpoints, launch,
                                       stage2_flags, trainer_state)
from tests.helpers.outputs import assert_loads_and_generates

pytestmark = pytest.mark.slow  # two-process jobs or whole benchmark runs: tens of seconds each


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


def test_ddp_trainable_checkpoints_resume_to_the_uninterrupted_weights(parts, llava_checkpoint, tmp_path):
    """Stage 1 under DDP with --checkpoint_weights trainable: checkpoint-4 holds the projector only (start model
    hashed and checked once, on rank 0), and resuming it, one step into epoch 2 (3 steps an epoch), ends bitwise
    where the run straight to step 6 ended: the length-grouped order of epoch 2 is the same on both runs."""
    flags = ["--max_steps", "6", "--freeze_language_model", "True", "--checkpoint_weights", "trainable",
             "--report_to", "none"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    for out, extra in ((whole, []), (resumed, ["--resume_from_checkpoint", str(whole / "checkpoint-4")])):
        rc, log = launch(TORCHRUN, "train_llava.py", stage2_flags(parts, llava_checkpoint, out, *flags, *extra),
                         tmp_path / f"{out.name}.log")
        assert rc == 0, log[-4000:]
    assert_complete_two_process_checkpoints(str(whole), [2, 4, 6])
    assert "trainable_weights.safetensors" in os.listdir(whole / "checkpoint-4")
    assert "model.safetensors" not in os.listdir(whole / "checkpoint-4")
    expected, final = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert final.keys() == expected.keys() and all(torch.equal(final[key], expected[key]) for key in expected)
    assert_loads_and_generates(str(resumed))


def test_fsdp_shards_saves_loadable_checkpoints_and_resumes(parts, llava_checkpoint, tmp_path):
    """Real FSDP2 (see tests/helpers/fsdp_on_cpu.py). The data mixes text-only and image samples, so at batch size 1 the two
    processes often disagree on whether the tower runs; sample answers need every process under sharding."""
    out = tmp_path / "fsdp"
    fsdp = ["--fsdp", "full_shard auto_wrap", "--use_cpu", "True", "--report_to", "tensorboard",
            "--sample_data_path", parts["data"], "--num_logged_samples", "1"]
    rc, log = launch(TORCHRUN, "tests/helpers/fsdp_on_cpu.py", stage2_flags(parts, llava_checkpoint, out, "--max_steps", "4",
                                                                     *fsdp), tmp_path / "fsdp.log")
    assert rc == 0, log[-4000:]
    assert_complete_two_process_checkpoints(str(out), [2, 4])
    assert os.path.isfile(out / "checkpoint-4" / "pytorch_model_fsdp.bin")  # FSDP's own resume files
    assert_loads_and_generates(str(out / "checkpoint-4"))
    rc, log = launch(TORCHRUN, "tests/helpers/fsdp_on_cpu.py", stage2_flags(parts, llava_checkpoint, out, "--max_steps", "6",
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
