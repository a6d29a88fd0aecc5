"""One run per output_dir: an advisory `fcntl.flock` on `<output_dir>/train_llava.lock`, which holds who has it.

Two runs writing one output_dir would interleave their checkpoints, and one's `--save_total_limit` would delete the
other's folders mid-save. The first process of a job (global rank 0) takes the lock; the job's other ranks never
touch it, so they cannot lock each other out, and a second job fails on its rank 0, which stops its other ranks.

The kernel drops a flock when its holder dies, so a run killed with SIGKILL leaves no lock behind, only the file
and its text: the next run takes over with a warning naming the dead run. A run that ends normally (finished,
failed, preempted, or stopped by SIGTERM before or after training, which would otherwise end it on the spot)
deletes the file, so a finished output folder holds only the model's files. A lock still held by a process that is
not the named (dead) run, e.g. a leftover DataLoader worker that inherited it, is broken when that run's pid is
gone from this host.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

logger = logging.getLogger(__name__)

LOCK_NAME = "train_llava.lock"


class OutputDirNotWritableError(PermissionError):
    """The output_dir cannot be written, so nothing a run trains could be saved."""


class OutputDirBusyError(RuntimeError):
    """Another run holds the output_dir's lock."""


def check_writable(output_dir: str) -> None:
    """Refuse an output_dir that cannot be written, before anything trains: otherwise the run would fail at its
    first save, or (with --save_strategy no) lose the whole run at the end."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_probe", dir=output_dir)
        os.close(fd)
        os.remove(probe)
    except OSError as error:
        raise OutputDirNotWritableError(f"--output_dir {output_dir} is not writable ({error.strerror or error}): no checkpoint "
                              "or final model could be saved there. Fix its permissions or pass another "
                              "--output_dir.") from None


@contextlib.contextmanager
def run_lock(output_dir: str) -> Iterator[None]:
    """Hold `output_dir`'s run lock in the block (global rank 0 only; every rank checks the folder is writable).

    Raises:
        OutputDirNotWritableError: output_dir is not writable.
        OutputDirBusyError: another run holds the lock; the message names it (host, pid, start time, command).
    """
    check_writable(output_dir)
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    path = os.path.join(output_dir, LOCK_NAME)
    lock = _acquire(path)
    try:
        with exiting_on_sigterm():
            yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)  # while still locked: a run that opens it now finds it gone and retries (`_acquire`)
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


@contextlib.contextmanager
def exiting_on_sigterm() -> Iterator[None]:
    """SIGTERM raises SystemExit(128 + SIGTERM, the status of a process it ended) in the block, where it would end
    the process on the spot (its default), so `finally` blocks run: the lock file is removed. Training replaces the
    handler with its own while it runs (a checkpoint, then exit, see `llava.training.preemption`); outside the main
    thread, where no handler can be set, the block runs as it is."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def exit_now(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, exit_now)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _acquire(path: str):
    """The open lock file, flocked and holding this run's description."""
    broken = False
    for _ in range(5):
        lock = open(path, "a+", encoding="utf-8")
        lock.seek(0)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(lock)
            lock.close()
            if not broken and _is_dead_here(holder):
                broken = True
                logger.warning("%s is held by a leftover process of a run that is gone (%s); breaking it.", path,
                               _describe(holder))
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                continue
            raise OutputDirBusyError(
                f"--output_dir {os.path.dirname(path)} is in use by another run: {_describe(holder)}. Wait for it to "
                f"finish or stop it, or pass another --output_dir. (If that run is gone, e.g. its host crashed, "
                f"delete {path}.)") from None
        if not _still_named(lock, path):  # the run that held it deleted it while we opened it: open the new one
            lock.close()
            continue
        previous = _read(lock)
        if previous:
            logger.warning("%s: taking over the lock of a run that ended without releasing it (%s).", path,
                           _describe(previous))
        lock.seek(0)
        lock.truncate()
        json.dump(_this_run(), lock)
        lock.flush()
        os.fsync(lock.fileno())
        return lock
    raise OutputDirBusyError(f"--output_dir {os.path.dirname(path)}: {path} kept changing while this run tried to "
                             "lock it (other runs starting and ending at once?); rerun the command.")


def _still_named(lock, path: str) -> bool:
    """Whether `path` is still the file `lock` has open (not deleted, nor replaced by a new one)."""
    try:
        return os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino
    except FileNotFoundError:
        return False


def _this_run() -> dict:
    job = {key: os.environ[key] for key in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID")
           if key in os.environ}
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv), **({"job": job} if job else {})}


def _read(lock) -> dict:
    lock.seek(0)
    try:
        return json.loads(lock.read() or "{}")
    except ValueError:
        return {"unreadable": True}


def _describe(holder: dict) -> str:
    if not holder.get("pid"):
        return "a run that left no description"
    return (f"pid {holder['pid']} on {holder.get('host')}, started {holder.get('started')}, "
            f"command: {holder.get('command')}")


def _is_dead_here(holder: dict) -> bool:
    """True when `holder` ran on this host and its pid no longer exists."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
