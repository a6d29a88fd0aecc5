"""What a user of another stack does with an output folder, run under whichever transformers imports here.

    python tests/helpers/portable_consumer.py SPEC.json RESULT.pt

SPEC: {"folders": [...], "image": PNG path (or a list of them, all in one prompt; one only with processor_only),
"question": text, "attn_implementation": optional, "processor_only": optional (then only `preprocess`), "pipeline":
optional (also answer through `pipeline("image-text-to-text")`)}.
For each folder: load the model with plain transformers (`output_loading_info`), build the prompt with the
processor's chat template, and record the loading info, input ids, logits, the tokenizer's special tokens and (for
LLaVA-OneVision) the video processor's settings. Uses nothing of train_llava, so it runs in the transformers 4.57 venv (tests/helpers/portable.py). With
PORTABLE_CONSUMER_NO_PROTOBUF=1 in the environment, protobuf is hidden, as on a machine without it (4.57 then
reports some tokenizer errors as "requires the protobuf library").
"""

import json
import os
import sys

if os.environ.get("PORTABLE_CONSUMER_NO_PROTOBUF") == "1":
    sys.modules["google.protobuf"] = None  # `import google.protobuf` fails and find_spec finds nothing

import torch
import transformers
from PIL import Image
from transformers import AutoConfig, AutoProcessor, pipeline


def preprocess(folder: str, image: Image.Image) -> dict:
    """What the folder's processor makes of an image and one placeholder: class, pixel values, input ids."""
    processor = AutoProcessor.from_pretrained(folder)
    inputs = processor(text=processor.image_token + "\nHi", images=[image], return_tensors="pt")
    return {"image_processor": type(processor.image_processor).__name__.removesuffix("Pil"),
            "pixel_values": inputs["pixel_values"], "input_ids": inputs["input_ids"]}


def consume(folder: str, image: Image.Image | list[Image.Image], question: str,
            attn_implementation: str | None = None) -> dict:
    """The folder's model, loaded as the class its config's `architectures` names (LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration, LlavaOnevisionForConditionalGeneration), as serving stacks pick it, and what
    it makes of a question on one image (or on each of a list, in one prompt)."""
    images = image if isinstance(image, list) else [image]
    model_class = getattr(transformers, AutoConfig.from_pretrained(folder).architectures[0])
    model, info = model_class.from_pretrained(folder, output_loading_info=True, attn_implementation=attn_implementation)
    processor = AutoProcessor.from_pretrained(folder)
    messages = [{"role": "user", "content": [*[{"type": "image"}] * len(images), {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=images, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    tokenizer = processor.tokenizer
    return {"missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"]),
            "input_ids": inputs["input_ids"], "logits": logits, "tied": model.lm_head.weight is
            model.get_input_embeddings().weight,
            "special_tokens": sorted(zip(tokenizer.all_special_tokens, tokenizer.all_special_ids)),
            "video_processor": json.loads(video.to_json_string())  # tuples, enums as JSON writes them
            if (video := getattr(processor, "video_processor", None)) else None}


def answer(folder: str, image: Image.Image | list[Image.Image], question: str) -> str:
    """What `pipeline("image-text-to-text")` answers, greedily, in a few tokens."""
    images = image if isinstance(image, list) else [image]
    content = [*({"type": "image", "image": one} for one in images), {"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
    output = pipeline("image-text-to-text", model=folder)(text=messages, max_new_tokens=4, do_sample=False)
    return output[0]["generated_text"][-1]["content"]


def open_image(path: str) -> Image.Image:
    return Image.open(path).convert("RGB")


def main(spec_path: str, result_path: str) -> None:
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    paths = spec["image"]
    image = [open_image(path) for path in paths] if isinstance(paths, list) else open_image(paths)
    if spec.get("processor_only"):
        results = {folder: preprocess(folder, image) for folder in spec["folders"]}
    else:
        results = {folder: consume(folder, image, spec["question"], spec.get("attn_implementation"))
                   for folder in spec["folders"]}
        if spec.get("pipeline"):
            for folder in spec["folders"]:
                results[folder]["answer"] = answer(folder, image, spec["question"])
    torch.save({"transformers": transformers.__version__, "torch": torch.__version__, "results": results},
               result_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
