"""Peak memory of a whole pipeline against its largest stage run alone (README "Pipelines"; issue: within ~1.1x).

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 python bench/pipeline_memory.py               # configs/demo.yaml
    ... python bench/pipeline_memory.py --steps 20 --work_dir /tmp/pipeline_memory

Needs the demo's assets (`make demo` or `python -m llava.demo.easy_vqa` + `python -m llava.demo.pretrain_vision`).
It runs `train_llava.py configs/demo.yaml` with every stage cut to `--steps` steps, then the stage that peaked
highest again on its own (`python -m llava.train` with that stage's flags, from the same start model). Memory is
the summed RSS of the whole process tree (pipeline process, stage processes, their dataloader workers), sampled
every 20 ms, because that is what the machine must hold; shared pages count once per process in both runs.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def tree_rss(process: psutil.Process) -> tuple[int, dict[int, int]]:
    """Summed RSS of `process` and its descendants, and each direct child's subtree RSS by pid."""
    def rss(p):
        try:
            return p.memory_info().rss
        except psutil.Error:
            return 0
    per_child = {}
    try:
        children = process.children()
    except psutil.Error:
        children = []
    for child in children:
        try:
            per_child[child.pid] = rss(child) + sum(rss(d) for d in child.children(recursive=True))
        except psutil.Error:
            per_child[child.pid] = 0
    return rss(process) + sum(per_child.values()), per_child


def _command(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


def run_sampled(command: list[str], env: dict, log_path: str) -> tuple[int, int, dict[int, tuple[str, int]]]:
    """Run `command`; its exit status, peak tree RSS in bytes and each direct child's command line and peak."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        watched, peak, child_peaks = psutil.Process(process.pid), 0, {}
        while process.poll() is None:
            total, per_child = tree_rss(watched)
            peak = max(peak, total)
            for pid, value in per_child.items():
                command = child_peaks[pid][0] if pid in child_peaks else _command(pid)
                child_peaks[pid] = (command, max(child_peaks.get(pid, ("", 0))[1], value))
            time.sleep(0.02)
    return process.returncode, peak, child_peaks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pipeline", default="configs/demo.yaml")
    parser.add_argument("--steps", type=int, default=10, help="max_steps of every stage")
    parser.add_argument("--work_dir", default="/tmp/pipeline_memory")
    args = parser.parse_args(argv)

    from llava.demo.smollm2 import ensure_smollm2
    from llava.training.parsing import flag_names
    from llava.training.pipeline.plan import start_path
    from llava.training.pipeline.spec import read_pipeline, stage_argv

    with open(os.path.join(REPO, "data/easy_vqa/meta.json")) as f:
        image_folder = json.load(f)["image_folder"]
    shutil.rmtree(args.work_dir, ignore_errors=True)
    out = os.path.join(args.work_dir, "pipeline")
    overrides = ["--output_dir", out, "--language_model_name_or_path", ensure_smollm2(), "--image_folder", image_folder,
                 "--report_to", "none"]
    known = flag_names()
    names = read_pipeline(os.path.join(REPO, args.pipeline), overrides, known).names
    overrides += [text for name in names for text in (f"--{name}.max_steps", str(args.steps))]
    pipeline = read_pipeline(os.path.join(REPO, args.pipeline), overrides, known)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    os.makedirs(args.work_dir, exist_ok=True)
    rc, pipeline_peak, child_peaks = run_sampled(
        [sys.executable, "train_llava.py", args.pipeline, *overrides], env, os.path.join(args.work_dir, "pipeline.log"))
    if rc:
        raise SystemExit(f"the pipeline failed (exit {rc}); see {args.work_dir}/pipeline.log")
    # The pipeline's children: its checks' process first, then one per stage (its own output_dir on its command line).
    stage_peaks = {stage.name: max((peak for command, peak in child_peaks.values()
                                    if f"--output_dir {stage.output_dir}" in command), default=0)
                   for stage in pipeline.stages}
    largest = max(stage_peaks, key=stage_peaks.get)
    alone_argv = stage_argv(pipeline.stage(largest), start_path(pipeline, pipeline.stage(largest)))
    alone_argv[alone_argv.index("--output_dir") + 1] = os.path.join(args.work_dir, "alone")
    rc, alone_peak, _ = run_sampled([sys.executable, "-m", "llava.train", *alone_argv], env,
                                    os.path.join(args.work_dir, "alone.log"))
    if rc:
        raise SystemExit(f"the stage alone failed (exit {rc}); see {args.work_dir}/alone.log")
    mb = 2 ** 20
    print(json.dumps({"pipeline": args.pipeline, "steps_per_stage": args.steps,
                      "pipeline_peak_mb": round(pipeline_peak / mb),
                      "stage_peaks_in_pipeline_mb": {name: round(v / mb) for name, v in stage_peaks.items()},
                      "largest_stage": largest, "largest_stage_alone_peak_mb": round(alone_peak / mb),
                      "ratio": round(pipeline_peak / alone_peak, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
