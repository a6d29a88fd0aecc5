"""The values a sample is made of on its way to the model (`Message`, `Sample`, `IGNORE_INDEX`) and the errors a
user can fix (`DataError`, `ConfigurationError`).

A leaf module: it imports nothing of ours, so every stage can share these types without an import circle.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Label of every token the loss ignores (prompts, image tokens, padding): PyTorch's cross-entropy default.
IGNORE_INDEX = -100

# What marks an image in a sample's text (the processor's default image token, `--image_token`).
IMAGE_PLACEHOLDER = "<image>"


@dataclass
class Message:
    """One turn of a conversation (torchtune's `Message`, minus what LLaVA data does not have).

    Attributes:
        role: "system", "user" or "assistant".
        content: the text, with one image placeholder (`<image>`) where each image goes.
        trained: whether the model learns to produce this text (assistant turns of training data).
    """

    role: str
    content: str
    trained: bool = False


@dataclass
class Sample:
    """One conversation: its `messages` (image placeholders left in their text), the image paths in placeholder
    order, and where it came from (`location`: "file:line" or "file[index]"; `source`: the file's position in
    --data_path, which says where its images are, see `llava.data.images.ImageReader`)."""

    id: str
    location: str
    messages: list[Message]
    images: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)  # the record's other fields, e.g. "answer_type" for evaluation
    source: int = 0

    def describe(self) -> str:
        return f"{self.location} (id {self.id!r})"


class DataError(ValueError):
    """A sample (or data file) that cannot be trained on; the message names its file, position and id and the fix.

    `kind` is a short name of the defect (e.g. "missing_image"), used to count problems by kind.
    """

    def __init__(self, message: str, kind: str = "invalid_sample"):
        super().__init__(message)
        self.kind = kind


class ConfigurationError(ValueError):
    """A flag, a flag combination, a config file or a model part the flags name that cannot run; the message says
    which and the fix. Raised before anything trains (the commands report it in one line, see `llava.reporting`)."""
