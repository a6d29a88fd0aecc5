"""Train, generate and preprocess as in an environment without torchvision (transformers then builds its PIL image
processors), printing one JSON line: what ran and what the processors produced.

    python tests/helpers/without_torchvision.py VISION LM DATA_PATH IMAGE_FOLDER OUT_DIR IMAGE...

Trains a llava stage 1 (new model) and a llava_next stage 2 from it (2 steps each), answers one question with each
output through `llava.generate`, and preprocesses each IMAGE with each output's `AutoProcessor`, so the caller can
compare the token counts and pixels with the torchvision-backed processors of its own environment.
"""

import json
import sys

sys.modules["torchvision"] = None  # import fails, as when it is not installed (transformers checks it so too)

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoProcessor  # noqa: E402
from transformers.utils import is_torchvision_available  # noqa: E402

from llava import generate  # noqa: E402
from llava.train import main  # noqa: E402

STEPS = ["--max_steps", "2", "--logging_steps", "1", "--per_device_train_batch_size", "2", "--report_to", "none",
         "--seed", "0", "--learning_rate", "1e-2"]


def processed(path: str, images: list[str]) -> dict:
    """The image processor's class, and each image's input ids and pixels through the output's processor."""
    processor = AutoProcessor.from_pretrained(path)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    results = []
    for image in images:
        inputs = processor(text=prompt, images=[Image.open(image).convert("RGB")], return_tensors="pt")
        results.append({"input_ids": inputs["input_ids"][0].tolist(), "pixel_values": inputs["pixel_values"].tolist()})
    return {"image_processor": type(processor.image_processor).__name__, "inputs": results}


def run(vision: str, lm: str, data: str, images_folder: str, out: str, images: list[str]) -> dict:
    data_flags = ["--data_path", data, "--image_folder", images_folder, *STEPS]
    outputs = {"llava": f"{out}/llava", "llava_next": f"{out}/llava_next"}
    trainers = {
        "llava": main(["--vision_model_name_or_path", vision, "--language_model_name_or_path", lm,
                       "--freeze_language_model", "True", "--output_dir", outputs["llava"], *data_flags]),
        "llava_next": main(["--model_name_or_path", outputs["llava"], "--architecture", "llava_next",
                            "--freeze_language_model", "False", "--output_dir", outputs["llava_next"], *data_flags]),
    }
    report = {"torchvision_available": is_torchvision_available()}
    for name, path in outputs.items():
        losses = [entry["loss"] for entry in trainers[name].state.log_history if "loss" in entry]
        report[name] = {
            "steps": trainers[name].state.global_step,
            "losses_finite": bool(losses) and all(torch.isfinite(torch.tensor(losses)).tolist()),
            "answer": generate.main(["--model_name_or_path", path, "--image", images[0], "--prompt", "What colour?",
                                     "--max_new_tokens", "3"]),
            **processed(path, images),
        }
    return report


if __name__ == "__main__":
    vision, lm, data, images_folder, out, *images = sys.argv[1:]
    print(json.dumps(run(vision, lm, data, images_folder, out, images)))
