"""Merge a LoRA/QLoRA checkpoint into a plain full-precision LLaVA checkpoint.

    python -m llava.merge_lora --checkpoint OUT/checkpoint-500 --output_dir merged/

`--checkpoint` is an adapter checkpoint (checkpoint-N of a LoRA run, or a run's output_dir written with
`--merge_lora False`) or a merged run's output_dir (its `adapter/` is used). The adapters are added to the
base model named in adapter_config.json, reloaded unquantized in float32 even after QLoRA, so every weight that
did not train is bitwise the base's. The result has no quantization config, includes the processor, holds the llava-hf
tensor names and loads with `transformers.LlavaForConditionalGeneration.from_pretrained` and
`AutoProcessor.from_pretrained` (transformers 4.x and 5.x).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

import torch

from llava.model.hub_format import save_processor
from llava.model.lora import load_merged_model
from llava.reporting import run_command
from llava.training.arguments import DTYPE_CHOICES
from llava.training.parsing import parse_flags

logger = logging.getLogger("llava")


@dataclass
class MergeArguments:
    checkpoint: str = field(metadata={"help": "Adapter checkpoint (checkpoint-N) or a merged LoRA run's output_dir."})
    output_dir: str = field(metadata={"help": "Where the merged LLaVA checkpoint (weights + processor) is written."})
    dtype: str = field(
        default="float32", metadata={"help": "dtype of the saved weights (the merge itself runs in float32).",
                                     "choices": [c for c in DTYPE_CHOICES if c != "auto"]},
    )
    base_model_name_or_path: str | None = field(
        default=None, metadata={"help": "The full-precision LLaVA the adapters were trained on, when it moved away "
                                        "from the path in adapter_config.json."},
    )


def main(argv: list[str] | None = None) -> str:
    """Merge and save; returns the output folder."""
    (args,) = parse_flags((MergeArguments,), argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO,
                        stream=sys.stdout)
    model, processor = load_merged_model(args.checkpoint, getattr(torch, args.dtype), args.base_model_name_or_path)
    model.save_pretrained(args.output_dir)
    save_processor(processor, args.output_dir)
    logger.info("Merged %s into %s", args.checkpoint, args.output_dir)
    return args.output_dir


if __name__ == "__main__":
    run_command(main)
