"""Hostile input, built here: every file and flag a careless or malicious user could hand us is refused with its
file, position, sample id and fix (or, for images, converted correctly), never read, hung on or trained silently."""

import io
import json
import os
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image

from llava import validate_data
from llava.data.chat_template import ChatTemplate
from llava.data.checking import SampleChecker, iter_samples
from llava.data.packing import planned_batches
from llava.data.encoder import ConversationEncoder
from llava.data.images import image_readers, load_image, to_rgb
from llava.data.types import DataError
from llava.model.processor import image_tokens
from llava.training.arguments import ModelArguments
from llava.training.build import processor_for
from llava.training.parsing import parse_args
from tests.helpers.tiny_parts import CHATML_TEMPLATE, dataset_from, prepared, qa, save_images, write_dataset


@pytest.fixture(scope="module")
def processor(parts):
    return processor_for(ModelArguments(vision_model_name_or_path=parts["vision"],
                                         language_model_name_or_path=parts["lm"]))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """An image folder holding good images, a FIFO, a symlink out of the folder (file and folder), and a secret
    outside it."""
    root = tmp_path_factory.mktemp("hostile")
    images = root / "images"
    save_images(str(images))
    Image.new("RGB", (8, 8), (0, 255, 0)).save(root / "secret.png")
    os.symlink(root / "secret.png", images / "link_out.png")
    os.symlink(root, images / "dir_out")
    os.symlink(images / "img0.png", images / "link_in.png")  # a link that stays inside is fine
    os.mkfifo(images / "fifo.png")
    return root


def problems_by_id(result):
    return {p.args[0].split("(id ")[1].split(")")[0].strip("'"): p.kind for p in result.problems if "(id " in str(p)}


def write_jsonl(path, lines):
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines) + b"\n")
    return str(path)


def test_hostile_records_are_refused_by_file_line_and_id(processor, hostile, tmp_path):
    records = {
        "fifo": (qa("fifo", image="fifo.png"), "not_a_regular_file"),
        "link_out": (qa("link_out", image="link_out.png"), "image_path_escapes_folder"),
        "dir_out": (qa("dir_out", image="dir_out/secret.png"), "image_path_escapes_folder"),
        "int_image": (qa("int_image", image=5), "malformed_sample"),
        "bool_image": (qa("bool_image", image=True), "malformed_sample"),
        "zero_image": (qa("zero_image", image=0), "malformed_sample"),
        "dict_image": (qa("dict_image", image={"img0.png": 1}), "malformed_sample"),
        "surrogate": (qa("surrogate", answer="bad \ud800 text"), "invalid_text"),
        "assistant_first": ({"id": "assistant_first", "conversations": [
            {"from": "gpt", "value": "Hello"}, {"from": "human", "value": "<image>\nHi"},
            {"from": "gpt", "value": "Red."}], "image": "img0.png"}, "first_turn_assistant"),
    }
    lines = [json.dumps(qa("good", image="link_in.png"))]
    lines += [json.dumps(record) for record, _ in records.values()]
    lines += ["[" * 200000 + "]" * 200000,  # line 11: RecursionError in json
              b'{"id": "latin1", "conversations": [{"from": "human", "value": "caf\xe9"}]}']  # line 12
    path = write_jsonl(tmp_path / "data.JSONL", lines)  # upper-case suffix: still JSONL
    started = time.monotonic()
    result = prepared([path], processor, 512, str(hostile / "images"))
    assert time.monotonic() - started < 30  # the FIFO is never opened
    assert [s.id for s in result.samples] == ["good"]
    assert problems_by_id(result) == {sample_id: kind for sample_id, (_, kind) in records.items()}
    by_location = {str(p).split(": ")[0]: p.kind for p in result.problems}
    assert by_location[f"{path}:11"] == "malformed_json" and "nested too deeply" in result.report()
    assert by_location[f"{path}:12"] == "not_utf8" and "iconv" in result.report()
    # --skip_invalid_samples drops every one of them and trains on the rest, unless that is the lesser part.
    with pytest.raises(DataError, match="would drop 11 of 12 samples, more than half") as error:
        dataset_from([path], processor, 512, str(hostile / "images"), skip_invalid=True)
    assert error.value.kind == "mostly_broken"
    more = write_jsonl(tmp_path / "more.jsonl", [json.dumps(qa(f"more{i}")) for i in range(12)])
    dataset = dataset_from([path, more], processor, 512, str(hostile / "images"), skip_invalid=True)
    assert len(dataset) == 13 and dataset[0]["pixel_values"].shape[0] == 1


