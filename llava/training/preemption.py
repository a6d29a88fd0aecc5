"""SIGTERM (what schedulers send before preempting a job): save a checkpoint at the next step boundary and stop.

The signal handler only sets a flag; the Trainer's own loop does the rest. At the end of the step in progress,
`PreemptionCallback` asks it to save (the usual crash-safe checkpoint-N, see `llava.training.checkpoints`) and to stop.
`llava.training.run.train` then skips the final save and exits with `PREEMPTED_EXIT_CODE`; rerunning the same command
with `--resume_from_checkpoint True` continues from that checkpoint.

With several processes, torchrun and schedulers signal every one, but not at the same instant: the flag is
combined across processes at every step (one tiny all-reduce), so all of them save and stop at the same step
instead of one waiting forever in a collective the others never join.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import signal
import threading
from collections.abc import Callable

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

# 128 + SIGTERM: what a process stopped by SIGTERM reports by convention, so wrappers and schedulers see the run as
# terminated rather than finished (a Kubernetes Job would count an exit status of 0 as done and not rerun it).
PREEMPTED_EXIT_CODE = 143


class PreemptionCallback(TrainerCallback):
    """Turns SIGTERM during training into "save a checkpoint now and stop" at the next step boundary.

    Args:
        any_process: combines this process's flag with the other processes' (True if any got the signal); the
            identity for a single process.
    """

    def __init__(self, any_process: Callable[[bool], bool]):
        self.any_process = any_process
        self.requested = False  # set by the signal handler
        self.preempted = False  # True once training stopped because of it
        self._previous_handler = None

    def _on_sigterm(self, signum, frame) -> None:
        self.requested = True

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            logger.warning("Training runs outside the main thread: SIGTERM is not caught (no checkpoint on "
                           "preemption).")
            return
        self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def on_step_end(self, args, state, control, **kwargs):
        if self.any_process(self.requested):
            logger.warning("SIGTERM received: saving checkpoint-%d and stopping.", state.global_step)
            self.preempted = True
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None


def ignoring_sigterm(worker_init_fn: Callable[[int], None] | None) -> Callable[[int], None]:
    """A DataLoader `worker_init_fn` that makes the worker ignore SIGTERM, then runs `worker_init_fn`.

    Why: SLURM and Kubernetes signal the whole process group. PyTorch's workers re-raise SIGTERM and die of it, and
    the main process then fails on the dead worker before it reaches the step boundary where it saves. The main
    process stops them itself when training ends.
    """
    return functools.partial(_ignore_sigterm_then, worker_init_fn)


def _ignore_sigterm_then(worker_init_fn: Callable[[int], None] | None, worker_id: int) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if worker_init_fn is not None:
        worker_init_fn(worker_id)


def stop_dataloader_workers(timeout: float = 5.0) -> None:
    """Kill (SIGKILL) this process's daemonic children, the DataLoader workers, and wait for them.

    Why: they ignore SIGTERM (`ignoring_sigterm`), and when training ends by an exception the DataLoader that would
    stop them is still referenced by the traceback; at interpreter exit multiprocessing then SIGTERMs its daemonic
    children and joins them, waiting for ever on workers that ignore it. Called on every exit from training by an
    exception, so a failing run is gone within seconds. PyTorch's SIGCHLD handler, which raises when a worker dies of
    a signal, is set back to the default first: the run is ending, and its own error is the one to report.
    """
    children = [child for child in multiprocessing.active_children() if child.daemon]
    if children and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.kill()
    for child in children:
        child.join(timeout)
