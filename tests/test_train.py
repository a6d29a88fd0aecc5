"""End to end: the real CLI for stage 1 from separate parts, then stage 2 from stage 1's output."""

import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM, AutoProcessor, CLIPVisionModel
from transformers import LlavaForConditionalGeneration as PlainLlava

from llava import inspect_data
from llava.data.collator import LlavaDataCollator
from llava.train import main
from tests.helpers.outputs import REPO, assert_loads_and_generates
from tests.helpers.tiny_parts import dataset_from

COMMON = ["--per_device_train_batch_size", "2", "--logging_steps", "1", "--save_steps", "2", "--max_steps", "4",
          "--learning_rate", "1e-2", "--report_to", "tensorboard", "--seed", "0"]


def weights(path):
    """State dict as plain transformers loads it (the on-disk key layout is transformers' business)."""
    return PlainLlava.from_pretrained(path).state_dict()


@pytest.fixture(scope="module")
def stage1(parts, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("stage1"))
    subprocess.run(
        [sys.executable, "train_llava.py", "--vision_model_name_or_path", parts["vision"],
         "--language_model_name_or_path", parts["lm"], "--data_path", parts["data"], "--image_folder", parts["images"],
         "--freeze_vision_model", "True", "--freeze_language_model", "True", "--output_dir", out, *COMMON,
         "--sample_data_path", parts["data"], "--num_logged_samples", "2"],
        cwd=REPO, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, preexec_fn=lambda: os.umask(UMASK))
    return out


UMASK = 0o027  # group-readable, others nothing: a group-shared output folder


def modes(folder: str) -> dict[str, int]:
    """Permission bits of everything under `folder`, by path relative to it."""
    found = {}
    for root, folders, files in os.walk(folder):
        for name in folders + files:
            path = os.path.join(root, name)
            found[os.path.relpath(path, folder)] = os.stat(path).st_mode & 0o777
    return found


def test_every_output_file_follows_the_umask_and_no_lock_is_left(stage1):
    """Weights too (safetensors writes them 0600): a serving job of the folder's group must read them."""
    found = modes(stage1)
    assert "model.safetensors" in found and "checkpoint-2/model.safetensors" in found
    wrong = {path: oct(mode) for path, mode in found.items()
             if mode != (0o777 if os.path.isdir(os.path.join(stage1, path)) else 0o666) & ~UMASK}
    assert wrong == {}
    assert "train_llava.lock" not in found


def test_stage1_trains_only_the_projector(parts, stage1):
    trained = weights(stage1)
    lm_source = AutoModelForCausalLM.from_pretrained(parts["lm"]).state_dict()
    vision_source = CLIPVisionModel.from_pretrained(parts["vision"]).state_dict()
    vocab = lm_source["model.embed_tokens.weight"].shape[0]
    for name, tensor in lm_source.items():
        ours = trained[name.replace("model.", "model.language_model.", 1) if name.startswith("model.") else name]
        assert torch.equal(ours[:vocab] if "embed" in name or "lm_head" in name else ours, tensor), name
    vision_prefix = "model.vision_tower."
    assert {k for k in trained if k.startswith(vision_prefix)} == {vision_prefix + k for k in vision_source}
    for name, tensor in vision_source.items():
        assert torch.equal(trained[vision_prefix + name], tensor), name
    assert any(k.startswith("model.multi_modal_projector.") for k in trained)


def test_every_checkpoint_is_complete_and_generates(stage1):
    checkpoints = sorted(glob.glob(os.path.join(stage1, "checkpoint-*")))
    assert [os.path.basename(c) for c in checkpoints] == ["checkpoint-2", "checkpoint-4"]
    for path in [stage1, *checkpoints]:
        assert_loads_and_generates(path)
    first, final = weights(checkpoints[0]), weights(stage1)
    assert not torch.equal(first["model.multi_modal_projector.linear_1.weight"],
                           final["model.multi_modal_projector.linear_1.weight"])


def test_tensorboard_holds_loss_for_every_logged_step(stage1):
    (event_dir,) = [d for d in glob.glob(os.path.join(stage1, "runs", "*")) if not d.endswith("samples")]
    events = EventAccumulator(event_dir)
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert "train/learning_rate" in events.Tags()["scalars"] and "train/grad_norm" in events.Tags()["scalars"]


def test_tensorboard_shows_sample_answers_at_each_save(stage1):
    events = EventAccumulator(os.path.join(stage1, "runs", "samples"), size_guidance={"images": 0})
    events.Reload()
    assert sorted(events.Tags()["images"]) == ["samples/0_single", "samples/1_multi_turn"]
    assert [e.step for e in events.Images("samples/0_single")][-2:] == [4, 4]  # last save, then train end


def test_stage2_trains_lm_and_projector_keeps_tower(parts, stage1, tmp_path):
    out = str(tmp_path / "stage2")
    main(["--model_name_or_path", stage1, "--data_path", parts["data"], "--image_folder", parts["images"],
          "--freeze_vision_model", "True", "--freeze_language_model", "False", "--output_dir", out, *COMMON])
    before, after = weights(stage1), weights(out)
    assert before.keys() == after.keys()
    for name in before:
        changed = not torch.equal(before[name], after[name])
        if name.startswith("model.vision_tower."):
            assert not changed, name
        elif name.startswith(("model.multi_modal_projector.", "lm_head.")) or "q_proj" in name:
            assert changed, name
    assert_loads_and_generates(out)


def test_unfrozen_tower_really_trains(parts, stage1, tmp_path):
    out = str(tmp_path / "tower")
    main(["--model_name_or_path", stage1, "--data_path", parts["data"], "--image_folder", parts["images"],
          "--freeze_vision_model", "False", "--freeze_projector", "True", "--freeze_language_model", "True",
          "--output_dir", out, *COMMON])
    before, after = weights(stage1), weights(out)
    assert not torch.equal(before["model.vision_tower.embeddings.patch_embedding.weight"],
                           after["model.vision_tower.embeddings.patch_embedding.weight"])
    assert torch.equal(before["model.multi_modal_projector.linear_1.weight"],
                       after["model.multi_modal_projector.linear_1.weight"])


def test_inspect_data_json_is_what_the_collator_feeds(parts, stage1, capsys):
    inspect_data.main(["--model_name_or_path", stage1, "--data_path", parts["data"], "--num_samples", "6", "--json"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    dataset = dataset_from([parts["data"]], AutoProcessor.from_pretrained(stage1), 2048, parts["images"])
    collator = LlavaDataCollator(pad_token_id=0)
    assert [line["id"] for line in lines] == [s.id for s in dataset.samples]
    for line, index in zip(lines, range(len(dataset))):
        batch = collator([dataset[index]])
        assert line["input_ids"] == batch["input_ids"][0].tolist()
        assert line["labels"] == batch["labels"][0].tolist()


def test_inspect_data_marks_trained_spans(parts, stage1, capsys):
    inspect_data.main(["--model_name_or_path", stage1, "--data_path", parts["data"], "--num_samples", "2"])
    text = capsys.readouterr().out
    assert "[[Red.<|im_end|>]]" in text and "[[No, it is a light blue.<|im_end|>]]" in text
    assert "<image>x16" in text
