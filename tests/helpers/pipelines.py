"""Pipeline files for tests: two stages (align: the projector; instruct: LM and projector) on the tiny parts."""

import os

import yaml
from safetensors.torch import load_file

# Saves every 2 steps, so a kill inside a stage leaves a checkpoint to resume.
FAST = {"per_device_train_batch_size": 2, "logging_steps": 1, "save_steps": 2, "seed": 0, "report_to": "none"}
STAGES = [
    {"name": "align", "freeze_language_model": True, "learning_rate": "1e-2", "max_steps": 3},
    {"name": "instruct", "freeze_language_model": False, "learning_rate": "1e-3", "max_steps": 3},
]


def write_pipeline(folder, parts, stages=None, **defaults) -> str:
    """A pipeline file in `folder` training into `folder`/out; `defaults` add to (or, None, remove) the defaults."""
    values = {"output_dir": os.path.join(str(folder), "out"), "vision_model_name_or_path": parts["vision"],
              "language_model_name_or_path": parts["lm"], "data_path": parts["data"], "image_folder": parts["images"],
              **FAST, **defaults}
    path = os.path.join(str(folder), "pipeline.yaml")
    with open(path, "w") as f:
        yaml.safe_dump({"defaults": {k: v for k, v in values.items() if v is not None},
                        "stages": STAGES if stages is None else stages}, f, sort_keys=False)
    return path


def final_weights(folder) -> dict:
    """The tensors of a final output's model.safetensors, as saved (bitwise comparable)."""
    return load_file(os.path.join(str(folder), "model.safetensors"))
