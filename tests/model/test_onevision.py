"""LLaVA-OneVision: the tokens counted for a sample's images equal the features the model produces for them (one
image: anyres with the anyres_max_N cap; several: a base view and a newline each), over many sizes, aspect ratios
and 1-3 images per sample on CLIP and SigLIP towers; its grid, defaults and refusals; a llava-hf checkpoint
continues."""

import json
import os
import random

import pytest
import torch
import transformers
from PIL import Image

from llava.data.types import ConfigurationError
from llava.model.onevision import default_onevision_pinpoints
from llava.model.processor import image_tokens
from llava.train import main
from llava.training.arguments import ModelArguments
from llava.training.build import base_model_for, processor_for
from tests.helpers.portable import run_consumer
from tests.helpers.portable_consumer import consume
from tests.helpers.tiny_parts import IMAGE_SIZE, prepared, qa
from tests.helpers.tiny_towers import save_siglip


@pytest.fixture(scope="module", params=["clip", "siglip"])
def onevision(request, parts, tmp_path_factory):
    """(model, processor) of a new llava_onevision model of the tiny LM and a CLIP or SigLIP tower, its cap low
    (anyres_max_2) so that most images are shrunk."""
    vision = parts["vision"] if request.param == "clip" else save_siglip(str(tmp_path_factory.mktemp("siglip")))
    args = ModelArguments(vision_model_name_or_path=vision, language_model_name_or_path=parts["lm"],
                          architecture="llava_onevision", vision_aspect_ratio="anyres_max_2")
    processor = processor_for(args)
    return base_model_for(args, processor).eval(), processor


def samples(count: int = 60) -> list[list[tuple[int, int]]]:
    """Images (height, width) of samples with 1-3 images: squares, extreme aspect ratios, small and large ones."""
    rng = random.Random(0)
    fixed = [[(32, 32)], [(8, 200)], [(300, 11)], [(640, 33)], [(1000, 999)], [(31, 17)], [(64, 96), (8, 300)],
             [(500, 20), (33, 33), (190, 250)]]
    return fixed + [[(rng.randint(8, 700), rng.randint(8, 700)) for _ in range(rng.randint(1, 3))]
                    for _ in range(count - len(fixed))]


def uncapped_count(processor, size: tuple[int, int]) -> int:
    """What transformers counts for a lone image of `size` with no practical cap (anyres_max_1000)."""
    cap, processor.vision_aspect_ratio = processor.vision_aspect_ratio, "anyres_max_1000"
    try:
        return image_tokens(processor).count(size)
    finally:
        processor.vision_aspect_ratio = cap


def test_token_counts_are_the_models_feature_counts(onevision):
    model, processor = onevision
    counter = image_tokens(processor)
    checked, shrunk = 0, 0
    for sizes in samples():
        if any(counter.check_size(size) for size in sizes):
            continue  # refused at checking time
        images = [Image.new("RGB", (w, h), (h % 256, w % 256, 7)) for h, w in sizes]
        inputs = processor.image_processor(images=[images], return_tensors="pt")
        with torch.no_grad():
            features = model.model.get_image_features(
                pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                batch_num_images=inputs["batch_num_images"]).pooler_output
        counts = counter.counts(sizes)
        assert [f.shape[0] for f in features] == counts, sizes
        expanded = processor(text=[processor.image_token * len(sizes)], images=[images])["input_ids"][0]
        assert sum(1 for i in expanded if i == processor.image_token_id) == sum(counts), sizes
        if len(sizes) == 1:
            uncapped = uncapped_count(processor, sizes[0])
            assert counts[0] <= uncapped
            shrunk += counts[0] < uncapped  # the anyres_max_2 cap took features away
        else:
            assert set(counts) == {counter.tokens_per_image + 1}  # a base view and its newline each
        checked += 1
    assert checked >= 45 and shrunk >= 5


