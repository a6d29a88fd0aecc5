"""LLaVA-NeXT end to end: stage 1 then stage 2 through `train_llava.py` on images of many sizes, a llava_next stage 2
from a `llava` stage-1 output, outputs that plain transformers 5.x and 4.57 load with equal logits, the training
speed paths that stay exact, and the combinations that are refused."""

import json
import os

import pytest
import torch
import transformers
from PIL import Image

from llava.data.collator import LlavaDataCollator, PackingCollator
from llava.data.packing import pack_rows
from llava.data.types import ConfigurationError, DataError
from llava.data.images import check_image, load_image
from llava.data.types import Sample
from llava.model.hub_format import load_saved_weights
from llava.model.processor import image_tokens
from llava.model.components import components, set_trainable
from llava import evaluate, generate, inspect_data, validate_data
from llava.train import main
from llava.training.arguments import ModelArguments
from llava.training.build import base_model_for, processor_for
from tests.helpers.distributed import TORCHRUN, launch, stage2_flags
from tests.helpers.outputs import assert_pipeline_answers
from tests.helpers.pipelines import write_pipeline
from tests.helpers.runs import train_cli
from tests.helpers.portable import run_consumer, tensor_names
from tests.helpers.portable_consumer import consume
from tests.helpers.tiny_parts import dataset_from, prepared, qa

TRAIN = ["--per_device_train_batch_size", "2", "--logging_steps", "1", "--max_steps", "3", "--save_strategy", "no",
         "--learning_rate", "1e-2", "--report_to", "none", "--seed", "0"]
# (width, height) of the training images: square, wide, tall, extreme, larger than every grid resolution.
SIZES = [(32, 32), (100, 30), (30, 90), (200, 40), (41, 37), (150, 140)]
QUESTION = "What colour is it?"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(data path, image folder) of single- and two-image samples over images of `SIZES`, and a text-only one."""
    root = tmp_path_factory.mktemp("anyres_data")
    images = root / "images"
    images.mkdir()
    for i, size in enumerate(SIZES):
        Image.new("RGB", size, (40 * i, 255 - 40 * i, 90)).save(images / f"s{i}.png")
    records = [qa(f"one{i}", f"s{i}.png", answer=f"Colour {i}.") for i in range(len(SIZES))]
    records.append(qa("two", ["s1.png", "s2.png"], question="<image>\n<image>\nSame?", answer="No."))
    records.append(qa("text", None, question="Two plus two?", answer="Four."))
    path = root / "data.json"
    path.write_text(json.dumps(records))
    return str(path), str(images)


@pytest.fixture(scope="module")
def outputs(parts, data, tmp_path_factory):
    """A llava_next stage 1 (new model) and stage 2 from it, through the CLI; a llava_next stage 2 from a llava
    stage 1 (in process)."""
    root = tmp_path_factory.mktemp("anyres_runs")
    data_flags = ["--data_path", data[0], "--image_folder", data[1], *TRAIN]
    stage1, stage2, from_llava = str(root / "stage1"), str(root / "stage2"), str(root / "from_llava")
    train_cli("--architecture", "llava_next", "--vision_model_name_or_path", parts["vision"],
              "--language_model_name_or_path", parts["lm"], "--freeze_language_model", "True",
              "--output_dir", stage1, *data_flags)
    train_cli("--model_name_or_path", stage1, "--freeze_language_model", "False", "--output_dir", stage2, *data_flags)
    llava_stage1 = str(root / "llava_stage1")
    main(["--vision_model_name_or_path", parts["vision"], "--language_model_name_or_path", parts["lm"],
          "--freeze_language_model", "True", "--output_dir", llava_stage1, *data_flags])
    main(["--model_name_or_path", llava_stage1, "--architecture", "llava_next", "--freeze_language_model", "False",
          "--output_dir", from_llava, *data_flags])
    return {"stage1": stage1, "stage2": stage2, "from_llava": from_llava, "llava_stage1": llava_stage1}


def test_outputs_are_llava_next_checkpoints_in_the_llava_hf_layout(outputs):
    for kind in ("stage1", "stage2", "from_llava"):
        config = json.loads(open(os.path.join(outputs[kind], "config.json")).read())
        assert config["model_type"] == "llava_next" and config["architectures"] == ["LlavaNextForConditionalGeneration"]
        names = tensor_names(outputs[kind])
        assert "image_newline" in names and not any(name.startswith("model.") for name in names), kind


def test_stage_2_from_llava_keeps_its_projector(outputs):
    """The llava stage 1's projector went into the llava_next model (then stage 2 trained it on)."""
    llava = transformers.LlavaForConditionalGeneration.from_pretrained(outputs["llava_stage1"])
    next_model = transformers.LlavaNextForConditionalGeneration.from_pretrained(outputs["from_llava"])
    assert torch.equal(llava.model.vision_tower.state_dict()["embeddings.patch_embedding.weight"],
                       next_model.model.vision_tower.state_dict()["embeddings.patch_embedding.weight"])
    before = llava.model.multi_modal_projector.linear_1.weight
    after = next_model.model.multi_modal_projector.linear_1.weight
    assert not torch.equal(before, after) and (before - after).abs().max() < 0.2  # trained on, not replaced


