"""Answer one question about one image with a trained checkpoint.

    python -m llava.generate --model_name_or_path DIR --image PATH --prompt "What shape is this?" [--max_new_tokens N]
"""

from __future__ import annotations

import argparse

from llava.data import load_image
from llava.inference import Answerer, load_for_inference


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="Checkpoint folder (or hub id).")
    parser.add_argument("--image", help="Image file; omit for a text-only question.")
    parser.add_argument("--prompt", required=True, help="The question.")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--max_image_pixels", type=int,
                        help="Downsize larger images (keeping aspect ratio) before the image processor, as training "
                             "did with the same flag.")
    args = parser.parse_args(argv)

    model, processor = load_for_inference(args.model_name_or_path, args.dtype)
    images = [load_image(args.image, args.max_image_pixels)] if args.image else []
    content = (f"{processor.image_token}\n" if images else "") + args.prompt
    (answer,) = Answerer(model, processor, args.max_new_tokens).answer([[{"role": "user", "content": content}]],
                                                                       [images])
    print(answer)
    return answer


if __name__ == "__main__":
    main()
