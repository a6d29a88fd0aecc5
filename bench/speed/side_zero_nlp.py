"""Baseline: a plain `transformers.Trainer` with a per-sample collator, as zero_nlp's train_llava does it.

- The dataset hands out raw (question, answer, image path) triples; all the work happens in the collator.
- Per sample: prompt = the tokenizer's chat template over [user: "<image>\\n" + question] with the generation
  prompt; `processor(text=prompt, images=image)` tokenizes it, expands <image> and makes pixel_values (one
  processor call per sample); answer = tokenizer(answer) + EOS; labels -100 on the prompt.
- Left padding; attention mask from the true lengths (pad == EOS for SmolLM2, so `ids != pad` would mask real
  EOS tokens); the model's standard loss (full-vocabulary logits at every position).
- Trainer defaults otherwise (no activation checkpointing unless --grad_ckpt on).

    python bench/speed/side_zero_nlp.py --stage stage1 --model DIR --data JSON --image_folder DIR [...]
"""

from __future__ import annotations

import tempfile

import torch
from PIL import Image

import harness

IGNORE_INDEX = -100


class RawDataset(torch.utils.data.Dataset):
    def __init__(self, records: list[dict]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        return {"question": "<image>\n" + record["question"], "answer": record["answer"], "image": record["image"]}


class PerSampleCollator:
    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id

    def encode(self, question: str, answer: str, image_path: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                    add_generation_prompt=True)
        with Image.open(image_path) as image:
            image = image.convert("RGB")
        encoded = self.processor(text=prompt, images=image, return_tensors="pt")
        prompt_ids = encoded["input_ids"][0]
        answer_ids = torch.tensor(self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.eos_id])
        labels = torch.cat([torch.full_like(prompt_ids, IGNORE_INDEX), answer_ids])
        return torch.cat([prompt_ids, answer_ids]), labels, encoded["pixel_values"]

    def __call__(self, features: list[dict]) -> dict:
        built = [self.encode(f["question"], f["answer"], f["image"]) for f in features]
        length = max(ids.shape[0] for ids, _, _ in built)
        input_ids, labels, mask = [], [], []
        for ids, lab, _ in built:
            pad = length - ids.shape[0]
            input_ids.append(torch.cat([torch.full((pad,), self.pad_id), ids]))
            labels.append(torch.cat([torch.full((pad,), IGNORE_INDEX), lab]))
            mask.append(torch.cat([torch.zeros(pad, dtype=torch.long), torch.ones(ids.shape[0], dtype=torch.long)]))
        return {"input_ids": torch.stack(input_ids), "labels": torch.stack(labels),
                "attention_mask": torch.stack(mask), "pixel_values": torch.cat([pv for _, _, pv in built])}


def main() -> None:
    args, _ = harness.parse(__doc__)
    from transformers import AutoProcessor, LlavaForConditionalGeneration, Trainer, TrainingArguments

    model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(args.model)
    harness.freeze_for_stage(model, args.stage)
    recorder = harness.Recorder(args, "zero_nlp")
    trainer = harness.instrument(Trainer, recorder)(
        model=model, args=TrainingArguments(**harness.trainer_kwargs(args, tempfile.mkdtemp(prefix="speed-zero-"))),
        train_dataset=RawDataset(harness.single_turn_records(args.data, args.image_folder)),
        data_collator=PerSampleCollator(processor))
    trainer.train()
    harness.emit(recorder.result({"grad_ckpt": bool(trainer.args.gradient_checkpointing)}), args.out_json)


if __name__ == "__main__":
    main()
