"""`python -m llava.evaluate`: every data form training reads, a blind control that really hides the images,
predictions as JSONL (written as they come) and figures in TensorBoard; samples whose images do not load are skipped
and counted."""

import json
import os
import shutil

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from llava import evaluate
from llava.data.types import DataError
from llava.model.inference import Answerer
from tests.data.test_hostile_input import broken_images


def test_evaluate_scores_sighted_and_blind(parts, llava_checkpoint, tmp_path, capsys, monkeypatch):
    records = [{"id": f"q{i}", "image": "img0.png", "answer_type": kind,
                "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": reference}]}
               for i, (kind, reference) in enumerate([("colour", "x"), ("shape", "y"), ("colour", "x"),
                                                      ("yes/no", "yes")])]
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    seen = []

    def answer(self, conversations, images):  # sighted first, then blind; "X." counts as "x" after normalisation
        seen.append(images)
        return ["X.", "z", "x", "yes"] if len(seen) == 1 else ["x", "z", "z", "no"]

    monkeypatch.setattr(Answerer, "answer", answer)
    result = evaluate.main(["--model_name_or_path", llava_checkpoint, "--data_path", f"{data}:4", "--image_folder",
                            parts["images"], "--batch_size", "8", "--output_file", str(tmp_path / "p.jsonl"),
                            "--log_dir", str(tmp_path / "tb")])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert result["num_samples"] == 4 and result["accuracy"] == 0.75
    assert result["accuracy_by_type"] == {"colour": 1.0, "shape": 0.0, "yes/no": 1.0}
    assert result["blind_accuracy_by_type"] == {"colour": 0.5, "shape": 0.0, "yes/no": 0.0}
    assert result["gap_by_type"] == {"colour": 0.5, "shape": 0.0, "yes/no": 1.0}
    assert result["yes_no"]["yes_ratio"] == 1.0 and result["yes_no"]["blind"]["yes_ratio"] == 0.0
    sighted, blind = (np.asarray(images[0][0]) for images in seen)
    assert sighted.std() > 0 or sighted.mean() != blind.mean()  # img0 is a real image ...
    assert len(np.unique(blind.reshape(-1, 3), axis=0)) == 1 and blind.shape == sighted.shape  # ... blind: flat
    lines = [json.loads(line) for line in open(tmp_path / "p.jsonl")]
    assert [(p["correct"], p["blind_correct"]) for p in lines] == [(True, True), (False, False), (True, False),
                                                                  (True, False)]
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert {"eval/accuracy", "eval/gap/colour", "eval/blind_accuracy/shape", "eval/yes_no/f1"} <= set(
        events.Tags()["scalars"])
    assert events.Tags()["images"] == ["eval/samples"]


def test_evaluate_reads_parquet_with_embedded_images(parts, llava_checkpoint, tmp_path, monkeypatch):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), (255, 0, 0)).save(buffer, "PNG")
    question = [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]
    path = str(tmp_path / "t.parquet")
    pq.write_table(pa.table({"id": ["a"], "conversations": [question], "image": pa.array([buffer.getvalue()])}), path)
    seen = []
    monkeypatch.setattr(Answerer, "answer", lambda self, conversations, images: seen.append(images) or ["red"])
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    result = evaluate.main(["--model_name_or_path", llava_checkpoint, "--data_path", path, "--blind_control",
                            "False"])
    assert result["accuracy"] == 1.0 and "blind_accuracy" not in result
    assert seen[0][0][0].getpixel((5, 5)) == (255, 0, 0)


