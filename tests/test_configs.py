"""Every shipped file under configs/ parses, and says what README promises (launch recipes are tested in
test_distributed.py and, for DeepSpeed, test_deepspeed.py)."""

import glob
import importlib.util
import json
import os
from types import SimpleNamespace

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file

from llava.training.arguments import ModelArguments
from llava.training.parsing import flag_names, load_in_deepspeed_precision, parse_args
from tests.helpers.outputs import REPO

CONFIGS = os.path.join(REPO, "configs")
DEEPSPEED = {2: os.path.join(CONFIGS, "deepspeed_zero2.json"), 3: os.path.join(CONFIGS, "deepspeed_zero3.json")}
FILES = sorted(glob.glob(os.path.join(CONFIGS, "*.json")) + glob.glob(os.path.join(CONFIGS, "*.yaml")))


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_config_file_parses(path):
    with open(path) as f:
        assert json.load(f) if path.endswith(".json") else yaml.safe_load(f)


@pytest.mark.parametrize("stage", DEEPSPEED)
def test_deepspeed_config_leaves_precision_batch_and_optimizer_to_the_trainer(stage):
    with open(DEEPSPEED[stage]) as f:
        config = json.load(f)
    assert config["zero_optimization"]["stage"] == stage
    assert config["bf16"]["enabled"] == config["fp16"]["enabled"] == "auto"
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert config[key] == "auto", key
    # No optimizer/scheduler sections: Trainer's own run, with the per-component learning rates.
    assert "optimizer" not in config and "scheduler" not in config
    if stage == 3:  # the final output must hold real weights, loadable with plain transformers
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
@pytest.mark.parametrize("stage", DEEPSPEED)
def test_training_arguments_accept_the_deepspeed_config(stage):
    args = parse_args(["--model_name_or_path", "M", "--data_path", "d.json", "--output_dir", "o",
                       "--deepspeed", DEEPSPEED[stage]]).training
    assert args.hf_deepspeed_config.is_zero3() == (stage == 3)


@pytest.mark.parametrize("flag", ["bf16", "fp16"])
def test_deepspeed_with_16_bit_training_loads_16_bit_weights(flag):
    """DeepSpeed casts the model to 16 bits and keeps the fp32 master weights in its optimizer: no fp32 load first.
    (Arguments as parsed on a GPU machine: this one refuses --bf16 without --use_cpu.)"""
    def loaded_dtype(deepspeed):
        model_args = ModelArguments(model_name_or_path="M")
        load_in_deepspeed_precision(model_args, SimpleNamespace(deepspeed=deepspeed, bf16=flag == "bf16",
                                                                fp16=flag == "fp16"))
        return model_args.dtype

    assert loaded_dtype(DEEPSPEED[3]) == {"bf16": "bfloat16", "fp16": "float16"}[flag]
    assert loaded_dtype(None) == "float32"  # autocast: the model's fp32 weights are the master weights


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_deepspeed_with_use_cpu_is_refused():
    """accelerate would skip DeepSpeed under --use_cpu True and silently train plain DDP."""
    with pytest.raises(ValueError, match="--deepspeed with --use_cpu True"):
        parse_args(["--model_name_or_path", "M", "--data_path", "d.json", "--output_dir", "o",
                    "--deepspeed", DEEPSPEED[2], "--use_cpu", "True"])


def test_fsdp_accelerate_config():
    config = load_config_from_file(os.path.join(CONFIGS, "fsdp.yaml"))
    assert config.distributed_type == "FSDP" and config.mixed_precision == "no"
    assert config.fsdp_config["fsdp_version"] == 2
    assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"


# Command-line flags each shipped pipeline needs here: no GPU (--bf16 False), and what the file leaves to the user.
PIPELINES = {"demo.yaml": ["--image_folder", "images", "--language_model_name_or_path", "lm"],
             "llava_v1_5.yaml": ["--bf16", "False"],
             "llava_next_stage2.yaml": ["--bf16", "False", "--data_path", "d.json", "--image_folder", "images"]}
MULTI_STAGE = [name for name in PIPELINES if name != "llava_next_stage2.yaml"]  # stage 1 included


def stage_runs(name: str) -> dict:
    """Each stage of shipped pipeline `name` parsed as the `train_llava.py` run it starts, by stage name."""
    from llava.training.pipeline.plan import start_path
    from llava.training.pipeline.spec import read_pipeline, stage_argv

    pipeline = read_pipeline(os.path.join(CONFIGS, name), PIPELINES[name], flag_names())
    return {stage.name: parse_args(stage_argv(stage, start_path(pipeline, stage))) for stage in pipeline.stages}


