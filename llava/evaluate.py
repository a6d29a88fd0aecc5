"""Accuracy of a checkpoint's greedy answers on LLaVA-format question/answer samples.

    python -m llava.evaluate --model_name_or_path DIR --data_path test.json --image_folder IMGS \
        [--max_samples N] [--batch_size B] [--output_file predictions.jsonl]

Each sample's last turn is the reference answer; the turns before it are the prompt. Answers are compared
after normalisation (case, surrounding whitespace and punctuation). A sample's optional `answer_type` field
groups the accuracy. The last stdout line is one JSON object: accuracy, num_samples, per-type figures.
"""

from __future__ import annotations

import json
import string
from collections import defaultdict
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from llava.data.images import load_image, resolve_image_path
from llava.data.records import load_samples
from llava.data.types import Sample
from llava.model.inference import Answerer, InferenceArguments, load_for_inference
from llava.reporting import run_command
from llava.training.parsing import parse_flags


def normalize(answer: str) -> str:
    return " ".join(answer.lower().strip().strip(string.punctuation + " ").split())


def evaluate(answerer: Answerer, samples: list[Sample], image_folder: str | None, batch_size: int = 16,
             output_file: str | None = None, max_image_pixels: int | None = None) -> dict:
    """Answer every sample and return the accuracy overall and per `answer_type`."""
    correct, total = defaultdict(int), defaultdict(int)
    predictions = open(output_file, "w", encoding="utf-8") if output_file else None
    try:
        for start in tqdm(range(0, len(samples), batch_size), desc="evaluating", unit="batch"):
            batch = samples[start: start + batch_size]
            images = [[load_image(resolve_image_path(image_folder, path, s), max_image_pixels) for path in s.images]
                      for s in batch]
            answers = answerer.answer([s.messages[:-1] for s in batch], images)
            for sample, answer in zip(batch, answers):
                reference = sample.messages[-1].content
                is_correct = normalize(answer) == normalize(reference)
                answer_type = sample.metadata.get("answer_type", "all")
                for key in {"all", answer_type}:
                    total[key] += 1
                    correct[key] += is_correct
                if predictions:
                    predictions.write(json.dumps({"id": sample.id, "answer_type": answer_type, "reference": reference,
                                                  "prediction": answer, "correct": is_correct}) + "\n")
    finally:
        if predictions:
            predictions.close()
    by_type = {key: correct[key] / total[key] for key in sorted(total) if key != "all"}
    return {"accuracy": correct["all"] / max(total["all"], 1), "num_samples": total["all"],
            "accuracy_by_type": by_type, "num_samples_by_type": {key: total[key] for key in by_type}}


def evaluation_samples(data_path: str, max_samples: int | None) -> list[Sample]:
    samples = load_samples([p for p in data_path.split(",") if p])
    unanswered = [s.describe() for s in samples if s.messages[-1].role != "assistant"]
    if unanswered:
        raise ValueError(f"Evaluation samples must end with the reference answer (an assistant turn): "
                         f"{', '.join(unanswered[:5])}")
    return samples[:max_samples] if max_samples else samples


@dataclass
class EvaluateArguments:
    data_path: str = field(metadata={"help": "LLaVA .json/.jsonl file(s), comma-separated; each sample's last turn "
                                             "is the reference answer."})
    image_folder: str | None = field(default=None, metadata={"help": "Folder the samples' image paths are relative to."})
    max_samples: int | None = field(default=None, metadata={"help": "Evaluate the first N samples only."})
    batch_size: int = field(default=16, metadata={"help": "Questions answered together (left-padded)."})
    max_new_tokens: int = field(default=16, metadata={"help": "Longest answer, in tokens (greedy decoding)."})
    output_file: str | None = field(
        default=None, metadata={"help": "Write one JSON line per sample: reference, prediction, correct."})


def main(argv: list[str] | None = None) -> dict:
    model_args, args = parse_flags((InferenceArguments, EvaluateArguments), argv)
    samples = evaluation_samples(args.data_path, args.max_samples)
    model, processor = load_for_inference(model_args.model_name_or_path, model_args.dtype)
    result = evaluate(Answerer(model, processor, args.max_new_tokens), samples, args.image_folder, args.batch_size,
                      args.output_file, model_args.max_image_pixels)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run_command(main)