def test_plain_transformers_5_loads_and_generates(outputs, data):
    image = Image.open(os.path.join(data[1], "s1.png")).convert("RGB")
    for kind in ("stage2", "from_llava"):
        model, info = transformers.LlavaNextForConditionalGeneration.from_pretrained(outputs[kind],
                                                                                     output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], kind
        processor = transformers.AutoProcessor.from_pretrained(outputs[kind])
        assert type(processor).__name__ == "LlavaNextProcessor"
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(text=prompt, images=[image], return_tensors="pt")
        generated = model.generate(**inputs, min_new_tokens=3, max_new_tokens=3, do_sample=False)
        assert generated.shape[1] == inputs["input_ids"].shape[1] + 3


def test_transformers_4_57_gives_the_same_logits(outputs, data, tmp_path):
    folders = [outputs["stage2"], outputs["from_llava"]]
    image = os.path.join(data[1], "s1.png")  # 100 x 30: a 1x3 grid, unpadded
    theirs = run_consumer({"folders": folders, "image": image, "question": QUESTION}, tmp_path)
    for folder in folders:
        ours = consume(folder, Image.open(image).convert("RGB"), QUESTION)
        assert theirs[folder]["missing"] == theirs[folder]["unexpected"] == [], folder
        assert torch.equal(theirs[folder]["input_ids"], ours["input_ids"]), folder
        torch.testing.assert_close(theirs[folder]["logits"], ours["logits"], atol=1e-4, rtol=0)


def test_pipeline_answers_with_an_output(outputs, data):
    assert_pipeline_answers(outputs["stage2"], [Image.open(os.path.join(data[1], "s1.png")).convert("RGB")], QUESTION)


@pytest.fixture(scope="module")
def trainable(outputs):
    """(model, processor) of the llava_next stage 2 output with every part trainable, in train mode."""
    args = ModelArguments(model_name_or_path=outputs["stage2"])
    processor = processor_for(args)
    model = base_model_for(args, processor)
    set_trainable(model, vision_tower=True, projector=True, language_model=True)
    return model.train(), processor


def test_image_newline_trains_with_the_projector(trainable):
    model, _ = trainable
    projector = list(components(model)["projector"].parameters())
    assert any(p is model.model.image_newline for p in projector)
    set_trainable(model, vision_tower=True, projector=False, language_model=True)
    assert not model.model.image_newline.requires_grad
    set_trainable(model, vision_tower=True, projector=True, language_model=True)


