"""Baseline: TRL's `SFTTrainer` on vision-language data, as TRL documents it (needs the `bench` extra: trl).

The dataset has an `images` column (PIL images, decoded lazily from the paths by `datasets`; an empty list for a
text-only sample) and a conversational `messages` column (every turn of the conversation); SFTTrainer sees the
processor and the images and collates with `DataCollatorForVisionLanguageModeling` (processor.apply_chat_template
per batch, right padding; `prepare_multimodal_messages` puts a sample's images before its first question, and a
batch without any image is processed with `images=None`). TRL supports text-only samples in a vision dataset
(SFTTrainer's comment on "a text-only batch of a mixed one"); it refuses packing for vision datasets. The model is
the checkpoint's own class (`AutoModelForImageTextToText`): a LLaVA-NeXT one trains as it is, since the collator
returns whatever the processor gives, and `LlavaNextProcessor` adds the tiles (pixel_values padded to the batch's
most tiles) and `image_sizes`, from which the model takes each image's tiles and grid. TRL's defaults are kept:
activation checkpointing on (--grad_ckpt off to change), a loss on every non-pad token of "messages" data (image
tokens included), its fused LM-head loss. Overridden as for every side: fp32, learning rate, batch, steps, workers.

    python bench/speed/side_trl.py --stage stage1 --model DIR --data JSON --image_folder DIR [...]
"""

from __future__ import annotations

import tempfile

import torch

import harness


def main() -> None:
    args, _ = harness.parse(__doc__)
    import datasets
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import SFTConfig, SFTTrainer

    # The checkpoint's own class: LlavaForConditionalGeneration, or LlavaNextForConditionalGeneration (anyres).
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(args.model)
    harness.freeze_for_stage(model, args.stage)
    records = harness.conversation_records(args.data, args.image_folder)
    dataset = datasets.Dataset.from_dict({
        "images": [[r["image"]] if r["image"] else [] for r in records],
        "messages": [r["messages"] for r in records],
    }).cast_column("images", datasets.List(datasets.Image()))
    recorder = harness.Recorder(args, "trl")
    config = SFTConfig(max_length=None, **harness.trainer_kwargs(args, tempfile.mkdtemp(prefix="speed-trl-")))
    trainer = harness.instrument(SFTTrainer, recorder)(model=model, args=config, train_dataset=dataset,
                                                       processing_class=processor)
    trainer.train()
    harness.emit(recorder.result({"grad_ckpt": bool(trainer.args.gradient_checkpointing)}), args.out_json)


if __name__ == "__main__":
    main()
