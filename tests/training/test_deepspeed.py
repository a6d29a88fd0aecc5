"""DeepSpeed ZeRO-2 and ZeRO-3 with two processes on CPU (DeepSpeed's CPU accelerator over gloo), launched as
users do: `torchrun --nproc_per_node 2 train_llava.py ... --deepspeed configs/deepspeed_zero{2,3}.json`. Stage 1
from separate parts, stage 2 on data mixing text-only and image samples (at batch 1 per process, steps where one
process has an image and the other none), saves, a resume, and every output loaded by plain transformers."""

import importlib.util
import os

import pytest
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration as PlainLlava
from transformers import LlavaOnevisionForConditionalGeneration as PlainOnevision

from tests.helpers.distributed import (TORCHRUN, assert_complete_two_process_checkpoints, launch, stage2_flags,
                                       trainer_state)
from tests.helpers.outputs import assert_loads_and_generates
from tests.helpers.portable import HUB_PREFIXES, tensor_names
from tests.helpers.tiny_parts import qa, write_dataset

pytestmark = [pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                                   reason="deepspeed is not installed")]

CONFIG = {stage: f"configs/deepspeed_zero{stage}.json" for stage in (2, 3)}


def assert_plain_transformers_loads_all(path):
    """llava-hf names on disk, and plain transformers finds a place for every tensor and a tensor for every weight."""
    assert all(name.startswith(HUB_PREFIXES) for name in tensor_names(path)), tensor_names(path)[:5]
    _, info = PlainLlava.from_pretrained(path, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    assert_loads_and_generates(path)


def losses(path):
    return [entry["loss"] for entry in trainer_state(path)["log_history"] if "loss" in entry]


def test_zero3_stage1_from_parts(parts, tmp_path):
    """The LLaVA is assembled on the meta device under an active ZeRO-3 config; DeepSpeed partitions it after."""
    out = tmp_path / "stage1"
    rc, log = launch(TORCHRUN, "train_llava.py", [
        "--vision_model_name_or_path", parts["vision"], "--language_model_name_or_path", parts["lm"],
        "--data_path", parts["data"], "--image_folder", parts["images"], "--freeze_language_model", "True",
        "--output_dir", str(out), "--per_device_train_batch_size", "1", "--max_steps", "4", "--save_steps", "2",
        "--logging_steps", "1", "--learning_rate", "1e-2", "--report_to", "none", "--deepspeed", CONFIG[3]],
        tmp_path / "stage1.log")
    assert rc == 0, log[-4000:]
    assert "DeepSpeed on its CPU accelerator over gloo" in log
    assert trainer_state(str(out))["epoch"] == pytest.approx(4 / 3, abs=0.01)  # one run over both processes
    assert_complete_two_process_checkpoints(str(out), [2, 4])
    assert_plain_transformers_loads_all(str(out))
    trained, untrained = PlainLlava.from_pretrained(str(out)), PlainLlava.from_pretrained(str(out / "checkpoint-2"))
    assert not torch.equal(trained.model.multi_modal_projector.linear_1.weight,
                           untrained.model.multi_modal_projector.linear_1.weight)


@pytest.fixture(scope="module")
def zero2_losses(parts, llava_checkpoint, tmp_path_factory):
    """Stage 2 under ZeRO-2 (weights replicated): the reference for ZeRO-3's losses."""
    tmp_path = tmp_path_factory.mktemp("zero2")
    out = tmp_path / "out"
    rc, log = launch(TORCHRUN, "train_llava.py", stage2_flags(parts, llava_checkpoint, out, "--max_steps", "4",
                                                               "--report_to", "none", "--deepspeed", CONFIG[2]),
                     tmp_path / "zero2.log")
    assert rc == 0, log[-4000:]
    assert_complete_two_process_checkpoints(str(out), [2, 4])
    assert_plain_transformers_loads_all(str(out))
    return losses(str(out))


def test_zero3_stage2_on_mixed_data_saves_resumes_and_matches_zero2(parts, llava_checkpoint, tmp_path, zero2_losses):
    """Every step runs embed -> tower + projector -> merge -> LM on both processes, image batch or not, so ZeRO-3's
    parameter fetches stay in step; its losses equal ZeRO-2's. The parameter table shows full sizes, not shards."""
    out = tmp_path / "zero3"
    flags = ["--report_to", "none", "--deepspeed", CONFIG[3]]
    rc, log = launch(TORCHRUN, "train_llava.py", stage2_flags(parts, llava_checkpoint, out, "--max_steps", "4", *flags),
                     tmp_path / "zero3.log")
    assert rc == 0, log[-4000:]
    table = log.split("Parameters per component:\n")[1].split("\n")[1:6]  # 4 components and the total
    assert [row.split()[0] for row in table] == ["vision_tower", "projector", "language_model", "lm_head", "total"]
    assert all(int(row.split()[1].replace(",", "")) > 0 for row in table), table  # full sizes, not ZeRO-3's shards
    torch.testing.assert_close(losses(str(out)), zero2_losses, rtol=1e-4, atol=1e-4)
    assert_complete_two_process_checkpoints(str(out), [2, 4])
    assert os.path.isdir(out / "checkpoint-4" / "global_step4")  # DeepSpeed's own resume state
    assert_plain_transformers_loads_all(str(out / "checkpoint-4"))
    rc, log = launch(TORCHRUN, "train_llava.py", stage2_flags(parts, llava_checkpoint, out, "--max_steps", "6", *flags),
                     tmp_path / "zero3_resumed.log")
    assert rc == 0, log[-4000:]
    assert f"resuming from {out / 'checkpoint-4'}" in log
    assert trainer_state(str(out))["global_step"] == 6
    assert_plain_transformers_loads_all(str(out))


def onevision_run(parts, data, images, out, stage):
    """A llava_onevision stage 1 from parts under ZeRO-`stage`: (losses, {folder name: image_newline}) of its final
    output and checkpoint-2, each loaded by plain transformers with every tensor in place."""
    rc, log = launch(TORCHRUN, "train_llava.py", [
        "--architecture", "llava_onevision", "--vision_model_name_or_path", parts["vision"],
        "--language_model_name_or_path", parts["lm"], "--data_path", data, "--image_folder", images,
        "--freeze_language_model", "True", "--output_dir", str(out), "--per_device_train_batch_size", "1",
        "--max_steps", "4", "--save_steps", "2", "--logging_steps", "1", "--learning_rate", "1e-2", "--seed", "0",
        "--report_to", "none", "--deepspeed", CONFIG[stage]], out.parent / f"{out.name}.log")
    assert rc == 0, log[-4000:]
    newlines = {}
    for folder in (out, out / "checkpoint-2"):
        model, info = PlainOnevision.from_pretrained(str(folder), output_loading_info=True)
        assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), (folder, info)
        newlines[folder.name] = model.model.image_newline.detach()
    return losses(str(out)), newlines