def test_hostile_json_list_files_are_refused_with_their_name(processor, tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200000 + "]" * 200000)
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes(b'[\n{"id": "a",\n "x": "caf\xe9"}]')
    with pytest.raises(DataError, match=f"{deep}: JSON nested too deeply"):
        prepared([str(deep)], processor, 512, None)
    with pytest.raises(DataError, match=rf"{latin1}: not UTF-8 text \(byte 0xe9 at line 3\)"):
        prepared([str(latin1)], processor, 512, None)


def test_an_empty_image_path_is_refused_and_a_missing_image_means_text_only(processor, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(qa("empty", image="")), json.dumps(qa("none", image=None,
                                                                                            question="Hi?"))])
    result = prepared([path], processor, 512, None)
    assert problems_by_id(result) == {"empty": "malformed_sample"} and [s.id for s in result.samples] == ["none"]


def test_warnings_are_counted_in_the_summary_but_trained(processor, parts, tmp_path):
    long_answer = " ".join(["word"] * 300)
    lines = [json.dumps(qa("twice", image=None, question="Hi?")), json.dumps(qa("twice", image=None, question="Yo?")),
             json.dumps({"id": "image_answer", "image": "img0.png", "conversations": [
                 {"from": "human", "value": "Look"}, {"from": "gpt", "value": "<image>\nThis."}]}),
             json.dumps(qa("cut", image=None, question="Hi?", answer=long_answer))]
    path = write_jsonl(tmp_path / "w.jsonl", lines)
    result = prepared([path], processor, 128, parts["images"])
    assert not result.problems and len(result.samples) == 4
    kinds = sorted(w.kind for w in result.warnings)
    assert kinds == ["duplicate_id", "image_in_assistant_turn", "truncated_answer"]
    assert "3 warnings (trained anyway): " in result.report()
    assert f"{path}:2 (id 'twice'): same id as {path}:1" in result.report()


def test_a_template_with_nested_loops_is_stopped(processor, tmp_path):
    slow = CHATML_TEMPLATE.replace("{% for message in messages %}", "{% for message in messages %}{% if 'LOOP' in "
                                   "message['content'] %}{% for i in range(100000) %}{% for j in range(100000) %}"
                                   "{% endfor %}{% endfor %}{% endif %}", 1)
    assert slow != CHATML_TEMPLATE
    processor.chat_template, original = processor.chat_template.replace(CHATML_TEMPLATE, slow), processor.chat_template
    try:
        encoder = ConversationEncoder(processor, 512, image_tokens(processor))
        encoder.template.render_time_limit = 0.5
        path = write_jsonl(tmp_path / "t.jsonl", [json.dumps(qa("loop", image=None, question="LOOP?")),
                                                   json.dumps(qa("fine", image=None, question="Hi?"))])
        checker = SampleChecker(encoder, image_readers([path], None))
        started = time.monotonic()
        outcomes = [checker(item) for item in iter_samples([path])]
        assert time.monotonic() - started < 10
        assert outcomes[0][1].kind == "template_timeout" and "(id 'loop')" in str(outcomes[0][1])
        assert outcomes[1][1] is None
    finally:
        processor.chat_template = original


# --------------------------------------------------------------------------------------------- image modes

