"""lmms-eval scores our checkpoints: the local task (configs/lmms_eval/easy_vqa) asks what `llava.evaluate` asks and
scores as it scores, `make lmms-eval` builds lmms-eval's environment and runs it offline, and
`llava.lmms_eval_score` fails a run whose every sample failed (lmms-eval itself exits 0 then)."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from llava import lmms_eval_score
from llava.data.types import Message
from llava.model.evaluation import final_answer, normalize
from llava.model.inference import Answerer, load_for_inference
from tests.helpers.outputs import REPO

TASK_UTILS = os.path.join(REPO, "configs", "lmms_eval", "easy_vqa", "utils.py")
PREPARE = [sys.executable, "-m", "llava.demo.easy_vqa", "--max_images", "40", "--num_test", "30"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE",
       "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="module")
def task_utils():
    spec = importlib.util.spec_from_file_location("easy_vqa_llava_utils", TASK_UTILS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def doc(question, answer, image="img0.png", system=None, earlier=()):
    turns = ([{"from": "system", "value": system}] if system else []) + [
        {"from": role, "value": text} for q, a in earlier for role, text in (("human", q), ("gpt", a))]
    return {"id": question, "image": image, "answer_type": "colour",
            "conversations": turns + [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


def test_task_normalises_answers_as_llava_evaluate(task_utils):
    for answer in ["Yes.", " no ", "A  Red\tcircle!", "RECTANGLE", "teal,", "...", "", "it's blue"]:
        assert task_utils.normalize(answer) == normalize(answer), answer
    scores = task_utils.process_results(doc("<image>\nWhat colour?", "red"), ["Red."])
    assert scores == {"exact_match": 1.0, "colour_accuracy": 1.0}


def test_task_scores_the_final_answer_as_llava_evaluate(task_utils, monkeypatch):
    for text in ["blue: no", "red: yes.", "gray", "a: b: Yes", ": no", ""]:
        for answer_after in (":", None):
            assert task_utils.final_answer(text, answer_after) == final_answer(text, answer_after), (text, answer_after)
    record = doc("<image>\nis there a red shape?", "no")
    assert task_utils.process_results(record, ["blue: no"])["exact_match"] == 0.0  # whole answers by default
    monkeypatch.setenv(task_utils.ANSWER_AFTER_VARIABLE, ":")
    assert task_utils.process_results(record, ["blue: no"])["exact_match"] == 1.0
    assert task_utils.process_results(record, ["red: yes"])["exact_match"] == 0.0


def test_task_prompt_ids_are_llava_evaluates(task_utils, parts, llava_checkpoint, monkeypatch):
    """What lmms-eval's llava_hf (chat) sends: the processor's chat template over doc_to_messages, then the
    processor on that text and the images, equals the ids `llava.evaluate` generates from."""
    monkeypatch.setenv(task_utils.IMAGE_FOLDER_VARIABLE, parts["images"])
    model, processor = load_for_inference(llava_checkpoint)
    answerer = Answerer(model, processor)
    docs = [doc("<image>\nis there a red shape?", "no"),
            doc("<image>\nWhat colour?", "red", system="Answer in one word."),
            doc("Is it dark?", "no", image="img1.png", earlier=[("<image>\nWhat colour is it?", "Blue.")])]
    for record in docs:
        messages = task_utils.doc_to_messages(record)
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        images = [part["url"] for message in messages for part in message["content"] if part["type"] == "image"]
        theirs = processor(images=images, text=text, return_tensors="pt")["input_ids"][0].tolist()
        roles = {"human": "user", "gpt": "assistant", "system": "system"}
        ours = answerer.encoder.prompt_ids([Message(roles[t["from"]], t["value"]) for t in record["conversations"][:-1]])
        assert theirs == ours, record["id"]
    assert task_utils.doc_to_text(docs[0]) == "is there a red shape?" and task_utils.doc_to_target(docs[0]) == "no"


def fake_lmms_eval(tmp_path, samples, results):
    """A `python` that, run as `-m lmms_eval ... --output_path P`, writes lmms-eval's two files under P."""
    script = tmp_path / "python"
    script.write_text(f"""#!{sys.executable}
import json, os, sys
out = os.path.join(sys.argv[sys.argv.index("--output_path") + 1], "model")
os.makedirs(out)
with open(os.path.join(out, "1_samples_{lmms_eval_score.LOCAL_TASK}.jsonl"), "w") as f:
    f.writelines(json.dumps(s) + "\\n" for s in {samples!r})
with open(os.path.join(out, "1_results.json"), "w") as f:
    json.dump({{"results": {{"{lmms_eval_score.LOCAL_TASK}": {results!r}}}}}, f)
""")
    script.chmod(0o755)
    return str(script)


@pytest.mark.parametrize("answered", [True, False])
def test_wrapper_fails_when_every_sample_failed(tmp_path, capsys, answered):
    data = tmp_path / "test.json"
    data.write_text(json.dumps([doc("<image>\nWhat colour?", "red"), doc("<image>\nWhat colour?", "blue")]))
    counts = [{"output_tokens": 2}] if answered else [None]  # lmms-eval records no count for a failed generation
    samples = [{"doc_id": 1, "target": "blue", "filtered_resps": "blue" if answered else "", "token_counts": counts,
                "exact_match": float(answered)},
               {"doc_id": 0, "target": "red", "filtered_resps": "Blue." if answered else "", "token_counts": counts,
                "exact_match": 0.0}]
    python = fake_lmms_eval(tmp_path, samples, {"exact_match,none": 0.5 if answered else 0.0,
                                                "colour_accuracy,none": 0.5 if answered else 0.0})
    status = lmms_eval_score.main(["--model_name_or_path", str(tmp_path), "--data_path", str(data),
                                   "--lmms_eval_python", python, "--output_file", str(tmp_path / "p.jsonl")])
    out, err = capsys.readouterr()
    result = json.loads(out.strip().splitlines()[-1])
    assert result["num_samples"] == 2 and result["num_failed"] == (0 if answered else 2)
    assert status == (0 if answered else 1) and ("answered none of the 2 samples" in err) != answered
    rows = [json.loads(line) for line in open(tmp_path / "p.jsonl")]
    assert [row["id"] for row in rows] == ["<image>\nWhat colour?"] * 2 and [r["reference"] for r in rows] == ["red", "blue"]
    if answered:
        assert result["accuracy"] == 0.5 and result["accuracy_by_type"] == {"colour": 0.5}


