"""How well a checkpoint answers, and whether it looks at the image to do so: accuracy per answer type, the same
questions answered blind, POPE-style yes/no figures and the most frequent mistakes.

The blind control replaces every image by one of the same size filled with the image processor's mean colour
(which it normalises to zero): the prompt, its image tokens and their positions stay exactly what the model saw in
training, and only what the image shows is gone. Masking the image tokens instead would hand the model an attention
pattern it never trained on, so a drop could come from that rather than from the missing picture. The gap
sighted - blind per answer type is what the model takes from the image; a gap near 0 means it answers from the
question alone (its prior).

A model trained to name what it sees before it answers ("blue: no" to "is there a red shape?") is scored on its final
answer, what follows the last `answer_after` ("no"); the whole generated text is kept beside it (`output`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import string
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from llava.data.types import DataError, Sample
from llava.model.inference import Answerer

logger = logging.getLogger(__name__)

CARD_WIDTH, IMAGE_SIDE, LINE_HEIGHT = 320, 160, 14
YES, NO = "yes", "no"


def normalize(answer: str) -> str:
    """An answer as compared: lower case, surrounding whitespace and punctuation removed, spaces collapsed."""
    return " ".join(answer.lower().strip().strip(string.punctuation + " ").split())


def final_answer(text: str, answer_after: str | None) -> str:
    """What is scored of a generated `text`: all of it, or what follows the last `answer_after` in it (all of it when
    it has none: an answer that gives no reason, "blue")."""
    return text.rsplit(answer_after, 1)[-1].strip() if answer_after else text


@dataclass
class Prediction:
    """One evaluated sample: its reference and the answers with (`prediction`) and without (`blind`) its images; with
    `answer_after`, `output` and `blind_output` hold the whole generated texts those answers were taken from."""

    id: str
    answer_type: str
    reference: str
    prediction: str
    correct: bool
    blind: str | None = None
    blind_correct: bool | None = None
    output: str | None = None
    blind_output: str | None = None


def blank_like(image: Image.Image, image_processor) -> Image.Image:
    """An image of `image`'s size filled with `image_processor`'s mean colour: the blind control's stand-in."""
    mean = getattr(image_processor, "image_mean", None) or [0.5, 0.5, 0.5]
    return Image.new("RGB", image.size, tuple(int(round(255 * value)) for value in mean[:3]))


@dataclass
class Answers:
    """What `predict` gives: one prediction per answered sample (`samples[i]` answered by `predictions[i]`), and the
    ids of the samples left out because their images could not be read (`skipped`)."""

    predictions: list[Prediction]
    samples: list[Sample]
    skipped: list[str]


def predict(answerer: Answerer, samples: list[Sample], images_of: Callable[[Sample], list[Image.Image]],
            batch_size: int = 16, blind: bool = True, answer_after: str | None = None,
            on_batch: Callable[[list[Prediction]], None] | None = None) -> Answers:
    """Answer every sample (last turn: the reference; the turns before: the prompt), and again with blank images
    when `blind`, in batches; each answer scored on its `final_answer`, each batch's predictions handed to
    `on_batch` as soon as they are made (`prediction_writer`: a late failure keeps what was answered).

    A sample whose images `images_of` cannot read (a `DataError`: truncated, missing, not an image) is skipped with
    a warning naming it, and counted: one bad image must not cost the answers to all the others.

    Raises:
        DataError: no sample could be answered (a wrong --image_folder, say), naming the first one's problem.
    """
    answers = Answers([], [], [])
    blank = answerer.processor.image_processor
    first_problem = None
    for start in tqdm(range(0, len(samples), batch_size), desc="evaluating", unit="batch"):
        batch, images = [], []
        for sample in samples[start: start + batch_size]:
            try:
                images.append(images_of(sample))
            except DataError as error:
                logger.warning("skipped (left out of the figures, counted in 'skipped'): %s", error)
                answers.skipped.append(sample.id)
                first_problem = first_problem if first_problem is not None else error
                continue
            batch.append(sample)
        if not batch:
            continue
        prompts = [s.messages[:-1] for s in batch]
        outputs = answerer.answer(prompts, images)
        blind_outputs = answerer.answer(prompts, [[blank_like(i, blank) for i in row] for row in images]) \
            if blind else [None] * len(batch)
        predictions = [_prediction(*row, answer_after) for row in zip(batch, outputs, blind_outputs)]
        answers.predictions.extend(predictions)
        answers.samples.extend(batch)
        if on_batch is not None:
            on_batch(predictions)
    if samples and not answers.predictions:
        raise DataError(f"none of the {len(samples)} samples could be answered; the first: {first_problem}",
                        kind=first_problem.kind)
    return answers