def test_llava_onevision_trains_alike_under_zero2_and_zero3(parts, tmp_path):
    """OneVision's `image_newline` is a bare parameter of the model, not of a submodule: ZeRO-3 must gather it for
    the model's forward and whole for each save. On tiled single-image and on two-image samples both stages give the
    same losses and the same trained newline, and every output loads completely in plain transformers."""
    two = "<image>\n<image>\nSame?"
    data, images = write_dataset(str(tmp_path / "data"), [
        qa("wide", "wide.png"), qa("pair", ["img0.png", "wide.png"], two), qa("one", "img1.png"),
        qa("pair2", ["img2.png", "img3.png"], two)])
    Image.new("RGB", (100, 30), (0, 0, 255)).save(os.path.join(images, "wide.png"))  # a 1x3 grid of tiles
    zero2_losses, zero2 = onevision_run(parts, data, images, tmp_path / "zero2", 2)
    zero3_losses, zero3 = onevision_run(parts, data, images, tmp_path / "zero3", 3)
    assert not torch.equal(zero3["zero3"], zero3["checkpoint-2"])  # the newline trains under ZeRO-3
    torch.testing.assert_close(zero3_losses, zero2_losses, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(zero3["zero3"], zero2["zero2"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(zero3["checkpoint-2"], zero2["checkpoint-2"], rtol=1e-4, atol=1e-4)
