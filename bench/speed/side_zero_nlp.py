"""Baseline: a plain `transformers.Trainer` with a per-sample collator, as zero_nlp's train_llava does it.

- The dataset hands out raw samples (messages, image path); all the work happens in the collator.
- Per sample: prompt = the tokenizer's chat template over [user: "<image>\\n" + question] with the generation
  prompt; `processor(text=prompt, images=image)` tokenizes it, expands <image> and makes pixel_values (one
  processor call per sample); answer = tokenizer(answer) + EOS; labels -100 on the prompt.
- Left padding; attention mask from the true lengths (pad == EOS for SmolLM2, so `ids != pad` would mask real
  EOS tokens); the model's standard loss (full-vocabulary logits at every position).
- Trainer defaults otherwise (no activation checkpointing unless --grad_ckpt on).

zero_nlp's own dataset reads only a sample's first question and answer, and always an image
(train_llava/data.py: `conversations[0]`, `conversations[1]`, `image_dir.joinpath(cur_data.get("image"))`), so it
would cut a conversation to its first exchange and fail on a text-only sample. To train the same samples as the
other sides, the recipe is extended as little as it can be: a text-only sample's processor call has no image, and
each later exchange appends its prompt (the chat template's new text: end of the previous turn, the next
question, the assistant header) and its answer + EOS the same way, tokenized by the tokenizer (the image is in the
first prompt).

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
        messages = [dict(m) for m in record["messages"]]
        if record["image"]:
            messages[0]["content"] = "<image>\n" + messages[0]["content"]
        return {"messages": messages, "image": record["image"]}


class PerSampleCollator:
    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id

    def encode(self, messages: list[dict], image_path: str | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Token ids, labels and pixel_values (None without an image) of one sample, one exchange at a time."""
        ids, labels, pixel_values, encoded = [], [], None, ""
        for turn in range(0, len(messages), 2):
            rendered = self.tokenizer.apply_chat_template(messages[:turn + 1], tokenize=False,
                                                          add_generation_prompt=True)
            if not rendered.startswith(encoded):
                raise ValueError("the chat template renders earlier turns differently once a turn follows them")
            prompt = rendered[len(encoded):]
            if turn == 0:
                image = None
                if image_path:
                    with Image.open(image_path) as opened:
                        image = opened.convert("RGB")
                encoded_prompt = self.processor(text=prompt, images=image, return_tensors="pt")
                prompt_ids, pixel_values = encoded_prompt["input_ids"][0], encoded_prompt.get("pixel_values")
            else:
                prompt_ids = torch.tensor(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
            answer = messages[turn + 1]["content"]
            answer_ids = torch.tensor(self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.eos_id])
            ids += [prompt_ids, answer_ids]
            labels += [torch.full_like(prompt_ids, IGNORE_INDEX), answer_ids]
            encoded = rendered + answer + self.tokenizer.eos_token
        return torch.cat(ids), torch.cat(labels), pixel_values

    def __call__(self, features: list[dict]) -> dict:
        built = [self.encode(f["messages"], f["image"]) for f in features]
        length = max(ids.shape[0] for ids, _, _ in built)
        input_ids, labels, mask = [], [], []
        for ids, lab, _ in built:
            pad = length - ids.shape[0]
            input_ids.append(torch.cat([torch.full((pad,), self.pad_id), ids]))
            labels.append(torch.cat([torch.full((pad,), IGNORE_INDEX), lab]))
            mask.append(torch.cat([torch.zeros(pad, dtype=torch.long), torch.ones(ids.shape[0], dtype=torch.long)]))
        batch = {"input_ids": torch.stack(input_ids), "labels": torch.stack(labels),
                 "attention_mask": torch.stack(mask)}
        pixel_values = [pv for _, _, pv in built if pv is not None]
        if pixel_values:
            batch["pixel_values"] = torch.cat(pixel_values)
        return batch


def main() -> None:
    args, _ = harness.parse(__doc__)
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration, Trainer, TrainingArguments

    model_type = AutoConfig.from_pretrained(args.model).model_type
    if model_type != "llava":  # the recipe concatenates one view per image: LLaVA-1.5's processor and model only
        raise SystemExit(f"side_zero_nlp: {args.model} is a {model_type} checkpoint; zero_nlp's recipe trains "
                         "LLaVA-1.5 (`llava`) checkpoints only (run.py skips it for LLaVA-NeXT stages).")
    model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(args.model)
    harness.freeze_for_stage(model, args.stage)
    recorder = harness.Recorder(args, "zero_nlp")
    trainer = harness.instrument(Trainer, recorder)(
        model=model, args=TrainingArguments(**harness.trainer_kwargs(args, tempfile.mkdtemp(prefix="speed-zero-"))),
        train_dataset=RawDataset(harness.conversation_records(args.data, args.image_folder)),
        data_collator=PerSampleCollator(processor))
    trainer.train()
    harness.emit(recorder.result({"grad_ckpt": bool(trainer.args.gradient_checkpointing)}), args.out_json)


if __name__ == "__main__":
    main()
