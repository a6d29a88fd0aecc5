"""A stage launcher for tests (`--launcher "python tests/helpers/parent_probe.py"`): appends to $PARENT_PROBE_FILE
whether the process that started it (the pipeline's) has libtorch mapped, then runs the stage as it was given
(`-m llava.train ...`) in this process."""

import os
import sys

with open(f"/proc/{os.getppid()}/maps", encoding="utf-8") as maps, \
        open(os.environ["PARENT_PROBE_FILE"], "a", encoding="utf-8") as probe:
    probe.write(("torch" if "libtorch" in maps.read() else "no torch") + "\n")
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
