"""The flags of a pipeline run (`--stages`, `--dry_run`, `--restart_from`, `--launcher`), beside the training flags
that override the file's `defaults`."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import HfArgumentParser

# Where the checks' process (`check`) writes the training flags' names for the pipeline's process.
FLAG_NAMES_ENV = "TRAIN_LLAVA_FLAG_NAMES_FILE"


@dataclass
class PipelineArguments:
    """The flags of a pipeline run, beside the training flags that override its `defaults`."""

    stages: str | None = field(
        default=None, metadata={"help": "Comma-separated names of the stages to run (default: all). A stage whose "
                                        "start stage is neither done nor selected is refused."})
    dry_run: bool = field(
        default=False, metadata={"help": "Print the plan (per stage: start model, trainable parameters and learning "
                                         "rate per component, the data mixture, steps, output folder, what this "
                                         "run would do) and exit; loads no weights and writes nothing."})
    restart_from: str | None = field(
        default=None, metadata={"help": "Retrain this stage and every later one: their folders and records are "
                                        "deleted first (needed after their flags, data or start model changed)."})
    launcher: str | None = field(
        default=None, metadata={"help": "The command that starts each stage's process, before `-m llava.train`, "
                                        "e.g. 'torchrun --nproc_per_node 8' (default: this Python)."})


def parse_pipeline_arguments(argv: list[str]) -> tuple[PipelineArguments, list[str]]:
    """`argv` = pipeline file, then flags: the pipeline's own flags and the rest (training flags, as text)."""
    parser = HfArgumentParser(PipelineArguments)
    parser.prog = f"train_llava.py {argv[0]}"
    options, overrides = parser.parse_args_into_dataclasses(args=argv[1:], return_remaining_strings=True)
    return options, overrides
