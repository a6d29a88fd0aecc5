"""Where train_llava keeps what it builds once and reuses: the demo's converted SmolLM2, tokenized training data
(`tokenized/`), the tests' transformers-4.57 venv. `$TRAIN_LLAVA_CACHE` when set, else `~/.cache/train_llava`."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "TRAIN_LLAVA_CACHE"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "train_llava")
