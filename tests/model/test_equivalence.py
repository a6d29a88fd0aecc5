"""The speed-ups change no training result: a few real CLI steps give the same losses as the unoptimized path.

Unoptimized path: transformers' own `LlavaForConditionalGeneration.forward` (logits for every position and the
full vocabulary, every row's tokens computed separately, the last token fed too), every MLP activation kept.
Ours: logits only at trained positions, the batch's shared prompt prefix computed once, the last token only a
target, MLP activations recomputed in the backward pass (stage 2). The data has a default system prompt, so the prefix is shared.
"""

import pytest
import transformers

from llava.model import modeling as llava_model
from llava.train import main
from tests.helpers.tiny_parts import (CHATML_DEFAULT_SYSTEM_TEMPLATE, conversation_records, save_language_model,
                                      write_dataset)

STAGES = {
    "stage1": ["--freeze_vision_model", "True", "--freeze_language_model", "True"],
    "stage2": ["--freeze_vision_model", "True", "--freeze_language_model", "False"],
}


@pytest.fixture(scope="module")
def system_prompt_parts(parts, tmp_path_factory):
    root = tmp_path_factory.mktemp("system_prompt")
    # every record starts with the template's default system prompt (none brings its own)
    records = [r for r in conversation_records() if r["conversations"][0]["from"] != "system"] * 2
    data, images = write_dataset(str(root / "data"), records)
    return {"lm": save_language_model(str(root / "lm"), CHATML_DEFAULT_SYSTEM_TEMPLATE), "vision": parts["vision"],
            "data": data, "images": images}


def train_losses(parts, stage, output_dir, *extra):
    trainer = main(["--vision_model_name_or_path", parts["vision"], "--language_model_name_or_path", parts["lm"],
                    "--data_path", parts["data"], "--image_folder", parts["images"], "--output_dir", output_dir,
                    "--per_device_train_batch_size", "4", "--max_steps", "4", "--learning_rate", "1e-2",
                    "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--seed", "0",
                    *STAGES[stage], *extra])
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_losses_equal_the_unoptimized_path(system_prompt_parts, stage, tmp_path, monkeypatch):
    shared = []
    prefix_cache = llava_model.LlavaForConditionalGeneration._prefix_cache
    monkeypatch.setattr(llava_model.LlavaForConditionalGeneration, "_prefix_cache",
                        lambda self, ids, length: shared.append(length) or prefix_cache(self, ids, length))
    ours = train_losses(system_prompt_parts, stage, str(tmp_path / "ours"))
    assert len(shared) == 4 and min(shared) >= 8  # every step shared its system prompt prefix

    monkeypatch.setattr(llava_model.LlavaForConditionalGeneration, "forward",
                        transformers.LlavaForConditionalGeneration.forward)
    unoptimized = train_losses(system_prompt_parts, stage, str(tmp_path / "unoptimized"),
                               "--recompute_mlp_activations", "False")
    assert len(ours) == len(unoptimized) == 4
    assert ours == pytest.approx(unoptimized, abs=1e-4, rel=1e-4)
    assert ours[-1] < ours[0]  # the steps really trained
