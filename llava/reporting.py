"""How the commands report a user's mistake: one line naming the file, sample or flag and the fix, exit status 2,
no Python traceback (`TRAIN_LLAVA_TRACEBACK=1` shows it, for debugging).

Only errors that describe the input are reported so (bad data files and samples, flag combinations, an output_dir
that is busy, unwritable, half-published or out of space, checkpoints that cannot be resumed, files the libraries
refuse to load); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from llava.data.types import USER_ERROR_EXIT_CODE, ConfigurationError, DataError
from llava.model.final_output import IncompleteFinalOutputError
from llava.training.checkpoint_errors import ForeignCheckpointError, MissingCheckpointError, OutOfSpaceError
from llava.training.run_lock import OutputDirBusyError, OutputDirNotWritableError

TRACEBACK_ENV = "TRAIN_LLAVA_TRACEBACK"
USER_ERRORS = (DataError, ConfigurationError, OutputDirBusyError, OutputDirNotWritableError, IncompleteFinalOutputError,
               ForeignCheckpointError, MissingCheckpointError, OutOfSpaceError)


def run_command(main: Callable[[], object]) -> None:
    """Run a command's `main()` and exit: with its status when it returns an int (else 0), or, when it raises one
    of `USER_ERRORS`, after one line on stderr with status 2."""
    try:
        result = main()
    except USER_ERRORS as error:
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        print(f"error: {error}", file=sys.stderr)
        print(f"(set {TRACEBACK_ENV}=1 to see where it was raised)", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT_CODE)
    sys.exit(result if isinstance(result, int) else 0)
