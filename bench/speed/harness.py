"""What every side of the speed benchmark shares: its command line, the stage rules, and the measurement.

A side is one script (`side_ours.py`, `side_zero_nlp.py`, `side_trl.py`) that builds its trainer on the same
model, data, batch size, learning rate, steps, threads and workers, wraps the trainer class with `instrument`
and trains. Its last stdout line is one JSON object (`Recorder.result`).

Measured in the training process:
- steady-state throughput: wall time from the end of optimizer step `--warmup_steps` to the end of the last step
  (each interval: fetch and collate the batch, forward, backward, optimizer step, Trainer bookkeeping);
  samples/s = samples in those steps / time (a packed row counts the samples in it); tokens/s counts non-pad
  tokens (image tokens included); `samples_measured` and `tokens_measured` are the totals behind them;
- pad_fraction: padded positions / (rows x padded length) over the measured steps;
- peak_rss_mb: the process's `ru_maxrss` (model load included);
- vision_graph: whether the vision tower's output required grad (an autograd graph through a frozen tower);
- cpu_util: process CPU seconds per wall second in the window (2.0 = both cores busy; well below --threads
  means the run was starved by other load).
Training stops after `--steps` steps, or earlier once `--target_seconds` of steady state were measured.
Adapted from the harness that measured the baselines quoted in the speed issue (`shared/bench/bench_common.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

# Learning rates and trained parts per stage (LLaVA-1.5's recipe; the vision tower stays frozen in both).
STAGES = {
    "stage1": {"lr": 1e-3, "trains": ("multi_modal_projector",)},
    "stage2": {"lr": 2e-5, "trains": ("multi_modal_projector", "language_model", "lm_head")},
}


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=sorted(STAGES), required=True)
    p.add_argument("--model", required=True, help="a LLaVA checkpoint folder (weights + processor)")
    p.add_argument("--data", required=True, help="LLaVA JSON")
    p.add_argument("--image_folder", required=True)
    p.add_argument("--steps", type=int, default=200, help="max optimizer steps")
    p.add_argument("--target_seconds", type=float, default=60.0, help="stop after this much steady state (0: off)")
    p.add_argument("--warmup_steps", type=int, default=1, help="steps left out of the measurement (>= 1)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--workers", type=int, default=0, help="dataloader_num_workers")
    p.add_argument("--threads", type=int, default=2, help="torch threads in the training process")
    p.add_argument("--grad_ckpt", choices=["auto", "on", "off"], default="auto",
                   help="activation checkpointing; auto = the trainer's default (TRL: on, others: off)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out_json", default=None)
    return p


def parse(description: str, argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """Common flags, plus whatever follows (a side may pass them on, e.g. ours to train_llava.py)."""
    args, extra = parser(description).parse_known_args(argv)
    if args.warmup_steps < 1:
        raise SystemExit("--warmup_steps must be >= 1: the first step pays one-off costs")
    args.lr = STAGES[args.stage]["lr"]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    return args, extra


def trainer_kwargs(args: argparse.Namespace, output_dir: str) -> dict:
    """TrainingArguments shared by the baselines (TRL's SFTConfig takes the same)."""
    kwargs = dict(output_dir=output_dir, per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
                  max_steps=args.steps, logging_steps=10, save_strategy="no", report_to="none", use_cpu=True,
                  bf16=False, dataloader_num_workers=args.workers, dataloader_pin_memory=False, disable_tqdm=True,
                  seed=args.seed, data_seed=args.seed, remove_unused_columns=False)
    if args.grad_ckpt != "auto":
        kwargs["gradient_checkpointing"] = args.grad_ckpt == "on"
    return kwargs


def freeze_for_stage(model, stage: str) -> None:
    """The baselines' freezing: everything frozen but the stage's trained parts (never the vision tower)."""
    trains = STAGES[stage]["trains"]
    for name, param in model.named_parameters():
        param.requires_grad = any(part in name for part in trains) and "vision_tower" not in name


def conversation_records(path: str, image_folder: str) -> list[dict]:
    """LLaVA JSON -> {image: path or None, messages: [{role, content}, ...]} for the baselines.

    `<image>` is taken out of the first question: each baseline places the image there its own way. Only what
    both baselines can be given the same samples in is accepted: alternating human/gpt turns and at most one
    image, marked in the first question.
    """
    with open(path) as f:
        records = json.load(f)
    out = []
    for record in records:
        turns = record["conversations"]
        alternating = [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        marked = "<image>" in turns[0]["value"]
        if not alternating or marked != ("image" in record) or any("<image>" in t["value"] for t in turns[1:]):
            raise SystemExit(f"{path}: sample {record['id']!r} is not human/gpt turns with at most one image, "
                             "marked in its first question; the baselines only take those")
        messages = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in turns]
        if marked:
            messages[0]["content"] = messages[0]["content"].replace("<image>\n", "").replace("<image>", "").strip()
        out.append({"image": os.path.join(image_folder, record["image"]) if marked else None, "messages": messages})
    return out


def packed_samples(position_ids, labels) -> tuple[int, int]:
    """Samples and their tokens in a batch of packed rows (`llava.data.collator.PackingCollator`): every sample's
    positions restart at 0, and so do those of a row's padding, which alone has no trained label."""
    samples = tokens = 0
    for positions, row_labels in zip(position_ids, labels):
        starts = (positions == 0).nonzero().flatten().tolist() + [len(positions)]
        for start, end in zip(starts, starts[1:]):
            if (row_labels[start:end] != -100).any():
                samples, tokens = samples + 1, tokens + end - start
    return samples, tokens


class Recorder:
    """Per-step timings and batch statistics of one training run; `result()` is the side's JSON."""

    def __init__(self, args: argparse.Namespace, side: str):
        self.args, self.side = args, side
        self.step_ends: list[float] = []
        self.step_cpu: list[float] = []
        self.batches: list[dict] = []
        self.losses: list[float] = []
        self.vision_graph = False
        self.train_start = time.perf_counter()
        self.load_start = os.getloadavg()[0]

    def on_batch(self, inputs: dict) -> None:
        """A batch's samples and non-pad tokens; packed rows (positions, no attention mask) hold several samples."""
        ids, mask, labels = inputs["input_ids"], inputs.get("attention_mask"), inputs.get("labels")
        if mask is None and inputs.get("position_ids") is not None:
            samples, nonpad = packed_samples(inputs["position_ids"], labels)
        else:
            samples, nonpad = ids.shape[0], int(mask.sum()) if mask is not None else ids.numel()
        self.batches.append({"samples": samples, "rows": ids.shape[0], "length": ids.shape[1], "nonpad": nonpad,
                             "trained": int((labels != -100).sum()) if labels is not None else 0})

    def on_vision_output(self, module, inputs, output) -> None:
        hidden = getattr(output, "last_hidden_state", None)
        self.vision_graph = self.vision_graph or bool(hidden is not None and hidden.requires_grad)

    def callback(self):
        from transformers import TrainerCallback

        recorder = self

        class StepClock(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                recorder.train_start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                now = time.perf_counter()
                recorder.step_ends.append(now)
                recorder.step_cpu.append(time.process_time())
                warmup, target = recorder.args.warmup_steps, recorder.args.target_seconds
                measured = len(recorder.step_ends) - warmup
                if target > 0 and measured >= 2 and now - recorder.step_ends[warmup - 1] >= target:
                    control.should_training_stop = True

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    recorder.losses.append(round(float(logs["loss"]), 4))

        return StepClock()

    def attach(self, trainer) -> None:
        trainer.add_callback(self.callback())
        model = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
        model.model.vision_tower.register_forward_hook(self.on_vision_output)

    def result(self, extra: dict | None = None) -> dict:
        a, warmup, ends = self.args, self.args.warmup_steps, self.step_ends
        res = {"side": self.side, "stage": a.stage, "model": os.path.basename(a.model.rstrip("/")),
               "data": os.path.basename(a.data), "batch_size": a.batch_size, "workers": a.workers,
               "threads": a.threads, "steps_run": len(ends),
               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset")}
        if len(ends) >= warmup + 2:
            measured = self.batches[warmup:len(ends)]
            seconds = ends[-1] - ends[warmup - 1]
            samples = sum(b["samples"] for b in measured)
            nonpad = sum(b["nonpad"] for b in measured)
            slots = sum(b["rows"] * b["length"] for b in measured)
            steps = [ends[i] - ends[i - 1] for i in range(warmup, len(ends))]
            res.update({
                "steps_measured": len(measured), "measured_s": round(seconds, 2),
                "samples_measured": samples, "tokens_measured": nonpad,
                "samples_per_step": round(samples / len(measured), 2),
                "samples_per_s": round(samples / seconds, 3), "tokens_per_s": round(nonpad / seconds, 1),
                "pad_fraction": round(1 - nonpad / slots, 4),
                "tokens_per_sample": round(nonpad / samples, 1),
                "trained_tokens_per_sample": round(sum(b["trained"] for b in measured) / samples, 2),
                "step_s_median": round(statistics.median(steps), 3),
                "cpu_util": round((self.step_cpu[-1] - self.step_cpu[warmup - 1]) / seconds, 2),
            })
        else:
            res["error"] = f"only {len(ends)} steps ran; need warmup {warmup} + 2"
        res["first_step_s"] = round(ends[0] - self.train_start, 2) if ends else None
        res["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        res["vision_graph"] = self.vision_graph
        res["loss_first_last"] = [self.losses[0], self.losses[-1]] if self.losses else None
        res["load1_start"] = round(self.load_start, 2)
        res.update(extra or {})
        return res


def instrument(trainer_cls, recorder: Recorder):
    """A subclass of `trainer_cls` that attaches `recorder` when built and shows it every training batch."""

    class Instrumented(trainer_cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            recorder.attach(self)

        def training_step(self, model, inputs, *args, **kwargs):
            recorder.on_batch(inputs)
            return super().training_step(model, inputs, *args, **kwargs)

    Instrumented.__name__ = trainer_cls.__name__
    return Instrumented


def emit(result: dict, out_json: str | None) -> None:
    line = json.dumps(result)
    if out_json:
        with open(out_json, "w") as f:
            f.write(line + "\n")
    sys.stdout.flush()
    print(line, flush=True)
