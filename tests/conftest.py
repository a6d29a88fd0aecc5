"""Shared fixtures: tiny model parts and a dataset written once per test session."""

import os

import pytest

from tests.tiny_parts import save_language_model, save_vision_model, write_dataset

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
    from llava.arguments import ModelArguments
    from llava.model import load_model
    from llava.processor import load_processor, save_processor

    args = ModelArguments(vision_model_name_or_path=parts["vision"], language_model_name_or_path=parts["lm"])
    processor = load_processor(args)
    path = str(parts["root"] / "llava")
    load_model(args, processor).save_pretrained(path)
    save_processor(processor, path)
    return path
