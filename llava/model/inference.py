"""Batched greedy answers from a trained checkpoint: shared by `llava.generate`, `llava.evaluate` and the
TensorBoard sample callback, so all three prompt the model exactly as training rendered its data."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from PIL import Image
from transformers import AutoProcessor, ProcessorMixin

from llava.data.encoder import ConversationEncoder
from llava.data.image_tokens import ImageTokens
from llava.data.images import check_image, load_image
from llava.data.tables import EmbeddedImage
from llava.data.types import Message, Sample
from llava.model.final_output import check_final_output
from llava.model.lora import is_adapter_checkpoint, load_merged_model
from llava.model.modeling import model_class
from llava.model.processor import image_tokens

logger = logging.getLogger(__name__)


@dataclass
class InferenceArguments:
    """Which checkpoint answers, in which dtype (`llava.generate`, `llava.evaluate`)."""

    model_name_or_path: str = field(
        metadata={"help": "LLaVA checkpoint folder or hub id; a LoRA checkpoint-N is merged into its base first."})
    dtype: str = field(default="float32", metadata={"help": "Weights' dtype for inference.",
                                                    "choices": ["float32", "bfloat16", "float16"]})
    max_image_pixels: int | None = field(
        default=None, metadata={"help": "Downsize larger images (keeping aspect ratio) before the image processor, "
                                        "as training did with the same flag."})


def load_for_inference(path: str, dtype: str = "float32"):
    """(model in eval mode, processor) from a LLaVA checkpoint folder or hub id; a LoRA checkpoint-N is merged
    into its base first. A run's final output left half-published by a kill is refused (`check_final_output`)."""
    check_final_output(path)
    if is_adapter_checkpoint(path):
        model, processor = load_merged_model(path, getattr(torch, dtype))
    else:
        model = model_class(path).from_pretrained(path, dtype=getattr(torch, dtype))
        processor = AutoProcessor.from_pretrained(path)
    return model.eval(), processor


def load_checked_image(path: str | EmbeddedImage, sample: Sample, tokens: ImageTokens,
                       max_pixels: int | None = None) -> Image.Image:
    """`load_image(path, max_pixels)` for inference, checked as training's checking pass checks its images.

    An image that does not decode (truncated, not an image, missing) is refused with the `DataError` that
    `check_image` names it with. One whose size training refuses (`ImageTokens.check_size`: a side under one patch
    or an aspect ratio too extreme for an anyres grid) is answered anyway, with a warning: a question about it is
    worth an answer, but the model never saw such an image in training.

    Raises:
        DataError: naming `sample` and the file.
    """
    # Decoded twice (checked, then loaded): the check turns PIL's errors into the one training reports, and costs
    # little beside generating an answer.
    height, width = check_image(path, sample, decode=True, max_pixels=max_pixels)
    problem = tokens.check_size((height, width))
    if problem:
        logger.warning("%s: image %s (%dx%d pixels): %s Training refuses such an image (its checking pass: "
                       "image_size_unsupported); answering anyway.", sample.describe(), path, width, height, problem)
    return load_image(path, max_pixels)


class Answerer:
    """Greedy-decodes answers for conversations whose last turn is the user's.

    Prompt tokens come from the same `ConversationEncoder` the training data went through: the exact ids that
    preceded a trained answer (chat template, image-token expansion, tokenization at the answer's boundary), and
    images go through the same image processor. Prompts are padded on the left so each ends where generation starts.
    """

    def __init__(self, model, processor: ProcessorMixin, max_new_tokens: int = 32):
        self.model = model
        self.processor = processor
        self.encoder = ConversationEncoder(processor, max_length=1 << 30, image_tokens=image_tokens(processor))
        self.max_new_tokens = max_new_tokens

    @torch.no_grad()
    def answer(self, conversations: list[list[Message]], images: list[list[Image.Image]]) -> list[str]:
        """One answer per conversation; `images[i]` fills conversation i's placeholders in order."""
        prompts = [self.encoder.prompt_ids(messages, [(image.height, image.width) for image in sample_images])
                   for messages, sample_images in zip(conversations, images)]
        tokenizer = self.processor.tokenizer
        length = max(len(prompt) for prompt in prompts)
        input_ids = torch.full((len(prompts), length), tokenizer.pad_token_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros_like(input_ids)
        for row, prompt in enumerate(prompts):
            input_ids[row, length - len(prompt):] = torch.tensor(prompt)
            attention_mask[row, length - len(prompt):] = 1
        inputs = {"input_ids": input_ids.to(self.model.device), "attention_mask": attention_mask.to(self.model.device)}
        grouped = [sample_images for sample_images in images if sample_images]
        if grouped:
            # One group per conversation, as training gave them (OneVision tiles only a conversation's only image).
            processed = self.processor.image_processor(images=grouped, return_tensors="pt")
            inputs["pixel_values"] = processed["pixel_values"].to(self.model.device, self.model.dtype)
            for name in ("image_sizes", "batch_num_images"):  # anyres: each image's grid; OneVision: per sample
                if name in processed:
                    inputs[name] = processed[name].to(self.model.device)
        output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
        new_tokens = output[:, length:]
        return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
