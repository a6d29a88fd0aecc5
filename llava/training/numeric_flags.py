"""Numbers among the training flags that transformers accepts but torch refuses once the model has loaded (a batch
size of 0, a negative learning rate, Adam betas outside [0, 1)): checked while parsing
(`LlavaTrainingArguments.__post_init__`), so a run fails in one line, naming the flag, before anything loads."""

from __future__ import annotations

# Flags counting things that need at least one: 0 would stop the DataLoader (batch size) or divide by zero (steps).
_AT_LEAST_ONE = ("per_device_train_batch_size", "gradient_accumulation_steps")


def check_numeric_flags(args) -> None:
    """Refuse what the DataLoader, the Trainer's step count or the optimizer would refuse later, with a traceback
    after minutes of loading. `args`: a `LlavaTrainingArguments`."""
    for flag in _AT_LEAST_ONE:
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be at least 1, got {getattr(args, flag)}.")
    if args.dataloader_num_workers < 0:
        raise ValueError(f"--dataloader_num_workers must be 0 (load batches in the training process) or more, got "
                         f"{args.dataloader_num_workers}.")
    if args.learning_rate < 0:
        raise ValueError(f"--learning_rate must not be negative, got {args.learning_rate}: a negative rate trains "
                         "away from the data.")
    for flag in ("projector_lr", "vision_lr"):
        value = getattr(args, flag)
        if value is not None and not value > 0:
            raise ValueError(f"--{flag} must be positive, got {value}: a negative rate trains away from the "
                             "data, zero trains nothing (freeze the component instead).")
    for flag in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be at least 0 and below 1, got {getattr(args, flag)} (Adam's defaults: "
                             "0.9 and 0.999).")
    if args.adam_epsilon < 0:
        raise ValueError(f"--adam_epsilon must not be negative, got {args.adam_epsilon} (default 1e-8).")
