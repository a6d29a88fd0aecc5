"""Bad input gets a clear error naming the file, the sample id and the fix; nothing trains on garbage."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from llava import validate_data
from llava.data.images import load_image
from llava.data.types import DataError
from llava.train import main
from llava.training.arguments import ModelArguments
from llava.training.build import processor_for
from tests.helpers.tiny_parts import conversation_records, dataset_from, prepared, qa, save_images

BROKEN = {  # id -> (record, kind): each sample has exactly one defect
    "missing": (qa("missing", image="nowhere.png"), "missing_image"),
    "corrupt": (qa("corrupt", image="corrupt.png"), "corrupt_image"),
    "escape": (qa("escape", image="../img0.png"), "image_path_escapes_folder"),
    "absolute": (qa("absolute", image="/etc/hostname"), "image_path_escapes_folder"),
    "count": (qa("count", image=["img0.png", "img1.png"]), "image_count_mismatch"),
    "user_last": ({"id": "user_last", "conversations": [{"from": "human", "value": "Hi"}]}, "last_turn_not_assistant"),
    "role": ({"id": "role", "conversations": [{"from": "robot", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]},
             "unknown_role"),
    "empty": (qa("empty", answer="  "), "empty_text"),
}
GOOD_AFTER = 9  # valid samples after the broken ones
RECORDS = 3 + len(BROKEN) + 1 + GOOD_AFTER  # with the malformed line


@pytest.fixture(scope="module")
def broken_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")
    images = str(root / "images")
    save_images(images)
    with open(os.path.join(images, "corrupt.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really a png")
    path = root / "data.jsonl"
    # Fewer broken than valid samples: --skip_invalid_samples refuses data that is more than half broken.
    good = [qa(f"good{i}", image=f"img{i % 3}.png") for i in range(GOOD_AFTER)]
    lines = [json.dumps(r) for r in [*conversation_records()[:3], *[r for r, _ in BROKEN.values()], *good]]
    lines.insert(4, '{"id": "malformed", "conversations": [')  # line 5
    path.write_text("\n".join(lines) + "\n")
    return {"data": str(path), "images": images, "root": root}


def test_validate_data_names_every_bad_sample(parts, broken_data, capsys):
    code = validate_data.main(["--vision_model_name_or_path", parts["vision"], "--language_model_name_or_path",
                               parts["lm"], "--data_path", broken_data["data"], "--image_folder", broken_data["images"]])
    report = capsys.readouterr().out
    assert code == 1
    for sample_id, (_, kind) in BROKEN.items():
        assert any(f"[{kind}]" in line and f"'{sample_id}'" in line for line in report.splitlines()), sample_id
    assert f"{broken_data['data']}:5: malformed JSON" in report
    assert report.splitlines()[-1].startswith(f"{len(BROKEN) + 1} of {RECORDS} samples invalid:")


def test_training_refuses_bad_data_before_loading_and_writes_nothing(parts, broken_data, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DataError, match="--skip_invalid_samples True") as error:
        main(["--vision_model_name_or_path", parts["vision"], "--language_model_name_or_path", parts["lm"],
              "--data_path", broken_data["data"], "--image_folder", broken_data["images"], "--output_dir", str(out),
              "--freeze_language_model", "True", "--max_steps", "1", "--report_to", "none"])
    assert all(f"'{sample_id}'" in str(error.value) for sample_id in BROKEN)
    assert not out.exists() or not any(out.rglob("*.safetensors"))


def test_skip_invalid_samples_trains_on_the_rest(parts, broken_data, tmp_path, caplog):
    out = tmp_path / "out"
    trainer = main(["--vision_model_name_or_path", parts["vision"], "--language_model_name_or_path", parts["lm"],
                    "--data_path", broken_data["data"], "--image_folder", broken_data["images"],
                    "--output_dir", str(out), "--skip_invalid_samples", "True", "--freeze_language_model", "True",
                    "--max_steps", "2", "--per_device_train_batch_size", "2", "--report_to", "none",
                    "--save_strategy", "no"])
    assert len(trainer.train_dataset) == 3 + GOOD_AFTER
    assert f"{len(BROKEN) + 1} of {RECORDS} samples invalid" in caplog.text
    assert (out / "model.safetensors").exists()


def test_image_replaced_after_validation_is_skipped_or_named(parts, tmp_path):
    images = str(tmp_path / "images")
    save_images(images)
    data = tmp_path / "d.json"
    data.write_text(json.dumps([qa("a", "img0.png"), qa("b", "img1.png")]))
    processor = processor_for(ModelArguments(vision_model_name_or_path=parts["vision"],
                                              language_model_name_or_path=parts["lm"]))
    strict = dataset_from([str(data)], processor, 512, images)
    lenient = dataset_from([str(data)], processor, 512, images, skip_invalid=True)
    with open(os.path.join(images, "img0.png"), "wb") as f:
        f.write(b"garbage")
    with pytest.raises(DataError, match=r"id 'a'.*cannot read image"):
        strict[0]
    assert lenient[0]["input_ids"].tolist() == lenient[1]["input_ids"].tolist()  # sample b stands in


def test_decompression_bomb_is_refused(parts, tmp_path, monkeypatch):
    images = str(tmp_path / "images")
    save_images(images)
    data = tmp_path / "d.json"
    data.write_text(json.dumps([qa("bomb", "img0.png")]))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    processor = processor_for(ModelArguments(vision_model_name_or_path=parts["vision"],
                                              language_model_name_or_path=parts["lm"]))
    result = prepared([str(data)], processor, 512, images)
    assert [p.kind for p in result.problems] == ["image_too_large"] and "bomb" in str(result.problems[0])


def test_images_become_upright_rgb(tmp_path):
    image = Image.new("RGBA", (40, 20), (255, 0, 0, 128))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = str(tmp_path / "phone.jpg")
    image.convert("RGB").save(path, exif=exif)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (20, 40)
    palette = str(tmp_path / "p.png")
    image.convert("P").save(palette)
    assert load_image(palette).mode == "RGB"


def test_images_are_checked_by_header_and_decoded_when_loaded(parts, tmp_path):
    """A PNG whose header is fine but whose pixel data is cut off passes the up-front check (nothing is decoded
    there) and fails, naming the sample, when its batch loads it; with --skip_invalid_samples it is skipped then."""
    images = str(tmp_path / "images")
    save_images(images)
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    noise.save(os.path.join(images, "noise.png"))
    with open(os.path.join(images, "noise.png"), "rb") as f:
        whole = f.read()
    with open(os.path.join(images, "cut.png"), "wb") as f:
        f.write(whole[: len(whole) // 2])  # header and half the pixel data
    data = tmp_path / "d.json"
    data.write_text(json.dumps([qa("cut", "cut.png"), qa("b", "img1.png")]))
    processor = processor_for(ModelArguments(vision_model_name_or_path=parts["vision"],
                                              language_model_name_or_path=parts["lm"]))
    assert prepared([str(data)], processor, 512, images).problems == []
    with pytest.raises(DataError, match=r"id 'cut'.*cannot read image"):
        dataset_from([str(data)], processor, 512, images)[0]
    lenient = dataset_from([str(data)], processor, 512, images, skip_invalid=True)
    assert lenient[0]["input_ids"].tolist() == lenient[1]["input_ids"].tolist()
