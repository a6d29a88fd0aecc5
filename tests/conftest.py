"""Shared fixtures: tiny model parts and a dataset written once per test session."""
import os

import pytest

from llava.training.build import base_model_for, processor_for
from tests.helpers.tiny_parts import save_language_model, save_vision_model, write_dataset

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub


@pytest.fixture(scope="session")
def parts(tmp_path_factory):
    """Paths of a tiny CLIP vision checkpoint, a tiny ChatML LM, and a LLaVA JSON dataset with its images."""
    root = tmp_path_factory.mktemp("parts")
    data_path, image_folder = write_dataset(str(root / "data"))
    return {
        "vision": save_vision_model(str(root / "vision")),
        "lm": save_language_model(str(root / "lm")),
        "data": data_path,
        "images": image_folder,
        "root": root,
    }


@pytest.fixture(scope="session")
def llava_checkpoint(parts):
    """An assembled, untrained LLaVA checkpoint folder (weights + processor), as a user's stage output."""
    from llava.model.hub_format import save_processor
    from llava.training.arguments import ModelArguments

    args = ModelArguments(vision_model_name_or_path=parts["vision"], language_model_name_or_path=parts["lm"])
    processor = processor_for(args)
    path = str(parts["root"] / "llava")
    base_model_for(args, processor).save_pretrained(path)
    save_processor(processor, path)
    return path