def _prediction(sample: Sample, output: str, blind_output: str | None, answer_after: str | None) -> Prediction:
    """`sample`'s prediction from the generated texts, sighted and blind (None without the blind control)."""
    reference = sample.messages[-1].content
    answer = final_answer(output, answer_after)
    blind_answer = None if blind_output is None else final_answer(blind_output, answer_after)
    return Prediction(
        id=sample.id, answer_type=str(sample.metadata.get("answer_type", "all")), reference=reference,
        prediction=answer, correct=normalize(answer) == normalize(reference), blind=blind_answer,
        blind_correct=None if blind_answer is None else normalize(blind_answer) == normalize(reference),
        output=output if answer_after else None, blind_output=blind_output if answer_after else None)


def _rate(hits: list[bool]) -> float:
    return round(sum(hits) / len(hits), 4) if hits else 0.0


def _by_type(predictions: list[Prediction], field: str) -> dict[str, float]:
    types = sorted({p.answer_type for p in predictions} - {"all"})
    return {t: _rate([getattr(p, field) for p in predictions if p.answer_type == t]) for t in types}


def yes_no_figures(predictions: list[Prediction]) -> dict | None:
    """Over the samples whose reference is yes or no, as POPE reports them ("yes" the positive class): accuracy,
    precision, recall, F1 and the share of "yes" answers (a model that ignores the image drifts towards one answer;
    a balanced test set has a yes-ratio near its share of "yes" references), blind too. None without such samples."""
    rows = [p for p in predictions if normalize(p.reference) in (YES, NO)]
    if not rows:
        return None

    def figures(answer_of: Callable[[Prediction], str]) -> dict:
        said = [normalize(answer_of(p)) == YES for p in rows]
        truth = [normalize(p.reference) == YES for p in rows]
        true_positive = sum(s and t for s, t in zip(said, truth))
        precision = true_positive / sum(said) if any(said) else 0.0
        recall = true_positive / sum(truth) if any(truth) else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        correct = [normalize(answer_of(p)) == normalize(p.reference) for p in rows]
        return {"accuracy": _rate(correct), "precision": round(precision, 4), "recall": round(recall, 4),
                "f1": round(f1, 4), "yes_ratio": _rate(said)}

    result = {"num_samples": len(rows), "reference_yes_ratio": _rate([normalize(p.reference) == YES for p in rows]),
              **figures(lambda p: p.prediction)}
    if rows[0].blind is not None:
        result["blind"] = figures(lambda p: p.blind)
    return result


def score(predictions: list[Prediction], confusions: int = 10) -> dict:
    """Accuracy overall and per answer type; with blind answers, the blind control's figures and the gap sighted -
    blind per type; yes/no figures (`yes_no_figures`); the `confusions` most frequent (reference, prediction) pairs
    among wrong answers."""
    result = {"accuracy": _rate([p.correct for p in predictions]), "num_samples": len(predictions),
              "accuracy_by_type": _by_type(predictions, "correct"),
              "num_samples_by_type": dict(sorted(Counter(p.answer_type for p in predictions
                                                         if p.answer_type != "all").items()))}
    if predictions and predictions[0].blind is not None:
        blind_by_type = _by_type(predictions, "blind_correct")
        result["blind_accuracy"] = _rate([p.blind_correct for p in predictions])
        result["blind_accuracy_by_type"] = blind_by_type
        result["gap_by_type"] = {t: round(result["accuracy_by_type"][t] - blind_by_type[t], 4) for t in blind_by_type}
        result["gap"] = round(result["accuracy"] - result["blind_accuracy"], 4)
    yes_no = yes_no_figures(predictions)
    if yes_no is not None:
        result["yes_no"] = yes_no
    mistakes = Counter((normalize(p.reference), normalize(p.prediction)) for p in predictions if not p.correct)
    result["most_frequent_mistakes"] = [{"reference": r, "prediction": a, "count": n}
                                        for (r, a), n in mistakes.most_common(confusions)]
    return result


