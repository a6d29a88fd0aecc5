"""The `--architecture` flags: which transformers LLaVA class the model is (LLaVA-1.5's `llava`, LLaVA-NeXT's
anyres `llava_next` or LLaVA-OneVision's `llava_onevision`), the anyres grid and OneVision's feature cap. A part of `ProcessorArguments`: they decide how images become tokens,
so checking data needs them, before any weights load."""

from __future__ import annotations

from dataclasses import dataclass, field

from llava.model.anyres import ARCHITECTURES, parse_pinpoints
from llava.model.onevision import parse_vision_aspect_ratio


@dataclass
class ArchitectureArguments:
    """Which LLaVA architecture to build or continue as (see README, 'LLaVA-NeXT (anyres)')."""

    architecture: str | None = field(
        default=None,
        metadata={"help": "'llava' (LLaVA-1.5: one tower-sized view per image), 'llava_next' (LLaVA-NeXT anyres: "
                          "tiles on a grid chosen per image, a base view and a newline vector per row) or "
                          "'llava_onevision' (LLaVA-OneVision: anyres with the features capped by "
                          "--vision_aspect_ratio for a sample's only image, one base view and newline per image of a "
                          "multi-image sample). Unset: llava for a new model, the checkpoint's own when continuing; "
                          "a later architecture with an earlier one's checkpoint (a stage output) turns it into that "
                          "(projector kept, newline kept or new).",
                  "choices": list(ARCHITECTURES)},
    )
    image_grid_pinpoints: str | None = field(
        default=None,
        metadata={"help": "llava_next's or llava_onevision's grid resolutions as JSON [[height, width], ...] in "
                          "pixels, each a multiple of the tower's image size. Unset: llava-v1.6's 1x2, 2x1, 2x2, 1x3, "
                          "3x1 tiles of the tower's size (llava_next), OneVision's 1x1 to 6x6 tiles "
                          "(llava_onevision). Only for a new model of that architecture (a checkpoint keeps its "
                          "grid)."},
    )
    vision_aspect_ratio: str | None = field(
        default=None,
        metadata={"help": "llava_onevision's cap on one image's features, as anyres_max_N: a sample's only image "
                          "keeps about N tiles' worth of grid features (bilinearly shrunk beyond 1.1x that). Unset: "
                          "anyres_max_9 (OneVision's). Only for a new llava_onevision model (a checkpoint keeps "
                          "its own)."},
    )

    def __post_init__(self) -> None:
        tower = getattr(self, "vision_model_name_or_path", None) or getattr(self, "model_name_or_path", None)
        self.grid_pinpoints = parse_pinpoints(self.image_grid_pinpoints, tower)  # refuses what is not a grid
        self.vision_aspect_ratio = parse_vision_aspect_ratio(self.vision_aspect_ratio)
