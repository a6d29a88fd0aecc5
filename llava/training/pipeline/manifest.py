"""`<output_dir>/pipeline.json`: per stage the flags it ran with and the digests of what decides its result, its
start model, status and final output. Written atomically, with a digest over its own content: a truncated or
hand-edited manifest is refused, never trusted (a wrong record would skip a stage that must rerun).

    {"format": 1, "pipeline": "/abs/path/pipeline.yaml",
     "stages": {"align": {"status": "done", "flags": {...}, "config_sha256": ..., "data_sha256": ...,
                          "start": {"parts": [...]}, "start_sha256": ..., "steps": 60,
                          "final_output_sha256": ..., "selection_sha256": ...}, ...},
     "sha256": <digest of everything above>}
"""

from __future__ import annotations

import json
import os

from llava.data.types import ConfigurationError
from llava.training.pipeline.digests import json_digest
from llava.utils.files import write_json_atomically

MANIFEST_NAME = "pipeline.json"
FORMAT = 1


def manifest_path(output_dir: str) -> str:
    return os.path.join(output_dir, MANIFEST_NAME)


def new_manifest(pipeline_path: str) -> dict:
    return {"format": FORMAT, "pipeline": pipeline_path, "stages": {}}


def read_manifest(output_dir: str) -> dict | None:
    """The manifest in `output_dir` (without its digest), None when there is none.

    Raises:
        ConfigurationError: it does not parse, or its digest does not match its content.
    """
    path = manifest_path(output_dir)
    if not os.path.exists(path):
        return None
    fix = (f"It is not trusted: restore it, or delete it and the stage folders in {output_dir} to start the "
           "pipeline over (or train into another --output_dir).")
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except (OSError, ValueError) as error:
        raise ConfigurationError(f"{path} is not readable JSON (truncated?): {error}. {fix}") from None
    if not isinstance(content, dict) or not isinstance(content.get("sha256"), str):
        raise ConfigurationError(f"{path} is not a pipeline manifest (no digest of its content). {fix}")
    body = {key: value for key, value in content.items() if key != "sha256"}
    if json_digest(body) != content["sha256"]:
        raise ConfigurationError(f"{path} was changed after the pipeline wrote it: its content does not match its "
                                 f"digest. {fix}")
    if body.get("format") != FORMAT or not isinstance(body.get("stages"), dict):
        raise ConfigurationError(f"{path}: manifest format {body.get('format')!r}, this version reads {FORMAT}. {fix}")
    return body


def write_manifest(output_dir: str, manifest: dict) -> None:
    write_json_atomically(manifest_path(output_dir), {**manifest, "sha256": json_digest(manifest)})
