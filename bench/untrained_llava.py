"""An untrained LLaVA for the benchmarks: SmolLM2-135M-Instruct (optionally only its first decoder layers) + a
random CLIP vision tower + a new projector, assembled and saved by train_llava's own code with its processor."""

from __future__ import annotations

import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

from llava.demo.smollm2 import ensure_smollm2
from llava.training.arguments import ModelArguments
from llava.training.build import base_model_for, processor_for


def save_untrained_llava(output_dir: str, work_dir: str, vision_config: dict, lm_layers: int | None) -> None:
    """Write the LLaVA to `output_dir`; its parts (cut LM, random tower) go to `work_dir` first."""
    lm_dir = str(ensure_smollm2())
    if lm_layers:  # the real LM's first layers: same vocabulary, template and widths, less compute
        lm = AutoModelForCausalLM.from_pretrained(lm_dir)
        lm.model.layers = lm.model.layers[:lm_layers]
        lm.config.num_hidden_layers = lm_layers
        tokenizer = AutoTokenizer.from_pretrained(lm_dir)
        lm_dir = os.path.join(work_dir, f"lm-{lm_layers}-layers")
        lm.save_pretrained(lm_dir)
        tokenizer.save_pretrained(lm_dir)
    vision_dir = os.path.join(work_dir, "vision")
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**vision_config)).save_pretrained(vision_dir)
    size = vision_config["image_size"]
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
        vision_dir)
    args = ModelArguments(vision_model_name_or_path=vision_dir, language_model_name_or_path=lm_dir)
    processor = processor_for(args)
    base_model_for(args, processor).save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