def loss_and_grads(model, batch, num_items):
    model.zero_grad(set_to_none=True)
    loss = model(**batch, num_items_in_batch=num_items).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same(model, batch, other, num_items):
    loss, grads = loss_and_grads(model, batch, num_items)
    other_loss, other_grads = loss_and_grads(model, other, num_items)
    torch.testing.assert_close(loss, other_loss, rtol=0, atol=1e-5)
    assert grads.keys() == other_grads.keys() and "model.image_newline" in grads
    assert max((grads[n] - other_grads[n]).abs().max().item() for n in grads) <= 1e-5


def test_packed_rows_train_as_the_padded_batch(trainable, data):
    model, processor = trainable
    dataset = dataset_from([data[0]], processor, 4096, data[1])
    items = [dataset[i] for i in range(len(dataset))]
    rows = pack_rows(dataset.lengths, max(dataset.lengths) + 40, seed=0)
    assert any(len(row) > 1 for row in rows)
    packed = PackingCollator(processor.tokenizer.pad_token_id)([[items[i] for i in row] for row in rows])
    padded = LlavaDataCollator(processor.tokenizer.pad_token_id)([items[i] for row in rows for i in row])
    assert packed["pixel_values"].dim() == 5 and packed["image_sizes"].shape == (len(SIZES) + 2, 2)
    assert_same(model, packed, padded, padded["labels"][:, 1:].ne(-100).sum())


def test_shared_prefix_batches_train_as_per_row_ones(trainable, data, monkeypatch, tmp_path):
    """Samples that share a system prompt, their images of different grids: the prefix runs once per batch."""
    model, processor = trainable
    model.eval()  # no dropout: the shared-prefix path is taken (it is off with active dropout)
    system = {"from": "system", "value": "You are a careful assistant who looks at every picture closely."}
    records = [{**qa(f"s{i}", f"s{i}.png"), "conversations": [system, *qa(i)["conversations"]]} for i in range(4)]
    (tmp_path / "system.json").write_text(json.dumps(records))
    dataset = dataset_from([str(tmp_path / "system.json")], processor, 4096, data[1])
    batch = LlavaDataCollator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(4)])
    num_items = batch["labels"][:, 1:].ne(-100).sum()
    assert model._shared_prefix_length(batch["input_ids"][:, :-1], batch["attention_mask"][:, :-1],
                                       batch["labels"][:, 1:], {}) > 0
    shared = loss_and_grads(model, batch, num_items)
    monkeypatch.setattr(type(model), "_shared_prefix_length", lambda *args: 0)
    per_row = loss_and_grads(model, batch, num_items)
    model.train()
    torch.testing.assert_close(shared[0], per_row[0], rtol=0, atol=1e-5)
    assert max((shared[1][n] - per_row[1][n]).abs().max().item() for n in per_row[1]) <= 1e-5


@pytest.fixture(scope="module")
def new_processor(parts):
    return processor_for(ModelArguments(vision_model_name_or_path=parts["vision"],
                                        language_model_name_or_path=parts["lm"], architecture="llava_next"))


def test_max_length_never_cuts_an_anyres_image(new_processor, data):
    """The largest image (150 x 140: a 2x2 grid) alone outgrows the limit: refused with its count, or skipped."""
    tokens = image_tokens(new_processor).count((140, 150))
    with pytest.raises(DataError, match=rf"id 'one5'\): its images alone take {tokens} tokens"):
        dataset_from([data[0]], new_processor, tokens - 1, data[1])
    dataset = dataset_from([data[0]], new_processor, tokens - 1, data[1], skip_invalid=True)
    assert "one5" not in [sample.id for sample in dataset.samples] and max(dataset.lengths) <= tokens - 1
    assert dataset.lengths == [len(dataset[i]["input_ids"]) for i in range(len(dataset))]


