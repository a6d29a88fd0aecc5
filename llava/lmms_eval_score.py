"""Score a checkpoint with lmms-eval (`--model llava_hf`) on LLaVA JSON questions, offline, and fail when it did.

    python -m llava.lmms_eval_score --model_name_or_path DIR --data_path data/easy_vqa/test.json \
        [--image_folder IMGS] [--lmms_eval_python .venv-lmms-eval/bin/python] [--output_dir DIR] [--limit N] \
        [--answer_after :]

`make lmms-eval CHECKPOINT=DIR` builds lmms-eval's environment and calls this. It runs lmms-eval's own command on
the task in `configs/lmms_eval/easy_vqa/` (pointed at `--data_path` through a one-line task that includes it), with
`device_map` and `device` set (lmms-eval's default `device_map=""` is refused by transformers 5) and the hubs off.

lmms-eval exits 0 when the model fails to load (it logs the error and writes no samples) and when every answer
failed (each failed generation is logged and scored as an empty answer). Here a run with no samples file, or whose
every sample failed (no generated tokens recorded), exits 1. The last stdout line is one JSON object: lmms-eval's
accuracy (`exact_match`) overall and per answer type, the sample and failure counts (and, with `--output_dir`, where
lmms-eval's files are); `--output_file` writes one JSON line per sample (id, answer_type, reference, prediction,
correct, failed), in `llava.evaluate --output_file`'s form.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

from llava.model.evaluation import final_answer
from llava.reporting import run_command
from llava.training.parsing import parse_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK_DIR = os.path.join(REPO, "configs", "lmms_eval", "easy_vqa")
TASK_FILE = "easy_vqa_llava.yaml"
TASK = "easy_vqa_llava"
LOCAL_TASK = "easy_vqa_llava_local"  # the shipped task with --data_path as its data file
IMAGE_FOLDER_VARIABLE = "LLAVA_LMMS_EVAL_IMAGE_FOLDER"  # read by the task's utils.py
ANSWER_AFTER_VARIABLE = "LLAVA_LMMS_EVAL_ANSWER_AFTER"  # read by the task's utils.py
TYPE_METRICS = {"yes/no": "yes_no_accuracy", "colour": "colour_accuracy", "shape": "shape_accuracy"}


@dataclass
class LmmsEvalArguments:
    model_name_or_path: str = field(metadata={"help": "Checkpoint folder (ours or llava-hf) that lmms-eval loads."})
    data_path: str = field(default="data/easy_vqa/test.json", metadata={
        "help": "LLaVA .json/.jsonl questions, each ending with its reference answer (what `llava.evaluate "
                "--data_path` reads, one file)."})
    image_folder: str | None = field(default=None, metadata={
        "help": "Folder the image paths are relative to (default: the image_folder of a meta.json beside "
                "--data_path, as `python -m llava.demo.easy_vqa` writes it)."})
    lmms_eval_python: str = field(default=".venv-lmms-eval/bin/python", metadata={
        "help": "Python of the environment lmms-eval is installed in (`make lmms-eval-env` builds it)."})
    device: str = field(default="cpu", metadata={"help": "torch device lmms-eval's llava_hf runs on."})
    dtype: str = field(default="float32", metadata={"help": "Weights' dtype (llava.evaluate's default).",
                                                    "choices": ["float32", "bfloat16", "float16", "auto"]})
    limit: int | None = field(default=None, metadata={"help": "Score the first N questions only (lmms-eval's --limit)."})
    answer_after: str | None = field(default=None, metadata={
        "help": "Score what follows the last occurrence of this text in each answer (`llava.evaluate "
                "--answer_after`; ':' for the demo's \"blue: no\")."})
    output_dir: str | None = field(default=None, metadata={
        "help": "Keep the task file and lmms-eval's results and samples here (default: a temporary folder, removed "
                "after)."})
    output_file: str | None = field(default=None, metadata={
        "help": "Write one JSON line per sample: id, answer_type, reference, prediction, correct, failed (and the "
                "whole answer as output, with --answer_after)."})


def _records(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in f if line.strip()]
        return json.load(f)


def _image_folder(args: LmmsEvalArguments) -> str | None:
    if args.image_folder:
        return os.path.abspath(args.image_folder)
    meta = os.path.join(os.path.dirname(os.path.abspath(args.data_path)), "meta.json")
    if os.path.isfile(meta):
        with open(meta, encoding="utf-8") as f:
            return json.load(f).get("image_folder")
    return None  # the task falls back to the installed easy_vqa package's images


def write_task(folder: str, data_path: str) -> str:
    """A task that is the shipped one with `data_path` as its test file; returns the folder (lmms-eval's
    --include_path)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{LOCAL_TASK}.yaml"), "w", encoding="utf-8") as f:
        f.write(f"include: {json.dumps(os.path.join(TASK_DIR, TASK_FILE))}\ntask: {LOCAL_TASK}\n"
                f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(os.path.abspath(data_path))}\n")
    return folder


