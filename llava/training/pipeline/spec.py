"""A pipeline file read into stages: each stage's flags (the file's `defaults`, then the stage's own, with the
command line's overrides), where it starts from and where it writes.

    defaults:                       # any train_llava.py flag; output_dir is the pipeline's folder
      output_dir: out/llava
      vision_model_name_or_path: openai/clip-vit-large-patch14-336
      language_model_name_or_path: Qwen/Qwen2.5-7B-Instruct
    stages:
      - name: align                 # trains in out/llava/align
        freeze_language_model: true
        learning_rate: 1e-3
      - name: instruct              # starts from align's final output (the previous stage's, unless `from:`)
        from: align                 # a stage name, or a checkpoint path
        learning_rate: 2e-5

Command-line flags after the file override `defaults` (`--output_dir out/run2`), `--<stage>.<flag>` overrides one
stage's (`--align.learning_rate 5e-4`). Every value becomes the flag's command-line text, so a stage's run is
exactly `python -m llava.train <its flags>`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from llava.data.types import ConfigurationError

CONFIG_SUFFIXES = (".json", ".yaml", ".yml")  # of config files: one run's flags, or a pipeline
PIPELINE_KEYS = ("defaults", "stages")
STAGE_KEYS = ("name", "from")
START_FLAGS = ("model_name_or_path", "vision_model_name_or_path", "language_model_name_or_path")
# Flags that set up a new model's image processor, which every later stage's checkpoint then keeps (and refuses
# the flag): under `defaults` they go to the first stage alone, as the start model's parts do (a first stage that
# continues a checkpoint gets them too, and refuses them by name).
NEW_MODEL_FLAGS = ("image_grid_pinpoints", "image_aspect_ratio", "vision_aspect_ratio")
# Flags the pipeline sets for every stage: each writes into <output_dir>/<name> and resumes its own checkpoints.
PIPELINE_FLAGS = ("output_dir", "resume_from_checkpoint")
_STAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_RESERVED_NAMES = re.compile(r"runs|checkpoint-\d+")


@dataclass(frozen=True)
class Start:
    """Where a stage's weights come from: an earlier stage's final output, a checkpoint path, or (first stage
    only) the parts or checkpoint its flags name."""

    stage: str | None = None
    path: str | None = None

    def describe(self, flags: dict[str, str]) -> str:
        if self.stage:
            return f"stage {self.stage}'s final output"
        if self.path:
            return self.path
        if "model_name_or_path" in flags:
            return flags["model_name_or_path"]
        return (f"vision tower {flags.get('vision_model_name_or_path')} + language model "
                f"{flags.get('language_model_name_or_path')}")


@dataclass(frozen=True)
class Stage:
    name: str
    flags: dict[str, str]  # flag name -> its command-line text, output_dir and the start model not included
    start: Start
    output_dir: str


@dataclass(frozen=True)
class Pipeline:
    path: str  # absolute: names the pipeline in its manifest
    output_dir: str
    stages: tuple[Stage, ...]

    def stage(self, name: str) -> Stage:
        return next(stage for stage in self.stages if stage.name == name)

    @property
    def names(self) -> list[str]:
        return [stage.name for stage in self.stages]


def read_file(path: str) -> object:
    """The content of a .json/.yaml file, or ConfigurationError naming the file."""
    import yaml  # only config files need it

    if not os.path.isfile(path):
        raise ConfigurationError(f"{path}: file not found.")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f) if path.lower().endswith(".json") else yaml.safe_load(f)
        except (ValueError, yaml.YAMLError) as error:
            raise ConfigurationError(f"{path}: not a readable config file ({error}).") from None


def is_pipeline_file(path: str) -> bool:
    """A config file with `stages:` is a pipeline; any other one holds one run's flags."""
    content = read_file(path)
    return isinstance(content, dict) and "stages" in content


