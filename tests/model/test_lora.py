"""LoRA / QLoRA: where adapters and quantization land, adapter checkpoints, merging, and refused flag sets."""

import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from transformers import LlavaForConditionalGeneration as PlainLlava

from llava.model.building import load_llava
from llava.model.components import linear_layer_names
from llava.model.lora import is_adapter_checkpoint, load_merged_model
from llava.model.modeling import LlavaForConditionalGeneration
from llava.model.quantization import quantization_config, quantized_module_names
from llava.train import main
from llava.training.arguments import ModelArguments
from llava.training.build import add_lora
from llava.training.parsing import parse_args
from tests.helpers.outputs import REPO, assert_loads_and_generates

TRAIN = ["--per_device_train_batch_size", "2", "--logging_steps", "1", "--save_steps", "2", "--max_steps", "4",
         "--learning_rate", "1e-2", "--report_to", "none", "--seed", "0"]
LORA = ["--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8"]


def parsed(*flags):
    return parse_args(["--model_name_or_path", "M", "--data_path", "d.json", "--output_dir", "o", *flags])


def with_adapters(model, *flags):
    """`model` with the adapters these flags ask for, as a run adds them."""
    args = parsed(*flags)
    return add_lora(model, args.lora, args.training)


def lora_layers(model):
    return {name for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def stage2(parts, base, out, *flags):
    return main(["--model_name_or_path", base, "--data_path", parts["data"], "--image_folder", parts["images"],
                 "--output_dir", str(out), *TRAIN, *LORA, *flags])


# --------------------------------------------------------------------------------------------- placement

def test_default_targets_are_exactly_the_lm_linear_layers(llava_checkpoint):
    model = LlavaForConditionalGeneration.from_pretrained(llava_checkpoint)
    lm_linears = {"base_model.model." + n for n in linear_layer_names(model, "language_model")}
    peft_model = with_adapters(model, *LORA)
    assert lora_layers(peft_model) == lm_linears and len(lm_linears) == 2 * 7  # 2 layers x q,k,v,o,gate,up,down
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert all(".lora_" in n or ".multi_modal_projector.modules_to_save." in n for n in trainable)
    assert any(".multi_modal_projector.modules_to_save." in n for n in trainable)


def test_named_targets_stay_in_their_component(llava_checkpoint):
    model = LlavaForConditionalGeneration.from_pretrained(llava_checkpoint)
    # Both the LM and the CLIP tower have q_proj layers: a plain name means the LM's only.
    peft_model = with_adapters(model, *LORA, "--freeze_vision_model", "False",
                               "--lora_target_modules", "q_proj,vision_tower.fc1")
    layers = lora_layers(peft_model)
    assert {n for n in layers if ".language_model." in n} == {
        f"base_model.model.model.language_model.layers.{i}.self_attn.q_proj" for i in range(2)}
    assert {n for n in layers if ".vision_tower." in n} == {
        f"base_model.model.model.vision_tower.encoder.layers.{i}.mlp.fc1" for i in range(3)}
    assert len(layers) == 5


def test_unknown_target_lists_the_real_names(llava_checkpoint):
    model = LlavaForConditionalGeneration.from_pretrained(llava_checkpoint)
    with pytest.raises(ValueError, match=r"'qkv' matches no linear layer of the language_model.*'q_proj'"):
        with_adapters(model, *LORA, "--lora_target_modules", "qkv")


@pytest.mark.parametrize("flags", [{"load_in_4bit": True}, {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
                                   {"load_in_8bit": True}], ids=["nf4", "fp4", "int8"])
def test_quantization_reaches_exactly_the_lm_linear_layers(llava_checkpoint, flags):
    import bitsandbytes as bnb

    args = ModelArguments(model_name_or_path=llava_checkpoint, **flags)
    quantization = quantization_config(8 if args.load_in_8bit else 4, torch.float32, args.bnb_4bit_quant_type,
                                       args.bnb_4bit_use_double_quant)
    model = load_llava(llava_checkpoint, quantization=quantization)
    names = quantized_module_names(model)
    assert names == linear_layer_names(model, "language_model") and len(names) == 14
    layer_type = bnb.nn.Linear8bitLt if args.load_in_8bit else bnb.nn.Linear4bit
    assert all(type(model.get_submodule(n)) is layer_type for n in names)
    if args.load_in_4bit:
        assert {model.get_submodule(n).weight.quant_state.quant_type for n in names} == {args.bnb_4bit_quant_type}
    for component in ("vision_tower", "projector"):
        for name in linear_layer_names(model, component):
            assert type(model.get_submodule(name)) is torch.nn.Linear, name
            assert model.get_submodule(name).weight.dtype == torch.float32, name
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.float32


# --------------------------------------------------------------------------------------------- outputs

@pytest.fixture(scope="module")
def qlora_run(parts, llava_checkpoint, tmp_path_factory):
    """QLoRA stage 2 from a stage-1 checkpoint, merged into <output_dir> by default."""
    out = tmp_path_factory.mktemp("qlora")
    stage2(parts, llava_checkpoint, out, "--load_in_4bit", "True", "--lora_dropout", "0.0")
    return str(out)


def test_adapter_checkpoints_hold_adapter_projector_and_processor(qlora_run, llava_checkpoint):
    checkpoints = sorted(glob.glob(os.path.join(qlora_run, "checkpoint-*")))
    assert [os.path.basename(c) for c in checkpoints] == ["checkpoint-2", "checkpoint-4"]
    for path in checkpoints:
        assert is_adapter_checkpoint(path)
        with open(os.path.join(path, "adapter_config.json")) as f:
            assert json.load(f)["base_model_name_or_path"] == os.path.abspath(llava_checkpoint)
        saved = load_file(os.path.join(path, "adapter_model.safetensors"))
        assert any(".multi_modal_projector.linear_1.weight" in k for k in saved)
        assert sum(".lora_A." in k for k in saved) == 14
        # Plain transformers loads an adapter checkpoint through its PEFT integration (base from adapter_config).
        assert_loads_and_generates(path)
    assert not is_adapter_checkpoint(qlora_run) and is_adapter_checkpoint(os.path.join(qlora_run, "adapter"))


def test_merged_qlora_output_is_full_precision_and_moves_only_what_trained(qlora_run, llava_checkpoint):
    with open(os.path.join(qlora_run, "config.json")) as f:
        assert "quantization_config" not in json.load(f)
    assert_loads_and_generates(qlora_run)
    before, after = PlainLlava.from_pretrained(llava_checkpoint).state_dict(), PlainLlava.from_pretrained(
        qlora_run).state_dict()
    assert before.keys() == after.keys() and all(t.dtype == torch.float32 for t in after.values())
    for name in before:
        moved = not torch.equal(before[name], after[name])
        trained = name.startswith("model.multi_modal_projector.") or (
            name.startswith("model.language_model.layers.") and name.endswith("_proj.weight"))
        assert moved == trained, name


def test_merge_cli_equals_the_runs_own_merge(qlora_run, tmp_path):
    out = str(tmp_path / "merged")
    subprocess.run([sys.executable, "-m", "llava.merge_lora", "--checkpoint", os.path.join(qlora_run, "checkpoint-4"),
                    "--output_dir", out], cwd=REPO, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    with open(os.path.join(out, "config.json")) as f:
        assert "quantization_config" not in json.load(f)
    assert_loads_and_generates(out)
    cli, run = PlainLlava.from_pretrained(out).state_dict(), PlainLlava.from_pretrained(qlora_run).state_dict()
    assert all(torch.equal(cli[name], run[name]) for name in run)


def test_load_merged_model_accepts_checkpoints_and_merged_outputs(qlora_run):
    from_checkpoint, processor = load_merged_model(os.path.join(qlora_run, "checkpoint-4"), dtype=torch.bfloat16)
    from_output, _ = load_merged_model(qlora_run)
    assert isinstance(from_checkpoint, LlavaForConditionalGeneration) and processor.image_token == "<image>"
    assert from_checkpoint.dtype == torch.bfloat16 and from_output.dtype == torch.float32
    with pytest.raises(ValueError, match="not a LoRA checkpoint"):
        load_merged_model(os.path.join(qlora_run, "checkpoint-4", "nowhere"))


def test_qlora_from_parts_keeps_a_full_precision_base_and_can_skip_the_merge(parts, tmp_path):
    out = tmp_path / "from_parts"
    main(["--vision_model_name_or_path", parts["vision"], "--language_model_name_or_path", parts["lm"],
          "--data_path", parts["data"], "--image_folder", parts["images"], "--output_dir", str(out),
          *TRAIN, *LORA, "--load_in_4bit", "True", "--max_steps", "2", "--merge_lora", "False"])
    assert is_adapter_checkpoint(str(out)) and not os.path.exists(out / "model.safetensors")
    with open(out / "adapter_config.json") as f:
        assert json.load(f)["base_model_name_or_path"] == str(out / "base_model")
    with open(out / "base_model" / "config.json") as f:
        assert "quantization_config" not in json.load(f)
    assert all(t.dtype == torch.float32 for t in load_file(str(out / "base_model" / "model.safetensors")).values())
    assert_loads_and_generates(str(out))


# --------------------------------------------------------------------------------------------- refused flags

PARTS = ["--vision_model_name_or_path", "/missing/vision", "--language_model_name_or_path", "/missing/lm",
         "--data_path", "/missing/d.json", "--output_dir", "/missing/out"]


@pytest.mark.parametrize("flags, message", [
    (["--load_in_4bit", "True"], "add --lora_enable True"),
    (["--load_in_8bit", "True", "--freeze_language_model", "True"], "use --dtype bfloat16"),
    (["--load_in_4bit", "True", "--load_in_8bit", "True", *LORA], "exclusive"),
    ([*LORA, "--freeze_language_model", "True"], "--freeze_language_model True keeps it fixed"),
    ([*LORA, "--lora_target_modules", "vision_tower.q_proj"], "names none of its modules"),
    ([*LORA, "--lora_target_modules", "q_proj,vision_tower.q_proj"], "--freeze_vision_model True keeps the tower"),
    ([*LORA, "--lora_dropout", "1.0"], "--lora_dropout"),
])
def test_bad_combinations_fail_before_anything_loads(flags, message):
    # Every path is missing: reaching any loading code would raise OSError instead.
    with pytest.raises(ValueError, match=message):
        main([*PARTS, *flags])


def test_lora_on_the_vision_tower_alone_is_accepted():
    args = parsed(*LORA, "--freeze_language_model", "True", "--freeze_vision_model", "False",
                  "--lora_target_modules", "vision_tower.all-linear")
    assert args.lora.lora_targets == ["vision_tower.all-linear"]


def test_adapter_and_merged_weights_follow_the_umask(qlora_run):
    umask = os.umask(0)
    os.umask(umask)
    weights = glob.glob(os.path.join(qlora_run, "**", "*.safetensors"), recursive=True)
    assert any(w.endswith("adapter_model.safetensors") for w in weights)
    assert {w: oct(os.stat(w).st_mode & 0o777) for w in weights} == {w: oct(0o666 & ~umask) for w in weights}


def test_generate_and_evaluate_accept_a_lora_checkpoint(qlora_run, parts, capsys):
    from llava import evaluate, generate
    checkpoint = os.path.join(qlora_run, "checkpoint-4")
    answer = generate.main(["--model_name_or_path", checkpoint, "--image", f"{parts['images']}/img0.png",
                            "--prompt", "What colour?", "--max_new_tokens", "2"])
    result = evaluate.main(["--model_name_or_path", checkpoint, "--data_path", parts["data"], "--image_folder",
                            parts["images"], "--max_samples", "2", "--max_new_tokens", "2"])
    assert isinstance(answer, str) and result["num_samples"] == 2