@contextlib.contextmanager
def prediction_writer(path: str | None) -> Iterator[Callable[[list[Prediction]], None]]:
    """A function that appends predictions to `path` as JSON lines (id, answer_type, reference, prediction,
    correct; the blind ones, the outputs), flushed at once, so a run that fails or is killed later keeps them; one
    that writes nothing when `path` is None."""
    if path is None:
        yield lambda predictions: None
        return
    with open(path, "w", encoding="utf-8") as f:
        def write(predictions: list[Prediction]) -> None:
            f.writelines(json.dumps(asdict(p)) + "\n" for p in predictions)
            f.flush()

        yield write


def sample_card(image: Image.Image | None, lines: list[str]) -> Image.Image:
    """The image, enlarged, above lines of text (question, answer, truth), as one picture for TensorBoard."""
    card = Image.new("RGB", (CARD_WIDTH, IMAGE_SIDE + 8 + LINE_HEIGHT * len(lines)), "white")
    if image is not None:
        card.paste(image.resize((IMAGE_SIDE, IMAGE_SIDE)), ((CARD_WIDTH - IMAGE_SIDE) // 2, 0))
    draw = ImageDraw.Draw(card)
    for row, line in enumerate(lines):
        draw.text((4, IMAGE_SIDE + 4 + row * LINE_HEIGHT), line[:52], fill="black")
    return card


def card_grid(cards: list[Image.Image], columns: int = 4) -> np.ndarray:
    """`cards` tiled into one (H, W, 3) uint8 picture, `columns` a row."""
    width, height = CARD_WIDTH, max(card.height for card in cards)
    rows = -(-len(cards) // columns)
    grid = Image.new("RGB", (width * min(columns, len(cards)), height * rows), "white")
    for index, card in enumerate(cards):
        grid.paste(card, ((index % columns) * width, (index // columns) * height))
    return np.asarray(grid)


def log_to_tensorboard(log_dir: str, result: dict, predictions: list[Prediction], samples: list[Sample],
                       images_of: Callable[[Sample], list[Image.Image]], step: int = 0, num_cards: int = 16) -> None:
    """The figures as scalars (`eval/...`), and the first `num_cards` samples as one grid of cards (image,
    question, answer, target; blind answer too), at `step` (a checkpoint's global step)."""
    from torch.utils.tensorboard import SummaryWriter  # only when asked for: it costs start-up time

    scalars = {"accuracy": result["accuracy"], **{f"accuracy/{t}": v for t, v in result["accuracy_by_type"].items()}}
    if "blind_accuracy" in result:
        scalars.update({"blind_accuracy": result["blind_accuracy"], "gap": result["gap"],
                        **{f"blind_accuracy/{t}": v for t, v in result["blind_accuracy_by_type"].items()},
                        **{f"gap/{t}": v for t, v in result["gap_by_type"].items()}})
    for key in ("precision", "recall", "f1", "yes_ratio"):
        if key in result.get("yes_no", {}):
            scalars[f"yes_no/{key}"] = result["yes_no"][key]
    os.makedirs(log_dir, exist_ok=True)
    writer = SummaryWriter(log_dir)
    try:
        for name, value in scalars.items():
            writer.add_scalar(f"eval/{name}", value, step)
        cards = []
        for sample, prediction in list(zip(samples, predictions))[:num_cards]:
            images = images_of(sample)
            question = sample.messages[-2].content.replace("<image>", "").strip()
            lines = [f"Q: {question}", f"model: {prediction.output or prediction.prediction}",
                     f"truth: {prediction.reference}"]
            if prediction.blind is not None:
                lines.append(f"blind: {prediction.blind_output or prediction.blind}")
            cards.append(sample_card(images[0] if images else None, lines))
        if cards:
            writer.add_image("eval/samples", card_grid(cards), step, dataformats="HWC")
        writer.add_text("eval/result", "```\n" + json.dumps(result, indent=1) + "\n```", step)
    finally:
        writer.close()
