"""`--checkpoint_weights trainable`: a stage-1 checkpoint-N holds the projector only (well under 1 % of a full one),
resumes (through the real CLI, from a moved copy of the start model) to final weights bitwise equal to an
uninterrupted run's, refuses a changed start model, and leaves the default checkpoints and the final output whole."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.utils import SAFE_WEIGHTS_NAME

from llava.model.components import set_trainable
from llava.model.modeling import LlavaForConditionalGeneration
from llava.train import main
from llava.training.checkpoints import is_complete, resolve_resume_checkpoint
from llava.training.pipeline.digests import model_digest
from llava.training.trainable_weights import (START_MODEL_RECORD, TRAINABLE_WEIGHTS_NAME, StartModelChangedError,
                                              load_trainable_weights, start_model_changes)
from tests.helpers.outputs import assert_loads_and_generates
from tests.helpers.runs import Run

# Stage 1: tower and LM frozen, the projector trains; 6 samples at batch 2, checkpoints at steps 3 and 6.
STAGE1 = ["--freeze_language_model", "True", "--per_device_train_batch_size", "2", "--logging_steps", "1",
          "--save_steps", "3", "--max_steps", "6", "--learning_rate", "1e-2", "--report_to", "none", "--seed", "0"]
TRAINABLE = ["--checkpoint_weights", "trainable"]


def flags(parts, start, out, *extra):
    return ["--model_name_or_path", start, "--data_path", parts["data"], "--image_folder", parts["images"],
            "--output_dir", str(out), *STAGE1, *extra]


@pytest.fixture(scope="module")
def runs(parts, llava_checkpoint, tmp_path_factory):
    """Output folders of three 6-step stage-1 runs: checkpoints full (the default), trainable, and the trainable one
    resumed from its checkpoint-3 by `train_llava.py` with the start model moved elsewhere (same files)."""
    root = tmp_path_factory.mktemp("trainable")
    out = {name: root / name for name in ("full", "trainable", "resumed")}
    main(flags(parts, llava_checkpoint, out["full"]))
    trainer = main(flags(parts, llava_checkpoint, out["trainable"], *TRAINABLE))
    moved = shutil.copytree(llava_checkpoint, root / "moved")
    resume = ["--resume_from_checkpoint", str(out["trainable"] / "checkpoint-3")]
    run = Run("train_llava.py", flags(parts, str(moved), out["resumed"], *TRAINABLE, *resume), root / "resumed.log")
    assert run.wait() == 0, run.log()[-3000:]
    trained = {name for name, param in trainer.model.named_parameters() if param.requires_grad}
    return out, trained, run.log()


def test_a_trainable_checkpoint_holds_the_projector_only(runs, llava_checkpoint):
    out, trained, _ = runs
    checkpoint = out["trainable"] / "checkpoint-3"
    weights = checkpoint / TRAINABLE_WEIGHTS_NAME
    saved = load_file(weights)
    assert saved.keys() == trained
    trained_bytes = sum(tensor.numel() * tensor.element_size() for tensor in saved.values())
    assert len(trained) == 4 and all(name.startswith("model.multi_modal_projector.") for name in trained)
    full_size = os.path.getsize(out["full"] / "checkpoint-3" / SAFE_WEIGHTS_NAME)
    assert os.path.getsize(weights) < 0.01 * full_size
    assert os.path.getsize(weights) < trained_bytes + 1024  # the safetensors header only
    assert not (checkpoint / SAFE_WEIGHTS_NAME).exists()  # nothing takes it for a whole model
    with open(checkpoint / START_MODEL_RECORD) as f:
        assert json.load(f) == {"start_model": {"model_name_or_path": {
            "path": llava_checkpoint, "digest": model_digest(llava_checkpoint)}}}
    assert is_complete(str(checkpoint))
    assert resolve_resume_checkpoint("True", str(out["trainable"])) == str(out["trainable"] / "checkpoint-6")


def test_default_checkpoints_hold_every_weight(runs):
    out, _, _ = runs
    checkpoint = out["full"] / "checkpoint-3"
    assert set(load_file(checkpoint / SAFE_WEIGHTS_NAME)) == set(load_file(out["full"] / SAFE_WEIGHTS_NAME))
    assert not (checkpoint / TRAINABLE_WEIGHTS_NAME).exists() and not (checkpoint / START_MODEL_RECORD).exists()


def test_resumed_run_ends_bitwise_where_the_uninterrupted_run_ends(runs):
    out, _, log = runs
    assert log.count("'loss'") == 3  # steps 4-6 trained here; 1-3 are checkpoint-3's history
    with open(out["resumed"] / "trainer_state.json") as f:
        state = json.load(f)
    assert state["global_step"] == 6 and [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3, 4, 5, 6]
    expected = load_file(out["full"] / SAFE_WEIGHTS_NAME)
    for name in ("trainable", "resumed"):
        final = load_file(out[name] / SAFE_WEIGHTS_NAME)  # the final output is the complete llava-hf checkpoint
        assert final.keys() == expected.keys(), name
        assert all(torch.equal(final[key], expected[key]) for key in expected), name
    assert_loads_and_generates(str(out["resumed"]))


def test_a_changed_start_model_is_refused(runs, parts, llava_checkpoint, tmp_path):
    out, _, _ = runs
    changed = shutil.copytree(llava_checkpoint, tmp_path / "changed")
    weights = load_file(changed / SAFE_WEIGHTS_NAME)
    frozen = next(key for key in weights if "lm_head" in key)
    weights[frozen] = weights[frozen] + 1
    save_file(weights, str(changed / SAFE_WEIGHTS_NAME), metadata={"format": "pt"})
    checkpoint = str(out["trainable"] / "checkpoint-3")
    with pytest.raises(StartModelChangedError) as error:
        main(flags(parts, str(changed), tmp_path / "out", "--resume_from_checkpoint", checkpoint))
    message = str(error.value)
    assert checkpoint in message and str(changed) in message and llava_checkpoint in message
    assert "--model_name_or_path" in message and "--checkpoint_weights full" in message


def test_loading_is_strict_on_what_trains(runs, llava_checkpoint):
    out, _, _ = runs
    checkpoint = str(out["trainable"] / "checkpoint-3")
    model = LlavaForConditionalGeneration.from_pretrained(llava_checkpoint)
    set_trainable(model, vision_tower=False, projector=True, language_model=True)
    with pytest.raises(ValueError, match="missing: .*model.language_model"):
        load_trainable_weights(model, checkpoint)
    set_trainable(model, vision_tower=False, projector=True, language_model=False)
    load_trainable_weights(model, checkpoint)
    saved = load_file(os.path.join(checkpoint, TRAINABLE_WEIGHTS_NAME))
    assert all(torch.equal(param, saved[name]) for name, param in model.named_parameters() if name in saved)


def test_start_model_changes_compare_digests_then_names():
    def record(path, digest, seed=None):
        entry = {"start_model": {"language_model_name_or_path": {"path": path, "digest": digest}}}
        return entry if seed is None else {**entry, "seed": seed}

    assert start_model_changes(record("a", "d1"), record("b", "d1")) == []  # moved, same files
    assert "digest" in start_model_changes(record("a", "d1"), record("a", "d2"))[0]
    assert start_model_changes(record("org/lm", None), record("org/lm", None)) == []  # a hub id, by name
    assert start_model_changes(record("org/lm", None), record("org/other", None))
    assert start_model_changes(record("a", "d1", seed=0), record("a", "d1", seed=1)) == ["--seed 0 when saved, now 1"]
    assert "now given --model_name_or_path" in start_model_changes(
        record("a", "d1"), {"start_model": {"model_name_or_path": {"path": "a", "digest": "d1"}}})[0]


@pytest.mark.parametrize("extra", [["--deepspeed", "configs/deepspeed_zero2.json"], ["--fsdp", "full_shard"]])
def test_sharded_runs_refuse_trainable_checkpoints(extra):
    from llava.training.parsing import parse_args

    argv = ["--model_name_or_path", "M", "--data_path", "d.json", "--output_dir", "o", *TRAINABLE, *extra]
    with pytest.raises(ValueError, match="--checkpoint_weights trainable works without DeepSpeed and FSDP"):
        parse_args(argv)
