"""The embedded demo: data preparation, the stage scripts, and a reduced end-to-end run on the real assets
(easy-VQA and SmolLM2-135M from PyPI) so CI exercises the real conversion and loading path."""

import filecmp
import json
from collections import Counter, defaultdict
import os
import re
import subprocess
import sys

import pytest
from transformers import AutoProcessor
from transformers import LlavaForConditionalGeneration as PlainLlava

from llava.data.records import load_samples
from llava.demo.easy_vqa import COLOURS
from llava.demo.run import question_only_baselines
from tests.helpers.outputs import REPO, assert_loads_and_generates

PREPARE = [sys.executable, "-m", "llava.demo.easy_vqa", "--max_images", "24", "--num_test", "16"]


@pytest.fixture(scope="module")
def easy_vqa(tmp_path_factory):
    out = tmp_path_factory.mktemp("easy_vqa")
    subprocess.run(PREPARE + ["--output_dir", str(out)], check=True)
    with open(out / "meta.json") as f:
        return {"dir": out, "images": json.load(f)["image_folder"]}


def test_prepare_is_deterministic_and_writes_llava_json(easy_vqa, tmp_path):
    subprocess.run(PREPARE + ["--output_dir", str(tmp_path)], check=True)
    for name in ("stage1_captions.json", "stage2_instruct.json", "stage2_single_turn.json",
                 "stage2_yes_no_balanced.json", "stage2_single_turn_reasoned.json",
                 "stage2_yes_no_balanced_reasoned.json", "validation.json", "test.json"):
        assert filecmp.cmp(easy_vqa["dir"] / name, tmp_path / name, shallow=False), name
    captions = load_samples([str(easy_vqa["dir"] / "stage1_captions.json")])
    with open(easy_vqa["dir"] / "image_labels.json") as f:
        labels = json.load(f)
    train_labels = {r["image"]: r for r in labels["train"]}
    # images 9 and 19 of the first 24 (every 10th) are held out for validation
    assert len(captions) == 22 and all(len(s.images) == 1 for s in captions)
    for sample in captions:
        caption, label = sample.messages[-1].content.lower(), train_labels[sample.images[0]]
        assert label["colour"] in caption and label["shape"] in caption, (caption, label)
    for sample in load_samples([str(easy_vqa["dir"] / "stage2_instruct.json")]):
        roles = [m.role for m in sample.messages]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and sample.messages[0].content.startswith("<image>")
    validation = load_samples([str(easy_vqa["dir"] / "validation.json")])
    assert {s.images[0] for s in validation} == {"train/images/9.png", "train/images/19.png"}
    trained_on = {s.images[0] for name in ("stage1_captions.json", "stage2_single_turn.json",
                                           "stage2_yes_no_balanced.json") for s in load_samples([str(easy_vqa["dir"] / name)])}
    assert not trained_on & {s.images[0] for s in validation}
    assert {r["image"] for r in labels["train"]} == trained_on and len(labels["validation"]) == 2
    test = load_samples([str(easy_vqa["dir"] / "test.json")])
    assert len(test) == 16 and all(len(s.messages) == 2 for s in test)
    assert {s.metadata["answer_type"] for s in test} <= {"yes/no", "shape", "colour"}
    assert all(os.path.isfile(os.path.join(easy_vqa["images"], s.images[0])) for s in test)


def test_balanced_yes_no_questions_say_nothing_about_the_answer(easy_vqa):
    answers = defaultdict(Counter)
    for sample in load_samples([str(easy_vqa["dir"] / "stage2_yes_no_balanced.json")]):
        answers[sample.messages[0].content][sample.messages[1].content] += 1
    assert answers and all(set(count) == {"yes", "no"} and count["yes"] == count["no"] for count in answers.values())
    plain = defaultdict(Counter)
    for sample in load_samples([str(easy_vqa["dir"] / "stage2_single_turn.json")]):
        if sample.messages[1].content in ("yes", "no"):
            plain[sample.messages[0].content][sample.messages[1].content] += 1
    # each question text keeps every question of its rarer answer, and as many of the other
    expected = {text: min(count["yes"], count["no"]) for text, count in plain.items()
                if min(count["yes"], count["no"]) > 0}
    assert {text: count["yes"] for text, count in answers.items()} == expected


