"""Single-process training paths that once failed: a stage-1 run whose first batches are text-only, activation
checkpointing next to a frozen tower, and `--dtype auto` with an fp32 tower beside a bf16 LM."""

import json

import pytest
import torch
from transformers import TrainerCallback

from llava import generate
from llava.data.collator import LlavaDataCollator
from llava.model.components import set_trainable
from llava.train import main
from tests.helpers.tiny_parts import assemble, conversation_records, dataset_from, save_language_model, write_dataset

TRAIN = ["--per_device_train_batch_size", "2", "--logging_steps", "1", "--learning_rate", "1e-2",
         "--report_to", "none", "--seed", "0"]


def stage1(parts, out, data, *extra, lm=None):
    return main(["--vision_model_name_or_path", parts["vision"], "--language_model_name_or_path", lm or parts["lm"],
                 "--data_path", data, "--image_folder", parts["images"], "--freeze_language_model", "True",
                 "--output_dir", str(out), *TRAIN, *extra])


@pytest.fixture(scope="module")
def text_first_data(parts, tmp_path_factory):
    """Text-only samples first in the file, read in file order (`--train_sampling_strategy sequential` below): the
    first batches hold no image whatever order length grouping would draw (it once put them first by chance)."""
    records = conversation_records()
    long_text = [{"id": f"long{i}", "conversations": [
        {"from": "human", "value": "Please count slowly. " * 20}, {"from": "gpt", "value": "One two three " * 10}]}
        for i in range(4)]
    path, _ = write_dataset(str(tmp_path_factory.mktemp("text_first")), long_text + records)
    return path


class FirstBatches:
    """Records whether each of the first training batches had images."""

    def __init__(self):
        self.had_images = []

    def __call__(self, module, args, kwargs):
        self.had_images.append(kwargs.get("pixel_values") is not None)


def test_stage1_trains_when_the_first_batches_are_text_only(parts, text_first_data, tmp_path):
    """Only the projector trains: a text-only batch still reaches it (through 0 x a blank image's features)."""
    seen = FirstBatches()

    class Hook(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            model.register_forward_pre_hook(seen, with_kwargs=True)

    trainer = main(["--vision_model_name_or_path", parts["vision"], "--language_model_name_or_path", parts["lm"],
                    "--data_path", text_first_data, "--image_folder", parts["images"], "--freeze_language_model",
                    "True", "--output_dir", str(tmp_path), *TRAIN, "--max_steps", "3",
                    "--train_sampling_strategy", "sequential"], callbacks=[Hook()])
    assert seen.had_images[0] is False  # the case that failed: "element 0 of tensors does not require grad"
    assert trainer.state.global_step == 3
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)


def test_blank_image_leaves_text_only_loss_unchanged_and_gives_the_projector_a_zero_gradient(parts):
    model, processor = assemble(parts)
    dataset = dataset_from([parts["data"]], processor, 512, parts["images"])
    text_only = [dataset[i] for i in range(len(dataset)) if "pixel_values" not in dataset[i]]
    inputs = LlavaDataCollator(processor.tokenizer.pad_token_id)(text_only)
    assert "pixel_values" not in inputs
    set_trainable(model, vision_tower=False, projector=False, language_model=True)
    reference = model(**inputs).loss  # the LM trains: transformers' own path
    set_trainable(model, vision_tower=False, projector=True, language_model=False)
    loss = model(**inputs).loss
    torch.testing.assert_close(loss, reference)
    loss.backward()
    grad = model.model.multi_modal_projector.linear_1.weight.grad
    assert grad is not None and torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("freeze_lm", ["True", "False"], ids=["stage1", "stage2"])
def test_gradient_checkpointing_leaves_the_frozen_tower_alone(parts, tmp_path, freeze_lm):
    trainer = stage1(parts, tmp_path, parts["data"], "--max_steps", "2", "--gradient_checkpointing", "True",
                     "--freeze_language_model", freeze_lm)
    model = trainer.model
    tower, lm = model.model.vision_tower, model.model.language_model
    assert not any(getattr(m, "gradient_checkpointing", False) for m in tower.modules())
    assert any(getattr(m, "gradient_checkpointing", False) for m in lm.modules())
    pixel_values = torch.zeros(1, 3, 32, 32)
    with torch.enable_grad():
        features = model.model.get_image_features(pixel_values=pixel_values, vision_feature_layer=-2,
                                                  vision_feature_select_strategy="default")
        embeddings = model.get_input_embeddings()(torch.tensor([[1, 2]]))
    assert not features.hidden_states[-2].requires_grad  # the frozen tower builds no graph
    assert embeddings.requires_grad  # checkpointed LM layers get inputs that carry the gradient
    assert trainer.state.global_step == 2


def test_gradient_checkpointing_checkpoints_a_training_tower(parts, tmp_path):
    trainer = stage1(parts, tmp_path, parts["data"], "--max_steps", "1", "--gradient_checkpointing", "True",
                     "--freeze_vision_model", "False")
    assert any(getattr(m, "gradient_checkpointing", False) for m in trainer.model.model.vision_tower.modules())


def test_dtype_auto_with_a_bf16_lm_trains_and_generates(parts, tmp_path):
    """fp32 tower + bf16 LM under --dtype auto: training (no autocast) and generation without dtype errors."""
    lm = save_language_model(str(tmp_path / "lm_bf16"), dtype=torch.bfloat16)
    out = tmp_path / "out"
    trainer = stage1(parts, out, parts["data"], "--max_steps", "2", "--dtype", "auto", lm=lm)
    model = trainer.model
    assert model.model.vision_tower.dtype == torch.float32 and model.model.language_model.dtype == torch.bfloat16
    with open(out / "config.json") as f:
        assert json.load(f)["text_config"]["dtype"] == "bfloat16"
    answer = generate.main(["--model_name_or_path", str(out), "--image", f"{parts['images']}/img0.png",
                            "--prompt", "What colour?", "--max_new_tokens", "3"])
    assert isinstance(answer, str)
    # the projector follows the LM; its input is cast from the tower's dtype, its output merges into bf16 embeddings
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=torch.zeros(1, 3, 32, 32), vision_feature_layer=-2,
                                                  vision_feature_select_strategy="default").pooler_output
    assert features[0].dtype == torch.bfloat16
