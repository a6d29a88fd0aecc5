"""How far transformers' two image-processor backends differ: torchvision's (the default where torchvision is
installed, as `make install` does) and PIL's (what runs without it). Prints one JSON line per processor: the
largest and mean absolute difference of the normalised pixel values, and whether the shapes and image sizes (which
fix the image token counts) are equal, over images of many sizes and aspect ratios.

    python bench/image_backends.py [--images 200]

Processors: CLIP at 336 px (LLaVA-1.5's CLIP-L/336 settings), at 64 px (the demo's tower), and LLaVA-NeXT's anyres
at 336 px with its published grid.
"""

import json
import random
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from transformers import (CLIPImageProcessor, CLIPImageProcessorPil, HfArgumentParser, LlavaNextImageProcessor,
                          LlavaNextImageProcessorPil)

CLIP_336 = {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336},
            "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
CLIP_64 = {**CLIP_336, "size": {"shortest_edge": 64}, "crop_size": {"height": 64, "width": 64}}
NEXT_GRID = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
PROCESSORS = {
    "clip_336": (CLIPImageProcessor, CLIPImageProcessorPil, CLIP_336),
    "clip_64": (CLIPImageProcessor, CLIPImageProcessorPil, CLIP_64),
    "llava_next_336": (LlavaNextImageProcessor, LlavaNextImageProcessorPil,
                       {**CLIP_336, "image_grid_pinpoints": NEXT_GRID}),
}


def images(count: int, seed: int = 0) -> list[Image.Image]:
    """Photographs are smooth with edges: random smooth fields plus a few hard-edged rectangles, 8 to 1500 px a side,
    aspect ratios up to 1:8."""
    rng = random.Random(seed)
    result = []
    for _ in range(count):
        width, height = rng.randint(8, 1500), rng.randint(8, 1500)
        if max(width, height) > 8 * min(width, height):
            height = max(height, width // 8)
            width = max(width, height // 8)
        coarse = np.random.default_rng(rng.randint(0, 2**31)).integers(0, 256, (4, 4, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
        for _ in range(3):
            x, y = rng.randint(0, width - 1), rng.randint(0, height - 1)
            image.paste(tuple(rng.randint(0, 255) for _ in range(3)),
                        (x, y, min(width, x + rng.randint(1, width)), min(height, y + rng.randint(1, height))))
        result.append(image)
    return result


def compare(name: str, test_images: list[Image.Image]) -> dict:
    default_class, pil_class, settings = PROCESSORS[name]
    default, pil = default_class(**settings), pil_class(**settings)
    largest, total, values, same_shapes = 0.0, 0.0, 0, True
    for image in test_images:
        a, b = default(images=[image], return_tensors="pt"), pil(images=[image], return_tensors="pt")
        same = a["pixel_values"].shape == b["pixel_values"].shape and torch.equal(
            a.get("image_sizes", torch.zeros(0)), b.get("image_sizes", torch.zeros(0)))
        same_shapes &= same
        if same:
            difference = (a["pixel_values"] - b["pixel_values"]).abs()
            largest = max(largest, difference.max().item())
            total, values = total + difference.sum().item(), values + difference.numel()
    return {"processor": name, "backends": [default_class.__name__, pil_class.__name__], "images": len(test_images),
            "shapes_and_image_sizes_equal": same_shapes, "max_abs_pixel_difference": round(largest, 4),
            "mean_abs_pixel_difference": round(total / max(values, 1), 5)}


@dataclass
class ImageBackendArguments:
    images: int = field(default=200, metadata={"help": "How many random images."})


def main(argv: list[str] | None = None) -> None:
    (args,) = HfArgumentParser(ImageBackendArguments, description=__doc__).parse_args_into_dataclasses(argv)
    test_images = images(args.images)
    for name in PROCESSORS:
        print(json.dumps(compare(name, test_images)))


if __name__ == "__main__":
    main()
