"""LLaVA-OneVision end to end: stage 1 then stage 2 through `train_llava.py` on single- and multi-image samples of
many sizes; the final output and a checkpoint-N load in plain transformers 5.x, generate, and give our model's
logits; a OneVision stage 2 from `llava` and `llava_next` outputs carries the projector (and the newline)."""

import json
import os

import pytest
import torch
import transformers
from PIL import Image

from llava import evaluate, generate, validate_data
from llava.data.collator import LlavaDataCollator, PackingCollator
from llava.data.packing import pack_rows
from llava.data.types import ConfigurationError
from llava.model.components import set_trainable
from llava.train import main
from llava.model.modeling import LlavaOnevisionForConditionalGeneration
from llava.training.arguments import ModelArguments
from llava.training.build import base_model_for, processor_for
from tests.helpers.outputs import assert_pipeline_answers
from tests.helpers.portable import run_consumer, tensor_names
from tests.helpers.portable_consumer import consume
from tests.helpers.pipelines import write_pipeline
from tests.helpers.runs import train_cli
from tests.helpers.tiny_parts import dataset_from, qa

TRAIN = ["--per_device_train_batch_size", "2", "--logging_steps", "1", "--max_steps", "2", "--save_strategy", "no",
         "--learning_rate", "1e-2", "--report_to", "none", "--seed", "0"]