def read_pipeline(path: str, overrides: list[str], known_flags: set[str]) -> Pipeline:
    """The pipeline in file `path`, with the command line's `overrides` (flags after the file) applied; keys and
    references are checked here, each stage's flags against each other by `llava.training.parsing` later."""
    content = read_file(path)
    unknown = sorted(set(content) - set(PIPELINE_KEYS))
    if unknown:
        raise ConfigurationError(f"{path}: unknown keys {unknown}; a pipeline file holds 'defaults' (flags of every "
                                 "stage) and 'stages' (a list of stages, each with a 'name' and its flags).")
    defaults, stages = content.get("defaults") or {}, content.get("stages")
    if not isinstance(defaults, dict):
        raise ConfigurationError(f"{path}: 'defaults' is a mapping of flag names to values.")
    if not isinstance(stages, list) or not stages or not all(isinstance(s, dict) for s in stages):
        raise ConfigurationError(f"{path}: 'stages' is a non-empty list of mappings, each with a 'name' and flags.")
    names = _stage_names(path, stages)
    default_flags = _flags(defaults, f"{path}: defaults", known_flags)
    for key in PIPELINE_FLAGS[1:]:
        if key in default_flags:
            raise ConfigurationError(f"{path}: defaults: {key} is the pipeline's to set (every stage resumes its "
                                     "own checkpoints when the same command runs again); drop it.")
    cli_defaults, cli_stages = split_overrides(overrides, names, known_flags)
    default_flags.update(cli_defaults)
    output_dir = default_flags.pop("output_dir", None)
    if not output_dir:
        raise ConfigurationError(f"{path}: no output_dir: set it under 'defaults' or pass --output_dir; each stage "
                                 "writes into <output_dir>/<stage name>.")
    built = []
    for index, (raw, name) in enumerate(zip(stages, names)):
        where = f"{path}: stage {name}"
        own = _flags({k: v for k, v in raw.items() if k not in STAGE_KEYS}, where, known_flags)
        for key in PIPELINE_FLAGS:
            if key in own:
                raise ConfigurationError(f"{where}: {key} is the pipeline's to set (the stage writes into "
                                         f"<output_dir>/{name} and resumes its own checkpoints); drop it.")
        own.update(cli_stages.get(name, {}))
        start = _start(raw.get("from"), where, name, names)
        if (index or start.path) and set(own) & set(START_FLAGS):
            raise ConfigurationError(f"{where}: {sorted(set(own) & set(START_FLAGS))[0]} names a start model, but "
                                     "a later stage starts from the previous stage's output: say `from: <stage "
                                     "name or checkpoint path>` instead.")
        first_only = (START_FLAGS if start.path or index else ()) + (NEW_MODEL_FLAGS if index else ())
        flags = {**{k: v for k, v in default_flags.items() if k not in first_only}, **own}
        built.append(Stage(name, flags, start, os.path.join(output_dir, name)))
    _check_overrides_apply(cli_defaults, stages, names)
    return Pipeline(os.path.abspath(path), output_dir, tuple(built))


def _stage_names(path: str, stages: list[dict]) -> list[str]:
    names = []
    for index, stage in enumerate(stages):
        name = stage.get("name")
        if not isinstance(name, str) or not _STAGE_NAME.fullmatch(name) or _RESERVED_NAMES.fullmatch(name):
            raise ConfigurationError(f"{path}: stages[{index}] has name {name!r}; give each stage a 'name' of "
                                     "letters, digits, '-' and '_' (it names its folder; not 'runs' or "
                                     "'checkpoint-N').")
        if name in names:
            raise ConfigurationError(f"{path}: two stages are named {name!r} (stages[{names.index(name)}] and "
                                     f"stages[{index}]); each stage needs its own name: it names its folder.")
        names.append(name)
    return names