def test_every_image_mode_becomes_the_right_rgb(tmp_path):
    gradient16 = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(gradient16).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as opened:
        assert opened.mode.startswith("I")
    rgb = np.asarray(load_image(str(tmp_path / "g16.png")))
    expected = np.rint(gradient16 / 257.0)
    assert np.abs(rgb[..., 0].astype(int) - expected).max() <= 1 and len(np.unique(rgb)) > 200
    assert abs(rgb.mean() - expected.mean()) < 1  # not clipped to white (mean 254)
    assert np.asarray(to_rgb(Image.fromarray(np.full((2, 2), 0.5, np.float32), mode="F")))[0, 0, 0] == 128
    assert np.asarray(to_rgb(Image.fromarray(np.full((2, 2), 1000, np.int32), mode="I")))[0, 0, 0] in (3, 4)
    transparent_black = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    white = (255, 255, 255)
    for image in [transparent_black, transparent_black.convert("LA"), transparent_black.convert("PA")]:
        assert to_rgb(image).getpixel((0, 0)) == white, image.mode
    palette = Image.new("P", (2, 2), 0)
    palette.info["transparency"] = 0
    assert to_rgb(palette).getpixel((0, 0)) == white
    assert to_rgb(Image.new("CMYK", (2, 2), (0, 255, 255, 0))).getpixel((0, 0)) == (255, 0, 0)
    assert to_rgb(Image.new("1", (2, 2), 1)).getpixel((0, 0)) == white
    assert to_rgb(Image.new("I;16", (2, 2), 65535)).getpixel((0, 0)) == white


# --------------------------------------------------------------------------------------------- flags

PARTS = ["--vision_model_name_or_path", "V", "--language_model_name_or_path", "L"]
DATA = ["--data_path", "a.json", "--output_dir", "out"]


@pytest.mark.parametrize("flags, message", [
    (["--projector_lr=-1e-3"], "--projector_lr must be positive, got -0.001"),
    (["--vision_lr", "0"], "--vision_lr must be positive, got 0.0"),
    # accepted by transformers, refused by torch after the model loads
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be at least 1, got 0"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be at least 1, got 0"),
    (["--dataloader_num_workers=-1"], "--dataloader_num_workers must be 0 .* or more, got -1"),
    (["--learning_rate=-1e-3"], "--learning_rate must not be negative, got -0.001"),
    (["--adam_beta1", "1.5"], r"--adam_beta1 must be at least 0 and below 1, got 1.5"),
    (["--adam_beta2=-0.1"], r"--adam_beta2 must be at least 0 and below 1, got -0.1"),
    (["--adam_epsilon=-1"], "--adam_epsilon must not be negative, got -1.0"),
    (["--chat_template", "templates/chatml.jinja"], "--chat_template templates/chatml.jinja: no such file"),
    (["--chat_template", "my_template.J2"], "no such file"),
])
def test_bad_flags_are_refused_at_parse_time(flags, message):
    with pytest.raises(ValueError, match=message):
        parse_args(PARTS + DATA + flags)


def test_a_literal_template_and_an_existing_file_are_accepted(tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text(CHATML_TEMPLATE)
    for value in [str(template), CHATML_TEMPLATE]:
        assert parse_args(PARTS + DATA + ["--chat_template", value]).model.chat_template == value


@pytest.mark.parametrize("suffix", [".yaml", ".JSON"])
def test_a_config_file_plus_flags_merges_with_the_flags_winning(tmp_path, suffix):
    config = tmp_path / f"stage1{suffix}"
    values = {"vision_model_name_or_path": "V", "language_model_name_or_path": "L", "data_path": "a.json",
              "output_dir": "from_file", "learning_rate": "1e-3", "freeze_language_model": True}
    config.write_text(json.dumps(values))  # JSON is YAML too
    model_args, data_args, _, training_args = parse_args([str(config), "--output_dir", "from_flag"])
    assert model_args.vision_model_name_or_path == "V" and data_args.data_path == "a.json"
    assert training_args.output_dir == "from_flag" and training_args.learning_rate == 1e-3
    assert training_args.freeze_language_model
    config.write_text(json.dumps({**values, "learning_rat": 1}))
    with pytest.raises(ValueError, match=r"unknown keys \['learning_rat'\]"):
        parse_args([str(config), "--output_dir", "x"])


@pytest.mark.parametrize("layer", [99, -99, 3, -4])
def test_a_vision_feature_layer_out_of_range_is_refused_before_loading(parts, layer):
    from transformers import AutoConfig

    num_layers = AutoConfig.from_pretrained(parts["vision"]).num_hidden_layers
    args = ModelArguments(vision_model_name_or_path=parts["vision"], language_model_name_or_path=parts["lm"],
                          vision_feature_layer=layer)
    if -num_layers - 1 <= layer <= num_layers:
        processor_for(args)
    else:
        with pytest.raises(ValueError, match=f"valid values are {-num_layers - 1} to {num_layers}"):
            processor_for(args)


def test_a_template_that_never_finishes_is_stopped_before_any_sample(processor, tmp_path, monkeypatch):
    """A loop on every rendering hangs the start-up probes themselves, which run while the token cache's lock is
    held: they are time-limited too, and the error names the model."""
    monkeypatch.setattr(ChatTemplate, "render_time_limit", 0.5)
    endless = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}" + CHATML_TEMPLATE
    processor.chat_template, original = endless, processor.chat_template
    try:
        started = time.monotonic()
        with pytest.raises(DataError, match="The chat template of .*took over 0.5 s") as error:
            ConversationEncoder(processor, 512, image_tokens(processor))
        assert error.value.kind == "template_timeout" and time.monotonic() - started < 10
    finally:
        processor.chat_template = original