def test_wrapper_fails_when_lmms_eval_wrote_nothing(tmp_path, capsys):
    """lmms-eval exits 0 after a model that fails to load, with no samples written."""
    data = tmp_path / "test.json"
    data.write_text(json.dumps([doc("<image>\nWhat colour?", "red")]))
    python = tmp_path / "python"
    python.write_text(f"#!{sys.executable}\nimport sys; sys.exit(0)\n")
    python.chmod(0o755)
    status = lmms_eval_score.main(["--model_name_or_path", str(tmp_path), "--data_path", str(data),
                                   "--lmms_eval_python", str(python)])
    assert status == 1 and "wrote no samples" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained(tmp_path_factory, parts):
    """A tiny model trained for a few seconds on easy-VQA train questions (not the test images it is scored on) with
    the demo's reasoned yes/no answers ("blue: no"), its test questions, and their image folder."""
    root = tmp_path_factory.mktemp("lmms_eval")
    subprocess.run(PREPARE + ["--output_dir", str(root / "data")], check=True, env=ENV)
    with open(root / "data" / "meta.json") as f:
        images = json.load(f)["image_folder"]
    subprocess.run([sys.executable, "train_llava.py", "--vision_model_name_or_path", parts["vision"],
                    "--language_model_name_or_path", parts["lm"], "--data_path",
                    str(root / "data" / "stage2_single_turn_reasoned.json"), "--image_folder", images,
                    "--freeze_vision_model", "False", "--learning_rate", "3e-3", "--max_steps", "400",
                    "--per_device_train_batch_size", "8", "--report_to", "none", "--seed", "0",
                    "--save_strategy", "no", "--data_cache_dir", "none", "--output_dir", str(root / "model")],
                   cwd=REPO, check=True, env=ENV, capture_output=True)
    return {"root": root, "model": str(root / "model"), "test": str(root / "data" / "test.json"), "images": images}


def make_lmms_eval(*args, check=True):
    return subprocess.run(["make", "-s", "lmms-eval", f"PYTHON={sys.executable}", *args], cwd=REPO, env=ENV,
                          check=check, capture_output=True, text=True)


@pytest.mark.slow
def test_lmms_eval_scores_a_trained_checkpoint_as_llava_evaluate(trained):
    root = trained["root"]
    subprocess.run([sys.executable, "-m", "llava.evaluate", "--model_name_or_path", trained["model"], "--data_path",
                    trained["test"], "--image_folder", trained["images"], "--blind_control", "False",
                    "--answer_after", ":",
                    "--output_file", str(root / "ours.jsonl")], cwd=REPO, check=True, env=ENV, capture_output=True)
    ours = [json.loads(line) for line in open(root / "ours.jsonl")]
    run = make_lmms_eval(f"CHECKPOINT={trained['model']}", f"LMMS_EVAL_DATA={trained['test']}",
                         f"LMMS_EVAL_ARGS=--output_file {root / 'theirs.jsonl'}")
    result = json.loads(run.stdout.strip().splitlines()[-1])
    theirs = [json.loads(line) for line in open(root / "theirs.jsonl")]
    assert result["num_failed"] == 0 and result["num_samples"] == len(ours) == 30
    assert [(p["id"], p["output"], p["prediction"], p["correct"]) for p in theirs] == [
        (p["id"], p["output"], p["prediction"], p["correct"]) for p in ours]
    assert any(":" in p["output"] for p in ours)  # scored on the answer after the colon (make's default ":")
    accuracy = round(sum(p["correct"] for p in ours) / len(ours), 4)
    assert result["accuracy"] == accuracy and 0 < accuracy < 1, result
    assert len({p["prediction"] for p in ours}) > 1  # the model answers, and not always alike
    for kind, figure in result["accuracy_by_type"].items():
        rows = [p["correct"] for p in ours if p["answer_type"] == kind]
        assert figure == round(sum(rows) / len(rows), 4), kind


@pytest.mark.slow
def test_make_lmms_eval_fails_when_every_sample_failed(trained):
    """A checkpoint whose processor expands <image> to one token too many: every generation raises inside
    lmms-eval, which logs it, scores "" and exits 0; the target exits non-zero."""
    broken = str(trained["root"] / "broken")
    shutil.copytree(trained["model"], broken)
    config_path = os.path.join(broken, "processor_config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["num_additional_image_tokens"] += 1
    with open(config_path, "w") as f:
        json.dump(config, f)
    run = make_lmms_eval(f"CHECKPOINT={broken}", f"LMMS_EVAL_DATA={trained['test']}", "LMMS_EVAL_ARGS=--limit 3",
                         check=False)
    assert run.returncode != 0 and "answered none of the 3 samples" in run.stderr, run.stderr[-3000:]
    assert "Image features and image tokens do not match" in run.stdout  # lmms-eval logs to stdout
