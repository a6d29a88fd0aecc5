"""Peak memory and speed of stage 2 as full fine-tune, LoRA and QLoRA, each in its own process.

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 python bench/memory.py                 # SmolLM2-135M LLaVA
    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 python bench/memory.py --lm_layers 6   # ~50M-parameter LM

The model is the demo's: SmolLM2-135M-Instruct (`llava.demo.smollm2`, optionally cut to its first
`--lm_layers` decoder layers) with a random 64-px CLIP tower (patch 16, 16 image tokens), saved once as an
untrained "stage 1" checkpoint; stage 2 starts from it with `train_llava.py`'s own flags, as a user would.
Everything heavy (building the model, training) runs in child processes and this one stays small: on Linux a
child's `ru_maxrss` starts at its parent's RSS when spawned (the peak survives exec), so a parent holding
torch would put its own memory under every number. Each mode runs in a fresh child. "whole run" is `ru_maxrss` from `os.wait4` on it: the largest peak
of that process and of its own children (a LoRA run merges its adapters in a `llava.merge_lora`
subprocess after training). "training process" is the child's own peak (load, train, save), read by itself
before it exits. Seconds per step are the median over steps after the first (which pays one-off costs).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

MODES = {
    "full": [],
    "lora": ["--lora_enable", "True"],
    "qlora": ["--lora_enable", "True", "--load_in_4bit", "True"],
}
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 220), "yellow": (230, 220, 20)}


def stage1_path(work_dir: str, lm_layers: int | None) -> str:
    return os.path.join(work_dir, f"stage1-{lm_layers}-layers" if lm_layers else "stage1")


def build_assets(work_dir: str, lm_layers: int | None) -> None:
    """Write the data and, when missing, an untrained stage-1 LLaVA (SmolLM2 + random CLIP tower) (in a child)."""
    from importlib.resources import files

    from untrained_llava import save_untrained_llava

    write_data(work_dir)
    stage1 = stage1_path(work_dir, lm_layers)
    if os.path.isdir(stage1):
        return
    vision_config = json.loads(files("llava.demo").joinpath("vision_config.json").read_text())
    vision_config.pop("model_type")
    save_untrained_llava(stage1, work_dir, vision_config, lm_layers)


def write_data(work_dir: str, count: int = 64) -> None:
    """easy-VQA-like samples: a coloured square on white, a question and a one-word answer."""
    from PIL import Image, ImageDraw

    data_path, image_folder = data_paths(work_dir)
    os.makedirs(image_folder, exist_ok=True)
    records = []
    for i in range(count):
        name, colour = list(COLOURS.items())[i % len(COLOURS)]
        image = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(image).rectangle((8 + i % 16, 8, 40 + i % 16, 40), fill=colour)
        image.save(os.path.join(image_folder, f"{i}.png"))
        records.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the shape?"}, {"from": "gpt", "value": name}]})
    with open(data_path, "w") as f:
        json.dump(records, f)


def data_paths(work_dir: str) -> tuple[str, str]:
    return os.path.join(work_dir, "data.json"), os.path.join(work_dir, "images")


def child(argv: list[str], report: str) -> None:
    """Train with `argv` (train_llava.py flags), then write the step times and this process's peak RSS."""
    from transformers import TrainerCallback

    from llava.train import main as train

    class StepTimer(TrainerCallback):
        """Wall-clock seconds of every optimizer step."""

        def __init__(self):
            self.times, self.start = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start)

    timer = StepTimer()
    train(argv, callbacks=[timer])
    with open(report, "w") as f:
        json.dump({"step_seconds": timer.times,
                   "process_peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}, f)


def run_mode(mode: str, args: argparse.Namespace) -> dict:
    """One stage-2 run in a fresh process; its own peak RSS comes from wait4, not from this process."""
    out = os.path.join(args.work_dir, f"run-{mode}")
    report = out + ".json"
    data_path, image_folder = data_paths(args.work_dir)
    argv = ["--model_name_or_path", stage1_path(args.work_dir, args.lm_layers), "--data_path", data_path,
            "--image_folder", image_folder, "--output_dir", out,
            "--freeze_vision_model", "True", "--freeze_language_model", "False", "--max_steps", str(args.steps),
            "--per_device_train_batch_size", str(args.batch_size), "--learning_rate", "2e-4",
            "--save_strategy", "no", "--report_to", "none", "--logging_steps", "1", "--seed", "0", *MODES[mode],
            *args.train_flags.split()]
    with open(out + ".log", "w") as log:
        process = subprocess.Popen([sys.executable, __file__, "--child", report, "--", *argv],
                                   stdout=None if args.verbose else log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{mode} run failed (exit {process.returncode}); see {out}.log")
    with open(report) as f:
        result = json.load(f)
    return {"mode": mode, "peak_mb": usage.ru_maxrss / 1024, "process_peak_mb": result["process_peak_kb"] / 1024,
            "step_s": statistics.median(result["step_seconds"][1:] or result["step_seconds"])}


def table(rows: list[dict]) -> str:
    full = next((r["peak_mb"] for r in rows if r["mode"] == "full"), None)
    lines = ["| mode | peak RSS, whole run (MB) | vs full | peak RSS, training process (MB) | s/step |",
             "|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['peak_mb'] / full:.2f}x" if full else "-"
        lines.append(f"| {r['mode']} | {r['peak_mb']:,.0f} | {ratio} | {r['process_peak_mb']:,.0f} | "
                     f"{r['step_s']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] == ["--child"]:  # internal: python bench/memory.py --child REPORT -- <train flags>
        child(sys.argv[4:], sys.argv[2])
        return
    if sys.argv[1:2] == ["--build"]:  # internal: python bench/memory.py --build WORK_DIR LM_LAYERS
        build_assets(sys.argv[2], int(sys.argv[3]) or None)
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="full,lora,qlora", help="comma-separated, from " + ",".join(MODES))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--lm_layers", type=int, default=None, help="keep only SmolLM2's first N decoder layers")
    parser.add_argument("--train_flags", default="", help="more train_llava.py flags for every mode, e.g. "
                                                           "'--gradient_checkpointing True'")
    parser.add_argument("--work_dir", default=None, help="default: a new temporary folder; reused when given")
    parser.add_argument("--verbose", action="store_true", help="show the children's training logs")
    args = parser.parse_args()
    args.work_dir = args.work_dir or tempfile.mkdtemp(prefix="llava-memory-")
    subprocess.run([sys.executable, __file__, "--build", args.work_dir, str(args.lm_layers or 0)], check=True)
    rows = [run_mode(mode, args) for mode in args.modes.split(",")]
    print(f"stage 2 from {stage1_path(args.work_dir, args.lm_layers)}: {args.steps} steps, batch {args.batch_size}, flags {args.train_flags!r}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    print(table(rows))


if __name__ == "__main__":
    main()
