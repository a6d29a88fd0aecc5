"""LLaVA-NeXT (anyres): the tokens counted for each image equal the features the model produces for it, for every
size and aspect ratio and for CLIP and SigLIP towers; the grid flags and the towers it cannot tile are refused."""

import json
import random
import re

import pytest
import torch
from PIL import Image

from llava.data.types import ConfigurationError
from llava.model.anyres import default_pinpoints, parse_pinpoints
from llava.model.processor import image_tokens
from llava.training.arguments import ModelArguments
from llava.training.build import base_model_for, processor_for
from tests.helpers.tiny_parts import IMAGE_SIZE
from tests.helpers.tiny_towers import TOWERS, save_siglip

# A grid beyond llava-v1.6's too (4 tiles wide), so wide images take other grid shapes than 1x3.
PINPOINTS = "[[32, 64], [64, 32], [64, 64], [32, 96], [96, 32], [32, 128]]"


def sizes(count: int = 30) -> list[tuple[int, int]]:
    """(height, width) pairs: random ones, squares, extreme aspect ratios (1:8 and beyond) and sizes off the grid."""
    rng = random.Random(0)
    fixed = [(32, 32), (8, 200), (200, 8), (9, 300), (300, 11), (640, 33), (31, 17), (1000, 999), (64, 96)]
    return fixed + [(rng.randint(8, 700), rng.randint(8, 700)) for _ in range(count - len(fixed))]


@pytest.fixture(scope="module", params=["clip", "siglip"])
def anyres(request, parts, tmp_path_factory):
    """(model, processor) of a new llava_next model of the tiny LM and a CLIP or SigLIP tower."""
    vision = parts["vision"] if request.param == "clip" else save_siglip(str(tmp_path_factory.mktemp("siglip")))
    args = ModelArguments(vision_model_name_or_path=vision, language_model_name_or_path=parts["lm"],
                          architecture="llava_next", image_grid_pinpoints=PINPOINTS)
    processor = processor_for(args)
    return base_model_for(args, processor).eval(), processor


def test_token_count_is_the_models_feature_count_for_every_size(anyres):
    model, processor = anyres
    counter = image_tokens(processor)
    checked = 0
    for height, width in sizes():
        if counter.check_size((height, width)):
            continue  # refused at checking time, see test_too_small_images_are_refused
        image = Image.new("RGB", (width, height), (height % 256, width % 256, 7))
        inputs = processor.image_processor(images=[image], return_tensors="pt")
        assert inputs["image_sizes"].tolist() == [[height, width]]
        with torch.no_grad():
            features = model.model.get_image_features(
                pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                vision_feature_layer=model.config.vision_feature_layer,
                vision_feature_select_strategy=model.config.vision_feature_select_strategy).pooler_output
        expanded = processor(text=processor.image_token, images=[image])["input_ids"][0]
        assert features[0].shape[0] == counter.count((height, width)), (height, width)
        assert sum(1 for i in expanded if i == processor.image_token_id) == features[0].shape[0], (height, width)
        checked += 1
    assert checked >= 25


def test_a_batch_of_mixed_sizes_runs_and_matches_its_tokens(anyres):
    """Images of different grids in one batch: the tiles pad to the largest, the model reads each its own."""
    model, processor = anyres
    images = [Image.new("RGB", (w, h), (200, 10, 10)) for h, w in ((40, 100), (90, 30), (32, 32))]
    text = [f"{processor.image_token} one", f"{processor.image_token}{processor.image_token} two"]
    inputs = processor(text=text, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        model(**inputs)  # raises "Image features and image tokens do not match" on a miscount


def test_default_grid_is_llava_v1_6s():
    assert default_pinpoints(336) == [[336, 672], [672, 336], [672, 672], [336, 1008], [1008, 336]]


def test_too_small_images_are_refused(anyres):
    _, processor = anyres
    counter = image_tokens(processor)
    assert "patch size" in counter.check_size((4, 100))
    assert counter.check_size((40, 40)) is None


@pytest.mark.parametrize("value, message", [
    ("[[32, 64], [64]]", "pairs"), ("not json", "not JSON"), ("[]", "non-empty"), ('[["a", 2]]', "pairs")])
def test_bad_pinpoints_are_refused(value, message):
    with pytest.raises(ConfigurationError, match=message):
        parse_pinpoints(value)


@pytest.mark.parametrize("value", ["[[32, 64], [64]]", "[[32, 64]"], ids=["not_pairs", "not_json"])
def test_malformed_pinpoints_get_an_example_of_the_towers_size(parts, value):
    """The example grid is llava-v1.6's for the tower named (32-pixel tiles here), not a 336-pixel tower's."""
    example = re.escape(f"'{json.dumps(default_pinpoints(IMAGE_SIZE)[:3])}' for this {IMAGE_SIZE}-pixel tower")
    with pytest.raises(ConfigurationError, match=example):
        ModelArguments(vision_model_name_or_path=parts["vision"], language_model_name_or_path=parts["lm"],
                       architecture="llava_next", image_grid_pinpoints=value)
    with pytest.raises(ConfigurationError, match=r"\[\[T, 2T\], \[2T, T\], \[2T, 2T\]\]' with T the tower's image"):
        parse_pinpoints(value, tower=str(parts["root"] / "no_such_tower"))


def test_pinpoints_off_the_tile_size_are_refused(parts):
    args = ModelArguments(vision_model_name_or_path=parts["vision"], language_model_name_or_path=parts["lm"],
                          architecture="llava_next", image_grid_pinpoints="[[32, 64], [48, 32]]")
    with pytest.raises(ConfigurationError, match=rf"\[\[48, 32\]\].*multiple of the tower's image size {IMAGE_SIZE}"):
        processor_for(args)


def test_pinpoints_without_llava_next_are_refused(parts):
    args = ModelArguments(vision_model_name_or_path=parts["vision"], language_model_name_or_path=parts["lm"],
                          image_grid_pinpoints="[[32, 64]]")
    with pytest.raises(ConfigurationError, match="--architecture llava_next"):
        processor_for(args)


@pytest.mark.parametrize("name, message", [("dinov2", "configured for 48-pixel"),
                                           ("dinov2_registers", "configured for 48-pixel")])
def test_towers_that_cannot_tile_are_refused(parts, tmp_path, name, message):
    vision = TOWERS[name][0](str(tmp_path / name))
    args = ModelArguments(vision_model_name_or_path=vision, language_model_name_or_path=parts["lm"],
                          architecture="llava_next")
    with pytest.raises(ConfigurationError, match=message):
        processor_for(args)


def test_clip_under_full_strategy_is_refused(parts):
    args = ModelArguments(vision_model_name_or_path=parts["vision"], language_model_name_or_path=parts["lm"],
                          architecture="llava_next", vision_feature_select_strategy="full")
    with pytest.raises(ConfigurationError, match="keeps 1 token"):
        processor_for(args)
