"""Start-up cost of LLaVA-scale data: time to the first training step, peak RSS and CPU, cold (no cache) and warm,
next to LLaVA's own lazy dataset (json.load + its length list) on the same file.

    python bench/data_scale.py                      # 665k samples, shaped like LLaVA-1.5's mix665k
    python bench/data_scale.py --num_samples 20000 --ranks 1,2

The mix: 24% multi-turn image conversations (LLaVA-Instruct), 6% long text-only conversations (ShareGPT), 70%
short VQA (several single-phrase questions about one image); one image per image sample among `num_samples / 30`
distinct 32x32 PNGs. The model is tiny (a 2-layer LM, a 1-layer CLIP at 336 px / patch 14: 576 image tokens per
image, as CLIP-L/336), so what is measured is the data path. Each run is its own process; RSS is the largest
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
         "looks like there is are what where how many colour shape").split()


@dataclass
class DataScaleArguments:
    num_samples: int = field(default=665_000, metadata={"help": "Samples in the generated mix."})
    work_dir: str = field(default="output/data_scale", metadata={"help": "Where the mix, images and runs go."})
    ranks: str = field(default="1", metadata={"help": "Comma-separated process counts to time (torchrun when > 1)."})
    output_json: str | None = field(default=None, metadata={"help": "Also write the figures here."})


def words(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def generate_mix(path: str, image_folder: str, num_samples: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    num_images = max(1, num_samples // 30)
    os.makedirs(image_folder, exist_ok=True)
    for index in range(num_images):
        name = os.path.join(image_folder, f"{index % 100:02d}", f"{index}.png")
        if not os.path.exists(name):
            os.makedirs(os.path.dirname(name), exist_ok=True)
            Image.new("RGB", (32, 32), tuple(rng.randrange(256) for _ in range(3))).save(name)
    with open(path, "w", encoding="utf-8") as f:
        f.write("[")
        for index in range(num_samples):
            kind = rng.random()
            if kind < 0.06:  # ShareGPT-like text-only
                turns = []
                for _ in range(rng.randint(1, 5)):
                    turns += [{"from": "human", "value": words(rng, 10, 60)}, {"from": "gpt", "value": words(rng, 80, 300)}]
                record = {"id": f"t{index}", "conversations": turns}
            else:
                rounds, question, answer = ((rng.randint(2, 6), (6, 16), (20, 80)) if kind < 0.30 else
                                            (rng.randint(1, 8), (4, 10), (1, 3)))
                turns = []
                for turn in range(rounds):
                    text = words(rng, *question) + "?"
                    turns += [{"from": "human", "value": ("<image>\n" + text) if turn == 0 else text},
                              {"from": "gpt", "value": words(rng, *answer)}]
                image = rng.randrange(num_images)
                record = {"id": f"i{index}", "image": f"{image % 100:02d}/{image}.png", "conversations": turns}
            f.write(("," if index else "") + json.dumps(record))
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
                       "--model_max_length", "4096", "--skip_invalid_samples", "True"]
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
