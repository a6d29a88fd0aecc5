"""Answer one question about one image with a trained checkpoint.

    python -m llava.generate --model_name_or_path DIR --image PATH --prompt "What shape is this?" [--max_new_tokens N]

The image goes before the question, as LLaVA data writes it ("<image>\\nWhat shape is this?"), unless the prompt
holds one image placeholder itself: then the image goes there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from llava.data.types import ConfigurationError, Message, Sample
from llava.model.inference import Answerer, InferenceArguments, load_checked_image, load_for_inference
from llava.reporting import run_command
from llava.training.parsing import parse_flags


@dataclass
class GenerateArguments:
    prompt: str = field(metadata={"help": "The question; the image goes before it, or where it writes the image "
                                          "token (<image>) once."})
    image: str | None = field(default=None, metadata={"help": "Image file; omit for a text-only question."})
    max_new_tokens: int = field(default=64, metadata={"help": "Longest answer, in tokens (greedy decoding)."})


def user_turn(prompt: str, image_token: str, num_images: int) -> str:
    """The user's message: `prompt` with its images' placeholders where it writes them, else each on a line before
    it (as LLaVA data writes "<image>\\nquestion").

    Raises:
        ConfigurationError: `prompt` holds placeholders, but not one per image.
    """
    placeholders = prompt.count(image_token)
    if placeholders == 0:
        return f"{image_token}\n" * num_images + prompt
    if placeholders != num_images:
        raise ConfigurationError(
            f"--prompt holds {placeholders} {image_token} placeholder(s) for {num_images} image(s) (--image): each "
            f"image needs exactly one. Drop {image_token} from --prompt (generate places the image before the "
            "question), or write it once where the image goes and pass the image with --image.")
    return prompt


def main(argv: list[str] | None = None) -> str:
    model_args, args = parse_flags((InferenceArguments, GenerateArguments), argv)
    model, processor = load_for_inference(model_args.model_name_or_path, model_args.dtype)
    content = user_turn(args.prompt, processor.image_token, 1 if args.image else 0)
    answerer = Answerer(model, processor, args.max_new_tokens)
    images = []
    if args.image:  # the image's errors name a sample: here the flag and the file
        flag = Sample(id=os.path.basename(args.image), location="--image", messages=[])
        images.append(load_checked_image(args.image, flag, answerer.encoder.image_tokens,
                                         model_args.max_image_pixels))
    (answer,) = answerer.answer([[Message("user", content)]], [images])
    print(answer)
    return answer


if __name__ == "__main__":
    run_command(main)
