"""Ours: `train_llava.py` itself (llava.train.main) with the stage's freeze flags; any further flags after the
common ones go to train_llava.py unchanged (e.g. `--train_sampling_strategy random` to see what grouping buys).

    python bench/speed/side_ours.py --stage stage1 --model DIR --data JSON --image_folder DIR [train flags...]
"""

from __future__ import annotations

import os
import sys
import tempfile

import harness

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

FREEZE_FLAGS = {
    "stage1": ["--freeze_vision_model", "True", "--freeze_language_model", "True"],
    "stage2": ["--freeze_vision_model", "True", "--freeze_language_model", "False"],
}


def main(side: str = "ours", doc: str = __doc__, side_flags: tuple[str, ...] = ()) -> None:
    """`side_flags` go to train_llava.py after the common ones (a variant of ours, e.g. `side_ours_packed.py`)."""
    args, train_flags = harness.parse(doc)
    train_flags = [*side_flags, *train_flags]
    import llava.train
    import llava.training.run

    recorder = harness.Recorder(args, side)
    llava.training.run.LlavaTrainer = harness.instrument(llava.training.run.LlavaTrainer, recorder)
    argv = ["--model_name_or_path", args.model, "--data_path", args.data, "--image_folder", args.image_folder,
            "--output_dir", tempfile.mkdtemp(prefix="speed-ours-"), *FREEZE_FLAGS[args.stage],
            "--per_device_train_batch_size", str(args.batch_size), "--learning_rate", str(args.lr),
            "--num_train_epochs", "1", "--max_steps", "-1", "--logging_steps", "1", "--save_strategy", "no",
            "--report_to", "none", "--use_cpu", "True", "--dataloader_num_workers", str(args.workers), "--disable_tqdm", "True",
            "--seed", str(args.seed), "--data_seed", str(args.seed), "--model_max_length", "4096"]
    if args.grad_ckpt != "auto":
        argv += ["--gradient_checkpointing", str(args.grad_ckpt == "on")]
    trainer = llava.train.main(argv + train_flags)
    harness.emit(recorder.result({"grad_ckpt": bool(trainer.args.gradient_checkpointing),
                                  "train_flags": " ".join(train_flags)}), args.out_json)


if __name__ == "__main__":
    main()
