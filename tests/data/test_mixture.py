"""Data mixtures (`llava.data.mixture`) and table sources (`llava.data.tables`): --data_path amounts and mixture files, the
seeded selection, per-source image folders, the cache shared by every amount, the record that resume checks, and
parquet / arrow / save_to_disk inputs in both record forms; every bad input is refused before any model loads."""

import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import llava.data.dataset
import llava.training.run
from llava import inspect_data, validate_data
from llava.data.mixture import RECORD_NAME, Mixture, Source, apply_mixture, parse_amount, read_mixture, select
from llava.data.types import DataError, Sample
from llava.train import main
from llava.training.arguments import ModelArguments
from llava.training.build import processor_for
from llava.training.checkpoints import COMPLETE_MARKER
from tests.helpers.tiny_parts import conversation_records, dataset_from, save_images, write_dataset

PARTS = ["--vision_model_name_or_path", "V", "--language_model_name_or_path", "L", "--output_dir", "out"]


@pytest.fixture(scope="module")
def processor(parts):
    return processor_for(ModelArguments(vision_model_name_or_path=parts["vision"],
                                          language_model_name_or_path=parts["lm"]))


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    """`datasets`' Arrow cache (where parquet is converted) inside the test's folder."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))


def fake_samples(counts):
    return [Sample(id=f"s{source}_{i}", location=f"f{source}[{i}]", messages=[], source=source)
            for source, count in enumerate(counts) for i in range(count)]


def touch(folder, *names):
    for name in names:
        (folder / name).write_text("[]")
    return [str(folder / name) for name in names]


def items(dataset):
    return [(dataset[i]["input_ids"].tolist(), dataset[i].get("pixel_values")) for i in range(len(dataset))]


# --------------------------------------------------------------------------------------------- parsing

def test_amounts_and_the_plain_form_parse(tmp_path):
    a, b, c = touch(tmp_path, "a.json", "b.jsonl", "c.json")
    mixture = read_mixture(f"{a}:0.7,{b}:30%,{c}:12", str(tmp_path))
    assert mixture.paths == [a, b, c] and mixture.image_folders == [str(tmp_path)] * 3
    amounts = [(s.amount.value, s.amount.fraction) for s in mixture.sources]
    assert amounts == [(0.7, True), (0.3, True), (12, False)]
    plain = read_mixture(f"{a}, {b}", None)
    assert plain.paths == [a, b] and all(s.amount is None for s in plain.sources)


def test_mixture_file_yaml_and_json_with_per_source_folders(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    touch(data, "a.json", "b.jsonl")
    (data / "images_b").mkdir()
    default = tmp_path / "default_images"
    default.mkdir()
    (tmp_path / "mix.yaml").write_text("sources:\n  - path: data/a.json\n    amount: 0.5\n"
                                       "  - {path: data/b.jsonl, amount: 2000, image_folder: data/images_b}\n"
                                       "  - path: data/a.json\n    amount: 150%\n")
    mixture = read_mixture(str(tmp_path / "mix.yaml"), str(default))
    assert mixture.paths == [str(data / "a.json"), str(data / "b.jsonl"), str(data / "a.json")]
    assert mixture.image_folders == [str(default), str(data / "images_b"), str(default)]
    assert [s.amount.text for s in mixture.sources] == ["0.5", "2000", "150%"]
    assert [s.amount.count(10) for s in mixture.sources] == [5, 2000, 15]
    as_json = tmp_path / "mix.json"  # recognised by its content (a mapping), not only by its name
    as_json.write_text(json.dumps({"sources": [{"path": "data/a.json", "amount": 2.0}]}))
    (source,) = read_mixture(str(as_json), None).sources
    assert source.amount.fraction and source.amount.count(3) == 6
    listed = tmp_path / "records.json"  # a LLaVA .json data file is a list: not a mixture
    listed.write_text(json.dumps(conversation_records()))
    assert read_mixture(str(listed), None).paths == [str(listed)]


BAD_MIXTURE_FILES = {
    "malformed YAML": ("mix.yaml", "sources:\n  - path: a.json\n   amount: [\n", r"mix.yaml: malformed YAML at line 3"),
    "malformed JSON": ("mix.json", '{"sources": [\n  {"path": "a.json",}\n]}',
                       r"mix.json: malformed JSON at line 2, column \d+"),
    "no sources": ("mix.yaml", "source:\n  - path: a.json\n", r"mapping with a non-empty 'sources' list"),
    "unknown top-level key": ("mix.yaml", "sources: [{path: a.json}]\nseed: 3\n", r"unknown keys \['seed'\]"),
    "unknown entry key": ("mix.yaml", "sources:\n  - {path: a.json, weight: 0.5}\n",
                          r"sources\[0\] \(a.json\): unknown keys \['weight'\]; a source has path, amount, "
                          r"image_folder"),
    "entry without a path": ("mix.yaml", "sources:\n  - amount: 0.5\n",
                             r"sources\[0\]: each source is a mapping with a 'path'"),
    "missing data file": ("mix.yaml", "sources:\n  - {path: gone.json}\n",
                          r"sources\[0\] \(gone.json\): data file .*gone.json not found"),
    "missing image folder": ("mix.yaml", "sources:\n  - {path: a.json, image_folder: nowhere}\n",
                             r"sources\[0\] \(a.json\): image_folder 'nowhere' is not a folder"),
    "bad amount": ("mix.yaml", "sources:\n  - {path: a.json, amount: lots}\n",
                   r"sources\[0\] \(a.json\): amount 'lots' does not parse"),
    "boolean amount": ("mix.yaml", "sources:\n  - {path: a.json, amount: yes}\n", r"amount True is not a number"),
}


@pytest.mark.parametrize("case", sorted(BAD_MIXTURE_FILES))
def test_bad_mixture_files_are_refused_before_anything_loads(tmp_path, case):
    name, text, message = BAD_MIXTURE_FILES[case]
    touch(tmp_path, "a.json")
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=message):
        main([*PARTS, "--data_path", str(tmp_path / name)])


@pytest.mark.parametrize("files, message", [
    ({"mix.yaml": "sources: [{path: a.json}, {path: mix.yaml}]"},
     r"mix.yaml: sources\[1\] \(mix.yaml\): mixture cycle: {d}/mix.yaml -> {d}/mix.yaml; "),
    ({"mix.json": '{"sources": [{"path": "./mix.json"}]}'}, r"mixture cycle: {d}/mix.json -> {d}/./mix.json"),
    ({"mix.yaml": "sources: [{path: sub/b.yaml}]", "sub/b.yaml": "sources: [{path: ../mix.yaml}]"},
     r"mix.yaml: sources\[0\] \(sub/b.yaml\): mixture cycle: {d}/mix.yaml -> {d}/sub/b.yaml -> {d}/sub/../mix.yaml"),
    ({"mix.yaml": "sources: [{path: b.yaml}]", "b.yaml": "sources: [{path: a.json}]"},
     r"sources\[0\] \(b.yaml\): {d}/b.yaml is a mixture file too, and mixture files do not nest; list its "
     r"sources in {d}/mix.yaml instead"),
])
def test_mixture_files_naming_mixture_files_are_refused_naming_the_cycle(tmp_path, files, message):
    """Read as a data file, a mixture file named as a source was "malformed JSON at column 1"."""
    touch(tmp_path, "a.json")
    (tmp_path / "sub").mkdir()
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=message.format(d=tmp_path)) as error:
        main([*PARTS, "--data_path", str(tmp_path / next(iter(files)))])
    assert error.value.kind == "bad_mixture"


@pytest.mark.parametrize("spec, message", [
    ("{a}:abc", r"--data_path .*a.json:abc: amount 'abc' does not parse; give a sample count"),
    ("{a}:-3", r"amount '-3' is negative"),
    ("{a}:0", r"amount '0' is not positive"),
    ("{a}:0.0", r"amount '0.0' is not positive"),
    ("{a}:1e3", r"amount '1e3' does not parse"),
    ("{a}:0.5,{d}/gone.json:0.5", r"--data_path .*gone.json: data file .*gone.json not found"),
    ("{a}:0.5,{d}/mix.yaml", r"mix.yaml: a mixture file must be the whole --data_path"),
    ("{d}/nothing.yaml", r"--data_path .*nothing.yaml: mixture file not found"),
])
def test_bad_data_path_amounts_are_refused_before_anything_loads(tmp_path, spec, message):
    (a,) = touch(tmp_path, "a.json")
    (tmp_path / "mix.yaml").write_text("sources: [{path: a.json}]\n")
    with pytest.raises(DataError, match=message):
        main([*PARTS, "--data_path", spec.format(a=a, d=tmp_path)])


# --------------------------------------------------------------------------------------------- selection

def test_counts_fractions_and_repeats():
    samples = fake_samples([10, 7, 4])
    mixture = Mixture(tuple(read_mixture_unchecked("a:3,b:0.5,c:2.5")))
    selection = select(mixture, samples, seed=0)
    assert selection.available == [10, 7, 4] and selection.taken == [3, 4, 10]
    chosen = [samples[i] for i in selection.indices]
    by_source = [[s.id for s in chosen if s.source == k] for k in range(3)]
    assert len(set(by_source[0])) == 3 and len(set(by_source[1])) == 4  # without replacement
    # 2.5 copies of 4: every sample twice (in file order), then 2 more drawn
    assert by_source[2][:8] == [f"s2_{i}" for i in range(4)] * 2 and len(set(by_source[2][8:])) == 2


def read_mixture_unchecked(spec):
    """Sources with amounts but no files (the selection never reads them)."""
    return [Source(entry.split(":")[0], parse_amount(entry.split(":")[1], entry), None) for entry in spec.split(",")]


def test_selection_is_deterministic_under_the_seed():
    samples = fake_samples([50, 50])
    mixture = Mixture(tuple(read_mixture_unchecked("a:0.3,b:17")))
    first, again, other = (select(mixture, samples, seed) for seed in (0, 0, 1))
    assert np.array_equal(first.indices, again.indices) and first.digest == again.digest
    assert not np.array_equal(first.indices, other.indices) and first.digest != other.digest
    assert first.taken == other.taken == [15, 17]


def test_a_mixture_selecting_nothing_is_refused(parts, processor, tmp_path):
    data, images = write_dataset(str(tmp_path))
    mixture = read_mixture(f"{data}:0.01", images)  # 0.01 of 6 samples rounds to none
    dataset = dataset_from(mixture.paths, processor, 512, mixture.image_folders)
    with pytest.raises(DataError, match=r"the data mixture selects no samples:\n.*source.*valid.*taken"):
        apply_mixture(mixture, dataset, seed=0)


# --------------------------------------------------------------------------------------------- images and cache

def two_sources_same_image_names(tmp_path):
    """Two data files whose samples name the same relative images, in folders of different colours."""
    folders = []
    for name, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        folder = tmp_path / name
        save_images(str(folder))
        Image.new("RGB", (40, 36), colour).save(folder / "img0.png")
        (folder / "data.json").write_text(json.dumps(conversation_records()[:1]))
        folders.append(folder)
    mix = tmp_path / "mix.yaml"
    mix.write_text("sources:\n" + "".join(f"  - {{path: {f.name}/data.json, image_folder: {f.name}}}\n"
                                          for f in folders))
    return str(mix), folders


def test_per_source_image_folders_at_check_and_load_time(processor, tmp_path):
    mix, (red, blue) = two_sources_same_image_names(tmp_path)
    mixture = read_mixture(mix, None)
    dataset = dataset_from(mixture.paths, processor, 512, mixture.image_folders)
    red_pixels, blue_pixels = (dataset[i]["pixel_values"][0] for i in range(2))
    channels = lambda pixels: pixels.mean(dim=(1, 2))  # noqa: E731
    assert channels(red_pixels)[0] > channels(red_pixels)[2] and channels(blue_pixels)[2] > channels(blue_pixels)[0]
    os.remove(blue / "img0.png")  # checked against the source's own folder
    with pytest.raises(DataError, match=rf"image not found: {blue}/img0.png"):
        dataset_from(mixture.paths, processor, 512, mixture.image_folders)


def test_the_cache_serves_every_amount_and_is_keyed_by_image_folders(processor, tmp_path, monkeypatch):
    mix, (red, blue) = two_sources_same_image_names(tmp_path)
    calls = []
    real_prepare = llava.data.dataset.prepare_samples
    monkeypatch.setattr(llava.data.dataset, "prepare_samples", lambda *a, **k: calls.append(a) or real_prepare(*a, **k))
    cache = str(tmp_path / "cache")
    a, b = (str(folder / "data.json") for folder in (red, blue))
    selected = []
    for spec in (f"{a}:1.0,{b}:3", f"{a}:2,{b}:0.5"):
        mixture = read_mixture(spec, str(red))
        dataset, record = apply_mixture(mixture, dataset_from(mixture.paths, processor, 512, mixture.image_folders,
                                                               cache_dir=cache), seed=0)
        selected.append(record["samples"])
    assert len(calls) == 1 and selected == [4, 3]  # other amounts, no re-tokenization
    mixture = read_mixture(mix, None)  # the same files with other image folders: another cache
    dataset_from(mixture.paths, processor, 512, mixture.image_folders, cache_dir=cache)
    assert len(calls) == 2


def test_the_selected_order_is_identical_across_builds(processor, tmp_path, monkeypatch):
    """The same files, amounts and seed select the same samples in the same order, also when the files are named
    from another working directory."""
    data, images = write_dataset(str(tmp_path))
    jsonl, _ = write_dataset(str(tmp_path), name="more.jsonl")
    builds = []
    for spec, folder in ((f"{data}:0.5,{jsonl}:9", images), ("data.json:0.5,more.jsonl:9", "images")):
        mixture = read_mixture(spec, folder)
        builds.append(apply_mixture(mixture, dataset_from(mixture.paths, processor, 512, mixture.image_folders,
                                                           cache_dir=str(tmp_path / "cache")), seed=3))
        monkeypatch.chdir(tmp_path)
    (first, first_record), (second, second_record) = builds
    assert first_record == second_record and len(first) == 3 + 9
    assert [s.id for s in first.samples] == [s.id for s in second.samples]
    assert first.lengths == second.lengths
    for i in range(len(first)):
        assert torch.equal(first[i]["input_ids"], second[i]["input_ids"])


# --------------------------------------------------------------------------------------------- record and resume

TRAIN = ["--per_device_train_batch_size", "2", "--save_steps", "1", "--learning_rate", "1e-2", "--report_to", "none",
         "--seed", "0", "--freeze_vision_model", "True", "--freeze_language_model", "True"]


def test_recorded_mixture_and_resume_refusal_or_continuation(parts, llava_checkpoint, tmp_path, caplog, monkeypatch):
    data, images = write_dataset(str(tmp_path))
    jsonl, _ = write_dataset(str(tmp_path), name="more.jsonl")
    out = str(tmp_path / "out")
    mixture = f"{data}:0.5,{jsonl}:2"

    def run(data_path, *flags):
        return main(["--model_name_or_path", llava_checkpoint, "--data_path", data_path, "--image_folder", images,
                     "--output_dir", out, *TRAIN, *flags])

    run(mixture, "--max_steps", "2")
    with open(os.path.join(out, RECORD_NAME), encoding="utf-8") as f:
        record = json.load(f)
    assert [(s["amount"], s["valid"], s["taken"]) for s in record["sources"]] == [("0.5", 6, 3), ("2", 6, 2)]
    assert record["seed"] == 0 and record["samples"] == 5 and len(record["selection_sha256"]) == 64
    assert record["sources"][0]["files"][0][0] == os.path.abspath(data)
    for step in (1, 2):
        with open(os.path.join(out, f"checkpoint-{step}", RECORD_NAME), encoding="utf-8") as f:
            assert json.load(f) == record
        with open(os.path.join(out, f"checkpoint-{step}", COMPLETE_MARKER), encoding="utf-8") as f:
            assert RECORD_NAME in json.load(f)["files"]  # written before the checkpoint was marked complete
    loads = []
    real_build_model = llava.training.run.model_for_training
    monkeypatch.setattr(llava.training.run, "model_for_training", lambda *a: loads.append(1) or real_build_model(*a))
    with pytest.raises(DataError, match=rf"checkpoint-2: that run trained on another data mixture:\n"
                                        rf"  - {jsonl}: amount 2 then, 3 now\n  - {jsonl}: taken 2 then, 3 now\n"
                                        r"Resuming would .* Rerun with the original --data_path and --seed"):
        run(f"{data}:0.5,{jsonl}:3", "--max_steps", "3", "--resume_from_checkpoint", "True")
    with pytest.raises(DataError, match=r"  - seed: 0 then, 1 now\n"):
        run(mixture, "--max_steps", "3", "--resume_from_checkpoint", "True", "--seed", "1")
    assert loads == []  # refused before any weights load
    trainer = run(f"{data}:50%,{jsonl}:2", "--max_steps", "3", "--resume_from_checkpoint", "True")
    assert trainer.state.global_step == 3 and loads == [1]  # the same selection: resumed
    assert "amount 0.5 then, 50% now" in caplog.text


def test_validate_and_inspect_data_take_mixtures(parts, llava_checkpoint, tmp_path, capsys):
    mix, _ = two_sources_same_image_names(tmp_path)
    assert validate_data.main(["--model_name_or_path", llava_checkpoint, "--data_path", mix]) == 0
    out = capsys.readouterr().out
    assert "all 2 samples valid" in out
    (tmp_path / "mix.yaml").write_text(open(mix).read().replace("image_folder: blue}", "image_folder: blue, "
                                                                                        "amount: 3}"))
    assert validate_data.main(["--model_name_or_path", llava_checkpoint, "--data_path", mix]) == 0
    assert "taken" in capsys.readouterr().out
    inspect_data.main(["--model_name_or_path", llava_checkpoint, "--data_path", mix, "--num_samples", "5", "--json"])
    assert [json.loads(line)["id"] for line in capsys.readouterr().out.splitlines()] == ["single", "single"]


# --------------------------------------------------------------------------------------------- tables

def png_bytes(colour):
    buffer = io.BytesIO()
    Image.new("RGB", (40, 36), colour).save(buffer, "PNG")
    return buffer.getvalue()


def table_rows():
    """The same two conversations in the `messages` form with embedded images, and in the LLaVA form with paths."""
    red, blue = png_bytes((255, 0, 0)), png_bytes((0, 128, 255))
    messages = {
        "id": ["single", "two_images"],
        "messages": [
            [{"role": "user", "content": [{"type": "image", "text": None},
                                          {"type": "text", "text": "What colour is it?"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "Red."}]}],
            [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "image", "text": None},
                                          {"type": "text", "text": "Are these the same colour?"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "No: red and blue."}]}]],
        "images": [[{"bytes": red, "path": None}], [{"bytes": red, "path": None}, {"bytes": blue, "path": None}]],
    }
    llava_form = {key: [r.get(key) for r in (conversation_records()[0], conversation_records()[5])]
                  for key in ("id", "image", "conversations")}
    llava_form["image"] = [["img0.png"], ["img0.png", "img1.png"]]
    return messages, llava_form


def write_tables(tmp_path, kind):
    import datasets

    messages, llava_form = table_rows()
    text = datasets.Value("string")
    features = datasets.Features({"id": text, "messages": [{"role": text, "content": [{"type": text, "text": text}]}],
                                  "images": datasets.Sequence(datasets.Image())})
    paths = []
    for name, table in (("messages", datasets.Dataset.from_dict(messages, features=features)),
                        ("llava", datasets.Dataset.from_dict(llava_form))):
        path = str(tmp_path / name)
        if kind == "parquet":
            table.to_parquet(path + ".parquet")
            path += ".parquet"
        elif kind == "arrow":
            table.save_to_disk(path + "_saved")
            (path,) = [os.path.join(path + "_saved", f) for f in os.listdir(path + "_saved") if f.endswith(".arrow")]
        else:
            table.save_to_disk(path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("kind", ["parquet", "arrow", "save_to_disk"])
def test_tables_in_both_record_forms_read_like_json(parts, processor, tmp_path, datasets_cache, kind):
    """Embedded image bytes and image paths give what the JSON records with the same images give."""
    messages_table, llava_table = write_tables(tmp_path, kind)
    data, images = write_dataset(str(tmp_path / "json"), [conversation_records()[0], conversation_records()[5]])
    reference = items(dataset_from([data], processor, 512, images))
    for path, embedded in ((messages_table, True), (llava_table, False)):
        dataset = dataset_from([path], processor, 512, images)
        assert [s.location for s in dataset.samples] == [f"{path}[0]", f"{path}[1]"]
        expected = ["embedded:1:0", "embedded:1:1"] if embedded else ["img0.png", "img1.png"]
        assert dataset.samples[1].images == expected
        for (ids, pixels), (expected_ids, expected_pixels) in zip(items(dataset), reference):
            assert ids == expected_ids
            torch.testing.assert_close(pixels, expected_pixels)


def test_bad_embedded_images_are_named_by_file_row_and_id(processor, tmp_path, datasets_cache):
    import datasets

    path = str(tmp_path / "bad.parquet")
    rows = {"id": ["fine", "corrupt", "empty"],
            "messages": [[{"role": "user", "content": "<image>\nColour?"},
                          {"role": "assistant", "content": "Red."}]] * 3,
            "images": [[{"bytes": png_bytes((255, 0, 0)), "path": None}], [{"bytes": b"not a png", "path": None}],
                       [{"bytes": None, "path": None}]]}
    features = datasets.Features({"id": datasets.Value("string"),
                                  "messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
                                  "images": datasets.Sequence(datasets.Image())})
    datasets.Dataset.from_dict(rows, features=features).to_parquet(path)
    with pytest.raises(DataError) as error:
        dataset_from([path], processor, 512, None)
    report = str(error.value)
    embedded = f"{path}[1] column 'images' image 0 (embedded)"  # table, row, column; never an object's repr
    assert (f"[corrupt_image] {path}[1] (id 'corrupt'): unreadable or corrupt image {embedded}: cannot identify "
            f"image file {embedded}\n") in report
    assert f"[malformed_sample] {path}[2] (id 'empty'): image 0 has neither bytes nor a path" in report
    assert "2 of 3 samples invalid" in report


def test_unreadable_tables_and_split_folders_are_refused(processor, tmp_path, datasets_cache):
    import datasets

    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=rf"--data_path {garbage}: cannot read it as a table"):
        dataset_from([str(garbage)], processor, 512, None)
    splits = datasets.DatasetDict({name: datasets.Dataset.from_dict({"id": ["a"]}) for name in ("train", "test")})
    splits.save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(DataError, match=r"splits holds several splits \(train, test\); name one split's folder, "
                                        r"e.g. .*splits/train"):
        dataset_from([str(tmp_path / "splits")], processor, 512, None)


def test_plain_binary_image_columns_are_embedded_images(parts, processor, tmp_path, datasets_cache):
    """Raw bytes in a `binary` column (one image per row, or a list of them) read as embedded images, like
    `datasets.Image` structs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    red, blue = png_bytes((255, 0, 0)), png_bytes((0, 128, 255))
    question = [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "Red."}]
    two = [{"from": "human", "value": "<image>\n<image>\nSame?"}, {"from": "gpt", "value": "No."}]
    one_per_row, listed = str(tmp_path / "binary.parquet"), str(tmp_path / "binary_list.parquet")
    pq.write_table(pa.table({"id": ["a"], "conversations": [question], "image": pa.array([red], pa.binary())}),
                   one_per_row)
    pq.write_table(pa.table({"id": ["b"], "conversations": [two],
                             "images": pa.array([[red, blue]], pa.list_(pa.binary()))}), listed)
    dataset = dataset_from([one_per_row, listed], processor, 512, None)
    assert [s.images for s in dataset.samples] == [["embedded:0:0"], ["embedded:0:0", "embedded:0:1"]]
    assert dataset[0]["pixel_values"].shape[0] == 1 and dataset[1]["pixel_values"].shape[0] == 2
    assert not torch.equal(dataset[1]["pixel_values"][0], dataset[1]["pixel_values"][1])  # red, then blue


