"""Tiny vision towers of every family the toolkit hosts (and one it refuses), built in code, each saved with its
real image-processor class, so tests exercise the same loading paths as the hub checkpoints.

Sizes are chosen so that a tower's input size differs from its config where the real family's does too: the tiny
DINOv2 is configured for 48-pixel images but its image processor (BiT: resize shortest edge, center crop, as
facebook/dinov2-*) gives 32-pixel crops, so the tower interpolates its position embeddings, as DINOv2 does at 224.
"""

from __future__ import annotations

import torch
from transformers import (BitImageProcessor, Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig,
                          Dinov2WithRegistersModel, Siglip2ImageProcessor, Siglip2VisionConfig, Siglip2VisionModel,
                          SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipVisionConfig, SiglipVisionModel)
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from tests.helpers.tiny_parts import IMAGE_SIZE, PATCH_SIZE, save_vision_model

PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2
DINOV2_CONFIG_IMAGE_SIZE = 48  # != IMAGE_SIZE: position embeddings are interpolated, as DINOv2's 518 -> 224
NUM_REGISTERS = 2

_LAYERS = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2}


def save_clip(path: str, full: bool = False) -> str:
    return save_vision_model(path, full_clip=full)


def save_siglip(path: str, full: bool = False) -> str:
    """A SigLIP vision checkpoint (also the format of fixed-resolution SigLIP2), or a whole SigLIP model."""
    torch.manual_seed(2)
    vision = SiglipVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, **_LAYERS)
    if full:
        text = {"vocab_size": 99, "max_position_embeddings": 16, "bos_token_id": 1, "eos_token_id": 2,
                "pad_token_id": 0, **_LAYERS}
        SiglipModel(SiglipConfig(text_config=text, vision_config=vision.to_dict())).save_pretrained(path)
    else:
        SiglipVisionModel(vision).save_pretrained(path)
    SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(path)
    return path


def _bit_image_processor() -> BitImageProcessor:
    """DINOv2's processor, scaled down: shortest edge 256 -> 40, center crop 224 -> 32, ImageNet mean/std."""
    return BitImageProcessor(size={"shortest_edge": IMAGE_SIZE + 8}, crop_size={"height": IMAGE_SIZE,
                                                                                "width": IMAGE_SIZE},
                             image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD)


def save_dinov2(path: str, registers: bool = False) -> str:
    """A DINOv2 (CLS + patches) or DINOv2-with-registers (CLS + NUM_REGISTERS registers + patches) checkpoint."""
    torch.manual_seed(3)
    common = {"image_size": DINOV2_CONFIG_IMAGE_SIZE, "patch_size": PATCH_SIZE, "hidden_size": 32,
              "num_hidden_layers": 3, "num_attention_heads": 2, "mlp_ratio": 2}
    if registers:
        Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=NUM_REGISTERS, **common)
                                 ).save_pretrained(path)
    else:
        Dinov2Model(Dinov2Config(**common)).save_pretrained(path)
    _bit_image_processor().save_pretrained(path)
    return path


def save_siglip2_naflex(path: str) -> str:
    """A SigLIP2 NaFlex tower (variable patch count per image): LLaVA cannot host it and must refuse it."""
    torch.manual_seed(4)
    Siglip2VisionModel(Siglip2VisionConfig(patch_size=PATCH_SIZE, num_patches=PATCHES, **_LAYERS)
                       ).save_pretrained(path)
    Siglip2ImageProcessor(patch_size=PATCH_SIZE, max_num_patches=PATCHES).save_pretrained(path)
    return path


# name -> (builder, extra tokens beside the patches, default strategy, tokens per image under that strategy)
TOWERS = {
    "clip": (save_clip, 1, "default", PATCHES),
    "siglip": (save_siglip, 0, "full", PATCHES),
    "dinov2": (save_dinov2, 1, "default", PATCHES),
    "dinov2_registers": (lambda path: save_dinov2(path, registers=True), 1 + NUM_REGISTERS, "default",
                         PATCHES + NUM_REGISTERS),
}