@pytest.mark.parametrize("name", MULTI_STAGE)
def test_shipped_pipeline_stages_parse_as_train_llava_runs(name):
    runs = stage_runs(name)
    first, *later = runs.values()
    # stage 1 aligns: only the projector trains, at a higher rate than the instruction stage after it
    assert first.training.freeze_language_model and first.training.freeze_vision_model
    assert all(not run.training.freeze_language_model for run in later)
    assert all(run.training.learning_rate < first.training.learning_rate for run in later)
    assert all(run.model.model_name_or_path for run in later)  # each later stage starts from an earlier output
    if name == "llava_v1_5.yaml":  # the published settings
        assert [run.training.per_device_train_batch_size * 8 for run in runs.values()] == [256, 128]
        assert [run.training.learning_rate for run in runs.values()] == [1e-3, 2e-5]
        assert all(run.training.lr_scheduler_type == "cosine" and run.training.warmup_steps == 0.03
                   for run in runs.values())
        assert first.model.vision_model_name_or_path == "openai/clip-vit-large-patch14-336"
        assert (first.training.deepspeed, runs["instruct"].training.deepspeed) == (
            None, "configs/deepspeed_zero3.json")  # finetune.sh's ZeRO-3: a 7B full fine-tune needs it
    else:
        assert list(runs) == ["align", "instruct", "look"]


def test_llava_next_stage2_recipe_parses_with_the_published_settings():
    """configs/llava_next_stage2.yaml: llava-v1.6's stage 2 from configs/llava_v1_5.yaml's stage-1 output."""
    from llava.model.anyres import default_pinpoints
    from llava.training.pipeline.spec import read_pipeline

    (run,) = stage_runs("llava_next_stage2.yaml").values()
    model, training = run.model, run.training
    llava_v1_5 = read_pipeline(os.path.join(CONFIGS, "llava_v1_5.yaml"), [], flag_names())
    assert model.model_name_or_path == llava_v1_5.stage("align").output_dir  # a `llava` stage 1, made llava_next
    assert model.architecture == "llava_next"
    assert model.grid_pinpoints == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llava-v1.6's
    assert sorted(model.grid_pinpoints) == sorted(default_pinpoints(336))  # the default grid's five, in v1.6's order
    assert not (training.freeze_vision_model or training.freeze_language_model or training.freeze_projector)
    assert (training.learning_rate, training.projector_lr, training.vision_lr) == (2e-5, None, 2e-6)
    assert training.per_device_train_batch_size * training.gradient_accumulation_steps * 8 == 128
    assert training.lr_scheduler_type == "cosine" and training.warmup_steps == 0.03
    assert training.num_train_epochs == 1 and training.weight_decay == 0 and training.gradient_checkpointing
    assert run.data.model_max_length == 4096


def test_llava_next_stage2_recipe_dry_run_on_a_tiny_llava_stage1(parts, llava_checkpoint, tmp_path, capsys):
    """The recipe's plan on a tiny `llava` checkpoint (its 32-px tower takes a grid of 32-px tiles): the model
    becomes llava_next, the tower trains at --vision_lr, the projector (newline included) and the LM at the base
    rate, in steps of 4 x 4 samples."""
    from llava.model.anyres import default_pinpoints
    from llava.train import main

    path = os.path.join(CONFIGS, "llava_next_stage2.yaml")
    assert main([path, "--dry_run", "True", "--bf16", "False", "--model_name_or_path", llava_checkpoint,
                 "--image_grid_pinpoints", json.dumps(default_pinpoints(32)), "--data_path", parts["data"],
                 "--image_folder", parts["images"], "--output_dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert not os.path.exists(tmp_path / "out")
    assert f"start:  {llava_checkpoint}" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}
    hidden = 32  # the tiny tower's and LM's width: two linear layers with biases, and the newline
    assert rows["projector"][:2] == [f"{2 * (hidden * hidden + hidden) + hidden:,}"] * 2
    assert rows["vision_tower"][0] == rows["vision_tower"][1] and rows["language_model"][0] == rows["language_model"][1]
    assert [rows[name][-1] for name in ("vision_tower", "projector", "language_model")] == ["2e-06", "2e-05", "2e-05"]
    assert "steps of 4 x 4 items" in out
