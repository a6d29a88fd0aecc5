"""bench/gpu_check.py --quick: the GPU check's whole path at tiny sizes on this machine (no GPU needed), and its
MFU arithmetic."""

import json
import os
import subprocess
import sys

import pytest
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

from tests.helpers.outputs import REPO

sys.path.insert(0, os.path.join(REPO, "bench"))
from gpu_check import training_flops  # noqa: E402


@pytest.mark.slow  # the whole check, every engine: ~30 s
def test_quick_check_writes_a_passing_report(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.run([sys.executable, "bench/gpu_check.py", "--quick", "--out", str(out)], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["failed"] == [] and report["versions"]["torch"]
    assert {"sdpa/prefix_on", "sdpa/prefix_off", "eager/prefix_on"} <= report["correctness"].keys()
    assert report["correctness"]["sdpa/prefix_on"]["shared_prefix_tokens"] >= 8  # sharing really ran
    for stage in ("stage1", "stage2"):
        assert all(report[stage]["checks"].values()) and report[stage]["median_step_s"] > 0


def test_training_flops_counts_decoder_matmuls_attention_trained_head_and_tower():
    text = LlamaConfig(vocab_size=100, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2)
    vision = CLIPVisionConfig(image_size=4, patch_size=2, hidden_size=4, intermediate_size=8, num_hidden_layers=1,
                              num_attention_heads=1)
    config = LlavaConfig(text_config=text, vision_config=vision, image_seq_length=4)
    decoder = 4 * 8 * 8 + 3 * 8 * 16  # q, k, v, o + gate, up, down (no embeddings, no lm_head)
    tower, positions = 4 * 4 * 4 + 2 * 4 * 8, 5
    projector = 4 * 8 + 8 * 8
    fixed = 3 * 2 * projector * 4 + 2 * tower * positions + 4 * 4 * positions ** 2
    for k, lm_trains in ((3, True), (2, False)):  # forward + input (+ weight) gradients
        lm = k * (2 * decoder * 10 + 4 * 8 * 100) + k * 2 * 8 * 100 * 3  # 10 positions, 3 trained, vocabulary 100
        assert training_flops(config, 10, 3, lm_trains=lm_trains) == lm + fixed