SIZES = [(32, 32), (100, 30), (30, 90), (200, 40), (150, 140), (41, 37)]  # (width, height)
QUESTION = "What colour is it?"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(data path, image folder): single-image samples of `SIZES`, a two- and a three-image one, a text-only one."""
    root = tmp_path_factory.mktemp("onevision_data")
    images = root / "images"
    images.mkdir()
    for i, size in enumerate(SIZES):
        Image.new("RGB", size, (40 * i, 255 - 40 * i, 90)).save(images / f"s{i}.png")
    records = [qa(f"one{i}", f"s{i}.png", f"<image>\n{QUESTION}", f"Colour {i}.") for i in range(len(SIZES))]
    records.append(qa("two", ["s1.png", "s2.png"], "<image>\n<image>\nSame?", "No."))
    records.append(qa("three", ["s0.png", "s3.png", "s4.png"], "<image><image><image>\nCount?", "Three."))
    records.append(qa("text", None, "Two plus two?", "Four."))
    path = root / "data.json"
    path.write_text(json.dumps(records))
    return str(path), str(images)


@pytest.fixture(scope="module")
def outputs(parts, data, tmp_path_factory):
    """A llava_onevision stage 1 (new model, CLI) and stage 2 from it (CLI, checkpoint-2 saved); OneVision stage 2s
    (in process) from a llava and a llava_next stage 1."""
    root = tmp_path_factory.mktemp("onevision_runs")
    flags = ["--data_path", data[0], "--image_folder", data[1], *TRAIN]
    out = {name: str(root / name) for name in ("stage1", "stage2", "llava", "llava_next", "from_llava",
                                               "from_llava_next")}
    train_cli("--architecture", "llava_onevision", "--vision_model_name_or_path", parts["vision"],
              "--language_model_name_or_path", parts["lm"], "--freeze_language_model", "True",
              "--output_dir", out["stage1"], *flags)
    train_cli("--model_name_or_path", out["stage1"], "--freeze_language_model", "False", "--output_dir",
              out["stage2"], *flags, "--save_strategy", "steps", "--save_steps", "2")
    for start in ("llava", "llava_next"):
        main(["--architecture", start, "--vision_model_name_or_path", parts["vision"], "--language_model_name_or_path",
              parts["lm"], "--freeze_language_model", "True", "--output_dir", out[start], *flags])
        main(["--model_name_or_path", out[start], "--architecture", "llava_onevision", "--freeze_language_model",
              "False", "--output_dir", out[f"from_{start}"], *flags])
    return out


def test_outputs_are_onevision_checkpoints_in_the_llava_hf_layout(outputs):
    for kind in ("stage1", "stage2", "from_llava", "from_llava_next"):
        config = json.loads(open(os.path.join(outputs[kind], "config.json")).read())
        assert config["model_type"] == "llava_onevision", kind
        assert config["architectures"] == ["LlavaOnevisionForConditionalGeneration"], kind
        assert config["vision_aspect_ratio"] == "anyres_max_9" and len(config["image_grid_pinpoints"]) == 36, kind
        names = tensor_names(outputs[kind])
        assert "image_newline" in names and not any(name.startswith("model.") for name in names), kind
    stage1 = json.loads(open(os.path.join(outputs["stage1"], "config.json")).read())
    assert stage1["vision_feature_layer"] == -1  # OneVision's; CLIP keeps "default" (full cannot tile its CLS)


@pytest.mark.parametrize("kind", ["stage2", "stage2/checkpoint-2", "from_llava_next"])
def test_plain_transformers_loads_generates_and_gives_our_logits(outputs, data, kind):
    folder = os.path.join(outputs[kind.split("/")[0]], *kind.split("/")[1:])
    model, info = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(folder,
                                                                                      output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], kind
    processor = transformers.AutoProcessor.from_pretrained(folder)
    assert type(processor).__name__ == "LlavaOnevisionProcessor"
    ours = LlavaOnevisionForConditionalGeneration.from_pretrained(folder).eval()
    images = [Image.open(os.path.join(data[1], name)).convert("RGB") for name in ("s1.png", "s3.png")]
    for sample_images in ([images[0]], images):  # one image (tiled) and two (base views)
        content = [*({"type": "image"} for _ in sample_images), {"type": "text", "text": QUESTION}]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        inputs = processor(text=[prompt], images=[sample_images], return_tensors="pt")
        with torch.no_grad():
            theirs, mine = model(**inputs).logits, ours(**inputs).logits
        torch.testing.assert_close(theirs, mine, atol=1e-4, rtol=0)
        generated = model.generate(**inputs, min_new_tokens=3, max_new_tokens=3, do_sample=False)
        assert generated.shape[1] == inputs["input_ids"].shape[1] + 3


@pytest.mark.parametrize("names", [["s1.png"], ["s1.png", "s3.png"]], ids=["one_image", "two_images"])
def test_transformers_4_57_reads_outputs_as_5x_does(outputs, data, tmp_path, names):
    """What a user of transformers 4.57 does with a final output and a checkpoint-N: same input ids, our logits, an
    answer from its pipeline; its video processor is the one saved, not one built from the image processor's file
    (4.57 falls back on preprocessor_config.json without a video_preprocessor_config.json)."""
    folders = [outputs["stage2"], os.path.join(outputs["stage2"], "checkpoint-2"), outputs["from_llava_next"]]
    paths = [os.path.join(data[1], name) for name in names]
    theirs = run_consumer({"folders": folders, "image": paths, "question": QUESTION, "pipeline": True}, tmp_path)
    for folder in folders:
        ours = consume(folder, [Image.open(path).convert("RGB") for path in paths], QUESTION)
        assert theirs[folder]["missing"] == theirs[folder]["unexpected"] == [] == ours["missing"], folder
        assert torch.equal(theirs[folder]["input_ids"], ours["input_ids"]), folder
        torch.testing.assert_close(theirs[folder]["logits"], ours["logits"], atol=1e-4, rtol=0)
        assert isinstance(theirs[folder]["answer"], str), folder
        assert ours["video_processor"].items() <= theirs[folder]["video_processor"].items(), folder
        assert "image_grid_pinpoints" not in theirs[folder]["video_processor"], folder


@pytest.mark.parametrize("names", [["s1.png"], ["s1.png", "s3.png"]], ids=["one_image", "two_images"])
def test_pipeline_answers_with_an_output(outputs, data, names):
    assert_pipeline_answers(outputs["stage2"], [Image.open(os.path.join(data[1], name)).convert("RGB")
                                                for name in names], QUESTION)


def test_stage_2_from_earlier_architectures_keeps_projector_and_newline(outputs):
    llava = transformers.LlavaForConditionalGeneration.from_pretrained(outputs["llava"])
    onevision = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(outputs["from_llava"])
    before = llava.model.multi_modal_projector.linear_1.weight
    after = onevision.model.multi_modal_projector.linear_1.weight
    assert not torch.equal(before, after) and (before - after).abs().max() < 0.2  # trained on, not replaced
    assert json.loads(open(os.path.join(outputs["from_llava"], "config.json")).read())["vision_feature_layer"] == -2
    next_model = transformers.LlavaNextForConditionalGeneration.from_pretrained(outputs["llava_next"])
    from_next = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(outputs["from_llava_next"])
    newline_before, newline_after = next_model.model.image_newline, from_next.model.image_newline
    assert not torch.equal(newline_before, newline_after)  # trained on with the projector ...
    assert (newline_before - newline_after).abs().max() < 0.2  # ... from the llava_next one, not a new draw


def test_packed_and_token_budget_batches_train_and_generate_answers(outputs, data, tmp_path):
    """Packing and token-budget plans take the per-sample counts (one-, two- and three-image samples in one row);
    `llava.generate` answers with the output."""
    for flags in (["--packing", "True", "--model_max_length", "600"],
                  ["--max_tokens_per_batch", "600", "--per_device_train_batch_size", "1"]):
        out = str(tmp_path / flags[0].strip("-"))
        main(["--model_name_or_path", outputs["stage1"], "--freeze_language_model", "False", "--data_path", data[0],
              "--image_folder", data[1], "--output_dir", out, *TRAIN, *flags])
        history = json.loads(open(os.path.join(out, "trainer_state.json")).read())["log_history"]
        assert any("loss" in entry for entry in history)
        assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in history if "loss" in entry)
    answer = generate.main(["--model_name_or_path", outputs["stage2"], "--image", os.path.join(data[1], "s2.png"),
                            "--prompt", QUESTION, "--max_new_tokens", "3"])
    assert isinstance(answer, str)


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch, num_items_in_batch=batch["labels"][:, 1:].ne(-100).sum()).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_packed_and_images_first_batches_train_as_the_padded_batch(outputs, data, monkeypatch):
    """Packed rows (batch_num_images per sample, not per row) and the multi-process path (images encoded before
    the LM) give the padded batch's loss and gradients, image_newline included."""
    args = ModelArguments(model_name_or_path=outputs["stage2"])
    processor = processor_for(args)
    model = base_model_for(args, processor).eval()  # no dropout
    set_trainable(model, vision_tower=True, projector=True, language_model=True)
    dataset = dataset_from([data[0]], processor, 4096, data[1])
    items = [dataset[i] for i in range(len(dataset))]
    rows = pack_rows(dataset.lengths, max(dataset.lengths) + 60, seed=0)
    assert any(len(row) > 1 for row in rows)
    padded = LlavaDataCollator(processor.tokenizer.pad_token_id)([items[i] for row in rows for i in row])
    packed = PackingCollator(processor.tokenizer.pad_token_id)([[items[i] for i in row] for row in rows])
    assert padded["batch_num_images"].tolist() == [len(dataset.samples[i].images) for row in rows for i in row
                                                   if dataset.samples[i].images]
    reference = _loss_and_grads(model, padded)
    monkeypatch.setattr(type(model), "_encodes_images_first", lambda self, pixel_values: True)
    for batch in (packed, padded):
        loss, grads = _loss_and_grads(model, batch)
        torch.testing.assert_close(loss, reference[0], rtol=0, atol=1e-5)
        assert grads.keys() == reference[1].keys() and "model.image_newline" in grads
        assert max((grads[n] - reference[1][n]).abs().max().item() for n in grads) <= 1e-5


