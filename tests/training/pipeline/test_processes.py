"""The processes of a pipeline started from the command line. Its own process holds no torch while stages train (the
checks that need transformers ran in a child first, whose refusals still come out as one line). Stages run as
2-process jobs on CPU (gloo), as users launch them on GPUs: `python train_llava.py pipeline.yaml --launcher
"torchrun --nproc_per_node 2"`, plain DDP and DeepSpeed ZeRO-2: each stage trains over both processes, the manifest
records every stage done, each starts from the previous one's final output, every final output loads in plain
transformers."""

import importlib.util
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

from llava.training.pipeline.manifest import read_manifest
from tests.helpers.distributed import TORCHRUN, assert_complete_two_process_checkpoints, launch, trainer_state
from tests.helpers.outputs import REPO, assert_loads_and_generates
from tests.helpers.pipelines import final_weights, write_pipeline

pytestmark = pytest.mark.slow

# Three stages: two DDP/ZeRO stage boundaries, the second stage's projector-only start and the third's LM start.
STAGES = [
    {"name": "align", "freeze_language_model": True, "learning_rate": "1e-2", "max_steps": 2},
    {"name": "instruct", "freeze_language_model": False, "learning_rate": "1e-3", "max_steps": 2},
    {"name": "task", "freeze_language_model": False, "learning_rate": "1e-4", "max_steps": 2},
]


def test_the_pipeline_process_holds_no_torch_while_stages_train(parts, tmp_path):
    path = write_pipeline(tmp_path, parts)
    probe = tmp_path / "probe.txt"
    env = {**os.environ, "PARENT_PROBE_FILE": str(probe), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "train_llava.py", path, "--launcher",
                             f"{sys.executable} tests/helpers/parent_probe.py"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert probe.read_text().split("\n") == ["no torch", "no torch", ""]  # one line per stage
    assert [record["status"] for record in read_manifest(str(tmp_path / "out"))["stages"].values()] == ["done"] * 2


def test_refusals_of_the_checks_process_come_out_as_one_line(parts, tmp_path):
    path = write_pipeline(tmp_path, parts, [STAGES[0], {**STAGES[1], "vision_lr": 1e-4}])
    result = subprocess.run([sys.executable, "train_llava.py", path], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert re.search(r"error: .*stage instruct: --vision_lr 0.0001 is the learning rate of a component",
                     result.stderr), result.stderr[-3000:]
    assert not os.path.exists(tmp_path / "out" / "align")  # nothing ran


def run_two_process_pipeline(parts, folder, **defaults):
    path = write_pipeline(folder, parts, stages=STAGES, per_device_train_batch_size=1, **defaults)
    rc, log = launch([sys.executable], "train_llava.py", [path, "--launcher", shlex.join(TORCHRUN)],
                     folder / "pipeline.log")
    assert rc == 0, log[-4000:]
    out = str(folder / "out")
    manifest = read_manifest(out)
    assert [(name, record["status"], record["steps"]) for name, record in manifest["stages"].items()] == [
        ("align", "done", 2), ("instruct", "done", 2), ("task", "done", 2)]
    for name in ("align", "instruct", "task"):
        stage_out = os.path.join(out, name)
        assert_complete_two_process_checkpoints(stage_out, [2])  # both processes trained each stage
        assert trainer_state(stage_out)["epoch"] == pytest.approx(2 / 3, abs=0.01)  # 2 steps x 2 processes of 6 samples
        assert_loads_and_generates(stage_out)
    assert manifest["stages"]["instruct"]["start_sha256"] == manifest["stages"]["align"]["final_output_sha256"]
    return out, log


def test_ddp_pipeline(parts, tmp_path):
    out, log = run_two_process_pipeline(parts, tmp_path)
    assert "DeepSpeed" not in log
    align, instruct = final_weights(os.path.join(out, "align")), final_weights(os.path.join(out, "instruct"))
    untrained_lm = final_weights(parts["lm"])
    name = next(name for name in untrained_lm if name.startswith("model.layers.0.self_attn."))
    saved_name = f"language_model.{name}"  # the llava-hf layout
    assert torch.equal(align[saved_name], untrained_lm[name])  # frozen in stage 1
    assert not torch.equal(instruct[saved_name], untrained_lm[name])  # trained in stage 2


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_zero2_pipeline(parts, tmp_path):
    _, log = run_two_process_pipeline(parts, tmp_path, deepspeed="configs/deepspeed_zero2.json")
    assert log.count("DeepSpeed on its CPU accelerator over gloo") >= 3  # every stage ran under DeepSpeed
