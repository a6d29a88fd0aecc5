"""An untrained LLaVA for the benchmarks: SmolLM2-135M-Instruct (optionally only its first decoder layers) + a
random CLIP vision tower + a new projector, assembled and saved by train_llava's own code with its processor, as a
LLaVA-1.5 (`llava`) or LLaVA-NeXT (`llava_next`, anyres) checkpoint in the llava-hf layout."""

from __future__ import annotations

import json
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

from llava.demo.smollm2 import ensure_smollm2
from llava.training.arguments import ModelArguments
from llava.training.build import base_model_for, processor_for


def save_untrained_llava(output_dir: str, work_dir: str, vision_config: dict, lm_layers: int | None,
                         architecture: str = "llava", image_grid_pinpoints: list[list[int]] | None = None) -> None:
    """Write the LLaVA to `output_dir`; its parts (cut LM, random tower) go to `work_dir` first. The tower is drawn
    with a fixed seed, so every architecture built in one `work_dir` has the same tower and LM (`image_grid_pinpoints`:
    llava_next's grid as [[height, width], ...], None for llava-v1.6's)."""
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
    args = ModelArguments(vision_model_name_or_path=vision_dir, language_model_name_or_path=lm_dir,
                          architecture=architecture,
                          image_grid_pinpoints=json.dumps(image_grid_pinpoints) if image_grid_pinpoints else None)
    processor = processor_for(args)
    base_model_for(args, processor).save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
