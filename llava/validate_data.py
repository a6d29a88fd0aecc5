"""Check a LLaVA dataset before training on it: every problem, with file, line/index and sample id.

    python -m llava.validate_data --model_name_or_path M --data_path D.json[,E.jsonl] --image_folder I \
        [--model_max_length N] [--max_image_pixels P] [--num_workers W]
    python -m llava.validate_data --model_name_or_path M --data_path mixture.yaml    # or a.json:0.5,b.parquet

Every source of a mixture is checked whole, against its own image folder; the mixture's table (valid samples,
taken, share) follows the report.

Finds malformed JSON (line/column), missing, corrupt or oversized images, image paths leaving the image
folder, <image> placeholder counts that differ from the image count, conversations with nothing to train on
or ending on a user turn, unknown roles, empty turns, and samples whose images do not fit
--model_max_length. Exit status 1 when anything is wrong; a count per kind ends the report.
Only the processor is loaded (tokenizer, chat template, image token count), never the weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llava.data.checking import prepare_samples
from llava.data.images import image_readers
from llava.data.mixture import mixture_table, read_mixture, select
from llava.model.processor import image_tokens
from llava.reporting import run_command
from llava.training.arguments import DataSourceArguments, ProcessorArguments
from llava.training.build import processor_for
from llava.training.parsing import parse_flags


@dataclass
class ValidateArguments:
    num_workers: int | None = field(default=None, metadata={"help": "Checking processes (default: up to 8)."})


def main(argv: list[str] | None = None) -> int:
    """Check and report; 1 when anything is wrong that training would refuse (invalid samples, no samples, a
    mixture that selects none), else 0. Bad flags and unreadable data files raise (one line, see `run_command`)."""
    model_args, data_args, validate_args = parse_flags(
        (ProcessorArguments, DataSourceArguments, ValidateArguments), argv)
    mixture = read_mixture(data_args.data_path, data_args.image_folder)
    processor = processor_for(model_args)
    images = image_readers(mixture.paths, mixture.image_folders, data_args.allow_absolute_image_paths)
    decode = data_args.decode_images is not False  # full decode unless --decode_images False
    result = prepare_samples(mixture.paths, processor, data_args.model_max_length, image_tokens(processor),
                             images, validate_args.num_workers, decode_images=decode,
                             max_image_pixels=data_args.max_image_pixels)
    if result.problems or result.warnings:
        print(result.report())
    selection = select(mixture, result.samples, seed=0)
    if any(source.amount for source in mixture.sources):
        print(mixture_table(mixture, selection))
    if result.problems:
        return 1
    if not result.samples:
        print(f"no samples in {', '.join(mixture.paths)}: training would refuse this data.")
        return 1
    if not len(selection.indices):
        print("the data mixture selects no samples: training would refuse it; raise the amounts.")
        return 1
    print(f"all {result.num_records} samples valid")
    return 0


if __name__ == "__main__":
    run_command(main)
