"""Why a run cannot resume (raised by `llava.training.checkpoints`): in a module of their own, without transformers,
so `llava.reporting` can name them in a process that holds no torch (a pipeline's)."""


class ForeignCheckpointError(RuntimeError):
    """Foreign checkpoint folders stand where training would go next."""


class MissingCheckpointError(FileNotFoundError):
    """`--resume_from_checkpoint` names a folder that does not exist."""
