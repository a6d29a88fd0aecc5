"""Speed benchmark: our trainer against TRL's SFTTrainer and the zero_nlp plain-Trainer recipe, side by side.

    OMP_WAIT_POLICY=PASSIVE python bench/speed/run.py             # SmolLM2-135M LLaVA, 3 alternations (~40 min)
    python bench/speed/run.py --quick                             # smoke run: 2-layer LM, a few steps (CI)

Every side trains the same checkpoint (`prepare.py`) on the same data file with the same batch size, learning
rate, precision (fp32), torch threads, dataloader workers and environment, each in a fresh process (a child's
peak RSS would otherwise start from this process's), and in turn: each repeat runs every side once per stage,
the order rotating between repeats so no side always runs first. The table gives medians over repeats, and
ours / baseline as the median of the per-repeat ratios. `OMP_WAIT_POLICY` is set to the same value for every
side (--omp_wait_policy; default PASSIVE, the setting `make` uses; "unset" removes it).

A mixed-length LLaVA-style set (captions, multi-turn conversations, text-only questions) runs through ours to
measure padding: per measured batch, and over one whole epoch of its sampler (`epoch_pad_fraction`, with the
same figure for plain random batches beside it).

Writes <out>/results.jsonl (one JSON per run), <out>/table.md; the last stdout line is a JSON summary.
TRL is optional (`pip install -e .[bench]`); without it that side is skipped and the table says so.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BASELINES = ("zero_nlp", "trl")
TARGETS = {"stage1": 2.0, "stage2": 1.3}  # ours / faster baseline, samples per second
PAD_TARGET = 0.05


def run_side(side: str, stage: str, data: str, assets: dict, args: argparse.Namespace, out_json: str) -> dict:
    command = [sys.executable, os.path.join(HERE, f"side_{side}.py"), "--stage", stage, "--model", assets["model"],
               "--data", data, "--image_folder", assets["image_folder"], "--steps", str(args.steps),
               "--target_seconds", str(args.target_seconds), "--warmup_steps", str(args.warmup_steps),
               "--batch_size", str(args.batch_size), "--workers", str(args.workers), "--threads", str(args.threads),
               "--out_json", out_json]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
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


def summarize(results: list[dict], sides: list[str]) -> tuple[str, dict]:
    lines = ["| stage | side | runs | samples/s | tokens/s | pad fraction | peak RSS (MB) | step s | ours / side |",
             "|---|---|---|---|---|---|---|---|---|"]
    summary: dict = {}
    for stage in ("stage1", "stage2"):
        rows = {s: [r for r in results if r["stage"] == stage and r["side"] == s and "samples_per_s" in r]
                for s in sides}
        if not any(rows.values()):
            continue
        ours_by_repeat = {r["repeat"]: r["samples_per_s"] for r in rows.get("ours", [])}
        stage_summary = {}
        for side, runs in rows.items():
            if not runs:
                continue
            ratios = [ours_by_repeat[r["repeat"]] / r["samples_per_s"] for r in runs if r["repeat"] in ours_by_repeat]
            entry = {"runs": len(runs), "samples_per_s": median([r["samples_per_s"] for r in runs]),
                     "tokens_per_s": median([r["tokens_per_s"] for r in runs]),
                     "pad_fraction": median([r["pad_fraction"] for r in runs]),
                     "peak_rss_mb": median([r["peak_rss_mb"] for r in runs]),
                     "step_s": median([r["step_s_median"] for r in runs]),
                     "ours_over_side": median(ratios) if side != "ours" else None}
            stage_summary[side] = entry
            ratio = f"{entry['ours_over_side']:.2f}x" if entry["ours_over_side"] else "-"
            lines.append(f"| {stage} | {side} | {entry['runs']} | {entry['samples_per_s']:.3f} | "
                         f"{entry['tokens_per_s']:.1f} | {entry['pad_fraction']:.3f} | {entry['peak_rss_mb']:,.0f} | "
                         f"{entry['step_s']:.2f} | {ratio} |")
        baselines = {s: e for s, e in stage_summary.items() if s != "ours"}
        if "ours" in stage_summary and baselines:
            fastest = max(baselines, key=lambda s: baselines[s]["samples_per_s"])
            lowest_rss = min(e["peak_rss_mb"] for e in baselines.values())
            stage_summary["vs_faster_baseline"] = {
                "baseline": fastest, "ratio": baselines[fastest]["ours_over_side"], "target": TARGETS[stage],
                "rss_ours_mb": stage_summary["ours"]["peak_rss_mb"], "rss_lowest_baseline_mb": lowest_rss}
        summary[stage] = stage_summary
    mixed = [r for r in results if r["stage"] == "mixed" and "pad_fraction" in r]
    if mixed:
        summary["mixed"] = {"pad_fraction_measured": median([r["pad_fraction"] for r in mixed]),
                            "epoch_pad_fraction": mixed[0].get("epoch_pad_fraction"),
                            "epoch_pad_fraction_random_batches": mixed[0].get("epoch_pad_fraction_random"),
                            "target": PAD_TARGET}
    return "\n".join(lines), summary


def target_lines(summary: dict) -> list[str]:
    lines = []
    for stage, target in TARGETS.items():
        vs = summary.get(stage, {}).get("vs_faster_baseline")
        if vs and vs["ratio"]:
            lines.append(f"{stage}: ours / {vs['baseline']} (faster baseline) = {vs['ratio']:.2f}x "
                         f"(target >= {target}x: {'met' if vs['ratio'] >= target else 'MISSED'}); peak RSS "
                         f"{vs['rss_ours_mb']:,.0f} MB vs lowest baseline {vs['rss_lowest_baseline_mb']:,.0f} MB "
                         f"({'met' if vs['rss_ours_mb'] <= vs['rss_lowest_baseline_mb'] else 'MISSED'})")
    mixed = summary.get("mixed")
    if mixed:
        lines.append(f"mixed-length set: padding {mixed['pad_fraction_measured']:.3f} in the measured batches, "
                     f"{mixed['epoch_pad_fraction']:.3f} over an epoch (random batches: "
                     f"{mixed['epoch_pad_fraction_random_batches']:.3f}; target <= {PAD_TARGET})")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 2-layer LM, 4 steps, batch 4, one repeat")
    p.add_argument("--work_dir", default="/tmp/llava-speed", help="model and data (built once, then reused)")
    p.add_argument("--out", default=None, help="results folder (default: <work_dir>/results-<time>)")
    p.add_argument("--sides", default="ours,zero_nlp,trl")
    p.add_argument("--stages", default="stage1,stage2")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--target_seconds", type=float, default=60.0)
    p.add_argument("--warmup_steps", type=int, default=1)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--omp_wait_policy", default="PASSIVE", help="PASSIVE, ACTIVE or unset; the same for every side")
    p.add_argument("--no_mixed", action="store_true", help="skip the mixed-length padding run")
    args = p.parse_args()
    prepare = [sys.executable, os.path.join(HERE, "prepare.py"), "--work_dir", args.work_dir]
    if args.quick:
        args.repeats, args.batch_size, args.steps, args.target_seconds = 1, 4, 4, 0
        prepare += ["--lm_layers", "2", "--max_images", "40", "--samples", "64"]
    sides = args.sides.split(",")
    if "trl" in sides and importlib.util.find_spec("trl") is None:
        print("trl is not installed (pip install -e .[bench]): skipping the TRL side", flush=True)
        sides.remove("trl")
    subprocess.run(prepare, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(args.work_dir, "assets.json")) as f:
        assets = json.load(f)
    out = args.out or os.path.join(args.work_dir, time.strftime("results-%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)
    print(f"# {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}, OMP_WAIT_POLICY={args.omp_wait_policy}, "
          f"batch {args.batch_size}, threads {args.threads}, workers {args.workers}, fp32; results in {out}", flush=True)
    results = []
    for repeat in range(1, args.repeats + 1):
        order = sides[repeat - 1:] + sides[:repeat - 1]  # rotate: no side always runs first
        runs = [(stage, side) for stage in args.stages.split(",") for side in order]
        if not args.no_mixed and repeat == 1 and "ours" in sides:
            runs.append(("mixed", "ours"))
        for stage, side in runs:
            data = assets[stage]
            name = f"{side}-{stage}-r{repeat}"
            result = run_side(side, "stage2" if stage == "mixed" else stage, data, assets, args,
                              os.path.join(out, name + ".json"))
            result.update(repeat=repeat, stage=stage)
            results.append(result)
            with open(os.path.join(out, "results.jsonl"), "a") as f:
                f.write(json.dumps(result) + "\n")
            print(f"[{time.strftime('%H:%M:%S')}] {name}: {result.get('samples_per_s')} samples/s, "
                  f"pad {result.get('pad_fraction')}, rss {result.get('peak_rss_mb')} MB, "
                  f"cpu_util {result.get('cpu_util')}, load {result.get('load1_start')}", flush=True)
    table, summary = summarize(results, sides)
    report = "\n".join([table, "", *target_lines(summary)])
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(report + "\n")
    print(report)
    print(json.dumps({"settings": vars(args), "summary": summary}))


if __name__ == "__main__":
    main()
