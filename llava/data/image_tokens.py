"""How many tokens one image placeholder becomes: a fixed number (LLaVA-1.5: every image is one tower-sized view),
or a number that depends on the image's size (LLaVA-NeXT's anyres grid, `llava.model.anyres.AnyresImageTokens`), or
on the sample's other images too (LLaVA-OneVision tiles a sample's only image, and encodes each image of a
multi-image sample as one base view: `llava.model.onevision.OnevisionImageTokens`).

The data stages (encoder, checking pass, token cache, dataset) only ask `counts(sizes)` for a sample's images; the
model stage decides the arithmetic, by asking transformers' own processor, so the count is the number of features
the model produces.
"""

from __future__ import annotations


class ImageTokens:
    """A fixed number of tokens per image, whatever its size (`needs_sizes` False: no image is opened to count).

    Subclasses whose count depends on the size set `needs_sizes` and override `count` and `fingerprint`.
    """

    needs_sizes = False

    def __init__(self, tokens_per_image: int):
        self.tokens_per_image = tokens_per_image

    def count(self, size: tuple[int, int] | None = None) -> int:
        """Tokens of one image of `size` (height, width), as the image processor receives it."""
        return self.tokens_per_image

    def counts(self, sizes: list[tuple[int, int]] | None, num_images: int | None = None) -> list[int]:
        """Tokens of each image of one sample, whose images have `sizes` (height, width; None where no count needs
        them), the first `num_images` of them (default: all). The sample's images are passed together because a
        count may depend on how many there are (OneVision)."""
        if not self.needs_sizes:
            return [self.tokens_per_image] * (len(sizes) if num_images is None else num_images)
        return [self.count(size) for size in sizes[:num_images]]

    def fingerprint(self) -> dict:
        """What the counts depend on, for the token cache's key (`llava.data.dataset.tokenization_fingerprint`)."""
        return {"tokens_per_image": self.tokens_per_image}

    def check_size(self, size: tuple[int, int]) -> str | None:
        """Why an image of `size` (height, width) cannot be used, or None when it can."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.fingerprint()})"
