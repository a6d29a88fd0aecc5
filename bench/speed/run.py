"""Speed benchmark: our trainer against TRL's SFTTrainer and the zero_nlp plain-Trainer recipe, on the same work.

    OMP_WAIT_POLICY=PASSIVE python bench/speed/run.py   # SmolLM2-135M LLaVA, all stages and sides, 3 repeats
    python bench/speed/run.py --stages mixed1,mixed2 --repeats 1   # the mixed-length set only
    python bench/speed/run.py --stages next_mixed2 --sides ours,ours_packed,trl   # LLaVA-NeXT stage 2 only
    python bench/speed/run.py --quick                   # smoke run: 2-layer LM, 16 samples in steps of 4 (CI)

Every side trains exactly one epoch over the same fixed subset of a stage's data file: N samples drawn with a
fixed seed (--samples, --seed; the same sample ids and so the same per-sample tokens for every side, written to
<out>/subset-<stage>.json), from the same checkpoint (`prepare.py`), with the same batch size, learning rate,
precision (fp32), torch threads, dataloader workers and environment, each in a fresh process (a child's peak RSS
would otherwise start from this process's), and in turn: each repeat runs every side once per stage, the order
rotating between repeats so no side always runs first. `OMP_WAIT_POLICY` is set to the same value for every side
(--omp_wait_policy; default PASSIVE, the setting `make` uses; "unset" removes it).

Per run, over that one pass (model load and data preparation left out; `setup_s` gives them): samples/s = N /
the time from the Trainer's train begin to the end of the last step; tokens/s = the subset's tokens (non-pad,
image tokens included, counted once by our encoder for every side, anyres images by their size; TRL's samples
hold one token more, the chat template's closing newline, which is not counted) / that time; peak RSS of the
training process (or of a child it waited for, whichever is larger). A run that does not train exactly the N
samples is an error. The table gives medians over repeats, and ours / baseline as the median of the per-repeat
ratios.

Stages: stage1 (projector only) and stage2 (projector + LM) on single-turn one-image samples; mixed1 and mixed2,
the same two freezings on a mixed-length LLaVA-style set (prepare.py's mixed.json: captions, multi-turn
conversations, text-only questions), which every side trains whole (see side_zero_nlp.py for what its recipe
needed); next_mixed2, stage 2 of a LLaVA-NeXT (anyres) model with the same LM and tower on the same mixed records,
their images at four sizes and aspect ratios (prepare.py's next_model and next_mixed.json: 136-336 image tokens an
image), which zero_nlp's LLaVA-1.5 recipe cannot train: it is skipped there. Sides: ours (length-grouped batches,
the default), ours_packed (`--packing True`, side_ours_packed.py), zero_nlp, trl.

Writes <out>/results.jsonl (one JSON per run), <out>/table.md; the last stdout line is a JSON summary (per stage,
each side's medians and `vs_faster_baseline`: ours' ratio to the faster baseline, its target, its peak RSS and the
lowest baseline's). TRL is optional (`pip install -e .[bench]`); without it that side is skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
import time
from typing import NamedTuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
OURS = ("ours", "ours_packed")
BASELINES = ("zero_nlp", "trl")


class Stage(NamedTuple):
    """Where a stage's work comes from: `data`, `model` and `image_folder` name prepare.py's assets.json entries,
    `freezing` one of harness.STAGES."""

    data: str
    freezing: str
    model: str = "model"
    image_folder: str = "image_folder"
    pack_length: int = 512  # ours_packed's rows: just above the data's longest sample (490 tokens in mixed.json)


# next_mixed2's rows: a LLaVA-NeXT sample has at most 762 tokens (mixed.json's longest, 490, with a 128 x 128 image:
# 336 image tokens, not 64); next_mixed.json's longest is 713.
STAGES = {"stage1": Stage("stage1", "stage1"), "stage2": Stage("stage2", "stage2"),
          "mixed1": Stage("mixed", "stage1"), "mixed2": Stage("mixed", "stage2"),
          "next_mixed2": Stage("next_mixed", "stage2", "next_model", "next_image_folder", pack_length=1024)}
# Sides whose recipe trains prepare.py's LLaVA-1.5 `model` only (zero_nlp concatenates one view per image).
LLAVA_1_5_ONLY = ("zero_nlp",)
# Samples per stage: one pass takes ~1-2 minutes for the baselines here (2 cores), ~0.5-1 minute for ours
# (next_mixed2's 32 samples hold about the tokens of mixed2's 48: 6,335 and 6,778 at seed 42).
SAMPLES = {"stage1": 160, "stage2": 96, "mixed1": 64, "mixed2": 48, "next_mixed2": 32}
QUICK_SAMPLES = 16
QUICK_PREPARE = ["--lm_layers", "2", "--max_images", "40", "--samples", "64"]  # prepare.py's flags under --quick
# ours / the faster baseline in samples/s over the same subset, per stage and side (no entry: no target;
# next_mixed2 has none: the issue asks for it side by side with TRL, its only baseline, without a figure).
TARGETS = {"stage1": {"ours": 2.0}, "stage2": {"ours": 1.3},
           "mixed1": {"ours": 1.7, "ours_packed": 2.5}, "mixed2": {"ours": 1.7, "ours_packed": 2.5}, "next_mixed2": {}}


def make_subset(data: str, n: int, seed: int, path: str) -> list[str]:
    """`n` records of `data` drawn with `seed` (file order kept), written to `path`; their ids."""
    with open(data) as f:
        records = json.load(f)
    if n > len(records):
        raise SystemExit(f"--samples {n} > the {len(records)} samples of {data}")
    chosen = sorted(random.Random(seed).sample(range(len(records)), n))
    with open(path, "w") as f:
        json.dump([records[i] for i in chosen], f)
    return [records[i]["id"] for i in chosen]


def subset_tokens(path: str, model: str, image_folder: str) -> int:
    """Tokens of every sample of `path` as our encoder builds them (image tokens expanded, an anyres image's by its
    size as the checking pass reads it; the baselines' tests check that zero_nlp builds the same ids and TRL these +
    one closing newline): one count for every side."""
    sys.path.insert(0, REPO)
    from transformers import AutoProcessor

    from llava.data.encoder import ConversationEncoder
    from llava.data.images import header_sizes, image_readers
    from llava.data.records import load_samples
    from llava.model.processor import image_tokens

    processor = AutoProcessor.from_pretrained(model)
    encoder = ConversationEncoder(processor, 4096, image_tokens(processor))
    reader = image_readers([path], image_folder)[0]
    tokens = 0
    for sample in load_samples([path]):
        sizes = header_sizes(sample, reader) if encoder.image_tokens.needs_sizes else None
        tokens += len(encoder.encode(sample, sizes)["input_ids"])
    return tokens


def stage_sides(stage: str, sides: list[str]) -> list[str]:
    """The `sides` that can train `stage`: all of them on prepare.py's LLaVA-1.5 model, else all but LLAVA_1_5_ONLY."""
    if STAGES[stage].model == "model":
        return sides
    return [side for side in sides if side not in LLAVA_1_5_ONLY]


