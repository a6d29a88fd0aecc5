"""Every vision tower family LLaVA can host: token counts match what the projector emits, a few training steps run
through the CLI entry point, and the output loads and generates in plain transformers. Also the towers it cannot
host (refused with the fix), --image_aspect_ratio and --max_image_pixels."""

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers import AutoProcessor

from llava.data.images import load_image
from llava.model.processor import image_token_count
from llava.train import main
from llava.training.arguments import DataArguments, ModelArguments
from llava.training.build import base_model_for, processor_for
from tests.helpers.tiny_parts import IMAGE_SIZE, dataset_from
from tests.helpers.tiny_towers import TOWERS, save_siglip, save_siglip2_naflex

STEPS = ["--per_device_train_batch_size", "2", "--max_steps", "2", "--save_strategy", "no", "--report_to", "none",
         "--learning_rate", "1e-2", "--seed", "0", "--logging_steps", "1"]


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    """name -> path of each tiny tower checkpoint."""
    root = tmp_path_factory.mktemp("towers")
    return {name: builder(str(root / name)) for name, (builder, *_) in TOWERS.items()}


def new_model_args(parts, vision, **kwargs):
    return ModelArguments(vision_model_name_or_path=vision, language_model_name_or_path=parts["lm"], **kwargs)


def wide_image():
    """A non-square red image: 48 wide, 24 high."""
    return Image.new("RGB", (48, 24), (255, 0, 0))


@pytest.mark.parametrize("name", sorted(TOWERS))
def test_one_image_token_expands_to_what_the_projector_emits(parts, towers, name):
    _, extra, strategy, tokens = TOWERS[name]
    args = new_model_args(parts, towers[name])
    processor = processor_for(args)
    assert processor.num_additional_image_tokens == extra
    assert processor.vision_feature_select_strategy == strategy
    assert image_token_count(processor) == tokens
    model = base_model_for(args, processor).eval()
    assert model.config.image_seq_length == tokens
    inputs = processor(text=f"{processor.image_token} colour?", images=[wide_image()], return_tensors="pt")
    with torch.no_grad():
        features = model.model.get_image_features(
            pixel_values=inputs["pixel_values"], vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy).pooler_output
        model(**inputs)  # raises "Image features and image tokens do not match" on a miscount
    assert sum(f.shape[0] for f in features) == tokens
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == tokens


def assert_loads_and_generates_in_plain_transformers(path, tokens):
    model = transformers.LlavaForConditionalGeneration.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=[wide_image()], return_tensors="pt")
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == tokens
    output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]


CASES = [(name, "True", []) for name in sorted(TOWERS)] + [
    ("dinov2", "False", []),  # the tower trains too
    ("clip", "True", ["--image_aspect_ratio", "pad", "--max_image_pixels", "1000"]),
]


@pytest.mark.parametrize("name,freeze_vision,flags", CASES)
def test_tower_trains_and_loads_in_plain_transformers(parts, towers, tmp_path, name, freeze_vision, flags):
    out = str(tmp_path / "out")
    before = transformers.AutoModel.from_pretrained(towers[name]).state_dict()
    trainer = main(["--vision_model_name_or_path", towers[name], "--language_model_name_or_path", parts["lm"],
                    "--data_path", parts["data"], "--image_folder", parts["images"], "--output_dir", out,
                    "--freeze_vision_model", freeze_vision, "--freeze_language_model", "True", *STEPS, *flags])
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(np.isfinite(losses))
    after = trainer.model.model.vision_tower.state_dict()
    changed = any(not torch.equal(after[key], before[key]) for key in after)
    assert changed == (freeze_vision == "False")
    assert_loads_and_generates_in_plain_transformers(out, TOWERS[name][3])
    assert bool(getattr(AutoProcessor.from_pretrained(out).image_processor, "do_pad", False)) == ("pad" in flags)


def test_full_siglip_checkpoint_gives_its_vision_part(parts, tmp_path):
    full = save_siglip(str(tmp_path / "siglip_full"), full=True)
    args = new_model_args(parts, full)
    model = base_model_for(args, processor_for(args))
    reference = transformers.SiglipModel.from_pretrained(full).vision_model.state_dict()
    tower = model.model.vision_tower.state_dict()
    assert tower.keys() == reference.keys()
    for key, tensor in tower.items():
        assert torch.equal(tensor, reference[key]), key


def test_siglip2_naflex_is_refused_with_the_fix(parts, tmp_path):
    naflex = save_siglip2_naflex(str(tmp_path / "naflex"))
    with pytest.raises(ValueError, match="siglip2_vision_model") as error:
        processor_for(new_model_args(parts, naflex))
    assert "fixed-resolution" in str(error.value) and "model_type 'siglip'" in str(error.value)


# --------------------------------------------------------------------------------------------- aspect ratio

def pixels(processor, image):
    """The processed image back in 0..255 RGB, (H, W, 3)."""
    image_processor = processor.image_processor
    values = image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
    mean = torch.tensor(image_processor.image_mean).view(3, 1, 1)
    std = torch.tensor(image_processor.image_std).view(3, 1, 1)
    return ((values * std + mean) * 255).permute(1, 2, 0).numpy()


