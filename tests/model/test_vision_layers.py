"""--vision_tune_last_n_layers on every tower family: exactly the last N layers that feed the projector train (and
get gradients), the embeddings only when every feeding layer does; too many layers and unknown towers are refused."""

import logging

import pytest
import torch
import transformers

from llava.data.types import ConfigurationError
from llava.model.components import components, parameter_table
from llava.model.vision_layers import encoder_layers
from llava.train import main
from llava.training.arguments import ModelArguments
from llava.training.build import base_model_for, processor_for, trainable_model
from llava.training.parsing import parse_args
from llava.training.trainer import component_rates
from tests.helpers.tiny_parts import batch
from tests.helpers.tiny_towers import TOWERS

# Where each tiny tower family (3 layers) keeps its encoder layers, inside `model.model.vision_tower`.
LAYER_LIST = {"clip": "encoder.layers", "siglip": "encoder.layers", "dinov2": "encoder.layer",
              "dinov2_registers": "encoder.layer"}
WHOLE = "whole tower"
# (--vision_feature_layer, N, the layers that train): -2 leaves 2 feeding layers, -1 all 3.
CASES = [(-2, 1, [1]), (-1, 1, [2]), (-1, 2, [1, 2]), (-2, 2, WHOLE), (-1, 3, WHOLE)]


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    root = tmp_path_factory.mktemp("towers")
    return {name: builder(str(root / name)) for name, (builder, *_) in TOWERS.items()}


def tuned(parts, tower, tmp_path, feature_layer, n, *flags):
    """A new LLaVA of `tower` set up by the flags of a stage training the tower's last `n` layers, its processor
    and its arguments."""
    args = parse_args(["--vision_model_name_or_path", tower, "--language_model_name_or_path", parts["lm"],
                       "--vision_feature_layer", str(feature_layer), "--data_path", parts["data"], "--output_dir",
                       str(tmp_path), "--report_to", "none", "--freeze_vision_model", "False",
                       "--freeze_language_model", "True", "--vision_tune_last_n_layers", str(n), *flags])
    model_args = ModelArguments(vision_model_name_or_path=tower, language_model_name_or_path=parts["lm"],
                                vision_feature_layer=feature_layer)
    processor = processor_for(model_args)
    return trainable_model(base_model_for(model_args, processor), args.lora, args.training), processor, args


def tower_parameters(model) -> dict[str, torch.nn.Parameter]:
    return dict(components(model)["vision_tower"].named_parameters())


@pytest.mark.parametrize("feature_layer, n, trained", CASES, ids=[f"layer{f}-n{n}" for f, n, _ in CASES])
@pytest.mark.parametrize("family", sorted(TOWERS))
def test_last_feeding_layers_train_and_get_gradients(parts, towers, tmp_path, family, feature_layer, n, trained):
    model, processor, _ = tuned(parts, towers[family], tmp_path, feature_layer, n)
    params = tower_parameters(model)
    prefixes = tuple(f"{LAYER_LIST[family]}.{i}." for i in ([] if trained == WHOLE else trained))
    expected = set(params) if trained == WHOLE else {name for name in params if name.startswith(prefixes)}
    assert {name for name, p in params.items() if p.requires_grad} == expected
    assert all(p.requires_grad for p in components(model)["projector"].parameters())

    model.train()
    model(**batch(parts, processor)).loss.backward()
    with_grad = {name for name, p in params.items() if p.grad is not None}
    feeding = len(encoder_layers(components(model)["vision_tower"])) + 1 + feature_layer
    if trained == WHOLE:  # everything below the feature layer learns, embeddings included; the final norm cannot
        used = tuple(f"{LAYER_LIST[family]}.{i}." for i in range(feeding))
        assert {name for name in params if name.startswith(used)} < with_grad
        assert any("embeddings" in name for name in with_grad)
        assert not any("post_layernorm" in name or name.startswith("layernorm.") for name in with_grad)
    else:
        assert with_grad == expected  # the final norm and the embeddings stay frozen
        assert not any("embeddings" in name or "layernorm." in name for name in expected)


def test_too_many_layers_is_refused_with_the_feeding_count(parts, towers, tmp_path):
    with pytest.raises(ConfigurationError, match=r"SiglipVisionModel tower has 3 encoder layers, of which 2 feed "
                                                 r"the projector \(--vision_feature_layer -2\)\. Pass at most 2"):
        tuned(parts, towers["siglip"], tmp_path, -2, 3)


def test_a_tower_without_a_known_layer_list_is_refused_by_name():
    class PatchOnlyTower(torch.nn.Module):
        pass

    with pytest.raises(ConfigurationError, match="vision tower PatchOnlyTower has no encoder layer list"):
        encoder_layers(PatchOnlyTower())


def test_under_lora_only_the_last_layer_trains_in_full_and_the_table_shows_adapters(parts, towers, tmp_path):
    model, processor, args = tuned(parts, towers["clip"], tmp_path, -2, 1, "--freeze_language_model", "False",
                                   "--lora_enable", "True", "--lora_r", "4", "--learning_rate", "1e-3",
                                   "--vision_lr", "2e-5")
    trainable = {name for name, p in tower_parameters(model).items() if p.requires_grad}
    assert trainable and all(name.startswith("encoder.layers.1.modules_to_save.") for name in trainable)
    model.train()
    model(**batch(parts, processor)).loss.backward()
    assert {name for name, p in tower_parameters(model).items() if p.grad is not None} == trainable

    rows = {line.split()[0]: line.split()[1:] for line in parameter_table(model, component_rates(args.training))
            .splitlines()[1:]}
    assert rows["vision_tower"][-1] == "2e-05" and rows["language_model.lora"][-1] == "0.001"
    assert rows["language_model"][1:] == ["0", "frozen"]  # the LM learns through its adapters only
    assert rows["language_model.lora"][0] == rows["language_model.lora"][1] != "0"
    assert "vision_tower.lora" not in rows


def test_a_training_run_moves_only_the_tuned_layer_and_logs_the_table(parts, towers, tmp_path, caplog):
    before = transformers.AutoModel.from_pretrained(towers["dinov2"]).state_dict()
    caplog.set_level(logging.INFO, logger="llava.training.trainer")
    trainer = main(["--vision_model_name_or_path", towers["dinov2"], "--language_model_name_or_path", parts["lm"],
                    "--data_path", parts["data"], "--image_folder", parts["images"], "--output_dir",
                    str(tmp_path / "out"), "--freeze_vision_model", "False", "--vision_tune_last_n_layers", "1",
                    "--vision_lr", "3e-2", "--freeze_language_model", "True", "--per_device_train_batch_size", "2",
                    "--max_steps", "2", "--save_strategy", "no", "--report_to", "none", "--learning_rate", "1e-2"])
    after = trainer.model.model.vision_tower.state_dict()
    assert {key for key in after if not torch.equal(after[key], before[key])} == {
        key for key in after if key.startswith("encoder.layer.1.")}
    table = caplog.text.split("Parameters per component:\n")[1]
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[1:6]}
    assert rows["vision_tower"][-1] == "0.03" and rows["projector"][-1] == "0.01"
    assert rows["language_model"][-1] == "frozen" and 0 < int(rows["vision_tower"][1].replace(",", "")) < int(
        rows["vision_tower"][0].replace(",", ""))
