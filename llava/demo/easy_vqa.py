#!/usr/bin/env python
"""Convert easy-VQA (PyPI `easy-vqa==1.0`) into LLaVA-format JSON for the two-stage demo.

Writes to --output_dir:
  stage1_captions.json  one sample per train image: "<image>\\nDescribe the image." -> "A red circle."
  stage2_instruct.json  one multi-turn conversation per train image holding all of its questions
  stage2_single_turn.json  every train question as its own sample, shuffled (what the demo's stage 2 uses)
  stage2_yes_no_balanced.json  the train yes/no questions with as many "yes" as "no" answers per question text
  stage2_single_turn_reasoned.json, stage2_yes_no_balanced_reasoned.json  the same two, each yes/no answer preceded
                        by what the image shows of the colour or shape asked about ("blue: no"; what configs/demo.yaml
                        trains on; `llava.evaluate --answer_after ":"` scores the answer after the colon)
  validation.json       single-turn questions on held-out train images (every 10th), to select recipes on
  test.json             single-turn test samples with extra fields `answer` and `answer_type`
  image_labels.json     colour and shape of every train/test image (used by llava.demo.pretrain_vision)
  meta.json             the --image_folder to pass (the installed easy_vqa data folder) and counts

Images are not copied: sample paths ("train/images/0.png") are relative to the easy_vqa package's data
folder, recorded in meta.json. Output is deterministic (fixed order, fixed sampling seed).

easy-VQA has no per-image labels, so each image's colour and shape are read from its questions:
wh-answers ("what color is the triangle?" -> blue), then yes/no facts ("is there not a red shape?" ->
"no" means red), then elimination. Images still unknown fall back to the pixels: the shape is drawn in
one exact palette colour, and the fraction of its bounding box it fills separates triangles (~0.5),
circles (~0.8) and axis-aligned rectangles (~1.0). Pixels are checked against questions on every image.

Usage: python -m llava.demo.easy_vqa --output_dir data/easy_vqa [--num_test N] [--max_images N]
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import easy_vqa
import numpy as np
from PIL import Image
from tqdm import tqdm
from transformers import HfArgumentParser

COLOURS = ("red", "green", "blue", "yellow", "teal", "brown", "gray", "black")
SHAPES = ("circle", "rectangle", "triangle")
# Exact RGB of each easy-VQA shape colour (the generator draws the shape flat in one of these).
PALETTE = {
    (255, 0, 0): "red",
    (0, 255, 0): "green",
    (0, 0, 255): "blue",
    (255, 255, 0): "yellow",
    (0, 128, 128): "teal",
    (165, 42, 42): "brown",
    (128, 128, 128): "gray",
    (0, 0, 0): "black",
}
# Bounding-box fill ratio ranges measured on the 4,791 train+test images whose shape the questions give:
# triangle 0.50-0.66, circle 0.74-0.91, rectangle 0.96-1.00.
TRIANGLE_MAX_FILL = 0.70
CIRCLE_MAX_FILL = 0.93
CAPTION_PROMPT = "Describe the image."
TRAIN_SHUFFLE_SEED = 0
TEST_SAMPLE_SEED = 0
BALANCE_SEED = 0
# Reasoned yes/no answers: "<the image's colour or shape>: <yes|no>".
REASON_SEPARATOR = ":"
# Every 10th train image (400 of 4,000) is held out of every training file and of the tower's pretraining: recipes
# are chosen on its questions, never on the test split's.
VALIDATION_EVERY = 10

Labels = dict[str, str | None]


def answer_type(answer: str) -> str:
    """easy-VQA's 13 answers are yes/no, a colour or a shape; the answer alone decides the type."""
    if answer in ("yes", "no"):
        return "yes/no"
    if answer in COLOURS:
        return "colour"
    if answer in SHAPES:
        return "shape"
    raise ValueError(f"unexpected easy-VQA answer {answer!r}")


def _mentioned(words: tuple[str, ...], text: str) -> list[str]:
    return [w for w in words if re.search(rf"\b{w}\b", text)]