def run_side(side: str, stage: Stage, data: str, assets: dict, args: argparse.Namespace, out_json: str) -> dict:
    command = [sys.executable, os.path.join(HERE, f"side_{side}.py"), "--stage", stage.freezing,
               "--model", assets[stage.model], "--data", data, "--image_folder", assets[stage.image_folder],
               "--pack_length", str(stage.pack_length), "--batch_size", str(args.batch_size),
               "--workers", str(args.workers), "--threads", str(args.threads), "--seed", str(args.seed),
               "--out_json", out_json]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join([REPO, *filter(None, [env.get("PYTHONPATH")])])  # this checkout's llava
    env.pop("OMP_WAIT_POLICY", None)
    if args.omp_wait_policy != "unset":
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    log = out_json[:-len(".json")] + ".log"
    with open(log, "w") as f:
        code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0 or not os.path.isfile(out_json):
        raise RuntimeError(f"{side} {stage} failed (exit {code}); see {log}")
    with open(out_json) as f:
        return json.load(f)


def median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def ratio_by_repeat(runs: list[dict], other: list[dict]) -> float | None:
    """Median over repeats of samples/s of `runs` / samples/s of `other` in the same repeat."""
    other_by_repeat = {r["repeat"]: r["samples_per_s"] for r in other}
    return median([r["samples_per_s"] / other_by_repeat[r["repeat"]] for r in runs if r["repeat"] in other_by_repeat])