def _start(value, where: str, name: str, names: list[str]) -> Start:
    """What stage `name`'s `from:` says: an earlier stage, a checkpoint path, or (None) the previous stage (the
    first stage: its flags)."""
    earlier = names[:names.index(name)]
    if value is None:
        return Start(stage=earlier[-1]) if earlier else Start()
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"{where}: from: {value!r} is not a stage name or a checkpoint path.")
    if value in names:
        if value not in earlier:
            which = "this stage itself" if value == name else "a later stage"
            raise ConfigurationError(f"{where}: from: {value} names {which}; a stage starts from an earlier one "
                                     f"({', '.join(earlier) or 'there is none before it'}). Reorder the stages or "
                                     "name an earlier one.")
        return Start(stage=value)
    if os.sep in value or os.path.isdir(value):
        return Start(path=value)
    raise ConfigurationError(f"{where}: from: {value} names no stage ({', '.join(names)}) and no folder; give an "
                             "earlier stage's name or a checkpoint path.")


def _flags(values: dict, where: str, known_flags: set[str]) -> dict[str, str]:
    """`values` (flag name -> YAML/JSON value) as command-line texts; unknown names refused, null drops a flag."""
    unknown = sorted(set(values) - known_flags)
    if unknown:
        extra = " (and 'name', 'from')" if "stage" in where else ""
        raise ConfigurationError(f"{where}: unknown keys {unknown}; keys are train_llava.py flag names without the "
                                 f"leading --{extra}.")
    return {key: flag_text(value, f"{where}: {key}") for key, value in values.items() if value is not None}


def flag_text(value, where: str) -> str:
    """A YAML/JSON value as the command line writes it: True/False, numbers as written, lists comma-separated."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, float, str)):
        return str(value)
    if isinstance(value, list) and all(isinstance(v, (int, float, str)) and not isinstance(v, bool) for v in value):
        return ",".join(str(v) for v in value)
    raise ConfigurationError(f"{where}: {json.dumps(value, default=repr)[:60]} is not a flag value; give a string, "
                             "number, true/false or a list of strings (joined with commas).")


def split_overrides(tokens: list[str], names: list[str], known_flags: set[str]
                    ) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """Command-line flags after the pipeline file: `--flag value` (overrides `defaults`) and `--<stage>.<flag>
    value` (overrides that stage's)."""
    defaults: dict[str, str] = {}
    stages: dict[str, dict[str, str]] = {}
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if not token.startswith("--"):
            raise ConfigurationError(f"{token}: expected a --flag after the pipeline file.")
        key, _, value = token[2:].partition("=")
        values = [value] if value else []
        index += 1
        while not value and index < len(tokens) and not tokens[index].startswith("--"):
            values.append(tokens[index])
            index += 1
        stage, _, flag = key.rpartition(".")
        if stage and stage not in names:
            raise ConfigurationError(f"--{key}: the pipeline has no stage {stage!r} ({', '.join(names)}).")
        if flag not in known_flags:
            raise ConfigurationError(f"--{key}: train_llava.py has no flag --{flag}.")
        if len(values) > 1:
            raise ConfigurationError(f"--{key} {' '.join(values)}: one value per flag after a pipeline file "
                                     "(lists are comma-separated).")
        (stages.setdefault(stage, {}) if stage else defaults)[flag] = values[0] if values else "True"
    return defaults, stages


def _check_overrides_apply(cli_defaults: dict[str, str], stages: list[dict], names: list[str]) -> None:
    """A command-line flag overrides `defaults`; one that every stage sets itself would change nothing."""
    for key, value in cli_defaults.items():
        if key not in START_FLAGS and all(key in stage for stage in stages):
            raise ConfigurationError(f"--{key} {value} overrides the pipeline's defaults, but every stage sets its "
                                     f"own {key}, so it would change nothing. Override one stage's with "
                                     f"--{names[0]}.{key} {value}.")


def stage_argv(stage: Stage, start_path: str | None) -> list[str]:
    """The flags of `python -m llava.train` for `stage`; `start_path` is the folder of the model it starts from
    (None: the first stage, whose flags name its parts or checkpoint)."""
    argv = []
    for key, value in stage.flags.items():
        argv += [f"--{key}", value]
    if start_path is not None:
        argv += ["--model_name_or_path", start_path]
    return argv + ["--output_dir", stage.output_dir, "--resume_from_checkpoint", "True"]