def test_answer_after_scores_the_final_answer_and_keeps_the_whole_output(parts, llava_checkpoint, tmp_path,
                                                                        monkeypatch):
    """--answer_after ":": "blue: no" is scored as "no" (yes/no figures too), an answer without a colon as it is; the
    predictions file keeps what the model said."""
    records = [{"id": f"q{i}", "image": "img0.png", "answer_type": kind,
                "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": reference}]}
               for i, (kind, reference) in enumerate([("yes/no", "no"), ("yes/no", "yes"), ("colour", "red")])]
    data = tmp_path / "test.json"
    data.write_text(json.dumps(records))
    calls = []
    monkeypatch.setattr(Answerer, "answer", lambda self, conversations, images: calls.append(1) or (
        ["blue: no", "red: no", "red"] if len(calls) == 1 else ["no", "gray: yes", "Red."]))
    result = evaluate.main(["--model_name_or_path", llava_checkpoint, "--data_path", str(data), "--image_folder",
                            parts["images"], "--answer_after", ":", "--output_file", str(tmp_path / "p.jsonl")])
    assert result["accuracy_by_type"] == {"colour": 1.0, "yes/no": 0.5}
    assert result["blind_accuracy_by_type"] == {"colour": 1.0, "yes/no": 1.0}
    assert result["yes_no"]["yes_ratio"] == 0.0 and result["yes_no"]["blind"]["yes_ratio"] == 0.5
    lines = [json.loads(line) for line in open(tmp_path / "p.jsonl")]
    assert [(p["prediction"].strip(), p["output"], p["blind"].strip(), p["blind_output"]) for p in lines] == [
        ("no", "blue: no", "no", "no"), ("no", "red: no", "yes", "gray: yes"), ("red", "red", "Red.", "Red.")]
    calls.clear()
    without = evaluate.main(["--model_name_or_path", llava_checkpoint, "--data_path", str(data), "--image_folder",
                             parts["images"], "--blind_control", "False"])
    assert without["accuracy_by_type"] == {"colour": 1.0, "yes/no": 0.0}  # whole answers: "blue: no" is not "no"


def questions(path, images: list[str]) -> str:
    """A JSONL file of one question per image, ids q0, q1, ..."""
    path.write_text("".join(json.dumps({"id": f"q{i}", "image": image, "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]}) + "\n"
        for i, image in enumerate(images)))
    return str(path)


def test_a_corrupt_image_is_skipped_named_and_counted(parts, llava_checkpoint, tmp_path, caplog, monkeypatch):
    folder = tmp_path / "images"
    broken = broken_images(str(folder))
    shutil.copy(os.path.join(parts["images"], "img0.png"), folder / "img0.png")
    data = questions(tmp_path / "test.jsonl", ["img0.png", broken["cut_jpg"], "img0.png", broken["cut_png"]])
    monkeypatch.setattr(Answerer, "answer", lambda self, conversations, images: ["x"] * len(conversations))
    result = evaluate.main(["--model_name_or_path", llava_checkpoint, "--data_path", data, "--image_folder",
                            str(folder), "--batch_size", "2", "--output_file", str(tmp_path / "p.jsonl")])
    assert result["num_samples"] == 2 and result["accuracy"] == 1.0
    assert result["skipped"] == 2 and result["skipped_ids"] == ["q1", "q3"]
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped")]
    assert len(skipped) == 2 and "(id 'q1'): unreadable or corrupt image" in skipped[0] and "cut.jpg" in skipped[0]
    assert [json.loads(line)["id"] for line in open(tmp_path / "p.jsonl")] == ["q0", "q2"]


def test_predictions_are_written_as_they_come(parts, llava_checkpoint, tmp_path, monkeypatch):
    """A failure in the second batch keeps the first batch's answers on disk."""
    data = questions(tmp_path / "test.jsonl", ["img0.png"] * 3)
    calls = []

    def answer(self, conversations, images):
        calls.append(1)
        if len(calls) > 2:  # the second batch's sighted pass (the first batch: sighted and blind)
            raise RuntimeError("out of memory")
        return ["x"] * len(conversations)

    monkeypatch.setattr(Answerer, "answer", answer)
    with pytest.raises(RuntimeError, match="out of memory"):
        evaluate.main(["--model_name_or_path", llava_checkpoint, "--data_path", data, "--image_folder",
                       parts["images"], "--batch_size", "2", "--output_file", str(tmp_path / "p.jsonl")])
    assert [json.loads(line)["id"] for line in open(tmp_path / "p.jsonl")] == ["q0", "q1"]


def test_no_sample_answered_is_an_error_naming_the_first(llava_checkpoint, tmp_path, monkeypatch):
    folder = tmp_path / "images"
    data = questions(tmp_path / "test.jsonl", [broken_images(str(folder))["cut_png"], "missing.png"])
    monkeypatch.setattr(Answerer, "answer", lambda self, conversations, images: ["x"] * len(conversations))
    with pytest.raises(DataError, match=r"none of the 2 samples could be answered; the first: .*\(id 'q0'\): "
                                        "unreadable or corrupt image"):
        evaluate.main(["--model_name_or_path", llava_checkpoint, "--data_path", data, "--image_folder", str(folder)])
