"""Start-up cost of LLaVA-scale data: time to the first training step, peak RSS and CPU, cold (no cache) and warm,
next to LLaVA's own lazy dataset (json.load + its length list) on the same file.

    python bench/data_scale.py                      # 665k samples, shaped like LLaVA-1.5's mix665k
    python bench/data_scale.py --num_samples 20000 --ranks 1,2

The mix follows LLaVA-1.5's mix665k source by source (`SOURCES`: shares, image folders, rounds and text lengths,
~1.09 GB at 665k; ShareGPT's text-only conversations partly in other scripts and emoji), one 32x32 PNG per distinct
image (~360k). The model is tiny (a 2-layer LM, a 2-layer CLIP at 336 px / patch 14: 576 image tokens per image, as
CLIP-L/336), so what is measured is the data path. Each run is its own process; RSS is the largest
process's peak (one rank), CPU is user+system of the whole run (all ranks and workers).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field

from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, HfArgumentParser

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.helpers.tiny_parts import save_language_model  # noqa: E402  (the repo's tiny ChatML LM)

WORDS = ("the a man woman dog cat red blue green small large table street car bus tree sky picture image left right "
         "holding sitting standing near behind front of in on with two three people building window sign white black "
         "looks like there is are what where how many colour shape kitchen pizza plate train station water boat "
         "field grass playing ball frisbee wearing shirt hat umbrella snow ski board bench clock tower room bed "
         "computer desk phone book shelf bottle glass food sandwich horse sheep cow elephant giraffe zebra bird "
         "airplane sky cloud mountain road traffic light motorcycle bicycle person child girl boy group young old "
         "because however which would could should also their other about into over after before during while "
         "suggests indicates possibly likely appears overall scene background foreground several various").split()
# ShareGPT holds other languages and emoji: one character beyond U+FFFF makes Python hold the file's text at 4 bytes
# per character, as the real mix665k does.
OTHER_SCRIPTS = "café naïve über 日本語 中文 русский 한국어 😀 👍 🚀".split()
ONE_WORD = "\nAnswer the question using a single word or phrase."
OPTION_LETTER = "\nAnswer with the option's letter from the given choices directly."

# LLaVA-1.5's mix665k, source by source (paper, table 7): samples, image folder and path pattern, distinct images,
# rounds per sample, words per question and answer, and the instruction appended to each question. Text lengths are
# set so that the file is ~1.05 GB, like the published llava_v1_5_mix665k.json.
SOURCES = (  # name, share, folder, images, rounds, question words, answer words, suffix
    ("llava_conversation", 58_000, "coco/train2017", 81_000, (2, 6), (6, 16), (30, 110), ""),
    ("llava_detail", 23_000, "coco/train2017", 81_000, (1, 1), (6, 12), (120, 260), ""),
    ("llava_reasoning", 77_000, "coco/train2017", 81_000, (1, 2), (10, 30), (80, 220), ""),
    ("sharegpt", 40_000, None, 0, (1, 7), (10, 80), (100, 320), ""),
    ("vqav2", 83_000, "coco/train2017", 83_000, (2, 9), (4, 9), (1, 2), ONE_WORD),
    ("gqa", 72_000, "gqa/images", 72_000, (3, 17), (5, 12), (1, 2), ONE_WORD),
    ("okvqa", 9_000, "coco/train2017", 9_000, (1, 2), (5, 12), (1, 2), ONE_WORD),
    ("ocrvqa", 80_000, "ocr_vqa/images", 80_000, (3, 7), (4, 10), (1, 4), ONE_WORD),
    ("aokvqa", 66_000, "coco/train2017", 17_000, (1, 1), (25, 45), (1, 1), OPTION_LETTER),
    ("textcaps", 22_000, "textvqa/train_images", 22_000, (1, 1), (20, 60), (8, 20), ""),
    ("refcoco", 48_000, "coco/train2014", 17_000, (3, 12), (4, 10), (6, 12), ""),
    ("vg", 86_000, "vg/VG_100K", 86_000, (4, 12), (6, 12), (6, 12), ""),
)


@dataclass
class DataScaleArguments:
    num_samples: int = field(default=665_000, metadata={"help": "Samples in the generated mix."})
    work_dir: str = field(default="output/data_scale", metadata={"help": "Where the mix, images and runs go."})
    ranks: str = field(default="1", metadata={"help": "Comma-separated process counts to time (torchrun when > 1)."})
    output_json: str | None = field(default=None, metadata={"help": "Also write the figures here."})


def words(rng: random.Random, low: int, high: int, vocabulary: list[str] = WORDS) -> str:
    return " ".join(rng.choices(vocabulary, k=rng.randint(low, high)))


def generate_mix(path: str, image_folder: str, num_samples: int, seed: int = 0) -> None:
    """A mix shaped like LLaVA-1.5's mix665k (`SOURCES`), scaled to `num_samples`, shuffled as the original is;
    one small PNG per distinct image (~380k at full size), checked by the data path like any image."""
    rng = random.Random(seed)
    scale = num_samples / sum(source[1] for source in SOURCES)
    kinds = [index for index, source in enumerate(SOURCES) for _ in range(round(source[1] * scale))]
    kinds = (kinds + kinds[:max(0, num_samples - len(kinds))])[:num_samples]
    rng.shuffle(kinds)
    folders = {}
    for name, _, folder, count, *_ in SOURCES:
        if folder:
            folders[folder] = max(folders.get(folder, 0), max(1, round(count * scale)))
    for folder, count in folders.items():
        os.makedirs(os.path.join(image_folder, folder), exist_ok=True)
        for index in range(count):
            name = os.path.join(image_folder, folder, f"{index:012d}.png")
            if not os.path.exists(name):
                Image.new("RGB", (32, 32), (index % 256, index // 256 % 256, 0)).save(name)
    with open(path, "w", encoding="utf-8") as f:
        f.write("[")
        for index, kind in enumerate(kinds):
            name, _, folder, _, rounds, question, answer, suffix = SOURCES[kind]
            turns = []
            vocabulary = WORDS + OTHER_SCRIPTS if name == "sharegpt" and rng.random() < 0.1 else WORDS
            for turn in range(rng.randint(*rounds)):
                text = words(rng, *question, vocabulary) + "?" + suffix
                if folder and turn == 0:
                    text = "<image>\n" + text
                turns += [{"from": "human", "value": text}, {"from": "gpt", "value": words(rng, *answer, vocabulary)}]
            record = {"id": f"{name}-{index}", "conversations": turns}
            if folder:
                record = {"id": record["id"], "image": f"{folder}/{rng.randrange(folders[folder]):012d}.png",
                          "conversations": turns}
            f.write(("," if index else "") + json.dumps(record, ensure_ascii=False))
        f.write("]")


def make_model(folder: str) -> tuple[str, str]:
    lm = save_language_model(os.path.join(folder, "lm"))
    vision = os.path.join(folder, "vision")
    CLIPVisionModel(CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=2)).save_pretrained(vision)
    CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}).save_pretrained(vision)
    return vision, lm


def measured(command: list[str], env: dict | None = None) -> dict:
    """Run `command` in a fresh wrapper process: wall seconds, CPU seconds of everything it ran, peak RSS (MB)."""
    wrapper = ("import resource, subprocess, sys, time, json; t = time.perf_counter(); "
               "code = subprocess.run(sys.argv[1:]).returncode; r = resource.getrusage(resource.RUSAGE_CHILDREN); "
               "print(json.dumps({'rc': code, 'seconds': time.perf_counter() - t, 'cpu_seconds': r.ru_utime + r.ru_stime, "
               "'peak_rss_mb': r.ru_maxrss / 1024}))")
    result = subprocess.run([sys.executable, "-c", wrapper, *command], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    if figures["rc"] != 0:
        raise RuntimeError(f"{' '.join(command[:6])} ... failed:\n{result.stderr[-3000:]}")
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in figures.items()}


LAZY_REFERENCE = """
import json, sys
with open(sys.argv[1]) as f:
    data = json.load(f)
