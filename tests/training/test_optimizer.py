"""Optimizer parameter groups: per-component learning rates, no weight decay on biases and norms."""

import pytest
from transformers import AutoProcessor

from llava.data.collator import LlavaDataCollator
from llava.data.types import ConfigurationError
from llava.model.components import set_trainable
from llava.training.build import add_lora
from llava.model.modeling import LlavaForConditionalGeneration
from llava.training.parsing import parse_args
from llava.training.trainer import LlavaTrainer, check_rates_reach_parameters

LRS = ["--learning_rate", "1e-3", "--projector_lr", "2e-3", "--vision_lr", "3e-4", "--weight_decay", "0.1"]
LORA = ["--lora_enable", "True", "--lora_r", "4"]
COMPONENT_PREFIX = {"vision_tower": ".vision_tower.", "projector": ".multi_modal_projector."}


def optimizer_groups(checkpoint, tmp_path, *flags):
    """{group name: (group, names of its parameters)} for a stage with every component training."""
    _, _, lora, args = parse_args(["--model_name_or_path", checkpoint, "--data_path", "d.json", "--output_dir",
                                   str(tmp_path), "--freeze_vision_model", "False", "--report_to", "none", *flags])
    model = LlavaForConditionalGeneration.from_pretrained(checkpoint)
    if lora.lora_enable:
        model = add_lora(model, lora, args)
    else:
        set_trainable(model, vision_tower=True, projector=True, language_model=True)
    trainer = LlavaTrainer(model=model, args=args, data_collator=LlavaDataCollator(0),
                           processing_class=AutoProcessor.from_pretrained(checkpoint))
    names = {id(p): "." + n for n, p in model.named_parameters()}
    groups = {g["name"]: (g, [names[id(p)] for p in g["params"]]) for g in trainer.create_optimizer().param_groups}
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    return groups, trainable


@pytest.mark.parametrize("flags", [[], LORA], ids=["full", "lora"])
def test_groups_have_their_component_lr_and_decay(llava_checkpoint, tmp_path, flags):
    groups, trainable = optimizer_groups(llava_checkpoint, tmp_path, *LRS, *flags)
    expected_lr = {"vision_tower": 3e-4, "projector": 2e-3, "language_model": 1e-3}
    # LoRA trains adapters (no norms, no biases) in the LM: it has no no-decay group there
    assert set(groups) == {c + s for c in expected_lr for s in ("", "/no_decay")} - (
        {"language_model/no_decay"} if flags else set())
    for name, (group, params) in groups.items():
        component, _, no_decay = name.partition("/")
        assert group["lr"] == expected_lr[component] and group["weight_decay"] == (0.0 if no_decay else 0.1)
        in_component = [any(p in n for p in COMPONENT_PREFIX.values()) if component == "language_model" else
                        COMPONENT_PREFIX[component] in n for n in params]
        assert all(in_component) if component != "language_model" else not any(in_component), name
        # biases and norms (CLIP's LayerNorms, Llama's RMSNorms) never decay; everything else does
        bias_or_norm = [n.endswith(".bias") or "norm" in n for n in params]
        assert all(bias_or_norm) if no_decay else not any(bias_or_norm), name
    listed = sorted(n[1:] for _, params in groups.values() for n in params)
    assert listed == trainable  # every trainable parameter in exactly one group, nothing frozen


def test_learning_rates_default_to_the_main_one(llava_checkpoint, tmp_path):
    groups, _ = optimizer_groups(llava_checkpoint, tmp_path, "--learning_rate", "5e-4")
    assert {group["lr"] for group, _ in groups.values()} == {5e-4}


def test_a_group_rate_reaching_no_trainable_parameter_is_refused(llava_checkpoint, tmp_path):
    """The flags pass (the tower is unfrozen), but the model ends up with nothing of the tower trainable."""
    args = parse_args(["--model_name_or_path", llava_checkpoint, "--data_path", "d.json", "--output_dir",
                       str(tmp_path), "--freeze_vision_model", "False", "--vision_lr", "1e-5"]).training
    model = LlavaForConditionalGeneration.from_pretrained(llava_checkpoint)
    set_trainable(model, vision_tower=True, projector=True, language_model=True)
    check_rates_reach_parameters(model, args)  # the tower trains: accepted
    model.model.vision_tower.requires_grad_(False)
    with pytest.raises(ConfigurationError, match=r"--vision_lr 1e-05 is the learning rate of the vision_tower, but "
                                                 r"nothing of it is trainable.* Drop --vision_lr"):
        check_rates_reach_parameters(model, args)