def labels_from_questions(qas: list[tuple[str, str]]) -> Labels:
    """Colour and shape implied by one image's (question, answer) pairs; None where they do not say.

    Negated questions ("is there not ...", "is no ... present?") flip the meaning of the yes/no answer.
    """
    found: Labels = {"colour": None, "shape": None}
    ruled_out: dict[str, set[str]] = {"colour": set(), "shape": set()}
    for question, answer in qas:
        colours, shapes = _mentioned(COLOURS, question), _mentioned(SHAPES, question)
        kind = answer_type(answer)
        if kind == "colour":  # "what color is the shape/<shape>?"
            found["colour"] = answer
            found["shape"] = found["shape"] or (shapes[0] if shapes else None)
        elif kind == "shape":  # "what shape is present?" / "what is the <colour> shape?"
            found["shape"] = answer
            found["colour"] = found["colour"] or (colours[0] if colours else None)
        else:
            present = (answer == "yes") != bool(re.search(r"\b(not|no)\b", question))
            for key, mentioned in (("colour", colours), ("shape", shapes)):
                if present and mentioned:
                    found[key] = found[key] or mentioned[0]
                elif not present:
                    ruled_out[key].update(mentioned)
    for key, candidates in (("colour", COLOURS), ("shape", SHAPES)):
        left = set(candidates) - ruled_out[key]
        if found[key] is None and len(left) == 1:
            found[key] = left.pop()
    return found


def labels_from_pixels(path: str) -> Labels:
    """Colour and shape read from the image.

    The background is the most frequent RGB value and the shape's colour the most frequent palette
    colour after it. Each pixel's share of shape colour (its projection on the background->shape colour
    line) gives a mask that ignores anti-aliasing; the share of the mask's bounding box that it covers
    tells the shape. (A fixed RGB tolerance instead misread 6x6-pixel gray triangles as circles.)
    """
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(np.float64)
    values, counts = np.unique(pixels.reshape(-1, 3).astype(np.int64), axis=0, return_counts=True)
    by_count = [tuple(int(c) for c in values[k]) for k in np.argsort(-counts, kind="stable")]
    background, others = by_count[0], by_count[1:]
    rgb = next((v for v in others if v in PALETTE), None)
    if rgb is None:
        return {"colour": None, "shape": None}
    direction = np.array(rgb) - np.array(background)
    mask = (pixels - np.array(background)) @ direction / (direction @ direction) > 0.5
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
    shape = "triangle" if fill < TRIANGLE_MAX_FILL else "circle" if fill < CIRCLE_MAX_FILL else "rectangle"
    return {"colour": PALETTE[rgb], "shape": shape}


def load_split(split: str, max_images: int | None) -> tuple[list[tuple[str, str, int]], dict[int, str]]:
    """(question, answer, image_id) triples and {image_id: absolute path}, limited to the first image ids."""
    questions, answers, image_ids = getattr(easy_vqa, f"get_{split}_questions")()
    paths = getattr(easy_vqa, f"get_{split}_image_paths")()
    kept = sorted(paths)[:max_images] if max_images else sorted(paths)
    paths = {i: paths[i] for i in kept}
    triples = [(q, a, i) for q, a, i in zip(questions, answers, image_ids) if i in paths]
    return triples, paths


def questions_by_image(triples: list[tuple[str, str, int]]) -> dict[int, list[tuple[str, str]]]:
    """{image_id: [(question, answer), ...]} in easy-VQA's order."""
    per_image: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for question, answer, image_id in triples:
        per_image[image_id].append((question, answer))
    return per_image


def image_labels(
    split: str, triples: list[tuple[str, str, int]], paths: dict[int, str]
) -> tuple[dict[int, Labels], Counter]:
    """Labels per image (questions first, pixels for what they leave open) and counts of where they came from.

    Pixels are computed for every image so that the pixel rule is checked against the questions; any
    disagreement is counted (it is 0 on easy-VQA 1.0).
    """
    per_image = questions_by_image(triples)
    labels, stats = {}, Counter()
    for image_id in tqdm(sorted(paths), desc=f"{split} labels", unit="img"):
        from_questions = labels_from_questions(per_image[image_id])
        from_pixels = labels_from_pixels(paths[image_id])
        labels[image_id] = {}
        for key in ("colour", "shape"):
            q, p = from_questions[key], from_pixels[key]
            stats[f"{key}_from_questions" if q else f"{key}_from_pixels" if p else f"{key}_unknown"] += 1
            stats[f"{key}_pixels_disagree"] += bool(q and p and q != p)
            labels[image_id][key] = q or p
    return labels, stats