@pytest.mark.parametrize("name", ["stage2_single_turn", "stage2_yes_no_balanced"])
def test_reasoned_answers_name_the_images_colour_or_shape_before_yes_or_no(easy_vqa, name):
    """The _reasoned files are the plain ones, sample for sample, with each yes/no answer "<attribute>: <answer>":
    the image's colour when the question names a colour, else its shape; other answers unchanged."""
    with open(easy_vqa["dir"] / "image_labels.json") as f:
        labels = {r["image"]: r for r in json.load(f)["train"]}
    plain = load_samples([str(easy_vqa["dir"] / f"{name}.json")])
    reasoned = load_samples([str(easy_vqa["dir"] / f"{name}_reasoned.json")])
    assert [(s.id, s.images, s.messages[0]) for s in plain] == [(s.id, s.images, s.messages[0]) for s in reasoned]
    kinds = Counter()
    for before, after in zip(plain, reasoned):
        question, answer, label = before.messages[0].content, before.messages[1].content, labels[before.images[0]]
        if answer not in ("yes", "no"):
            assert after.messages[1].content == answer
            continue
        kind = "colour" if set(re.findall(r"\w+", question)) & set(COLOURS) else "shape"
        kinds[kind] += 1
        assert after.messages[1].content == f"{label[kind]}: {answer}", (question, label)
    assert kinds["colour"] and kinds["shape"]


