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


# The exit status of a command stopped by one of these errors (argparse's for a bad command line); see
# `llava.reporting`.
USER_ERROR_EXIT_CODE = 2


class DataError(ValueError):
    """A sample (or data file) that cannot be trained on; the message names its file, position and id and the fix.

    `kind` is a short name of the defect (e.g. "missing_image"), used to count problems by kind.
    """

    def __init__(self, message: str, kind: str = "invalid_sample"):
        super().__init__(message)
        self.kind = kind

    def without_worker_traceback(self) -> DataError:
        """The error as the sample raised it, when a DataLoader worker raised it: PyTorch re-raises a worker's
        exception in the main process as the same type holding "Caught DataError in DataLoader worker process N.",
        the worker's traceback, and the original message on the last lines; this error itself otherwise.
        (The `kind` does not cross the process boundary: the copy's is "invalid_sample".)"""
        text = str(self)
        exception_line = f"\n{type(self).__module__}.{type(self).__qualname__}: "
        if not text.startswith(f"Caught {type(self).__name__} in DataLoader worker") or exception_line not in text:
            return self
        return type(self)(text.split(exception_line, 1)[1].rstrip("\n"))


class ConfigurationError(ValueError):
    """A flag, a flag combination, a config file or a model part the flags name that cannot run; the message says
    which and the fix. Raised before anything trains (the commands report it in one line, see `llava.reporting`)."""