def test_bad_images_and_placeholders_are_named(new_processor, data, tmp_path):
    """An image too elongated for the grid, one under a patch, and more placeholders than images: each refused
    by file and id."""
    for name, size in (("long.png", (256, 20)), ("tiny.png", (5, 40))):
        Image.new("RGB", size).save(os.path.join(data[1], name))
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([qa("long", "long.png"), qa("tiny", "tiny.png"),
                                qa("extra", "s0.png", question="<image>\n<image>\nWhat?"), qa("good", "s0.png")]))
    problems = prepared([str(path)], new_processor, 4096, data[1]).problems
    assert [(p.kind, str(p).split(": ")[0]) for p in problems] == [
        ("image_size_unsupported", f"{path}[0] (id 'long')"), ("image_size_unsupported", f"{path}[1] (id 'tiny')"),
        ("image_count_mismatch", f"{path}[2] (id 'extra')")]
    assert "too extreme" in str(problems[0]) and "patch size" in str(problems[1])


@pytest.mark.parametrize("flags, message", [
    (["--lora_enable", "True"], "--lora_enable"),
    (["--checkpoint_weights", "trainable"], "--checkpoint_weights trainable"),
])
def test_unsupported_combinations_are_refused(parts, data, tmp_path, flags, message):
    with pytest.raises(ConfigurationError, match=message):
        main(["--architecture", "llava_next", "--vision_model_name_or_path", parts["vision"],
              "--language_model_name_or_path", parts["lm"], "--freeze_language_model", "False",
              "--data_path", data[0], "--image_folder", data[1], "--output_dir", str(tmp_path / "out"), *TRAIN, *flags])