def sample(sample_id: str, image: str, turns: list[tuple[str, str]]) -> dict:
    """A LLaVA-format sample; the image placeholder opens the first user turn only."""
    conversations = []
    for k, (question, answer) in enumerate(turns):
        conversations.append({"from": "human", "value": f"<image>\n{question}" if k == 0 else question})
        conversations.append({"from": "gpt", "value": answer})
    return {"id": sample_id, "image": image, "conversations": conversations}


def relative_image(split: str, image_id: int) -> str:
    return f"{split}/images/{image_id}.png"


def caption(labels: Labels) -> str:
    return f"A {labels['colour'] or 'coloured'} {labels['shape'] or 'shape'}."


def stage1_samples(labels: dict[int, Labels]) -> list[dict]:
    return [
        sample(f"train_caption_{i}", relative_image("train", i), [(CAPTION_PROMPT, caption(labels[i]))])
        for i in sorted(labels)
    ]


def stage2_samples(triples: list[tuple[str, str, int]]) -> list[dict]:
    """All questions of one image in one conversation (in easy-VQA's order): the image tokens are then paid
    for once per image instead of once per question."""
    per_image = questions_by_image(triples)
    return [sample(f"train_qa_{i}", relative_image("train", i), per_image[i]) for i in sorted(per_image)]


def stage2_single_turn_samples(triples: list[tuple[str, str, int]]) -> list[dict]:
    """One question per sample, in a fixed shuffled order. Dearer per answer than `stage2_samples` (the image
    and prompt are paid for each question), but no answer can be read off an earlier turn ("what colour is
    it?" -> "blue", then "is there a blue shape?"): the model has to look at the image, as it must at test time."""
    records = [sample(f"train_qa_{k}", relative_image("train", image_id), [(question, answer)])
               for k, (question, answer, image_id) in enumerate(triples)]
    random.Random(TRAIN_SHUFFLE_SEED).shuffle(records)
    return records


def balanced_yes_no_samples(triples: list[tuple[str, str, int]]) -> list[dict]:
    """The yes/no questions, with per question text as many "yes" as "no" answers (the rarer answer's questions
    all, the other's drawn to the same count), shuffled.

    In easy-VQA the answer to a yes/no question is mostly fixed by its text ("is there a red shape?" is "no" for
    7 of 8 images): on the plain questions a model reaches the question-only prior (85 %) without looking. Here
    the text says nothing about the answer, so only the image can."""
    by_text: dict[str, dict[str, list[int]]] = defaultdict(lambda: {"yes": [], "no": []})
    for k, (question, answer, _) in enumerate(triples):
        if answer in ("yes", "no"):
            by_text[question][answer].append(k)
    rng = random.Random(BALANCE_SEED)
    chosen = []
    for question in sorted(by_text):
        yes, no = by_text[question]["yes"], by_text[question]["no"]
        count = min(len(yes), len(no))
        chosen += rng.sample(yes, count) + rng.sample(no, count)
    records = [sample(f"train_qa_{k}", relative_image("train", triples[k][2]), [triples[k][:2]]) for k in chosen]
    rng.shuffle(records)
    return records


def reasoned(record: dict, labels: Labels) -> dict:
    """A single-question `record` whose yes/no answer first names the image's colour, or its shape, whichever the
    question asks about: "is there not a red shape?" -> "blue: yes". Other answers, and images whose label is
    unknown, stay as they are.

    Straight from the image features, the yes/no logic was not learnt in the demo's few steps (yes/no stayed at the
    question-only prior: the model did not look). Naming the colour first is a colour question, which it answers
    from the image at 95-100 %, and the answer is then a comparison of two words of its text."""
    question, answer = record["conversations"]
    attribute = labels["colour"] if _mentioned(COLOURS, question["value"]) else labels["shape"]
    if answer["value"] not in ("yes", "no") or attribute is None:
        return record
    reasoned_answer = {**answer, "value": f"{attribute}{REASON_SEPARATOR} {answer['value']}"}
    return {**record, "conversations": [question, reasoned_answer]}


