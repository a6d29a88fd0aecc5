"""The one error type for bad training data, shared by reading, tokenizing and checking."""

from __future__ import annotations


class DataError(ValueError):
    """A sample that cannot be trained on; the message names its file, position and id and the fix.

    `kind` is a short name of the defect (e.g. "missing_image"), used to count problems by kind.
    """

    def __init__(self, message: str, kind: str = "invalid_sample"):
        super().__init__(message)
        self.kind = kind
