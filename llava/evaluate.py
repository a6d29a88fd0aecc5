"""Accuracy of a checkpoint's greedy answers, and how much of it comes from the image (a blind control).

    python -m llava.evaluate --model_name_or_path DIR --data_path test.json --image_folder IMGS \
        [--max_samples N] [--batch_size B] [--output_file predictions.jsonl] [--log_dir runs/eval]

`--data_path` takes every form training reads (JSON/JSONL, parquet/arrow/`save_to_disk`, mixtures). Each sample's
last turn is the reference answer; the turns before it are the prompt. Answers are compared after normalisation
(case, surrounding whitespace and punctuation), with `--answer_after` on what follows its last occurrence; a
sample's optional `answer_type` field groups the figures. Every question is asked again with blank images
(`llava.model.evaluation`: why blank rather than masked); the gap sighted - blind per type says what the model takes
from the image. The last stdout line is one JSON object:
accuracy, per-type accuracies, the blind control's (`blind_accuracy_by_type`), the gaps, yes/no figures (precision,
recall, F1, yes-ratio, as POPE reports them), the most frequent mistakes, and the samples skipped because their
images could not be read (`skipped`, `skipped_ids`; each also named in a warning). `--output_file` is written as the
answers come, so a run that fails late keeps them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from PIL import Image

from llava.data.images import ImageReader, image_readers
from llava.data.mixture import read_mixture, select
from llava.data.records import iter_samples
from llava.data.types import DataError, Sample
from llava.model.evaluation import log_to_tensorboard, predict, prediction_writer, score
from llava.model.inference import Answerer, InferenceArguments, load_checked_image, load_for_inference
from llava.reporting import run_command
from llava.training.parsing import parse_flags

@dataclass
class EvaluateArguments:
    data_path: str = field(metadata={"help": "Questions with reference answers, in any form training reads (LLaVA "
                                             ".json/.jsonl, .parquet/.arrow, save_to_disk folders, comma-separated "
                                             "or with amounts, or a mixture file); each sample's last turn is the "
                                             "reference answer."})
    image_folder: str | None = field(default=None, metadata={"help": "Folder the samples' image paths are relative to."})
    max_samples: int | None = field(default=None, metadata={"help": "Evaluate the first N samples only."})
    batch_size: int = field(default=16, metadata={"help": "Questions answered together (left-padded)."})
    max_new_tokens: int = field(default=16, metadata={"help": "Longest answer, in tokens (greedy decoding)."})
    blind_control: bool = field(
        default=True, metadata={"help": "Also answer every question with blank images (the image processor's mean "
                                        "colour), and report sighted - blind per answer type. Doubles the time."})
    answer_after: str | None = field(
        default=None, metadata={"help": "Score only what follows the last occurrence of this text in each answer, "
                                        "for a model trained to give its reason first (the demo's \"blue: no\" is "
                                        "scored as \"no\" with ':'); --output_file keeps the whole answers."})
    output_file: str | None = field(
        default=None, metadata={"help": "Write one JSON line per sample, as the answers come: reference, prediction, "
                                        "correct (blind too)."})
    log_dir: str | None = field(
        default=None, metadata={"help": "Also log the figures to TensorBoard here (scalars, and a grid of images "
                                        "with question, answer and target), at the checkpoint's global step."})


def evaluation_samples(data_path: str, image_folder: str | None, max_samples: int | None = None
                       ) -> tuple[list[Sample], list[ImageReader]]:
    """The samples `data_path` names (a mixture's amounts drawn with seed 0), each ending with its reference
    answer, and one image reader per source. Raises `DataError` naming a malformed sample or one with no answer."""
    mixture = read_mixture(data_path, image_folder)
    samples = []
    for item in iter_samples(mixture.paths):
        if isinstance(item, DataError):
            raise item
        if item.messages[-1].role != "assistant":
            raise DataError(f"{item.describe()}: an evaluation sample must end with its reference answer (an "
                            "assistant turn).", kind="last_turn_not_assistant")
        samples.append(item)
    if any(source.amount for source in mixture.sources):
        samples = [samples[i] for i in select(mixture, samples, seed=0).indices]
    return (samples[:max_samples] if max_samples else samples), image_readers(mixture.paths, mixture.image_folders)


def evaluate(answerer: Answerer, samples: list[Sample], images: list[ImageReader], batch_size: int = 16,
             output_file: str | None = None, max_image_pixels: int | None = None, blind_control: bool = True,
             log_dir: str | None = None, step: int = 0, answer_after: str | None = None) -> dict:
    """Answer every sample (and, with `blind_control`, again blind) and score it (`llava.model.evaluation.score`);
    `images` holds one reader per source (`evaluation_samples`). Predictions are written to `output_file` batch by
    batch; a sample whose images cannot be read is skipped with a warning, and counted (`skipped`, `skipped_ids`).

    Raises:
        DataError: no sample could be answered (`predict`).
    """
    def images_of(sample: Sample) -> list[Image.Image]:
        return [load_checked_image(images[sample.source].file(reference, sample), sample,
                                   answerer.encoder.image_tokens, max_image_pixels) for reference in sample.images]

    with prediction_writer(output_file) as write:
        answers = predict(answerer, samples, images_of, batch_size, blind=blind_control, answer_after=answer_after,
                          on_batch=write)
    result = {**score(answers.predictions), "skipped": len(answers.skipped), "skipped_ids": answers.skipped}
    if log_dir:
        log_to_tensorboard(log_dir, result, answers.predictions, answers.samples, images_of, step)
    return result


def _global_step(path: str) -> int:
    """The checkpoint's training step (its trainer_state.json), 0 when it has none (a hub checkpoint)."""
    try:
        with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as f:
            return int(json.load(f)["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def main(argv: list[str] | None = None) -> dict:
    model_args, args = parse_flags((InferenceArguments, EvaluateArguments), argv)
    samples, images = evaluation_samples(args.data_path, args.image_folder, args.max_samples)
    model, processor = load_for_inference(model_args.model_name_or_path, model_args.dtype)
    result = evaluate(Answerer(model, processor, args.max_new_tokens), samples, images, args.batch_size,
                      args.output_file, model_args.max_image_pixels, args.blind_control, args.log_dir,
                      _global_step(model_args.model_name_or_path), args.answer_after)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run_command(main)
