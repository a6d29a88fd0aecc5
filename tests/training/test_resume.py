"""Resuming from checkpoint-3 of a 6-step run ends where the uninterrupted run ends (full, LoRA, QLoRA).

The data is 6 samples at batch 2, so the resumed half is a whole new epoch: the sampler's shuffling, the
optimizer and scheduler states, and (for LoRA) the adapter dropout's RNG must all be restored to match.
"""

import pytest
import torch

from llava.train import main
from llava.training.build import base_model_for, processor_for
from tests.helpers.runs import StepCounter

TRAIN = ["--per_device_train_batch_size", "2", "--logging_steps", "1", "--save_steps", "3", "--max_steps", "6",
         "--learning_rate", "1e-2", "--report_to", "none", "--seed", "0"]
MODES = {
    "full": [],
    "lora": ["--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0.3",
             "--merge_lora", "False"],
}
MODES["qlora"] = [*MODES["lora"], "--load_in_4bit", "True"]


def run(parts, out, flags, *extra):
    """Train (vision tower, projector and LM all learning); return the trainer and the steps this run took."""
    counter = StepCounter()
    trainer = main(["--model_name_or_path", parts["llava"], "--data_path", parts["data"], "--image_folder",
                    parts["images"], "--output_dir", str(out), "--freeze_vision_model", "False", *TRAIN, *flags,
                    *extra], callbacks=[counter])
    return trainer, counter.steps


@pytest.fixture(scope="module")
def stage1(parts, llava_checkpoint):
    return {**parts, "llava": llava_checkpoint}


@pytest.mark.parametrize("mode", MODES)
def test_resumed_run_equals_uninterrupted_run(stage1, tmp_path, mode):
    whole, whole_steps = run(stage1, tmp_path / "whole", MODES[mode])
    resumed, resumed_steps = run(stage1, tmp_path / "resumed", MODES[mode],
                                 "--resume_from_checkpoint", str(tmp_path / "whole" / "checkpoint-3"))
    assert whole_steps == [1, 2, 3, 4, 5, 6] and resumed_steps == [4, 5, 6]
    # the resumed log starts with checkpoint-3's history, then its own steps 4-6
    whole_losses = [e["loss"] for e in whole.state.log_history if "loss" in e]
    resumed_losses = [e["loss"] for e in resumed.state.log_history if "loss" in e]
    torch.testing.assert_close(resumed_losses, whole_losses, rtol=0, atol=1e-6)
    expected = dict(whole.model.named_parameters())
    trained = 0
    for name, param in resumed.model.named_parameters():
        torch.testing.assert_close(param, expected[name], rtol=0, atol=1e-6, msg=name)
        trained += param.requires_grad
    assert trained > 0


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_checkpoint_weights_load_in_place_in_the_training_dtype(parts, tmp_path, monkeypatch, tie):
    """Resume copies the saved tensors into the model being trained: no second model, the model's dtype kept."""
    from llava.model.hub_format import load_saved_weights
    from llava.model.modeling import LlavaForConditionalGeneration
    from llava.training.arguments import ModelArguments
    from tests.helpers.tiny_parts import save_language_model

    lm = save_language_model(str(tmp_path / "lm"), tie=tie)
    args = ModelArguments(vision_model_name_or_path=parts["vision"], language_model_name_or_path=lm)
    saved = base_model_for(args, processor_for(args))
    saved.save_pretrained(tmp_path / "ckpt")
    model = base_model_for(args, processor_for(args)).to(torch.bfloat16)
    for param in model.parameters():
        param.data.zero_()

    def no_second_model(*args, **kwargs):
        raise AssertionError("a second model was built")

    monkeypatch.setattr(LlavaForConditionalGeneration, "from_pretrained", no_second_model)
    assert load_saved_weights(model, str(tmp_path / "ckpt"))
    expected = saved.state_dict()
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == torch.bfloat16, name
        torch.testing.assert_close(tensor, expected[name].to(torch.bfloat16), rtol=0, atol=0, msg=name)
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tie


def test_checkpoints_in_other_layouts_are_left_to_from_pretrained(parts, llava_checkpoint, tmp_path):
    """Earlier saves' names (here: the in-memory names) are not copied in place; `from_pretrained` maps them."""
    from safetensors.torch import save_file

    from llava.model.hub_format import load_saved_weights
    from llava.model.modeling import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(llava_checkpoint)
    (tmp_path / "old").mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "old" / "model.safetensors"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert not load_saved_weights(model, str(tmp_path / "old"))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# Each case's data makes at least 2 steps an epoch, so a checkpoint can fall inside epochs 2 and 3.
EPOCH_CASES = {
    "llava": [],
    "llava_packed": ["--packing", "True", "--model_max_length", "128"],
    "llava_next": ["--architecture", "llava_next"],
    "llava_next_packed": ["--architecture", "llava_next", "--packing", "True", "--model_max_length", "400"],
}


@pytest.mark.parametrize("case", EPOCH_CASES)
def test_resuming_inside_epochs_2_and_3_is_bitwise_exact(stage1, tmp_path, case):
    """Under the default length-grouped sampler (packing's rows shuffled by it too), a run resumed from a checkpoint
    inside epoch 2, or inside epoch 3, ends with the uninterrupted run's weights and losses, bit for bit: each
    epoch's order is a function of the seed and the epoch, not of the RNG state the epochs before left."""
    flags = [*EPOCH_CASES[case], "--per_device_train_batch_size", "1" if "packed" in case else "2",
             "--num_train_epochs", "3", "--max_steps", "-1", "--save_steps", "1"]
    whole, _ = run(stage1, tmp_path / "whole", flags)
    steps_per_epoch = whole.state.max_steps // 3
    assert steps_per_epoch >= 2, steps_per_epoch
    expected = {name: param.detach().clone() for name, param in whole.model.named_parameters()}
    whole_losses = [e["loss"] for e in whole.state.log_history if "loss" in e]
    for epoch in (2, 3):
        step = (epoch - 1) * steps_per_epoch + 1  # the first step of the epoch done, the rest to come
        resumed, steps = run(stage1, tmp_path / f"resumed{epoch}", flags,
                             "--resume_from_checkpoint", str(tmp_path / "whole" / f"checkpoint-{step}"))
        assert steps == list(range(step + 1, whole.state.max_steps + 1))
        assert [e["loss"] for e in resumed.state.log_history if "loss" in e] == whole_losses
        for name, param in resumed.model.named_parameters():
            assert torch.equal(param, expected[name]), f"epoch {epoch}: {name}"
