"""transformers 4.57 in a venv of its own (built once, cached), reading our output folders as other stacks do."""

import fcntl
import json
import os
import subprocess
import sys

import torch
from safetensors import safe_open

from llava.utils.files import cache_root

CONSUMER_TRANSFORMERS = "4.57"


HUB_PREFIXES = ("language_model.model.", "language_model.lm_head.", "vision_tower.vision_model.",
                "multi_modal_projector.")


def consumer_python() -> str:
    """The venv's python with transformers 4.57 and this environment's torch; built on first use (~15 s)."""
    cache = str(cache_root())
    venv = os.path.join(cache, f"venv-transformers-{CONSUMER_TRANSFORMERS}")
    python = os.path.join(venv, "bin", "python")
    os.makedirs(cache, exist_ok=True)
    with open(venv + ".lock", "w") as lock:  # concurrent test runs build it once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isfile(os.path.join(venv, "ready")):
            subprocess.run([sys.executable, "-m", "venv", "--clear", "--system-site-packages", venv], check=True)
            subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                            f"transformers=={CONSUMER_TRANSFORMERS}.*"], check=True)
            open(os.path.join(venv, "ready"), "w").close()
    return python


def tensor_names(folder: str) -> list[str]:
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        return list(f.keys())


def run_consumer(spec: dict, tmp_path, protobuf: bool = True) -> dict:
    """`portable_consumer.py` under transformers 4.57 (`protobuf` False: with protobuf hidden): its results per
    folder."""
    name = "with" if protobuf else "without"
    spec_path, result_path = tmp_path / f"spec_{name}.json", tmp_path / f"result_{name}.pt"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PORTABLE_CONSUMER_NO_PROTOBUF": "0" if protobuf else "1"}
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "portable_consumer.py")
    subprocess.run([consumer_python(), script, str(spec_path), str(result_path)], check=True, env=env)
    result = torch.load(result_path, weights_only=False)
    assert result["transformers"].startswith(CONSUMER_TRANSFORMERS + ".") and result["torch"] == torch.__version__
    return result["results"]