def lmms_eval_command(args: LmmsEvalArguments, include_path: str, output_path: str) -> list[str]:
    model_args = f"pretrained={os.path.abspath(args.model_name_or_path)},device_map={args.device},dtype={args.dtype}"
    command = [args.lmms_eval_python, "-m", "lmms_eval", "--model", "llava_hf", "--model_args", model_args,
               "--device", args.device, "--tasks", LOCAL_TASK, "--include_path", include_path, "--batch_size", "1",
               "--log_samples", "--output_path", output_path]
    return command + (["--limit", str(args.limit)] if args.limit else [])


def _failed(sample: dict) -> bool:
    """lmms-eval's llava_hf records the generated token count of every answer it generated, none for one whose
    generation raised (its answer is then an empty string)."""
    counts = sample.get("token_counts")
    return not counts or counts[0] is None


def collect(output_path: str, records: list[dict], answer_after: str | None = None) -> tuple[list[dict], dict]:
    """Per-sample rows (in data order) and lmms-eval's aggregated metrics, from its samples and results files.
    Raises `FileNotFoundError` when lmms-eval wrote none (it failed before answering)."""
    samples_files = glob.glob(os.path.join(output_path, "*", f"*_samples_{LOCAL_TASK}.jsonl"))
    results_files = glob.glob(os.path.join(output_path, "*", "*_results.json"))
    if not samples_files or not results_files:
        raise FileNotFoundError(f"lmms-eval wrote no samples or results under {output_path}: it failed before "
                                "answering (see its log above)")
    with open(max(samples_files), encoding="utf-8") as f:
        samples = sorted((json.loads(line) for line in f if line.strip()), key=lambda s: s["doc_id"])
    with open(max(results_files), encoding="utf-8") as f:
        metrics = json.load(f)["results"][LOCAL_TASK]
    rows = []
    for sample in samples:
        record = records[sample["doc_id"]]
        output = sample["filtered_resps"]
        output = (output[0] if isinstance(output, list) else output).strip()
        rows.append({"id": str(record.get("id", sample["doc_id"])), "answer_type": str(record.get("answer_type", "all")),
                     "reference": sample["target"], "prediction": final_answer(output, answer_after),
                     "correct": bool(sample["exact_match"]), "failed": _failed(sample),
                     **({"output": output} if answer_after else {})})
    return rows, metrics


def summary(rows: list[dict], metrics: dict) -> dict:
    """lmms-eval's accuracy overall and per answer type, with the sample and failure counts."""
    return {"accuracy": round(metrics["exact_match,none"], 4), "num_samples": len(rows),
            "accuracy_by_type": {kind: round(metrics[f"{name},none"], 4) for kind, name in sorted(TYPE_METRICS.items())
                                 if isinstance(metrics.get(f"{name},none"), (int, float))},
            "num_failed": sum(row["failed"] for row in rows)}


def score(args: LmmsEvalArguments, work: str) -> int:
    """Run lmms-eval with its files under `work`, report, and return the exit status (see the module docstring)."""
    include_path = write_task(os.path.join(work, "task"), args.data_path)
    output_path = os.path.abspath(os.path.join(work, "lmms_eval"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    folder = _image_folder(args)
    if folder:
        env[IMAGE_FOLDER_VARIABLE] = folder
    if args.answer_after:
        env[ANSWER_AFTER_VARIABLE] = args.answer_after
    status = subprocess.run(lmms_eval_command(args, include_path, output_path), env=env).returncode
    if status:
        print(f"error: lmms-eval exited with status {status}", file=sys.stderr)
        return status
    try:
        rows, metrics = collect(output_path, _records(args.data_path), args.answer_after)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.output_file:
        with open(args.output_file, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    result = summary(rows, metrics)
    if args.output_dir:
        result["lmms_eval_output"] = output_path
    print(json.dumps(result))
    if result["num_failed"] == len(rows):
        print(f"error: lmms-eval answered none of the {len(rows)} samples (its log above says why); it exited 0 "
              "all the same", file=sys.stderr)
        return 1
    if result["num_failed"]:
        print(f"warning: lmms-eval failed on {result['num_failed']} of {len(rows)} samples (scored as wrong)",
              file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    (args,) = parse_flags((LmmsEvalArguments,), argv)
    if not os.path.isfile(args.lmms_eval_python):
        print(f"error: no lmms-eval environment at {args.lmms_eval_python}: `make lmms-eval-env` builds it",
              file=sys.stderr)
        return 2
    if not os.path.isfile(os.path.join(TASK_DIR, TASK_FILE)):
        print(f"error: the lmms-eval task is not at {TASK_DIR} (run from a train_llava checkout)", file=sys.stderr)
        return 2
    if args.output_dir:
        return score(args, args.output_dir)
    with tempfile.TemporaryDirectory(prefix="lmms_eval_") as work:
        return score(args, work)


if __name__ == "__main__":
    run_command(main)
