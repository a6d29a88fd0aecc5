"""Batched greedy answers from a trained checkpoint: shared by `llava.generate`, `llava.evaluate` and the
TensorBoard sample callback, so all three prompt the model exactly as training rendered its data."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image
from transformers import AutoProcessor, ProcessorMixin

from llava.conversation import ConversationEncoder, Message
from llava.lora import is_adapter_checkpoint, load_merged_model
from llava.model import LlavaForConditionalGeneration


@dataclass
class InferenceArguments:
    """Which checkpoint answers, in which dtype (`llava.generate`, `llava.evaluate`)."""

    model_name_or_path: str = field(
        metadata={"help": "LLaVA checkpoint folder or hub id; a LoRA checkpoint-N is merged into its base first."})
    dtype: str = field(default="float32", metadata={"help": "Weights' dtype for inference.",
                                                    "choices": ["float32", "bfloat16", "float16"]})


def load_for_inference(path: str, dtype: str = "float32"):
    """(model in eval mode, processor) from a LLaVA checkpoint folder or hub id; a LoRA checkpoint-N is merged
    into its base first."""
    if is_adapter_checkpoint(path):
        model, processor = load_merged_model(path, getattr(torch, dtype))
    else:
        model = LlavaForConditionalGeneration.from_pretrained(path, dtype=getattr(torch, dtype))
        processor = AutoProcessor.from_pretrained(path)
    return model.eval(), processor


class Answerer:
    """Greedy-decodes answers for conversations whose last turn is the user's.

    Prompts are rendered by the same `ConversationEncoder` the training data went through (same chat
    template, same placeholder handling), then padded on the left so every prompt ends where generation starts.
    """

    def __init__(self, model, processor: ProcessorMixin, max_new_tokens: int = 32):
        self.model = model
        self.processor = processor
        self.encoder = ConversationEncoder(processor, max_length=1 << 30)
        self.max_new_tokens = max_new_tokens

    @torch.no_grad()
    def answer(self, conversations: list[list[Message]], images: list[list[Image.Image]]) -> list[str]:
        """One answer per conversation; `images[i]` fills conversation i's placeholders in order."""
        prompts = [self.encoder.prompt(messages) for messages in conversations]
        flat_images = [image for sample_images in images for image in sample_images]
        tokenizer = self.processor.tokenizer
        padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
        try:
            inputs = self.processor(text=prompts, images=flat_images or None, padding=True, return_tensors="pt",
                                    add_special_tokens=False)
        finally:
            tokenizer.padding_side = padding_side
        inputs = inputs.to(self.model.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