@pytest.mark.parametrize("name", ["clip", "siglip", "dinov2"])
def test_pad_fills_a_square_with_the_mean_colour(parts, towers, name):
    processor = processor_for(new_model_args(parts, towers[name], image_aspect_ratio="pad"))
    assert type(processor.image_processor).__name__.startswith("LlavaImageProcessor")
    assert processor.image_processor.do_pad
    out = pixels(processor, wide_image())  # 48x24: after padding to 48x48, rows 0-11 and 36-47 are border
    side = out.shape[0]
    mean = np.array([int(x * 255) for x in processor.image_processor.image_mean])
    border = out[: side // 8].reshape(-1, 3)
    np.testing.assert_allclose(border, np.broadcast_to(mean, border.shape), atol=2)
    centre = out[side // 2, side // 2]
    np.testing.assert_allclose(centre, [255, 0, 0], atol=2)
    assert out.shape[:2] == (IMAGE_SIZE, IMAGE_SIZE) and image_token_count(processor) == TOWERS[name][3]


def test_crop_cuts_the_sides_and_resize_keeps_them(parts, towers):
    image = Image.new("RGB", (64, 32), (0, 0, 255))
    image.paste((0, 255, 0), (0, 0, 8, 32))  # a green strip at the far left: cropped away, or squashed to 4 px
    cropped = pixels(processor_for(new_model_args(parts, towers["siglip"], image_aspect_ratio="crop")), image)
    squashed = pixels(processor_for(new_model_args(parts, towers["siglip"], image_aspect_ratio="resize")), image)
    assert cropped.shape == squashed.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert cropped[:, 0, 1].max() < 30 and cropped[:, 0, 2].min() > 225  # blue: the strip was cut off
    assert squashed[:, 0, 1].min() > 225  # green: the whole width was kept
    clip_cropped = processor_for(new_model_args(parts, towers["clip"], image_aspect_ratio="crop"))
    assert clip_cropped.image_processor.to_dict() == processor_for(new_model_args(parts, towers["clip"])
                                                                     ).image_processor.to_dict()


# transformers 4.57's LlavaImageProcessor.__init__ arguments: a saved config must use no others.
LLAVA_IMAGE_PROCESSOR_4X_FIELDS = {"do_pad", "do_resize", "size", "resample", "do_center_crop", "crop_size",
                                   "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std",
                                   "do_convert_rgb", "image_processor_type"}


@pytest.mark.parametrize("name", ["dinov2", "siglip"])
@pytest.mark.parametrize("mode", ["pad", "crop", "resize"])
def test_aspect_ratio_survives_save_and_plain_reload(parts, towers, tmp_path, name, mode):
    processor = processor_for(new_model_args(parts, towers[name], image_aspect_ratio=mode))
    processor.save_pretrained(str(tmp_path))
    reloaded = AutoProcessor.from_pretrained(str(tmp_path))
    assert type(reloaded.image_processor) is type(processor.image_processor)
    image = wide_image()
    np.testing.assert_array_equal(pixels(reloaded, image), pixels(processor, image))
    assert image_token_count(reloaded) == image_token_count(processor) == TOWERS[name][3]
    saved = reloaded.image_processor.to_dict()
    expected_class = ("LlavaImageProcessor" if mode == "pad" or (mode, name) == ("crop", "siglip")
                      else {"dinov2": "BitImageProcessor", "siglip": "SiglipImageProcessor"}[name])
    assert saved["image_processor_type"] == expected_class
    if expected_class == "LlavaImageProcessor":
        assert set(saved) <= LLAVA_IMAGE_PROCESSOR_4X_FIELDS


def test_aspect_ratio_is_refused_when_continuing_a_checkpoint(llava_checkpoint):
    with pytest.raises(ValueError, match="new model"):
        ModelArguments(model_name_or_path=llava_checkpoint, image_aspect_ratio="pad")


# --------------------------------------------------------------------------------------------- max pixels

def test_max_image_pixels_downsizes_keeping_the_aspect_ratio(tmp_path):
    path = str(tmp_path / "big.png")
    Image.new("RGB", (400, 100), (9, 9, 9)).save(path)
    assert load_image(path).size == (400, 100)
    assert load_image(path, max_pixels=100_000).size == (400, 100)  # within the limit: untouched
    small = load_image(path, max_pixels=10_000)
    assert small.size == (200, 50) and small.getpixel((0, 0)) == (9, 9, 9)
    with pytest.raises(ValueError, match="positive"):
        DataArguments(data_path="d.json", max_image_pixels=0)


def test_max_image_pixels_reaches_the_training_images(parts, monkeypatch):
    processor = processor_for(new_model_args(parts, parts["vision"]))
    seen = []
    original = type(processor.image_processor).__call__

    def spy(self, images, **kwargs):
        for group in images:  # the dataset passes a sample's images as one group
            seen.extend(image.size for image in (group if isinstance(group, list) else [group]))
        return original(self, images=images, **kwargs)

    dataset = dataset_from([parts["data"]], processor, 512, parts["images"], max_image_pixels=400)
    monkeypatch.setattr(type(processor.image_processor), "__call__", spy)
    dataset[0]
    assert seen and all(w * h <= 400 for w, h in seen)