def summarize(results: list[dict], sides: list[str]) -> tuple[str, dict]:
    lines = ["| stage | side | N | runs | samples/s | tokens/s | pass s | peak RSS (MB) | pad fraction | step s "
             "(median) | setup s | ours / side |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    summary: dict = {}
    for stage in STAGES:
        rows = {s: [r for r in results if r["stage"] == stage and r["side"] == s] for s in sides}
        if not any(rows.values()):
            continue
        stage_summary = {}
        for side, runs in rows.items():
            if not runs:
                continue
            entry = {"samples": runs[0]["samples"], "tokens": runs[0]["subset_tokens"], "runs": len(runs),
                     "samples_per_s": median([r["samples_per_s"] for r in runs]),
                     "tokens_per_s": median([r["tokens_per_s"] for r in runs]),
                     "train_s": median([r["train_s"] for r in runs]),
                     "peak_rss_mb": median([r["peak_rss_mb"] for r in runs]),
                     "pad_fraction": median([r["pad_fraction"] for r in runs]),
                     "step_s": median([r["step_s_median"] for r in runs]),
                     "setup_s": median([r["setup_s"] for r in runs]),
                     "ours_over_side": ratio_by_repeat(rows.get("ours", []), runs) if side != "ours" else None}
            stage_summary[side] = entry
            ratio = f"{entry['ours_over_side']:.2f}x" if entry["ours_over_side"] else "-"
            lines.append(f"| {stage} | {side} | {entry['samples']} | {entry['runs']} | {entry['samples_per_s']:.3f} | "
                         f"{entry['tokens_per_s']:.1f} | {entry['train_s']:.1f} | {entry['peak_rss_mb']:,.0f} | "
                         f"{entry['pad_fraction']:.3f} | {entry['step_s']:.2f} | {entry['setup_s']:.1f} | {ratio} |")
        baselines = [s for s in BASELINES if s in stage_summary]
        if baselines:
            fastest = max(baselines, key=lambda s: stage_summary[s]["samples_per_s"])
            lowest_rss = min(stage_summary[s]["peak_rss_mb"] for s in baselines)
            stage_summary["vs_faster_baseline"] = {
                side: {"baseline": fastest, "ratio": ratio_by_repeat(rows[side], rows[fastest]),
                       "target": TARGETS[stage].get(side), "rss_mb": stage_summary[side]["peak_rss_mb"],
                       "rss_lowest_baseline_mb": lowest_rss} for side in OURS if side in stage_summary}
        summary[stage] = stage_summary
    return "\n".join(lines), summary


def target_lines(summary: dict) -> list[str]:
    lines = []
    for stage in STAGES:
        for side, vs in summary.get(stage, {}).get("vs_faster_baseline", {}).items():
            if vs["ratio"]:
                target = vs["target"]
                met = "no target" if target is None else f"target >= {target}x: " + (
                    "met" if vs["ratio"] >= target else "MISSED")
                lines.append(f"{stage}: {side} / {vs['baseline']} (faster baseline) = {vs['ratio']:.2f}x ({met}); "
                             f"peak RSS {vs['rss_mb']:,.0f} MB vs lowest baseline {vs['rss_lowest_baseline_mb']:,.0f} "
                             f"MB ({'met' if vs['rss_mb'] <= vs['rss_lowest_baseline_mb'] else 'MISSED'})")
    return lines


def parse_samples(text: str | None, quick: bool) -> dict[str, int]:
    samples = {stage: QUICK_SAMPLES for stage in STAGES} if quick else dict(SAMPLES)
    for item in filter(None, (text or "").split(",")):
        stage, _, n = item.partition("=")
        if stage not in STAGES or not n.isdigit() or int(n) < 1:
            raise SystemExit(f"--samples: {item!r} is not STAGE=N with a stage of {', '.join(STAGES)}")
        samples[stage] = int(n)
    return samples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: 2-layer LM, {QUICK_SAMPLES} samples a stage, batch 4, one repeat")
    p.add_argument("--work_dir", default=None, help="model and data, built once, then reused (default: "
                   "/tmp/llava-speed, or /tmp/llava-speed-quick with --quick)")
    p.add_argument("--out", default=None, help="results folder (default: <work_dir>/results-<time>)")
    p.add_argument("--sides", default="ours,ours_packed,zero_nlp,trl", help=f"of {', '.join(OURS + BASELINES)}")
    p.add_argument("--stages", default=",".join(STAGES), help=f"of {', '.join(STAGES)}")
    p.add_argument("--samples", default=None, help="STAGE=N,... samples in a stage's subset (default: "
                   + ", ".join(f"{k}={v}" for k, v in SAMPLES.items()) + f"; --quick: {QUICK_SAMPLES})")
    p.add_argument("--seed", type=int, default=42, help="draws the subsets; every side's Trainer seed")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--omp_wait_policy", default="PASSIVE", help="PASSIVE, ACTIVE or unset; the same for every side")
    args = p.parse_args()
    args.work_dir = args.work_dir or ("/tmp/llava-speed-quick" if args.quick else "/tmp/llava-speed")
    prepare = [sys.executable, os.path.join(HERE, "prepare.py"), "--work_dir", args.work_dir]
    if args.quick:
        args.repeats, args.batch_size = 1, 4
        prepare += QUICK_PREPARE
    samples = parse_samples(args.samples, args.quick)
    sides, stages = args.sides.split(","), args.stages.split(",")
    unknown = sorted(set(sides) - set(OURS + BASELINES)) + sorted(set(stages) - set(STAGES))
    if unknown:
        p.error(f"unknown side or stage: {', '.join(unknown)}")
    if "trl" in sides and importlib.util.find_spec("trl") is None:
        print("trl is not installed (pip install -e .[bench]): skipping the TRL side", flush=True)
        sides.remove("trl")
    subprocess.run(prepare, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(args.work_dir, "assets.json")) as f:
        assets = json.load(f)
    out = args.out or os.path.join(args.work_dir, time.strftime("results-%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)
    subsets = {}
    for stage in stages:
        path = os.path.join(out, f"subset-{stage}.json")
        ids = make_subset(assets[STAGES[stage].data], samples[stage], args.seed, path)
        subsets[stage] = {"path": path, "samples": len(ids), "tokens": subset_tokens(
            path, assets[STAGES[stage].model], assets[STAGES[stage].image_folder])}
        for side in sorted(set(sides) - set(stage_sides(stage, sides))):
            print(f"{side} trains LLaVA-1.5 models only: skipping it for {stage}", flush=True)
    sizes = ", ".join(f"{stage} {subset['samples']}/{subset['tokens']}" for stage, subset in subsets.items())
    print(f"# {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}, OMP_WAIT_POLICY={args.omp_wait_policy}, "
          f"batch {args.batch_size}, threads {args.threads}, workers {args.workers}, fp32, seed {args.seed}; "
          f"subsets (samples/tokens): {sizes}; results in {out}", flush=True)
    results = []
    for repeat in range(1, args.repeats + 1):
        order = sides[repeat - 1:] + sides[:repeat - 1]  # rotate: no side always runs first
        for stage in stages:
            for side in stage_sides(stage, order):
                name = f"{side}-{stage}-r{repeat}"
                subset = subsets[stage]
                result = run_side(side, STAGES[stage], subset["path"], assets, args, os.path.join(out, name + ".json"))
                if result.get("samples") != subset["samples"]:
                    raise RuntimeError(f"{name} trained {result.get('samples')} samples, not the subset's "
                                       f"{subset['samples']}: {result.get('error', '')}")
                result.update(repeat=repeat, stage=stage, subset_tokens=subset["tokens"],
                              tokens_per_s=round(subset["tokens"] / result["train_s"], 1))
                results.append(result)
                with open(os.path.join(out, "results.jsonl"), "a") as f:
                    f.write(json.dumps(result) + "\n")
                print(f"[{time.strftime('%H:%M:%S')}] {name}: {result['samples']} samples in {result['train_s']} s "
                      f"({result['steps']} steps): {result['samples_per_s']} samples/s, {result['tokens_per_s']} "
                      f"tokens/s, pad {result['pad_fraction']}, rss {result['peak_rss_mb']} MB, "
                      f"setup {result['setup_s']} s, cpu_util {result['cpu_util']}, load {result['load1_start']}",
                      flush=True)
    table, summary = summarize(results, sides)
    report = "\n".join([table, "", *target_lines(summary)])
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(report + "\n")
    print(report)
    print(json.dumps({"settings": {**vars(args), "samples": samples}, "summary": summary}))


if __name__ == "__main__":
    main()
