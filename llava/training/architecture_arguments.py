"""The `--architecture` flags: which transformers LLaVA class the model is (LLaVA-1.5's `llava`, or LLaVA-NeXT's
anyres `llava_next`) and LLaVA-NeXT's grid. A part of `ProcessorArguments`: they decide how images become tokens,
so checking data needs them, before any weights load."""

from __future__ import annotations

from dataclasses import dataclass, field

from llava.model.anyres import ARCHITECTURES, parse_pinpoints


@dataclass
class ArchitectureArguments:
    """Which LLaVA architecture to build or continue as (see README, 'LLaVA-NeXT (anyres)')."""

    architecture: str | None = field(
        default=None,
        metadata={"help": "'llava' (LLaVA-1.5: one tower-sized view per image) or 'llava_next' (LLaVA-NeXT anyres: "
                          "tiles on a grid chosen per image, a base view and a newline vector per row). Unset: "
                          "llava for a new model, the checkpoint's own when continuing; llava_next with a llava "
                          "checkpoint (a stage-1 output) turns it into LLaVA-NeXT (projector kept, newline new).",
                  "choices": list(ARCHITECTURES)},
    )
    image_grid_pinpoints: str | None = field(
        default=None,
        metadata={"help": "llava_next's grid resolutions as JSON [[height, width], ...] in pixels, each a multiple "
                          "of the tower's image size. Unset: llava-v1.6's 1x2, 2x1, 2x2, 1x3, 3x1 tiles of the "
                          "tower's size. Only for a new llava_next model (a checkpoint keeps its grid)."},
    )

    def __post_init__(self) -> None:
        tower = getattr(self, "vision_model_name_or_path", None) or getattr(self, "model_name_or_path", None)
        self.grid_pinpoints = parse_pinpoints(self.image_grid_pinpoints, tower)  # refuses what is not a grid
