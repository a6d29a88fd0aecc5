"""LLaVA-NeXT ("anyres"): each image is resized onto the best of a few grid resolutions (`image_grid_pinpoints`),
cut into tower-sized tiles, and encoded with a downscaled base view; the features of the tiles, unpadded back to
the image's aspect ratio, get one `image_newline` vector per row.

Everything size-dependent is transformers' own: `LlavaNextImageProcessor` tiles the images, the model's
`get_image_features` packs the features, and `LlavaNextProcessor._get_number_of_features` counts them, which
`AnyresImageTokens` asks, so the data stages put exactly as many image tokens in a sample as the model produces
for each of its images. Turning a LLaVA-1.5 processor or model into a LLaVA-NeXT one (a new model, or stage 2 of a
`llava` stage-1 output) is `anyres_processor` and `llava.model.building.as_anyres`. LLaVA-OneVision's variant of
the grid (its own processor classes, a cap on the features per image) is `llava.model.onevision`, built on the
helpers here.
"""

from __future__ import annotations

import json

from transformers import AutoConfig, LlavaNextImageProcessor, LlavaNextProcessor, ProcessorMixin

from llava.data.image_tokens import ImageTokens
from llava.data.types import ConfigurationError

# In the order a model can be turned into the next (never back: a later one's grid or newline would be dropped).
ARCHITECTURES = ("llava", "llava_next", "llava_onevision")
ANYRES_ARCHITECTURES = ("llava_next", "llava_onevision")
# Tiles per side of llava-v1.6's grid (height x width in tiles): 1x2, 2x1, 2x2, 1x3, 3x1.
_DEFAULT_GRID = ((1, 2), (2, 1), (2, 2), (1, 3), (3, 1))


def default_pinpoints(tile: int) -> list[list[int]]:
    """llava-v1.6's grid for a tower of `tile` pixels (336 -> 336x672, 672x336, 672x672, 336x1008, 1008x336)."""
    return [[tile * rows, tile * columns] for rows, columns in _DEFAULT_GRID]


def parse_pinpoints(value: str | list | None, tower: str | None = None) -> list[list[int]] | None:
    """`--image_grid_pinpoints` (JSON `[[h, w], ...]`, or the list itself) as a list of [h, w]; None when unset.

    Args:
        value: the flag's value.
        tower: the vision tower or LLaVA checkpoint the grid is for (folder or hub id): a refusal's example grid
            is built from its image size (`pinpoints_example`), read only then.

    Raises:
        ConfigurationError: not JSON, not a non-empty list of pairs of positive integers.
    """
    if value is None or value == "":
        return None
    try:
        pinpoints = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError as error:
        raise ConfigurationError(f"--image_grid_pinpoints {value!r} is not JSON ({error}); write it as "
                                 f"{pinpoints_example(_tower_tile(tower))} (height, width in pixels).") from None
    if not (isinstance(pinpoints, list) and pinpoints and all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(x, int) and x > 0 for x in p) for p in pinpoints)):
        raise ConfigurationError(f"--image_grid_pinpoints {value!r} must be a non-empty JSON list of [height, width] "
                                 f"pairs of positive integers, e.g. {pinpoints_example(_tower_tile(tower))}.")
    return [list(p) for p in pinpoints]


def pinpoints_example(tile: int | None) -> str:
    """An example `--image_grid_pinpoints` for a tower of `tile`-pixel images: the first three of llava-v1.6's grid
    (1x2, 2x1, 2x2 tiles), or the same written in tiles when the tower's size is unknown."""
    if tile is None:
        return "'[[T, 2T], [2T, T], [2T, 2T]]' with T the tower's image size"
    return f"'{json.dumps(default_pinpoints(tile)[:3])}' for this {tile}-pixel tower"


def _tower_tile(tower: str | None) -> int | None:
    """The image size of the tower at `tower` (a vision checkpoint, a full CLIP/SigLIP one or a LLaVA checkpoint),
    from its config, without reaching a hub: LLaVA-NeXT tiles at that size (`check_tower`). None when unreadable:
    it only improves an error's example."""
    if not tower:
        return None
    try:
        config = AutoConfig.from_pretrained(tower, local_files_only=True)
    except (OSError, ValueError, KeyError):
        return None
    size = getattr(getattr(config, "vision_config", None) or config, "image_size", None)
    return size if isinstance(size, int) and size > 0 else None


def check_pinpoints(pinpoints: list[list[int]], tile: int, where: str) -> None:
    """Refuse grid resolutions that are not whole tiles: the model cuts each one into `tile`-pixel tiles
    (`get_anyres_image_grid_shape` divides by the tower's image size), so a remainder would misplace features."""
    wrong = [p for p in pinpoints if p[0] % tile or p[1] % tile]
    if wrong:
        raise ConfigurationError(f"--image_grid_pinpoints {json.dumps(wrong)} ({where}): every [height, width] must be "
                                 f"a multiple of the tower's image size {tile}, e.g. "
                                 f"{json.dumps(default_pinpoints(tile))}.")


