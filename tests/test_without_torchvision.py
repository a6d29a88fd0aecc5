"""`make install` puts torchvision beside torch, and transformers then preprocesses images with its torchvision
backend; what ran without it (llava, llava_next) must keep running there. One process without torchvision trains a
llava stage 1 and a llava_next stage 2, answers with both outputs and preprocesses images of several sizes with
their (PIL) processors: the same input ids as the torchvision-backed processors here, pixels within PIXEL_TOLERANCE
(README, "Install": the measured difference, `bench/image_backends.py`)."""

import json
import os
import subprocess
import sys

import torch
from PIL import Image
from transformers import AutoProcessor
from transformers.utils import is_torchvision_available

from tests.helpers.outputs import REPO

# Normalised pixel values (CLIP's mean/std: about -1.8 to 2.1). The backends' resizing rounds differently: measured
# here 0.03 at most on these images, and over 200 random ones (bench/image_backends.py) 0.09 (CLIP) and 0.23
# (LLaVA-NeXT's tiles), mean 3e-5 to 6e-5.
PIXEL_TOLERANCE = 0.25
SIZES = [(48, 40), (64, 64), (300, 70), (17, 250), (5, 3)]


def test_llava_and_llava_next_train_answer_and_preprocess_without_torchvision(parts, tmp_path):
    images = []
    for index, (width, height) in enumerate(SIZES):
        path = tmp_path / f"image{index}.png"
        gradient = torch.arange(width * height * 3, dtype=torch.int64).reshape(height, width, 3) * 37 % 256
        Image.fromarray(gradient.to(torch.uint8).numpy()).save(path)
        images.append(str(path))
    done = subprocess.run([sys.executable, "tests/helpers/without_torchvision.py", parts["vision"], parts["lm"],
                           parts["data"], parts["images"], str(tmp_path / "out"), *images], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["torchvision_available"] is False
    for name, expected_processor in (("llava", "CLIPImageProcessorPil"), ("llava_next", "LlavaNextImageProcessorPil")):
        result = report[name]
        assert result["steps"] == 2 and result["losses_finite"], name
        assert isinstance(result["answer"], str)
        assert result["image_processor"] == expected_processor
        if not is_torchvision_available():  # this environment has the PIL backend as well: nothing to compare
            continue
        processor = AutoProcessor.from_pretrained(str(tmp_path / "out" / name))
        assert not type(processor.image_processor).__name__.endswith("Pil")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        for image, without in zip(images, result["inputs"]):
            inputs = processor(text=prompt, images=[Image.open(image).convert("RGB")], return_tensors="pt")
            assert inputs["input_ids"][0].tolist() == without["input_ids"], (name, image)
            pixels = torch.tensor(without["pixel_values"])
            assert pixels.shape == inputs["pixel_values"].shape, (name, image)
            assert (pixels - inputs["pixel_values"]).abs().max() <= PIXEL_TOLERANCE, (name, image)