def test_image_cells_that_are_no_image_are_named(processor, tmp_path, datasets_cache):
    """Timestamps in the image column, and a path that poses as a reference to embedded bytes: refused by row and
    id, with the fix (never a TypeError or IndexError from inside the table reader)."""
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    question = [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "Red."}]
    stamps, forged = str(tmp_path / "stamps.parquet"), str(tmp_path / "forged.parquet")
    pq.write_table(pa.table({"id": ["t"], "conversations": [question],
                             "image": pa.array([datetime.datetime(2026, 1, 1)], pa.timestamp("s"))}), stamps)
    pq.write_table(pa.table({"id": ["f"], "conversations": [question], "image": ["embedded:99999:0"]}), forged)
    report = str(pytest.raises(DataError, dataset_from, [stamps, forged], processor, 512, str(tmp_path)).value)
    assert f"{stamps}[0] (id 't'): image 0: its image column holds timestamp[" in report
    assert f"{forged}[0] (id 'f'): image 0: image path 'embedded:99999:0' begins with 'embedded:'" in report


def test_an_amount_of_absurdly_many_copies_is_refused(tmp_path):
    (a,) = touch(tmp_path, "a.json")
    mixture = read_mixture(f"{a}:100000000000", None)
    with pytest.raises(DataError, match=r"takes 100,000,000,000 samples of its 48 valid ones.*more than 1000 copies"):
        select(mixture, fake_samples([48]), seed=0)
    assert len(select(read_mixture(f"{a}:1000.0", None), fake_samples([48]), seed=0).indices) == 48000


def test_validate_data_fails_where_training_would(parts, tmp_path, capsys):
    """An empty list, a mixture that selects nothing: exit status 1, as training refuses them."""
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    data, images = write_dataset(str(tmp_path / "d"))
    for data_path in (str(empty), f"{data}:0.0000001"):
        code = validate_data.main(["--vision_model_name_or_path", parts["vision"], "--language_model_name_or_path",
                                   parts["lm"], "--data_path", data_path, "--image_folder", images])
        assert code == 1, data_path
    output = capsys.readouterr().out
    assert "no samples in" in output and "selects no samples" in output
    with pytest.raises(DataError, match="names no data file"):
        read_mixture(",,", None)