def test_inspect_data_and_generate_expand_by_image_size(outputs, data, capsys):
    """`llava.inspect_data` counts each image's tokens from its header as training does; `llava.generate` answers."""
    inspect_data.main(["--model_name_or_path", outputs["stage2"], "--data_path", data[0], "--image_folder", data[1],
                       "--num_samples", "7", "--json"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    processor = transformers.AutoProcessor.from_pretrained(outputs["stage2"])
    dataset = dataset_from([data[0]], processor, 4096, data[1])
    assert [line["input_ids"] for line in lines] == [dataset[i]["input_ids"].tolist() for i in range(7)]
    counts = [line["input_ids"].count(processor.image_token_id) for line in lines]
    assert len(set(counts[:len(SIZES)])) > 3  # sizes of different grids give different counts
    answer = generate.main(["--model_name_or_path", outputs["stage2"], "--image", os.path.join(data[1], "s2.png"),
                            "--prompt", QUESTION, "--max_new_tokens", "3"])
    assert isinstance(answer, str)


def test_pipeline_dry_run_counts_the_newline_with_the_projector(parts, tmp_path, capsys):
    path = write_pipeline(tmp_path, parts, architecture="llava_next")
    assert main([path, "--dry_run", "True"]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines() if line.strip()}
    hidden = 32  # the tiny tower's and LM's width: two linear layers with biases, and the newline
    assert rows["projector"][0] == f"{2 * (hidden * hidden + hidden) + hidden:,}"


def test_images_encoded_before_the_lm_train_as_transformers_forward(trainable, data, monkeypatch):
    """The path of every multi-process run (and of text-only batches in stage 1): embeddings, then tower, projector
    and newlines, then the merge; a text-only batch encodes one blank image at zero weight."""
    model, processor = trainable
    dataset = dataset_from([data[0]], processor, 4096, data[1])
    collate = LlavaDataCollator(processor.tokenizer.pad_token_id)
    batch = collate([dataset[i] for i in (1, 3, 5, 6)])  # wide, tall, large, two images
    num_items = batch["labels"][:, 1:].ne(-100).sum()
    direct = loss_and_grads(model, batch, num_items)
    monkeypatch.setattr(type(model), "_encodes_images_first", lambda self, pixel_values: True)
    first = loss_and_grads(model, batch, num_items)
    torch.testing.assert_close(direct[0], first[0], rtol=0, atol=1e-5)
    assert max((direct[1][n] - first[1][n]).abs().max().item() for n in direct[1]) <= 1e-5
    text_only = collate([dataset[7]])
    _, grads = loss_and_grads(model, text_only, text_only["labels"][:, 1:].ne(-100).sum())
    assert torch.count_nonzero(grads["model.image_newline"]) == 0  # reached, at zero weight


def test_resuming_reads_the_newline_back_in_place(outputs):
    """Resuming copies a checkpoint's tensors into the model being trained (`load_saved_weights`): image_newline too."""
    args = ModelArguments(model_name_or_path=outputs["stage2"])
    model = base_model_for(args, processor_for(args))
    saved = model.model.image_newline.detach().clone()
    with torch.no_grad():
        model.model.image_newline.zero_()
    assert load_saved_weights(model, outputs["stage2"]) and torch.equal(model.model.image_newline, saved)


def test_sizes_from_headers_are_the_loaded_sizes(new_processor, data, tmp_path):
    """Counted from the header, as loading will shape the image: EXIF quarter turns swap the sides, and
    --max_image_pixels downsizing shrinks them; every item then loads with the counts it was planned with."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: shown 30 wide, 100 high
    path = str(tmp_path / "turned.jpg")
    Image.new("RGB", (100, 30), (200, 0, 0)).save(path, exif=exif.tobytes())
    sample = Sample("t", "mem", [], [path])
    loaded = load_image(path, max_pixels=1500)
    assert check_image(path, sample) == (100, 30)
    assert check_image(path, sample, max_pixels=1500) == (loaded.height, loaded.width) != (100, 30)
    small = dataset_from([data[0]], new_processor, 4096, data[1], max_image_pixels=600)
    full = dataset_from([data[0]], new_processor, 4096, data[1])
    assert small.lengths != full.lengths
    assert small.lengths == [len(small[i]["input_ids"]) for i in range(len(small))]  # counts checked at load


def test_checkers_count_tokens_after_max_image_pixels(new_processor, parts, data, capsys):
    """`llava.validate_data` and `llava.inspect_data` take --max_image_pixels as training does: a length limit that
    only downsized images fit is refused without it and passes with it; inspected tokens are the downsized ones."""
    small = dataset_from([data[0]], new_processor, 4096, data[1], max_image_pixels=600)
    full = dataset_from([data[0]], new_processor, 4096, data[1])
    limit = str(max(small.lengths))
    assert max(full.lengths) > max(small.lengths)
    flags = ["--vision_model_name_or_path", parts["vision"], "--language_model_name_or_path", parts["lm"],
             "--architecture", "llava_next", "--data_path", data[0], "--image_folder", data[1],
             "--model_max_length", limit]
    assert validate_data.main(flags) == 1
    assert validate_data.main([*flags, "--max_image_pixels", "600"]) == 0
    capsys.readouterr()
    inspect_data.main([*flags, "--max_image_pixels", "600", "--num_samples", str(len(small)), "--json"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["input_ids"] for line in lines] == [small[i]["input_ids"].tolist() for i in range(len(small))]


@pytest.fixture(scope="module")
def hub_llava_next(parts, tmp_path_factory):
    """A llava-hf-style LLaVA-NeXT checkpoint written by transformers itself (its class, config and processor, its
    own save), of the tiny tower and LM: what `--model_name_or_path llava-hf/llava-v1.6-*` gives."""
    path = str(tmp_path_factory.mktemp("hub_llava_next"))
    processor = processor_for(ModelArguments(vision_model_name_or_path=parts["vision"],
                                             language_model_name_or_path=parts["lm"], architecture="llava_next"))
    vision = transformers.AutoConfig.from_pretrained(parts["vision"])
    text = transformers.AutoConfig.from_pretrained(parts["lm"])
    text.vocab_size = len(processor.tokenizer)
    config = transformers.LlavaNextConfig(
        vision_config=vision, text_config=text, image_token_index=processor.image_token_id,
        image_grid_pinpoints=processor.image_processor.image_grid_pinpoints)
    torch.manual_seed(0)
    transformers.LlavaNextForConditionalGeneration(config).save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_a_hub_llava_next_checkpoint_continues(hub_llava_next, data, tmp_path):
    reference = transformers.LlavaNextForConditionalGeneration.from_pretrained(hub_llava_next).state_dict()
    loaded = base_model_for(ModelArguments(model_name_or_path=hub_llava_next), processor_for(
        ModelArguments(model_name_or_path=hub_llava_next))).state_dict()
    assert loaded.keys() == reference.keys() and all(torch.equal(loaded[k], reference[k]) for k in reference)
    out = str(tmp_path / "out")
    main(["--model_name_or_path", hub_llava_next, "--freeze_language_model", "False", "--data_path", data[0],
          "--image_folder", data[1], "--output_dir", out, *TRAIN])
    model, info = transformers.LlavaNextForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not torch.equal(model.model.image_newline, reference["model.image_newline"])  # trained with the projector


@pytest.mark.parametrize("flags", [
    ["--packing", "True", "--model_max_length", "400"],
    ["--max_tokens_per_batch", "400", "--per_device_train_batch_size", "1", "--gradient_checkpointing", "True"],
], ids=["packing", "token_budget_checkpointed"])
def test_planned_batches_train_through_the_cli(outputs, data, tmp_path, flags):
    out = str(tmp_path / "out")
    main(["--model_name_or_path", outputs["stage1"], "--freeze_language_model", "False", "--data_path", data[0],
          "--image_folder", data[1], "--output_dir", out, *TRAIN, *flags])
    model, info = transformers.LlavaNextForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    history = json.loads(open(os.path.join(out, "trainer_state.json")).read())["log_history"]
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in history if "loss" in entry)


def test_validate_data_and_evaluate_take_llava_next(outputs, parts, data, tmp_path):
    """`llava.validate_data` checks data against a new llava_next processor (sizes from the images); `llava.evaluate`
    answers, the blind control keeping each image's size (and so its token count)."""
    new = ["--vision_model_name_or_path", parts["vision"], "--language_model_name_or_path", parts["lm"],
           "--architecture", "llava_next", "--data_path", data[0], "--image_folder", data[1]]
    assert validate_data.main(new) == 0
    result = evaluate.main(["--model_name_or_path", outputs["stage2"], "--data_path", data[0], "--image_folder",
                            data[1], "--max_samples", "4", "--batch_size", "2"])
    assert 0 <= result["accuracy"] <= 1 and "blind_accuracy" in result


@pytest.mark.slow
def test_ddp_trains_llava_next_over_two_processes(parts, llava_checkpoint, tmp_path):
    """Under DDP every batch goes embeddings -> tower, projector, newlines -> merge (text-only ones with a blank
    image), so both processes run the same modules; a llava checkpoint turned llava_next, 2 steps."""
    out = tmp_path / "ddp"
    rc, log = launch(TORCHRUN, "train_llava.py", stage2_flags(
        parts, llava_checkpoint, out, "--architecture", "llava_next", "--max_steps", "2", "--report_to", "none"),
        tmp_path / "ddp.log")
    assert rc == 0, log[-4000:]
    model, info = transformers.LlavaNextForConditionalGeneration.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_a_grid_under_a_pipelines_defaults_sets_up_the_first_stage_only(parts, tmp_path):
    """`image_grid_pinpoints` under `defaults` goes to the first stage, which builds the grid; the later stage
    continues that checkpoint, which keeps it (given the flag, it would refuse: "keeps its own grid")."""
    grid = [[32, 64], [64, 32], [64, 64]]
    stages = [{**stage, "max_steps": 1} for stage in
              ({"name": "align", "freeze_language_model": True}, {"name": "instruct", "freeze_language_model": False})]
    path = write_pipeline(tmp_path, parts, stages, architecture="llava_next", image_grid_pinpoints=json.dumps(grid))
    assert main([path]) == 0
    for stage in ("align", "instruct"):
        with open(tmp_path / "out" / stage / "preprocessor_config.json") as f:
            assert json.load(f)["image_grid_pinpoints"] == grid, stage