def broken_images(folder) -> dict[str, str]:
    """Images whose header reads but whose pixels do not decode: a truncated PNG, a truncated JPEG, an EPS (no
    Ghostscript to render it here), by name."""
    os.makedirs(folder, exist_ok=True)
    for name, fmt in (("cut.png", "PNG"), ("cut.jpg", "JPEG")):
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, fmt)
        with open(os.path.join(folder, name), "wb") as f:
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with open(os.path.join(folder, "shape.eps"), "w") as f:
        f.write("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\n")
    return {"cut_png": "cut.png", "cut_jpg": "cut.jpg", "eps": "shape.eps"}


def test_images_that_do_not_decode_pass_a_header_check_and_fail_a_full_one(parts, processor, tmp_path, capsys):
    folder = str(tmp_path / "images")
    names = broken_images(folder)
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(qa(key, image=name)) for key, name in names.items()])
    assert prepared([path], processor, 512, folder).problems == []  # training's default: headers only
    decoded = prepared([path], processor, 512, folder, decode_images=True)
    assert problems_by_id(decoded) == {key: "corrupt_image" for key in names}
    model = ["--vision_model_name_or_path", parts["vision"], "--language_model_name_or_path", parts["lm"],
             "--data_path", path, "--image_folder", folder]
    assert validate_data.main(model) == 1  # decodes by default
    report = capsys.readouterr().out
    assert all(f"(id '{key}')" in report for key in names), report
    assert validate_data.main([*model, "--decode_images", "False"]) == 0


def test_a_missing_image_folder_is_refused_once_before_any_sample(parts, tmp_path):
    """Not as one missing_image problem per sample: the flag and the folder, once, before any model loads."""
    from llava import train

    missing = str(tmp_path / "no_such_images")
    model = ["--vision_model_name_or_path", parts["vision"], "--language_model_name_or_path", parts["lm"],
             "--data_path", parts["data"], "--image_folder", missing]
    for main, extra in ((validate_data.main, []), (train.main, ["--output_dir", str(tmp_path / "out")])):
        with pytest.raises(DataError, match=f"^--image_folder {missing}: no such folder; pass the folder") as error:
            main([*model, *extra])
        assert error.value.kind == "missing_image_folder"
    assert not os.path.exists(tmp_path / "out")


def test_an_ordinary_word_as_the_image_token_is_refused(parts):
    with pytest.raises(ValueError, match="--image_token 'the' is an ordinary token"):
        processor_for(ModelArguments(vision_model_name_or_path=parts["vision"], language_model_name_or_path=parts["lm"],
                                     image_token="the"))


