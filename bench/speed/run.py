"""Speed benchmark: our trainer against TRL's SFTTrainer and the zero_nlp plain-Trainer recipe, side by side.

    OMP_WAIT_POLICY=PASSIVE python bench/speed/run.py   # SmolLM2-135M LLaVA, all stages and sides, 3 repeats (~1.5 h)
    python bench/speed/run.py --stages mixed1,mixed2 --sides ours,ours_packed,zero_nlp,trl --repeats 2 \
        --target_seconds 40                             # the mixed-length set only (~30 min, see README)
    python bench/speed/run.py --quick                   # smoke run: 2-layer LM, a few steps (CI)

Every side trains the same checkpoint (`prepare.py`) on the same data file with the same batch size, learning
rate, precision (fp32), torch threads, dataloader workers and environment, each in a fresh process (a child's
peak RSS would otherwise start from this process's), and in turn: each repeat runs every side once per stage,
the order rotating between repeats so no side always runs first. The table gives medians over repeats, and
ours / baseline as the median of the per-repeat ratios. `OMP_WAIT_POLICY` is set to the same value for every
side (--omp_wait_policy; default PASSIVE, the setting `make` uses; "unset" removes it).

Stages: stage1 (projector only) and stage2 (projector + LM) on single-turn one-image samples; mixed1 and mixed2,
the same two freezings on a mixed-length LLaVA-style set (prepare.py's mixed.json: captions, multi-turn
conversations, text-only questions), which every side trains whole (see side_zero_nlp.py for what its recipe
needed). Sides: ours (length-grouped batches, the default), ours_packed (`--packing True`, side_ours_packed.py),
zero_nlp, trl. Per run: samples/s (a packed row counts its samples), non-pad tokens/s, the samples and tokens
measured, and the padding; ours' runs on the mixed set also give the padding over one whole epoch of its sampler
(`epoch_pad_fraction`, with the same figure for plain random batches beside it).

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
OURS = ("ours", "ours_packed")
BASELINES = ("zero_nlp", "trl")
STAGES = {"stage1": ("stage1", "stage1"), "stage2": ("stage2", "stage2"),  # stage -> (data file, freezing)
          "mixed1": ("mixed", "stage1"), "mixed2": ("mixed", "stage2")}
TARGETS = {"stage1": 2.0, "stage2": 1.3, "mixed1": 2.0, "mixed2": 2.0}  # ours / faster baseline, samples per second
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


def ratio_by_repeat(runs: list[dict], other: list[dict]) -> float | None:
    """Median over repeats of samples/s of `runs` / samples/s of `other` in the same repeat."""
    other_by_repeat = {r["repeat"]: r["samples_per_s"] for r in other}
    return median([r["samples_per_s"] / other_by_repeat[r["repeat"]] for r in runs if r["repeat"] in other_by_repeat])


def _set_ratio(stage_summary: dict, side: str, baselines: list[str]) -> float | None:
    """`side`'s estimated samples/s over the whole set / the faster baseline's by the same estimate."""
    rates = [stage_summary[s]["set_samples_per_s"] for s in baselines]
    if stage_summary[side]["set_samples_per_s"] is None or not all(rates):
        return None
    return round(stage_summary[side]["set_samples_per_s"] / max(rates), 2)


def summarize(results: list[dict], sides: list[str]) -> tuple[str, dict]:
    lines = ["| stage | side | runs | samples/s | tokens/s | samples | tokens/sample | pad fraction | peak RSS (MB) | "
             "step s | ours / side |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    summary: dict = {}
    for stage in STAGES:
        rows = {s: [r for r in results if r["stage"] == stage and r["side"] == s and "samples_per_s" in r]
                for s in sides}
        if not any(rows.values()):
            continue
        stage_summary = {}
        for side, runs in rows.items():
            if not runs:
                continue
            entry = {"runs": len(runs), "samples_per_s": median([r["samples_per_s"] for r in runs]),
                     "tokens_per_s": median([r["tokens_per_s"] for r in runs]),
                     "samples_measured": median([r["samples_measured"] for r in runs]),
                     "tokens_measured": median([r["tokens_measured"] for r in runs]),
                     "tokens_per_sample": median([r["tokens_per_sample"] for r in runs]),
                     "pad_fraction": median([r["pad_fraction"] for r in runs]),
                     "peak_rss_mb": median([r["peak_rss_mb"] for r in runs]),
                     "step_s": median([r["step_s_median"] for r in runs]),
                     "ours_over_side": ratio_by_repeat(rows.get("ours", []), runs) if side != "ours" else None}
            stage_summary[side] = entry
            ratio = f"{entry['ours_over_side']:.2f}x" if entry["ours_over_side"] else "-"
            lines.append(f"| {stage} | {side} | {entry['runs']} | {entry['samples_per_s']:.3f} | "
                         f"{entry['tokens_per_s']:.1f} | {entry['samples_measured']:.0f} | "
                         f"{entry['tokens_per_sample']:.1f} | {entry['pad_fraction']:.3f} | "
                         f"{entry['peak_rss_mb']:,.0f} | {entry['step_s']:.2f} | {ratio} |")
        # The measured window holds other samples on each side (ours: length-grouped batches, longest first; the
        # baselines: random ones), so samples/s over the whole set is also estimated, as non-pad tokens/s / the
        # set's tokens per sample (what ours counts; TRL's samples have one token more, its closing newline).
        set_tokens = median([r["set_tokens_per_sample"] for r in results
                             if r["stage"] == stage and "set_tokens_per_sample" in r])
        for side, entry in stage_summary.items():
            entry["set_samples_per_s"] = round(entry["tokens_per_s"] / set_tokens, 3) if set_tokens else None
        baselines = [s for s in BASELINES if s in stage_summary]
        if baselines:
            fastest = max(baselines, key=lambda s: stage_summary[s]["samples_per_s"])
            lowest_rss = min(stage_summary[s]["peak_rss_mb"] for s in baselines)
            stage_summary["vs_faster_baseline"] = {
                side: {"baseline": fastest, "ratio": ratio_by_repeat(rows[side], rows[fastest]),
                       "set_ratio": _set_ratio(stage_summary, side, baselines),
                       "target": TARGETS[stage], "rss_mb": stage_summary[side]["peak_rss_mb"],
                       "rss_lowest_baseline_mb": lowest_rss} for side in OURS if side in stage_summary}
        summary[stage] = stage_summary
    mixed = [r for r in results if r["side"] == "ours" and STAGES[r["stage"]][0] == "mixed" and "pad_fraction" in r]
    if mixed:
        summary["mixed_padding"] = {"pad_fraction_measured": median([r["pad_fraction"] for r in mixed]),
                                    "epoch_pad_fraction": mixed[0].get("epoch_pad_fraction"),
                                    "epoch_pad_fraction_random_batches": mixed[0].get("epoch_pad_fraction_random"),
                                    "target": PAD_TARGET}
    return "\n".join(lines), summary


def target_lines(summary: dict) -> list[str]:
    lines = []
    for stage, target in TARGETS.items():
        for side, vs in summary.get(stage, {}).get("vs_faster_baseline", {}).items():
            if vs["ratio"]:
                lines.append(f"{stage}: {side} / {vs['baseline']} (faster baseline) = {vs['ratio']:.2f}x "
                             f"(target >= {target}x: {'met' if vs['ratio'] >= target else 'MISSED'}); peak RSS "
                             f"{vs['rss_mb']:,.0f} MB vs lowest baseline {vs['rss_lowest_baseline_mb']:,.0f} MB "
                             f"({'met' if vs['rss_mb'] <= vs['rss_lowest_baseline_mb'] else 'MISSED'})")
                if vs.get("set_ratio") and stage.startswith("mixed"):
                    lines.append(f"  over the whole set (non-pad tokens/s / the set's tokens per sample): "
                                 f"{vs['set_ratio']:.2f}x ({'met' if vs['set_ratio'] >= target else 'MISSED'})")
    mixed = summary.get("mixed_padding")
    if mixed:
        lines.append(f"mixed-length set, ours: padding {mixed['pad_fraction_measured']:.3f} in the measured batches, "
                     f"{mixed['epoch_pad_fraction']:.3f} over an epoch (random batches: "
                     f"{mixed['epoch_pad_fraction_random_batches']:.3f}; target <= {PAD_TARGET})")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 2-layer LM, 4 steps, batch 4, one repeat")
    p.add_argument("--work_dir", default="/tmp/llava-speed", help="model and data (built once, then reused)")
    p.add_argument("--out", default=None, help="results folder (default: <work_dir>/results-<time>)")
    p.add_argument("--sides", default="ours,ours_packed,zero_nlp,trl", help=f"of {', '.join(OURS + BASELINES)}")
    p.add_argument("--stages", default=",".join(STAGES), help=f"of {', '.join(STAGES)}")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--target_seconds", type=float, default=60.0)
    p.add_argument("--warmup_steps", type=int, default=1)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--omp_wait_policy", default="PASSIVE", help="PASSIVE, ACTIVE or unset; the same for every side")
    args = p.parse_args()
    prepare = [sys.executable, os.path.join(HERE, "prepare.py"), "--work_dir", args.work_dir]
    if args.quick:
        args.repeats, args.batch_size, args.steps, args.target_seconds = 1, 4, 4, 0
        prepare += ["--lm_layers", "2", "--max_images", "40", "--samples", "64"]
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
    print(f"# {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}, OMP_WAIT_POLICY={args.omp_wait_policy}, "
          f"batch {args.batch_size}, threads {args.threads}, workers {args.workers}, fp32; results in {out}", flush=True)
    results = []
    for repeat in range(1, args.repeats + 1):
        order = sides[repeat - 1:] + sides[:repeat - 1]  # rotate: no side always runs first
        runs = [(stage, side) for stage in stages for side in order]
        for stage, side in runs:
            data, freezing = STAGES[stage]
            name = f"{side}-{stage}-r{repeat}"
            result = run_side(side, freezing, assets[data], assets, args, os.path.join(out, name + ".json"))
            result.update(repeat=repeat, stage=stage)
            results.append(result)
            with open(os.path.join(out, "results.jsonl"), "a") as f:
                f.write(json.dumps(result) + "\n")
            print(f"[{time.strftime('%H:%M:%S')}] {name}: {result.get('samples_per_s')} samples/s, "
                  f"{result.get('tokens_per_s')} tokens/s, {result.get('samples_measured')} samples / "
                  f"{result.get('tokens_measured')} tokens measured, "
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