def held_out_images(triples: list[tuple[str, str, int]], paths: dict[int, str]):
    """(train triples, train paths), (validation triples, validation paths): every VALIDATION_EVERY-th image."""
    held = {i for i in paths if i % VALIDATION_EVERY == VALIDATION_EVERY - 1}
    return (([t for t in triples if t[2] not in held], {i: p for i, p in paths.items() if i not in held}),
            ([t for t in triples if t[2] in held], {i: p for i, p in paths.items() if i in held}))


def test_samples(triples: list[tuple[str, str, int]], num_test: int | None, split: str = "test") -> list[dict]:
    """Single-question samples; `num_test` draws a fixed-seed random subset (easy-VQA lists questions
    image by image, so the first N would cover only ~N/10 images). `split`: whose images ("train" for
    the validation questions)."""
    indices = range(len(triples))
    if num_test is not None and num_test < len(triples):
        indices = sorted(random.Random(TEST_SAMPLE_SEED).sample(indices, num_test))
    records = []
    for k in indices:
        question, answer, image_id = triples[k]
        name = "test" if split == "test" else "validation"
        record = sample(f"{name}_{k}", relative_image(split, image_id), [(question, answer)])
        records.append({**record, "answer": answer, "answer_type": answer_type(answer)})
    return records


def label_records(split: str, labels: dict[int, Labels]) -> list[dict]:
    return [{"image": relative_image(split, i), **labels[i]} for i in sorted(labels)]


def write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n")


@dataclass
class PrepareArguments:
    output_dir: Path = field(metadata={"help": "Where the LLaVA JSON files and meta.json are written."})
    num_test: int | None = field(default=None, metadata={"help": "Test questions to keep (default: all 9,673)."})
    max_images: int | None = field(default=None, metadata={"help": "Use only the first N images of each split."})


def main(argv: list[str] | None = None) -> None:
    (args,) = HfArgumentParser(PrepareArguments).parse_args_into_dataclasses(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)

    (train, train_paths), (validation, validation_paths) = held_out_images(*load_split("train", args.max_images))
    test, test_paths = load_split("test", args.max_images)
    train_labels, train_stats = image_labels("train", train, train_paths)
    validation_labels, _ = image_labels("validation", validation, validation_paths)
    test_labels, test_stats = image_labels("test", test, test_paths)
    tests = test_samples(test, args.num_test)
    validations = test_samples(validation, args.num_test, split="train")

    write_json(args.output_dir / "stage1_captions.json", stage1_samples(train_labels))
    write_json(args.output_dir / "stage2_instruct.json", stage2_samples(train))
    labels_by_image = {relative_image("train", i): labels for i, labels in train_labels.items()}
    for name, records in (("stage2_single_turn", stage2_single_turn_samples(train)),
                          ("stage2_yes_no_balanced", balanced_yes_no_samples(train))):
        write_json(args.output_dir / f"{name}.json", records)
        write_json(args.output_dir / f"{name}_reasoned.json",
                   [reasoned(record, labels_by_image[record["image"]]) for record in records])
    write_json(args.output_dir / "validation.json", validations)
    write_json(args.output_dir / "test.json", tests)
    write_json(
        args.output_dir / "image_labels.json",
        {"train": label_records("train", train_labels), "validation": label_records("train", validation_labels),
         "test": label_records("test", test_labels)},
    )
    image_folder = str(Path(easy_vqa.__file__).resolve().parent / "data")
    meta = {
        "image_folder": image_folder,
        "easy_vqa_version": version("easy-vqa"),
        "train_images": len(train_paths),
        "train_questions": len(train),
        "validation_images": len(validation_paths),
        "validation_questions": len(validations),
        "test_images": len(test_paths),
        "test_questions": len(tests),
        "test_answer_types": dict(Counter(r["answer_type"] for r in tests)),
        "train_label_sources": dict(train_stats),
        "test_label_sources": dict(test_stats),
    }
    write_json(args.output_dir / "meta.json", meta)
    print(json.dumps(meta, indent=1))
    print(f"wrote {args.output_dir}; pass --image_folder {image_folder}")


if __name__ == "__main__":
    main()
