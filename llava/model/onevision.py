"""LLaVA-OneVision's images: LLaVA-NeXT's anyres grid (`llava.model.anyres`) with OneVision's own rules.

- A sample with one image tiles it on the grid (default 1x1 up to 6x6 tiles of the tower's size), unpads the tiles'
  features to the image's aspect ratio and then, when they exceed `anyres_max_N` tiles' worth (the
  `vision_aspect_ratio`, default `anyres_max_9`), shrinks them bilinearly to about that many; one newline ends
  each row, the base view comes first.
- A sample with several images encodes each as one base view (padded to a square) plus one newline.

As for LLaVA-NeXT, all size arithmetic is transformers' own: `LlavaOnevisionImageProcessor` tiles,
`LlavaOnevisionModel.pack_image_features` packs, `LlavaOnevisionProcessor._get_number_of_features` counts, which
`OnevisionImageTokens` asks, so the data stages count exactly the features the model produces for each image.
"""

from __future__ import annotations

import re

from transformers import (LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor,
                          ProcessorMixin)

from llava.data.types import ConfigurationError
from llava.model.anyres import AnyresImageTokens, check_pinpoints, normalisation, square_tile

DEFAULT_VISION_ASPECT_RATIO = "anyres_max_9"
_MAX_TILES_PER_SIDE = 6  # OneVision's grid: every shape from 1x1 to 6x6 tiles (transformers' 384-px default)
_VISION_ASPECT_RATIO = re.compile(r"anyres_max_([1-9][0-9]*)")


def default_onevision_pinpoints(tile: int) -> list[list[int]]:
    """OneVision's grid for a tower of `tile` pixels: [height, width] of 1..6 x 1..6 tiles, rows first (for 384:
    transformers' `LlavaOnevisionConfig` default, [[384, 384], [384, 768], ..., [2304, 2304]])."""
    sides = range(1, _MAX_TILES_PER_SIDE + 1)
    return [[tile * rows, tile * columns] for rows in sides for columns in sides]


def parse_vision_aspect_ratio(value: str | None) -> str | None:
    """`--vision_aspect_ratio` as transformers reads it (`anyres_max_N`, N >= 1 tiles' worth of features); None when
    unset.

    Why so strict: transformers takes N as `value.strip("anyres_max_")` and `int()` of what is left, so anything
    else fails only at the first image, or (`anyres_max_09`) reads as another number than the user meant.
    """
    if value is None or value == "":
        return None
    if not _VISION_ASPECT_RATIO.fullmatch(value):
        raise ConfigurationError(f"--vision_aspect_ratio {value!r} is not anyres_max_N with N a whole number of tiles "
                                 f"(at least 1), e.g. {DEFAULT_VISION_ASPECT_RATIO} (OneVision's).")
    return value


def onevision_processor(processor: ProcessorMixin, input_size: tuple[int, int], pinpoints: list[list[int]] | None,
                        vision_aspect_ratio: str | None) -> LlavaOnevisionProcessor:
    """The `LlavaOnevisionProcessor` of a LLaVA-1.5 or LLaVA-NeXT `processor` (tokenizer, chat template, image token,
    strategy kept): its tower's normalisation, tiles of the tower's `input_size` on the grid `pinpoints` (default:
    `default_onevision_pinpoints`), features capped at `vision_aspect_ratio` (default anyres_max_9).

    `num_image_tokens` is what transformers' processor counts per base view before it drops the CLS token under the
    `default` strategy: the tile's patches, plus that CLS token.

    Raises:
        ConfigurationError: non-square tower inputs, or pinpoints that are not whole tiles.
    """
    tile = square_tile(input_size, "llava_onevision")
    pinpoints = pinpoints or default_onevision_pinpoints(tile)
    check_pinpoints(pinpoints, tile, f"tower input {tile}x{tile}")
    image_processor = LlavaOnevisionImageProcessor(
        **normalisation(processor.image_processor), do_resize=True, size={"height": tile, "width": tile},
        image_grid_pinpoints=pinpoints, do_pad=True)
    # Videos are not trained here, but the processor class requires a video processor: one at the tower's size and
    # normalisation, so a saved model's AutoProcessor loads whole.
    video_processor = LlavaOnevisionVideoProcessor(**normalisation(processor.image_processor),
                                                   size={"height": tile, "width": tile})
    strategy = processor.vision_feature_select_strategy
    return LlavaOnevisionProcessor(
        image_processor=image_processor, tokenizer=processor.tokenizer, video_processor=video_processor,
        num_image_tokens=(tile // processor.patch_size) ** 2 + (strategy == "default"),
        vision_feature_select_strategy=strategy, image_token=processor.image_token,
        chat_template=processor.chat_template,
        vision_aspect_ratio=vision_aspect_ratio or DEFAULT_VISION_ASPECT_RATIO)


class OnevisionImageTokens(AnyresImageTokens):
    """Tokens of a sample's images under LLaVA-OneVision: its only image counted on the grid (with the
    `vision_aspect_ratio` cap), or each of several images one base view plus one newline, as
    `LlavaOnevisionProcessor` expands them; less the CLS token under the `default` strategy either way."""

    architecture = "llava_onevision"

    @classmethod
    def of(cls, processor: LlavaOnevisionProcessor) -> OnevisionImageTokens:
        """The counter of a `LlavaOnevisionProcessor`: tiles of its size, patches from its per-tile count."""
        tile = processor.image_processor.size["height"]
        patches_per_side = int((processor.num_image_tokens - (processor.vision_feature_select_strategy == "default"))
                               ** 0.5)
        return cls(processor, tile, tile // patches_per_side)

    def counts(self, sizes: list[tuple[int, int]] | None, num_images: int | None = None) -> list[int]:
        if len(sizes) == 1:
            return super().counts(sizes, num_images)
        # transformers' `replace_image_token` for a text with several images: a base view and its newline each.
        view = self.processor.num_image_tokens + 1 - (self.processor.vision_feature_select_strategy == "default")
        return [view] * (len(sizes) if num_images is None else num_images)

    def fingerprint(self) -> dict:
        return {**super().fingerprint(), "vision_aspect_ratio": self.processor.vision_aspect_ratio,
                "num_image_tokens": self.processor.num_image_tokens}