# LLaVA's LazySupervisedDataset: `lengths` / `modality_lengths` (word counts) for its length-grouped sampler
lengths = [sum(len(c["value"].split()) for c in s["conversations"]) + (128 if "image" in s else 0) for s in data]
print(len(lengths))
"""


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(DataScaleArguments).parse_args_into_dataclasses(argv)
    os.makedirs(args.work_dir, exist_ok=True)
    data_path = os.path.join(args.work_dir, f"mix_{args.num_samples}.json")
    image_folder = os.path.join(args.work_dir, "images")
    started = time.perf_counter()
    if not os.path.exists(data_path):
        generate_mix(data_path, image_folder, args.num_samples)
    vision, lm = make_model(os.path.join(args.work_dir, "model"))
    print(f"data ready in {time.perf_counter() - started:.0f} s: {data_path} "
          f"({os.path.getsize(data_path) / 2**20:.0f} MB)", flush=True)
    cache = os.path.join(args.work_dir, "cache")
    subprocess.run(["rm", "-rf", cache], check=True)
    env = {"TRAIN_LLAVA_CACHE": cache, "OMP_NUM_THREADS": "1"}
    results = {"num_samples": args.num_samples,
               "lazy_reference": measured([sys.executable, "-c", LAZY_REFERENCE, data_path])}
    print("lazy reference:", results["lazy_reference"], flush=True)
    for ranks in [int(r) for r in args.ranks.split(",")]:
        launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                        "--standalone", f"--nproc_per_node={ranks}"]
        for state in ("cold", "warm"):
            if state == "cold":
                subprocess.run(["rm", "-rf", cache], check=True)
            output_dir = os.path.join(args.work_dir, f"run_{ranks}_{state}")
            command = [*launcher, "train_llava.py", "--vision_model_name_or_path", vision,
                       "--language_model_name_or_path", lm, "--data_path", data_path, "--image_folder", image_folder,
                       "--freeze_language_model", "True", "--per_device_train_batch_size", "2", "--max_steps", "1",
                       "--save_strategy", "no", "--report_to", "none", "--output_dir", output_dir,
                       "--model_max_length", "2048", "--skip_invalid_samples", "True"]
            key = f"ranks_{ranks}_{state}"
            results[key] = measured(command, env)
            print(key, results[key], flush=True)
    reference = results["lazy_reference"]["seconds"]
    for key in [k for k in results if k.startswith("ranks_")]:
        results[key]["x_reference"] = round(results[key]["seconds"] / reference, 2)
    print(json.dumps(results))
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
