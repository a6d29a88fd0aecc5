"""The checks of a pipeline that need transformers: every stage's flags parsed as `llava.train` parses them (so a
contradiction in a later stage stops the run before the first trains), every stage's data found, and with
`--dry_run` the plan printed. The pipeline's process runs them in a process of its own (`python -m llava.train FILE
[flags]` with `$TRAIN_LLAVA_FLAG_NAMES_FILE` set), so it holds no torch while its stages train (~0.5 GB less at the
pipeline's peak); that process writes the training flags' names, which the pipeline's needs to read the file, there.
"""

from __future__ import annotations

import json
import os

from llava.data.mixture import read_mixture
from llava.data.types import ConfigurationError, DataError
from llava.training.parsing import check_model_paths, flag_names, parse_args
from llava.training.pipeline.arguments import FLAG_NAMES_ENV, PipelineArguments, parse_pipeline_arguments
from llava.training.pipeline.manifest import read_manifest
from llava.training.pipeline.plan import check_selection, plan, start_path
from llava.training.pipeline.spec import read_pipeline, stage_argv


def check_pipeline(path: str, options: PipelineArguments, overrides: list[str]) -> set[str]:
    """Check pipeline file `path` under the command line's `overrides` (with `options.dry_run`, print its plan);
    the names of the training flags. Raises ConfigurationError or DataError naming the stage and the fix."""
    known = flag_names()
    pipeline = read_pipeline(path, overrides, known)
    selected = check_selection(pipeline, options.stages, options.restart_from)
    mixtures = {}
    for stage in pipeline.stages:
        where = f"{pipeline.path}: stage {stage.name}"
        try:
            args = parse_args(stage_argv(stage, start_path(pipeline, stage)))
            if not stage.start.stage:  # a later stage's start folder is written by the stage before it
                check_model_paths(args.model)
            mixtures[stage.name] = read_mixture(args.data.data_path, args.data.image_folder)
        except ConfigurationError as error:
            raise ConfigurationError(f"{where}: {error}") from None
        except DataError as error:
            raise DataError(f"{where}: {error}", kind=error.kind) from None
    if options.dry_run:
        from llava.training.pipeline.dry_run import describe_plan  # builds meta-device models: only for the plan

        manifest = read_manifest(pipeline.output_dir)
        print(describe_plan(pipeline, plan(pipeline, manifest, mixtures, selected, options.restart_from), mixtures,
                            manifest))
    return known


def main(argv: list[str]) -> int:
    options, overrides = parse_pipeline_arguments(argv)
    known = check_pipeline(argv[0], options, overrides)
    with open(os.environ[FLAG_NAMES_ENV], "w", encoding="utf-8") as f:
        json.dump(sorted(known), f)
    return 0
