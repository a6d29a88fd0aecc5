"""Why a run cannot resume (raised by `llava.training.checkpoints`) or save (`llava.training.trainer`): in a module
of their own, without transformers, so `llava.reporting` can name them in a process that holds no torch (a
pipeline's)."""

import errno


class ForeignCheckpointError(RuntimeError):
    """Foreign checkpoint folders stand where training would go next."""


class MissingCheckpointError(FileNotFoundError):
    """`--resume_from_checkpoint` names a folder that does not exist."""


class OutOfSpaceError(OSError):
    """The disk filled up while a checkpoint-N or the final output was written; the message names the folder and
    what was kept."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror
