"""`python -m llava.evaluate`: every data form training reads, a blind control that really hides the images,
predictions as JSONL and figures in TensorBoard."""

import json

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from llava import evaluate
from llava.model.inference import Answerer


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