def anyres_processor(processor: ProcessorMixin, input_size: tuple[int, int], pinpoints: list[list[int]] | None
                     ) -> LlavaNextProcessor:
    """The `LlavaNextProcessor` of a LLaVA-1.5 `processor` (tokenizer, chat template, image token, strategy kept): its
    tower's normalisation, tiles of the tower's `input_size` (height, width: what its image processor gives) on the
    grid `pinpoints` (default: `default_pinpoints`).

    Raises:
        ConfigurationError: non-square tower inputs, or pinpoints that are not whole tiles.
    """
    height = square_tile(input_size, "llava_next")
    pinpoints = pinpoints or default_pinpoints(height)
    check_pinpoints(pinpoints, height, f"tower input {height}x{height}")
    image_processor = LlavaNextImageProcessor(
        **normalisation(processor.image_processor), do_resize=True, size={"shortest_edge": height}, do_center_crop=True,
        crop_size={"height": height, "width": height}, image_grid_pinpoints=pinpoints, do_pad=True)
    return LlavaNextProcessor(
        image_processor=image_processor, tokenizer=processor.tokenizer, patch_size=processor.patch_size,
        vision_feature_select_strategy=processor.vision_feature_select_strategy,
        num_additional_image_tokens=processor.num_additional_image_tokens, image_token=processor.image_token,
        chat_template=processor.chat_template)


def normalisation(image_processor) -> dict:
    """The fields of a tower's image processor that an anyres image processor keeps: how pixels are resampled,
    rescaled and normalised (its resize and crop are replaced by the grid's tiles)."""
    fields = image_processor.to_dict()
    return {k: fields[k] for k in ("resample", "do_rescale", "rescale_factor", "do_normalize", "image_mean",
                                   "image_std", "do_convert_rgb") if fields.get(k) is not None}


def square_tile(input_size: tuple[int, int], architecture: str) -> int:
    """The tile size of a tower whose image processor gives `input_size` (height, width): tiles are square."""
    height, width = input_size
    if height != width:
        raise ConfigurationError(f"--architecture {architecture} needs square tower inputs; the image processor "
                                 f"gives {height}x{width}.")
    return height


def check_tower(vision_config, processor: ProcessorMixin, tile: int, where: str, architecture: str) -> None:
    """Refuse towers whose tiles an anyres model cannot lay out on the grid; `processor` is the LLaVA(-NeXT) one
    being turned into `architecture`'s (it knows the tower's extra tokens), `tile` its input size.

    Why: `get_image_features` reshapes each tile's selected features into (image_size / patch)^2 positions, with
    the tile size taken from the tower's config; a tower fed other sizes than its config says (DINOv2: 518 vs
    224), or one that keeps extra tokens after feature selection (CLS under `full`, DINOv2's registers), cannot.
    """
    extra = processor.num_additional_image_tokens - (processor.vision_feature_select_strategy == "default")
    if vision_config.image_size != tile:
        raise ConfigurationError(f"--architecture {architecture}: {where} is configured for "
                                 f"{vision_config.image_size}-pixel images but its image processor gives {tile}-pixel "
                                 "ones; anyres models tile images at the tower's configured size. Use a tower whose "
                                 "processor matches (CLIP, SigLIP), or --architecture llava.")
    if extra != 0:
        raise ConfigurationError(f"--architecture {architecture}: {where} keeps {extra} token(s) beside its patches under "
                                 f"--vision_feature_select_strategy {processor.vision_feature_select_strategy}, which "
                                 "an anyres model cannot lay out on its grid. Use 'default' for towers with a CLS token "
                                 "(CLIP), 'full' for towers without one (SigLIP); towers with registers cannot tile.")


class AnyresImageTokens(ImageTokens):
    """Tokens of one anyres image, by its (height, width): transformers' `LlavaNextProcessor` count (unpadded grid
    features + one newline per row + the base view), less the CLS token under the `default` strategy.

    `LlavaOnevisionProcessor._get_number_of_features` takes the same arguments (and also shrinks the grid to its
    `vision_aspect_ratio` cap): `llava.model.onevision.OnevisionImageTokens` extends this class."""

    needs_sizes = True
    architecture = "llava_next"

    def __init__(self, processor: ProcessorMixin, tile: int, patch_size: int):
        self.processor = processor
        self.tile = tile
        self.patch_size = patch_size
        super().__init__((tile // patch_size) ** 2)  # one tile's (the base view's) features

    @classmethod
    def of(cls, processor: LlavaNextProcessor) -> AnyresImageTokens:
        """The counter of a `LlavaNextProcessor` (tiles of its crop size)."""
        return cls(processor, processor.image_processor.crop_size["height"], processor.patch_size)

    def count(self, size: tuple[int, int] | None = None) -> int:
        height, width = size
        tokens = self.processor._get_number_of_features(height, width, self.tile, self.tile)
        return tokens - (self.processor.vision_feature_select_strategy == "default")

    def check_size(self, size: tuple[int, int]) -> str | None:
        """Why an image is too small for the grid: a side under one patch leaves the tiles nothing to show, and an
        aspect ratio so extreme that the unpadded grid keeps no row or column of features drops the image from it."""
        height, width = size
        patch = self.patch_size
        if min(height, width) < patch:
            return (f"a side under the tower's patch size ({patch} pixels) is too small for --architecture "
                    f"{self.architecture}; enlarge or drop it.")
        if self.count(size) <= self.tokens_per_image:
            return ("its aspect ratio is too extreme for the grid (no row of tile features is left after "
                    "unpadding); crop or pad it to a less elongated shape.")
        return None

    def fingerprint(self) -> dict:
        image_processor = self.processor.image_processor
        return {"architecture": self.architecture, "image_grid_pinpoints": image_processor.image_grid_pinpoints,
                "tile": self.tile, "patch_size": self.patch_size,
                "num_additional_image_tokens": getattr(self.processor, "num_additional_image_tokens", None),
                "vision_feature_select_strategy": self.processor.vision_feature_select_strategy}

