"""Check a LLaVA dataset before training on it: every problem, with file, line/index and sample id.

    python -m llava.validate_data --model_name_or_path M --data_path D.json[,E.jsonl] --image_folder I \
        [--model_max_length N] [--num_workers W]
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

import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from llava.data.checking import prepare_samples
from llava.data.images import image_readers
from llava.data.mixture import mixture_table, read_mixture, select
from llava.model.processor import image_token_count
from llava.training.arguments import DataSourceArguments, ProcessorArguments
from llava.training.build import processor_for


@dataclass
class ValidateArguments:
    num_workers: int | None = field(default=None, metadata={"help": "Checking processes (default: up to 8)."})


def main(argv: list[str] | None = None) -> int:
    parser = HfArgumentParser((ProcessorArguments, DataSourceArguments, ValidateArguments))
    model_args, data_args, validate_args = parser.parse_args_into_dataclasses(args=argv)
    mixture = read_mixture(data_args.data_path, data_args.image_folder)
    processor = processor_for(model_args)
    images = image_readers(mixture.paths, mixture.image_folders, data_args.allow_absolute_image_paths)
    result = prepare_samples(mixture.paths, processor, data_args.model_max_length, image_token_count(processor),
                             images, validate_args.num_workers)
    if result.problems or result.warnings:
        print(result.report())
    if any(source.amount for source in mixture.sources):
        print(mixture_table(mixture, select(mixture, result.samples, seed=0)))
    if result.problems:
        return 1
    print(f"all {result.num_records} samples valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
