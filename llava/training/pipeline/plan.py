"""What each stage does on this run of a pipeline: skip it (done, its final output verified), resume it (started
before under the same flags, data and start model: its own checkpoints continue it) or start it; decided from the
manifest before any model loads.

A stage whose result-deciding flags, data or start model changed since it was recorded invalidates itself and
every later stage: refused, naming the stage and what changed, unless `--restart_from <stage>` says to redo from
there (those stages' folders are then deleted when the run starts).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from llava.data.mixture import Mixture
from llava.data.types import ConfigurationError
from llava.model.final_output import FINAL_MARKER, PUBLISHING, IncompleteFinalOutputError, check_final_output
from llava.training.pipeline.digests import data_digest, json_digest, model_digest, result_flags
from llava.training.pipeline.spec import START_FLAGS, Pipeline, Stage

SKIP, RESUME, START = "skip", "resume", "start"


@dataclass
class StagePlan:
    stage: Stage
    action: str  # SKIP, RESUME or START
    start_path: str | None  # the folder (or hub id) it starts from; None: the parts or checkpoint its flags name


def start_path(pipeline: Pipeline, stage: Stage) -> str | None:
    if stage.start.stage:
        return pipeline.stage(stage.start.stage).output_dir
    return stage.start.path


def current_record(pipeline: Pipeline, stage: Stage, mixture: Mixture, manifest: dict | None) -> dict:
    """What the manifest records when `stage` starts under the pipeline as it is now (status "running")."""
    if stage.start.stage:
        start = {"stage": stage.start.stage}
        earlier = (manifest or {}).get("stages", {}).get(stage.start.stage, {})
        start_sha256 = earlier.get("final_output_sha256")
    elif stage.start.path:
        start = {"path": stage.start.path}
        start_sha256 = model_digest(stage.start.path)
    else:
        start = {flag: stage.flags[flag] for flag in START_FLAGS if flag in stage.flags}
        start_sha256 = json_digest({flag: model_digest(path) for flag, path in start.items()})
    return {"status": "running", "flags": stage.flags, "config_sha256": json_digest(result_flags(stage.flags)),
            "data_sha256": data_digest(mixture), "start": start, "start_sha256": start_sha256}


def changes(recorded: dict, current: dict) -> list[str]:
    """What differs, in words, between a stage's record and the pipeline now (empty: it is still valid)."""
    lines = []
    then, now = result_flags(recorded.get("flags", {})), result_flags(current["flags"])
    for flag in sorted(then.keys() | now.keys()):
        if then.get(flag) != now.get(flag):
            lines.append(f"--{flag}: {then.get(flag, '(unset)')} then, {now.get(flag, '(unset)')} now")
    if not lines and recorded.get("config_sha256") != current["config_sha256"]:
        lines.append("its flags (digest differs)")
    if recorded.get("data_sha256") != current["data_sha256"]:
        lines.append(f"its data (--data_path {current['flags'].get('data_path')}): other sources or amounts, or "
                     "files changed on disk since (size or modification time)")
    if recorded.get("start") != current["start"] or recorded.get("start_sha256") != current["start_sha256"]:
        lines.append(f"its start model ({_describe_start(current['start'])}) changed since")
    return lines


def _describe_start(start: dict) -> str:
    return f"stage {start['stage']}'s final output" if "stage" in start else ", ".join(start.values())


def final_output_ready(folder: str) -> bool:
    """True when `folder` holds a completely published final output (its marker, no interrupted move)."""
    if not os.path.isfile(os.path.join(folder, FINAL_MARKER)) or os.path.exists(os.path.join(folder, PUBLISHING)):
        return False
    try:
        check_final_output(folder)
    except IncompleteFinalOutputError:
        return False
    return True


def plan(pipeline: Pipeline, manifest: dict | None, mixtures: dict[str, Mixture], selected: list[str],
         restart_from: str | None) -> list[StagePlan]:
    """The selected stages' plans, in pipeline order, after checking every recorded stage against the pipeline
    (stages from `restart_from` on count as never run). Raises ConfigurationError naming the stage and the fix."""
    names = pipeline.names
    if manifest is not None and manifest.get("pipeline") != pipeline.path:
        raise ConfigurationError(
            f"{pipeline.output_dir} holds the manifest of another pipeline ({manifest.get('pipeline')}, stages "
            f"{', '.join(manifest.get('stages', {})) or 'none yet'}), not of {pipeline.path}. Pass another "
            "--output_dir, or run that pipeline's file.")
    redo = set(names[names.index(restart_from):]) if restart_from else set()
    records = {name: record for name, record in (manifest or {}).get("stages", {}).items() if name not in redo}
    for name in names:
        stage = pipeline.stage(name)
        record = records.get(name)
        where = f"{pipeline.path}: stage {name}"
        if record is None:
            if name not in redo and os.path.isdir(stage.output_dir) and os.listdir(stage.output_dir):
                raise ConfigurationError(
                    f"{where}: {stage.output_dir} holds files that the manifest does not account for (another run, "
                    f"or a deleted {os.path.join(pipeline.output_dir, 'pipeline.json')}). Delete that folder, or "
                    f"pass --restart_from {name} to retrain from this stage on.")
            continue
        found = changes(record, current_record(pipeline, stage, mixtures[name], {"stages": records}))
        if found:
            later = names[names.index(name) + 1:]
            listing = "\n".join(f"  - {line}" for line in found)
            raise ConfigurationError(
                f"{where} changed since it {'ran' if record['status'] == 'done' else 'started'}:\n{listing}\n"
                f"Its checkpoints and output{' and those of ' + ', '.join(later) if later else ''} no longer match "
                f"the pipeline. Pass --restart_from {name} to retrain from there, or restore what changed.")
        if record["status"] == "done":
            if not final_output_ready(stage.output_dir) or \
                    model_digest(stage.output_dir) != record.get("final_output_sha256"):
                raise ConfigurationError(
                    f"{where} is recorded done, but its final output in {stage.output_dir} is incomplete or changed "
                    f"since (its digest differs from the manifest's). Pass --restart_from {name} to retrain it and "
                    "the stages after it.")
    plans = []
    for name in [name for name in names if name in selected]:
        stage = pipeline.stage(name)
        status = records.get(name, {}).get("status")
        needed = stage.start.stage
        if needed and records.get(needed, {}).get("status") != "done" and needed not in selected:
            raise ConfigurationError(f"{pipeline.path}: stage {name} starts from stage {needed}'s final output, "
                                     f"which is not finished; add {needed} to --stages.")
        action = SKIP if status == "done" else RESUME if status else START
        plans.append(StagePlan(stage, action, start_path(pipeline, stage)))
    return plans


def check_selection(pipeline: Pipeline, stages: str | None, restart_from: str | None) -> list[str]:
    """The stage names `--stages` selects (all when unset), with `--restart_from` checked to name a stage."""
    names = pipeline.names
    selected = names if not stages else [name.strip() for name in stages.split(",") if name.strip()]
    for flag, values in (("--stages", selected), ("--restart_from", [restart_from] if restart_from else [])):
        unknown = [name for name in values if name not in names]
        if unknown:
            raise ConfigurationError(f"{flag} {','.join(unknown)}: {pipeline.path} has no such stage; its stages are "
                                     f"{', '.join(names)}.")
    return selected
