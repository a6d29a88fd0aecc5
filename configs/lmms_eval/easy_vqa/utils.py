"""lmms-eval hooks of the `easy_vqa_llava` task: the question, image and reference of a LLaVA JSON sample, and the
score `python -m llava.evaluate` gives its answer.

Runs inside lmms-eval's environment, which need not hold train_llava: `normalize` and `final_answer` repeat
`llava.model.evaluation`'s (tests/test_lmms_eval_score.py checks that they agree). With $LLAVA_LMMS_EVAL_ANSWER_AFTER
set (llava.lmms_eval_score --answer_after), an answer is scored on what follows its last occurrence, as
`llava.evaluate --answer_after` scores it (the demo's "blue: no" as "no"). Image paths are
relative to the folder named by $LLAVA_LMMS_EVAL_IMAGE_FOLDER, else to the installed easy_vqa package's data folder
(where `python -m llava.demo.easy_vqa` points its --image_folder).
"""

from __future__ import annotations

import os
import string

from PIL import Image, ImageOps

IMAGE_FOLDER_VARIABLE = "LLAVA_LMMS_EVAL_IMAGE_FOLDER"
ANSWER_AFTER_VARIABLE = "LLAVA_LMMS_EVAL_ANSWER_AFTER"
# Accuracy per answer type (a sample's `answer_type` field), beside `exact_match` over all samples.
TYPE_METRICS = {"yes/no": "yes_no_accuracy", "colour": "colour_accuracy", "shape": "shape_accuracy"}
# LLaVA JSON's roles as chat templates name them, and its image placeholder.
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE = "<image>"


def normalize(answer: str) -> str:
    """An answer as compared: lower case, surrounding whitespace and punctuation removed, spaces collapsed."""
    return " ".join(answer.lower().strip().strip(string.punctuation + " ").split())


def final_answer(text: str, answer_after: str | None) -> str:
    """What is scored of a generated `text`: all of it, or what follows the last `answer_after` in it."""
    return text.rsplit(answer_after, 1)[-1].strip() if answer_after else text


def _image_folder() -> str:
    folder = os.environ.get(IMAGE_FOLDER_VARIABLE)
    if folder:
        return folder
    import easy_vqa  # the demo's data; only needed when no folder is given

    return os.path.join(os.path.dirname(os.path.abspath(easy_vqa.__file__)), "data")


def _turns(doc: dict) -> list[tuple[str, str]]:
    """(role, text) of every turn, roles as chat templates name them; the last must be the reference answer."""
    turns = [(ROLES.get(turn["from"], turn["from"]), turn["value"]) for turn in doc["conversations"]]
    if not turns or turns[-1][0] != "assistant" or any(role not in ROLES.values() for role, _ in turns):
        raise ValueError(f"sample {doc.get('id')!r}: expected user/assistant/system turns ending with the reference "
                         f"answer, got roles {[turn['from'] for turn in doc['conversations']]}")
    return turns


def _rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB, transparency composited over white, as `llava.data.images.to_rgb` does for 8-bit modes (the
    easy-VQA images are plain RGB)."""
    if (image.mode == "P" and "transparency" in image.info) or image.mode in ("PA", "La", "RGBA", "LA", "RGBa"):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def doc_to_visual(doc: dict) -> list[Image.Image]:
    """The sample's images, EXIF orientation applied, as RGB (as `llava.data.images.load_image` reads them)."""
    paths = doc["image"] if isinstance(doc["image"], list) else [doc["image"]]
    images = []
    for path in paths:
        with Image.open(os.path.join(_image_folder(), path)) as image:
            images.append(_rgb(ImageOps.exif_transpose(image)))
    return images


def doc_to_messages(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> list[dict]:
    """The turns before the reference answer, as lmms-eval's chat models take them: each `<image>` placeholder
    (with the newline after it) becomes an image part, in order, the text around it text parts.

    A train_llava checkpoint's saved chat template writes an image part back as `<image>\n` (see
    `llava.model.processor`), so the processor renders the text training rendered, and the prompt token ids equal
    `llava.evaluate`'s (tests/test_lmms_eval_score.py checks this).
    """
    images = iter(doc_to_visual(doc))
    messages = []
    for role, text in _turns(doc)[:-1]:
        content = []
        for k, piece in enumerate(text.split(IMAGE)):
            if k:
                content.append({"type": "image", "url": next(images)})
                piece = piece[1:] if piece.startswith("\n") else piece
            if piece:
                content.append({"type": "text", "text": piece})
        messages.append({"role": role, "content": content})
    return messages


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The last question without its image placeholders (what lmms-eval logs as the sample's input)."""
    return _turns(doc)[-2][1].replace(IMAGE + "\n", "").replace(IMAGE, "")


def doc_to_target(doc: dict) -> str:
    return _turns(doc)[-1][1]


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """Exact match of the final answer after normalisation; also under the sample's answer type's metric."""
    answer = final_answer(results[0], os.environ.get(ANSWER_AFTER_VARIABLE))
    correct = float(normalize(answer) == normalize(doc_to_target(doc)))
    scores = {"exact_match": correct}
    metric = TYPE_METRICS.get(doc.get("answer_type"))
    if metric:
        scores[metric] = correct
    return scores
