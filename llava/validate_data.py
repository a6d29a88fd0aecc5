"""Check a LLaVA dataset before training on it: every problem, with file, line/index and sample id.

    python -m llava.validate_data --model_name_or_path M --data_path D.json[,E.jsonl] --image_folder I \
        [--model_max_length N] [--num_workers W]

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

from llava.arguments import DataArguments, ModelArguments
from llava.preparation import prepare_samples
from llava.processor import load_processor


@dataclass
class ValidateArguments:
    num_workers: int | None = field(default=None, metadata={"help": "Checking processes (default: up to 8)."})


def main(argv: list[str] | None = None) -> int:
    parser = HfArgumentParser((ModelArguments, DataArguments, ValidateArguments))
    model_args, data_args, validate_args = parser.parse_args_into_dataclasses(args=argv)
    processor = load_processor(model_args)
    result = prepare_samples(data_args.data_paths, processor, data_args.model_max_length, data_args.image_folder,
                             data_args.allow_absolute_image_paths, validate_args.num_workers)
    if result.problems:
        print(result.report())
        return 1
    if result.warnings:
        print(result.report())
    print(f"all {result.num_records} samples valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
