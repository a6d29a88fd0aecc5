"""This process's memory, for the start-up log: where a run's memory goes is the first question at LLaVA scale."""

from __future__ import annotations

import os
import resource
import sys


def resident_mb() -> float:
    """Resident set size now, in MB (Linux: /proc; elsewhere the peak, which is what the OS reports)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return peak_resident_mb()


def peak_resident_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def memory_line() -> str:
    return f"RSS {resident_mb():,.0f} MB, peak {peak_resident_mb():,.0f} MB"