def test_question_only_baselines(tmp_path):
    def record(question, answer, kind="shape"):
        return {"id": question + answer, "image": "x.png", "answer_type": kind,
                "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]}
    train = tmp_path / "train.json"
    train.write_text(json.dumps([record("what shape?", "circle"), record("what shape?", "circle"),
                                 record("what shape?", "square"), record("is it red?", "no", "yes/no")]))
    test = tmp_path / "test.json"
    test.write_text(json.dumps([record("what shape?", "circle"), record("what shape?", "square"),
                                record("is it red?", "yes", "yes/no"), record("unseen?", "circle")]))
    result = question_only_baselines(str(train), load_samples([str(test)]))
    # prior: circle, circle, no, (unseen -> majority "circle"): right on 1st and 4th
    assert result["question_only_prior"] == {"all": 0.5, "shape": 0.6667, "yes/no": 0.0}
    assert result["majority_answer"] == {"all": 0.5, "shape": 0.6667, "yes/no": 0.0}


@pytest.fixture
def fake_python(tmp_path):
    """A `python` on PATH that records train_llava.py's arguments instead of training."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.jsonl"
    (bin_dir / "python").write_text(f"""#!{sys.executable}
import json, subprocess, sys
if sys.argv[1:3] == ["-m", "llava.demo.smollm2"]:
    print("/cache/smollm2")
    open({str(log)!r}, "a").write(json.dumps(["smollm2"]) + "\\n")
elif sys.argv[1] == "train_llava.py":
    open({str(log)!r}, "a").write(json.dumps(sys.argv[2:]) + "\\n")
else:
    sys.exit(subprocess.call([{sys.executable!r}] + sys.argv[1:]))
""")
    (bin_dir / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return env, log


def flag(argv, name):
    """The value argparse will use: the last occurrence wins."""
    return [argv[i + 1] for i, a in enumerate(argv) if a == name][-1]


@pytest.mark.parametrize("script", ["run_stage1.sh", "run_stage2.sh"])
def test_stage_scripts_pass_overrides_through(script, fake_python):
    env, log = fake_python
    subprocess.run(["bash", script, "--output_dir", "/tmp/x", "--learning_rate", "3e-4", "--max_steps", "7"],
                   cwd=REPO, env=env, check=True)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    argv = calls[-1]
    assert flag(argv, "--output_dir") == "/tmp/x" and flag(argv, "--learning_rate") == "3e-4"
    assert flag(argv, "--max_steps") == "7" and flag(argv, "--freeze_language_model") == (
        "True" if script == "run_stage1.sh" else "False")
    if script == "run_stage1.sh":
        assert flag(argv, "--language_model_name_or_path") == "/cache/smollm2"
    else:
        assert flag(argv, "--model_name_or_path") == "output/demo/stage1"


def test_stage1_with_users_models_never_converts_smollm2(fake_python):
    env, log = fake_python
    subprocess.run(["bash", "run_stage1.sh", "--vision_model_name_or_path", "V", "--language_model_name_or_path", "L"],
                   cwd=REPO, env=env, check=True)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls[0] != ["smollm2"] and len(calls) == 1
    assert flag(calls[0], "--vision_model_name_or_path") == "V" and flag(calls[0], "--language_model_name_or_path") == "L"


def test_run_pipeline_defaults_to_the_demo_pipeline(fake_python):
    env, log = fake_python
    subprocess.run(["bash", "run_pipeline.sh", "--dry_run", "True"], cwd=REPO, env=env, check=True)
    argv = [json.loads(line) for line in log.read_text().splitlines()][-1]
    assert argv[0] == "configs/demo.yaml" and flag(argv, "--language_model_name_or_path") == "/cache/smollm2"
    assert flag(argv, "--dry_run") == "True"
    if os.path.isfile(os.path.join(REPO, "data/easy_vqa/meta.json")):
        assert "--image_folder" in argv
    subprocess.run(["bash", "run_pipeline.sh", "configs/llava_v1_5.yaml", "--output_dir", "o"], cwd=REPO, env=env,
                   check=True)
    argv = [json.loads(line) for line in log.read_text().splitlines()][-1]
    assert argv == ["configs/llava_v1_5.yaml", "--output_dir", "o"]  # a user's pipeline gets no demo flags


@pytest.mark.slow
def test_reduced_demo_pipeline_on_real_assets(easy_vqa, tmp_path):
    """`make demo`'s pipeline file, configs/demo.yaml, in 2 steps per stage on the real assets."""
    data, images = easy_vqa["dir"], easy_vqa["images"]
    tower = str(tmp_path / "tower")
    subprocess.run([sys.executable, "-m", "llava.demo.pretrain_vision", "--data_dir", str(data), "--output_dir",
                    tower, "--epochs", "1"], cwd=REPO, check=True)
    stage_data = {"align": "stage1_captions.json", "instruct": "stage2_single_turn.json",
                  "look": f"{data / 'stage2_yes_no_balanced.json'}:4,{data / 'stage2_single_turn.json'}:4"}
    overrides = []
    for stage, path in stage_data.items():
        overrides += [f"--{stage}.max_steps", "2", f"--{stage}.data_path", path if ":" in path else str(data / path)]
    command = [sys.executable, "train_llava.py", "configs/demo.yaml", "--image_folder", images,
               "--language_model_name_or_path", subprocess.run(
                   [sys.executable, "-m", "llava.demo.smollm2"], check=True, capture_output=True, text=True
               ).stdout.split()[-1],
               "--vision_model_name_or_path", tower, "--output_dir", str(tmp_path / "demo"),
               "--per_device_train_batch_size", "2", "--sample_data_path", str(data / "validation.json"),
               "--num_logged_samples", "2", *overrides]
    subprocess.run(command, cwd=REPO, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    with open(tmp_path / "demo" / "pipeline.json") as f:
        manifest = json.load(f)
    assert [stage["status"] for stage in manifest["stages"].values()] == ["done"] * 3
    assert_loads_and_generates(str(tmp_path / "demo" / "look"))
    again = subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
    log = again.stdout + again.stderr
    assert log.count("is done") == 3 and "Stage look done" not in log  # the same command again trains nothing


@pytest.mark.slow
def test_reduced_demo_end_to_end_on_real_assets(easy_vqa, tmp_path):
    """The real demo path in a few steps: SmolLM2 conversion, tower pretraining, both stage scripts, evaluate."""
    run = lambda *command: subprocess.run(list(command), cwd=REPO, check=True,  # noqa: E731
                                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    data, images = easy_vqa["dir"], easy_vqa["images"]
    tower = str(tmp_path / "tower")
    run(sys.executable, "-m", "llava.demo.pretrain_vision", "--data_dir", str(data), "--output_dir", tower,
        "--epochs", "1")
    common = ["--image_folder", images, "--max_steps", "2", "--per_device_train_batch_size", "2",
              "--sample_data_path", str(data / "test.json"), "--num_logged_samples", "2"]
    run("bash", "run_stage1.sh", "--vision_model_name_or_path", tower, "--data_path", str(data / "stage1_captions.json"),
        "--output_dir", str(tmp_path / "stage1"), *common)
    run("bash", "run_stage2.sh", "--model_name_or_path", str(tmp_path / "stage1"),
        "--data_path", str(data / "stage2_single_turn.json"), "--output_dir", str(tmp_path / "stage2"), *common)
    stage2 = str(tmp_path / "stage2")
    assert_loads_and_generates(stage2)
    processor = AutoProcessor.from_pretrained(stage2)
    assert PlainLlava.from_pretrained(stage2).config.text_config.num_hidden_layers == 30  # the real SmolLM2
    assert "<|im_start|>" in processor.chat_template
    out = subprocess.run([sys.executable, "-m", "llava.evaluate", "--model_name_or_path", stage2,
                          "--data_path", str(data / "test.json"), "--image_folder", images, "--max_samples", "4",
                          "--max_new_tokens", "3"], cwd=REPO, check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["num_samples"] == 4 and 0.0 <= result["accuracy"] <= 1.0
