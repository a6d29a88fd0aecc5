"""Answer one question about one image with a trained checkpoint.

    python -m llava.generate --model_name_or_path DIR --image PATH --prompt "What shape is this?" [--max_new_tokens N]
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llava.data.images import load_image
from llava.data.types import Message
from llava.model.inference import Answerer, InferenceArguments, load_for_inference
from llava.reporting import run_command
from llava.training.parsing import parse_flags


@dataclass
class GenerateArguments:
    prompt: str = field(metadata={"help": "The question."})
    image: str | None = field(default=None, metadata={"help": "Image file; omit for a text-only question."})
    max_new_tokens: int = field(default=64, metadata={"help": "Longest answer, in tokens (greedy decoding)."})


def main(argv: list[str] | None = None) -> str:
    model_args, args = parse_flags((InferenceArguments, GenerateArguments), argv)
    model, processor = load_for_inference(model_args.model_name_or_path, model_args.dtype)
    images = [load_image(args.image, model_args.max_image_pixels)] if args.image else []
    content = (f"{processor.image_token}\n" if images else "") + args.prompt
    (answer,) = Answerer(model, processor, args.max_new_tokens).answer([[Message("user", content)]],
                                                                       [images])
    print(answer)
    return answer


if __name__ == "__main__":
    run_command(main)