def test_a_batch_of_one_and_several_image_samples_runs(onevision):
    """transformers' own processor over a batch of a one-image and a two-image text: tokens match features."""
    model, processor = onevision
    images = [[Image.new("RGB", (100, 40))], [Image.new("RGB", (30, 90)), Image.new("RGB", (32, 32))]]
    text = [f"{processor.image_token} one", f"{processor.image_token}{processor.image_token} two"]
    inputs = processor(text=text, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        model(**inputs)  # raises "Image features and image tokens do not match" on a miscount


def test_defaults_are_onevisions_scaled_to_the_tower(parts):
    args = ModelArguments(vision_model_name_or_path=parts["vision"], language_model_name_or_path=parts["lm"],
                          architecture="llava_onevision")
    processor = processor_for(args)
    assert args.vision_feature_layer == -1 and processor.vision_aspect_ratio == "anyres_max_9"
    assert processor.image_processor.image_grid_pinpoints == default_onevision_pinpoints(IMAGE_SIZE)
    assert default_onevision_pinpoints(384) == transformers.LlavaOnevisionConfig().image_grid_pinpoints
    assert ModelArguments(vision_model_name_or_path=parts["vision"], language_model_name_or_path=parts["lm"],
                          architecture="llava_onevision", vision_feature_layer=-2).vision_feature_layer == -2


@pytest.mark.parametrize("value", ["anyres_max_", "anyres_max_0", "anyres_max_09", "max_9", "anyres_9", "9"])
def test_bad_vision_aspect_ratio_is_refused(parts, value):
    with pytest.raises(ConfigurationError, match=rf"--vision_aspect_ratio '{value}' is not anyres_max_N"):
        ModelArguments(vision_model_name_or_path=parts["vision"], language_model_name_or_path=parts["lm"],
                       architecture="llava_onevision", vision_aspect_ratio=value)


@pytest.mark.parametrize("architecture", [None, "llava_next"])
def test_vision_aspect_ratio_without_onevision_is_refused(parts, architecture):
    args = ModelArguments(vision_model_name_or_path=parts["vision"], language_model_name_or_path=parts["lm"],
                          architecture=architecture, vision_aspect_ratio="anyres_max_4")
    with pytest.raises(ConfigurationError, match="add --architecture llava_onevision"):
        processor_for(args)


@pytest.fixture(scope="module")
def hub_onevision(parts, tmp_path_factory):
    """A llava-hf-style OneVision checkpoint written by transformers itself (its class, config and processor, its own
    save), of the tiny SigLIP tower and LM: what `--model_name_or_path llava-hf/llava-onevision-*` gives."""
    path = str(tmp_path_factory.mktemp("hub_onevision"))
    vision_path = save_siglip(str(tmp_path_factory.mktemp("hub_siglip")))
    processor = processor_for(ModelArguments(vision_model_name_or_path=vision_path,
                                             language_model_name_or_path=parts["lm"], architecture="llava_onevision"))
    text = transformers.AutoConfig.from_pretrained(parts["lm"])
    text.vocab_size = len(processor.tokenizer)
    config = transformers.LlavaOnevisionConfig(
        vision_config=transformers.AutoConfig.from_pretrained(vision_path), text_config=text,
        image_token_index=processor.image_token_id, image_grid_pinpoints=default_onevision_pinpoints(IMAGE_SIZE))
    torch.manual_seed(0)
    transformers.LlavaOnevisionForConditionalGeneration(config).save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_a_hub_onevision_checkpoint_continues(hub_onevision, parts, tmp_path):
    reference = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(hub_onevision).state_dict()
    args = ModelArguments(model_name_or_path=hub_onevision)
    loaded = base_model_for(args, processor_for(args)).state_dict()
    assert loaded.keys() == reference.keys() and all(torch.equal(loaded[k], reference[k]) for k in reference)
    out = str(tmp_path / "out")
    main(["--model_name_or_path", hub_onevision, "--freeze_language_model", "False", "--data_path", parts["data"],
          "--image_folder", parts["images"], "--output_dir", out, "--per_device_train_batch_size", "2",
          "--max_steps", "2", "--learning_rate", "1e-2", "--report_to", "none", "--save_strategy", "no"])
    model, info = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not torch.equal(model.model.image_newline, reference["model.image_newline"])  # trained with the projector
    # ... and a user of transformers 4.57 reads that output (SigLIP tower, strategy "full") as 5.x does.
    image = os.path.join(parts["images"], "img0.png")
    theirs = run_consumer({"folders": [out], "image": [image, image], "question": "Same?"}, tmp_path)[out]
    ours = consume(out, [Image.open(image).convert("RGB")] * 2, "Same?")
    assert theirs["missing"] == theirs["unexpected"] == [] and torch.equal(theirs["input_ids"], ours["input_ids"])
    torch.testing.assert_close(theirs["logits"], ours["logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("architecture, flags, message", [
    ("llava_next", {}, "is a llava_onevision model; --architecture llava_next cannot drop"),
    ("llava", {}, "is a llava_onevision model; --architecture llava cannot drop"),
    (None, {"vision_aspect_ratio": "anyres_max_4"}, "keeps its own"),
    (None, {"image_grid_pinpoints": "[[32, 32]]"}, "keeps its own grid"),
])
def test_a_onevision_checkpoint_keeps_its_architecture(hub_onevision, architecture, flags, message):
    with pytest.raises(ConfigurationError, match=message):
        processor_for(ModelArguments(model_name_or_path=hub_onevision, architecture=architecture, **flags))


def test_placeholders_and_images_must_agree_by_sample(parts, tmp_path):
    """More or fewer <image> than images: refused naming the sample (a multi-image count needs the true number)."""
    processor = processor_for(ModelArguments(vision_model_name_or_path=parts["vision"],
                                             language_model_name_or_path=parts["lm"], architecture="llava_onevision"))
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([qa("more", "img0.png", question="<image>\n<image>\nWhat?"),
                                qa("fewer", ["img0.png", "img1.png"]), qa("good", ["img0.png", "img1.png"],
                                                                          question="<image><image>\nWhat?")]))
    problems = prepared([str(path)], processor, 4096, parts["images"]).problems
    assert [(p.kind, str(p).split(": ")[0]) for p in problems] == [
        ("image_count_mismatch", f"{path}[0] (id 'more')"), ("image_count_mismatch", f"{path}[1] (id 'fewer')")]