def test_dry_run_validate_data_and_evaluate_take_llava_onevision(outputs, parts, data, tmp_path, capsys):
    """A pipeline dry run counts the newline with the projector; `llava.validate_data` checks data against a new
    OneVision processor; `llava.evaluate` answers with the output."""
    path = write_pipeline(tmp_path, parts, architecture="llava_onevision")
    assert main([path, "--dry_run", "True"]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines() if line.strip()}
    hidden = 32  # the tiny tower's and LM's width: two linear layers with biases, and the newline
    assert rows["projector"][0] == f"{2 * (hidden * hidden + hidden) + hidden:,}"
    assert validate_data.main(["--vision_model_name_or_path", parts["vision"], "--language_model_name_or_path",
                               parts["lm"], "--architecture", "llava_onevision", "--data_path", data[0],
                               "--image_folder", data[1]]) == 0
    result = evaluate.main(["--model_name_or_path", outputs["stage2"], "--data_path", data[0], "--image_folder",
                            data[1], "--max_samples", "4", "--batch_size", "2"])
    assert 0 <= result["accuracy"] <= 1 and "blind_accuracy" in result


@pytest.mark.parametrize("flags, message", [
    (["--lora_enable", "True"], r"--lora_enable True \(LoRA, .*llava_onevision \(LoRA would not train or save the "
                                r"image_newline"),
    (["--lora_enable", "True", "--load_in_4bit", "True"], r"--lora_enable True \(LoRA, and QLoRA with --load_in_4bit"),
    (["--checkpoint_weights", "trainable"], r"--checkpoint_weights trainable is not supported with --architecture "
                                            r"llava_onevision \(a resume would rebuild the image_newline"),
], ids=["lora", "qlora", "trainable_checkpoints"])
def test_lora_qlora_and_trainable_checkpoints_are_refused_naming_the_flag(parts, data, tmp_path, flags, message):
    """One line naming the flag and why, before any weights load (the run goes no further than the processor)."""
    with pytest.raises(ConfigurationError, match=message) as refusal:
        main(["--architecture", "llava_onevision", "--vision_model_name_or_path", parts["vision"],
              "--language_model_name_or_path", parts["lm"], "--freeze_language_model", "False", "--data_path", data[0],
              "--image_folder", data[1], "--output_dir", str(tmp_path / "out"), *TRAIN, *flags])
    assert "\n" not in str(refusal.value)