def test_a_learning_rate_of_a_frozen_part_is_refused():
    base = ["--model_name_or_path", "M", "--data_path", "d.json", "--output_dir", "o"]
    with pytest.raises(ValueError, match="--vision_lr 0.001 is the learning rate of a component that "
                                         "--freeze_vision_model True keeps fixed"):
        parse_args([*base, "--vision_lr", "1e-3"])
    with pytest.raises(ValueError, match="--freeze_projector True"):
        parse_args([*base, "--projector_lr", "1e-3", "--freeze_projector", "True"])
    assert parse_args([*base, "--vision_lr", "1e-3", "--freeze_vision_model", "False"]).training.vision_lr == 1e-3


def test_mostly_broken_images_at_load_time_end_the_run(parts, processor, tmp_path):
    """Every image corrupt in its pixels (headers fine): --skip_invalid_samples would otherwise train on the
    text-only rest and exit 0."""
    folder = str(tmp_path / "images")
    names = broken_images(folder)
    records = [qa(f"s{i}", image=names["cut_png"]) for i in range(30)] + [qa("text", image=None)]
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(r) for r in records])
    dataset = dataset_from([path], processor, 512, folder, skip_invalid=True)
    with pytest.raises(DataError, match=r"of the \d+ image samples loaded so far failed .*--skip_invalid_samples "
                                        "skips a few broken files") as error:
        for index in range(len(dataset)):
            dataset[index]
    assert error.value.kind == "mostly_broken"


@pytest.mark.parametrize("workers", [0, 2])
def test_broken_images_among_many_text_samples_end_the_run(processor, tmp_path, workers):
    """Judged over image samples only (60 text-only ones hid 6 corrupt images, and the run trained on text), and
    over what one DataLoader worker loads in an epoch (each of 2 loads 3 image samples here, never 20); a minority
    of broken images (2 of 10) is still skipped."""
    folder = str(tmp_path / "images")
    save_images(folder)
    broken = broken_images(folder)["cut_png"]

    def epoch(image_samples: int, broken_ones: int) -> list:
        records = [qa(f"t{i}", image=None, question="Hi?") for i in range(60)]
        for i in range(image_samples):  # spread over the epoch, broken ones first
            records.insert(i * 7, qa(f"i{i}", image=broken if i < broken_ones else "img0.png"))
        path = write_jsonl(tmp_path / f"d{image_samples}.jsonl", [json.dumps(r) for r in records])
        dataset = dataset_from([path], processor, 512, folder, skip_invalid=True)
        return list(torch.utils.data.DataLoader(dataset, num_workers=workers, collate_fn=list))

    assert len(epoch(10, 2)) == 70
    with pytest.raises(DataError, match=r"of the \d+ image samples loaded so far failed"):
        epoch(6, 6)


def test_a_replaced_sample_never_grows_its_packed_row(parts, processor, tmp_path):
    """Under --packing with --skip_invalid_samples, a sample that fails at load time is replaced by one no
    longer than it, so the row stays within --model_max_length."""
    folder = str(tmp_path / "images")
    save_images(folder)
    broken_images(folder)
    long = qa("long", question="<image>\n" + "Tell me about it in great detail, please. " * 6)
    records = [qa("broken", image="cut.png"), long, *[qa(f"ok{i}") for i in range(6)]]
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(r) for r in records])
    dataset = dataset_from([path], processor, 512, folder, skip_invalid=True)
    max_length = max(dataset.lengths) + 4
    planned, _ = planned_batches(dataset, 0, max_length, True, None, 0)
    for index, row in enumerate(planned.groups):
        items = planned[index]
        assert sum(len(item["input_ids"]) for item in items) <= max_length, [dataset.samples[i].id for i in row]


def test_a_cache_build_killed_half_way_leaves_no_folder_behind(parts, processor, tmp_path):
    data, images = write_dataset(str(tmp_path / "d"))
    cache = tmp_path / "cache"
    dataset_from([data], processor, 512, images, cache_dir=str(cache))
    (key,) = [name for name in os.listdir(cache) if not name.endswith(".lock")]
    os.makedirs(cache / f".{key}-killed")  # what a kill during the save leaves
    shutil.rmtree(cache / key)  # so the next run builds again
    dataset_from([data], processor, 512, images, cache_dir=str(cache))
    assert sorted(os.listdir(cache)) == [key, f"{key}.lock"]
