"""What every side of the speed benchmark shares: its command line, the stage rules, and the measurement.

A side is one script (`side_ours.py`, `side_ours_packed.py`, `side_zero_nlp.py`, `side_trl.py`) that builds its
trainer on the same model, data file, batch size, learning rate, threads and workers, wraps the trainer class with
`instrument` and trains exactly one epoch over the data file (`run.py` hands every side the same fixed subset).
Its last stdout line is one JSON object (`Recorder.result`).

Measured in the training process:
- train_s: wall time of the whole epoch, from the Trainer's `on_train_begin` (model, data and optimizer already
  built: model load and data preparation are left out, `setup_s` gives them) to the end of the last optimizer
  step; every step counts, the first included (fetch and collate the batch, forward, backward, optimizer step,
  Trainer bookkeeping); samples_per_s = samples trained / train_s (a packed row counts the samples in it);
- samples and tokens_fed: the samples and non-pad tokens (image tokens included) in the batches as this side's
  collator built them (TRL's samples hold one token more than the others', the chat template's closing newline;
  `run.py` therefore computes tokens/s from one count of the subset's tokens, the same for every side);
- pad_fraction: padded positions / (rows x padded length) over the epoch; step_s_median: the median step;
- peak_rss_mb: the largest `ru_maxrss` of this process (model load included) and of any child it waited for;
- vision_graph: whether the vision tower's output required grad (an autograd graph through a frozen tower);
- cpu_util: process CPU seconds per wall second over the epoch (2.0 = both cores busy; well below --threads
  means the run was starved by other load).
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

PROCESS_START = time.perf_counter()  # sides import this module first

# Learning rates and trained parts per stage (LLaVA-1.5's recipe; the vision tower stays frozen in both). A
# LLaVA-NeXT model's `image_newline` trains with its projector, as in ours (`llava.model.components`).
STAGES = {
    "stage1": {"lr": 1e-3, "trains": ("multi_modal_projector", "image_newline")},
    "stage2": {"lr": 2e-5, "trains": ("multi_modal_projector", "image_newline", "language_model", "lm_head")},
}


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=sorted(STAGES), required=True)
    p.add_argument("--model", required=True, help="a LLaVA or LLaVA-NeXT checkpoint folder (weights + processor)")
    p.add_argument("--data", required=True, help="LLaVA JSON")
    p.add_argument("--image_folder", required=True)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--workers", type=int, default=0, help="dataloader_num_workers")
    p.add_argument("--threads", type=int, default=2, help="torch threads in the training process")
    p.add_argument("--grad_ckpt", choices=["auto", "on", "off"], default="auto",
                   help="activation checkpointing; auto = the trainer's default (TRL: on, others: off)")
    p.add_argument("--pack_length", type=int, default=512,
                   help="token slots of a packed row, for a side that packs (ours_packed): above the longest sample")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out_json", default=None)
    return p


def parse(description: str, argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """Common flags, plus whatever follows (a side may pass them on, e.g. ours to train_llava.py)."""
    args, extra = parser(description).parse_known_args(argv)
    args.lr = STAGES[args.stage]["lr"]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    return args, extra


def trainer_kwargs(args: argparse.Namespace, output_dir: str) -> dict:
    """TrainingArguments shared by the baselines (TRL's SFTConfig takes the same)."""
    kwargs = dict(output_dir=output_dir, per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
                  num_train_epochs=1, max_steps=-1, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
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
    """Timings and batch statistics of one training epoch; `result()` is the side's JSON."""

    def __init__(self, args: argparse.Namespace, side: str):
        self.args, self.side = args, side
        self.step_ends: list[float] = []
        self.batches: list[dict] = []
        self.losses: list[float] = []
        self.vision_graph = False
        self.train_start = self.cpu_start = None
        self.cpu_end = None
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
                recorder.train_start, recorder.cpu_start = time.perf_counter(), time.process_time()

            def on_step_end(self, args, state, control, **kwargs):
                recorder.step_ends.append(time.perf_counter())
                recorder.cpu_end = time.process_time()

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    recorder.losses.append(round(float(logs["loss"]), 4))

        return StepClock()

    def attach(self, trainer) -> None:
        trainer.add_callback(self.callback())
        model = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
        model.model.vision_tower.register_forward_hook(self.on_vision_output)

    def result(self, extra: dict | None = None) -> dict:
        a, ends = self.args, self.step_ends
        res = {"side": self.side, "stage": a.stage, "model": os.path.basename(a.model.rstrip("/")),
               "data": os.path.basename(a.data), "batch_size": a.batch_size, "workers": a.workers,
               "threads": a.threads, "steps": len(ends), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset")}
        if ends and len(self.batches) == len(ends):
            seconds = ends[-1] - self.train_start
            samples = sum(b["samples"] for b in self.batches)
            nonpad = sum(b["nonpad"] for b in self.batches)
            slots = sum(b["rows"] * b["length"] for b in self.batches)
            steps = [end - start for start, end in zip([self.train_start, *ends], ends)]
            res.update({
                "train_s": round(seconds, 2), "samples": samples, "tokens_fed": nonpad,
                "samples_per_s": round(samples / seconds, 3), "tokens_fed_per_s": round(nonpad / seconds, 1),
                "pad_fraction": round(1 - nonpad / slots, 4),
                "trained_tokens_per_sample": round(sum(b["trained"] for b in self.batches) / samples, 2),
                "step_s_median": round(statistics.median(steps), 3), "first_step_s": round(steps[0], 2),
                "cpu_util": round((self.cpu_end - self.cpu_start) / seconds, 2),
            })
        else:
            res["error"] = f"{len(ends)} optimizer steps for {len(self.batches)} batches (one batch a step expected)"
        res["setup_s"] = round(self.train_start - PROCESS_START, 2) if self.train_start else None
        res["peak_rss_mb"] = round(max(resource.getrusage(who).ru_maxrss for who in
                                       (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 1024, 1)
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
