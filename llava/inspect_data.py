"""Show exactly what training sees: rendered samples with the trained spans marked, or the ids and labels.

    python -m llava.inspect_data --model_name_or_path M --data_path D.json --image_folder IMGS --num_samples 3
    python -m llava.inspect_data ... --json     # one {"id", "input_ids", "labels"} object per line

--data_path takes every form training does (files, parquet/arrow tables, mixtures); samples are shown from the
first source on, whatever the amounts. Only the processor is loaded (no weights), so this is quick even for a 7B
checkpoint. Parts work too:
`--vision_model_name_or_path V --language_model_name_or_path L` instead of `--model_name_or_path`.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field

from llava.data.encoder import ConversationEncoder
from llava.data.images import header_sizes, image_readers
from llava.data.mixture import read_mixture
from llava.data.records import load_samples
from llava.data.types import IGNORE_INDEX
from llava.model.processor import image_tokens
from llava.reporting import run_command
from llava.training.arguments import DataSourceArguments, ProcessorArguments
from llava.training.build import processor_for
from llava.training.parsing import parse_flags

TRAIN_OPEN, TRAIN_CLOSE = "[[", "]]"


@dataclass
class InspectArguments:
    num_samples: int = field(default=3, metadata={"help": "How many samples to show, from the first."})
    json: bool = field(default=False, metadata={"help": "Print one JSON object per sample: id, input_ids, labels."})


def render_marked(tokenizer, input_ids: list[int], labels: list[int], image_token_id: int) -> str:
    """Decode a sample with trained spans wrapped in [[ ]] and each run of image tokens shown as <image>xN."""
    pieces = []
    for (is_image, trained), run in itertools.groupby(
            zip(input_ids, labels), key=lambda pair: (pair[0] == image_token_id, pair[1] != IGNORE_INDEX)):
        ids = [token_id for token_id, _ in run]
        text = f"{tokenizer.convert_ids_to_tokens(image_token_id)}x{len(ids)}" if is_image else tokenizer.decode(ids)
        pieces.append(f"{TRAIN_OPEN}{text}{TRAIN_CLOSE}" if trained else text)
    return "".join(pieces)


def main(argv: list[str] | None = None) -> None:
    model_args, data_args, inspect_args = parse_flags((ProcessorArguments, DataSourceArguments, InspectArguments),
                                                      argv)
    mixture = read_mixture(data_args.data_path, data_args.image_folder)
    processor = processor_for(model_args)
    encoder = ConversationEncoder(processor, data_args.model_max_length, image_tokens(processor))
    readers = image_readers(mixture.paths, mixture.image_folders, data_args.allow_absolute_image_paths)
    samples = load_samples(mixture.paths)[: inspect_args.num_samples]
    if not inspect_args.json:
        print(f"Trained tokens are between {TRAIN_OPEN} and {TRAIN_CLOSE}; everything else has label -100.\n")
    for sample in samples:
        # Anyres images expand by their size, read from their headers as the checking pass reads them.
        sizes = (header_sizes(sample, readers[sample.source], data_args.max_image_pixels)
                 if encoder.image_tokens.needs_sizes else None)
        encoded = encoder.encode(sample, sizes)
        if inspect_args.json:
            print(json.dumps({"id": sample.id, **encoded}))
            continue
        trained = sum(label != IGNORE_INDEX for label in encoded["labels"])
        print(f"=== {sample.describe()}: {len(encoded['input_ids'])} tokens, {trained} trained, "
              f"{len(sample.images)} image(s)")
        print(render_marked(processor.tokenizer, encoded["input_ids"], encoded["labels"], processor.image_token_id))
        print()


if __name__ == "__main__":
    run_command(main)
