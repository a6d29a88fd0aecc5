"""`python train_llava.py` arguments: flags, or a .json/.yaml config file of the same keys followed by flags that
override it, parsed into the four dataclasses of `llava.training.arguments` and checked across them."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import NamedTuple

from transformers import HfArgumentParser

from llava.data.types import ConfigurationError
from llava.model.lora import VISION_TARGET_PREFIX
from llava.training.arguments import DataArguments, LlavaTrainingArguments, LoraArguments, ModelArguments
from llava.training.pipeline.spec import CONFIG_SUFFIXES, START_FLAGS

logger = logging.getLogger(__name__)


def parse_flags(dataclass_types: tuple, argv: list[str] | None) -> tuple:
    """`HfArgumentParser(dataclass_types).parse_args_into_dataclasses(argv)`, the dataclasses' own checks raising
    `ConfigurationError` (what every command's parsing goes through, so each reports a bad flag as one line)."""
    try:
        return tuple(HfArgumentParser(dataclass_types).parse_args_into_dataclasses(args=argv))
    except ConfigurationError:
        raise
    except ValueError as error:
        raise ConfigurationError(str(error)) from error


class RunArguments(NamedTuple):
    """A training run's parsed flags, one dataclass per concern."""

    model: ModelArguments
    data: DataArguments
    lora: LoraArguments
    training: LlavaTrainingArguments


RUN_DATACLASSES = (ModelArguments, DataArguments, LoraArguments, LlavaTrainingArguments)


def flag_names(parser: HfArgumentParser | None = None) -> set[str]:
    """The names of the flags `parser` takes (default: every flag of a training run), without the leading --."""
    return {action.dest for action in (parser or HfArgumentParser(RUN_DATACLASSES))._actions}


def parse_args(argv: list[str] | None = None) -> RunArguments:
    """Parse flags, or a .json/.yaml config file holding the same keys, optionally followed by flags that
    override the file's values.

    Example:
        parse_args(["--vision_model_name_or_path", "V", "--language_model_name_or_path", "L",
                    "--data_path", "d.json", "--output_dir", "out"])
        parse_args(["my_stage1.yaml", "--output_dir", "out"])
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = HfArgumentParser(RUN_DATACLASSES)
    try:
        if argv and argv[0].lower().endswith(CONFIG_SUFFIXES):
            parser.set_defaults(**_read_config(argv[0], parser))
            argv = argv[1:]
        parsed = RunArguments(*parser.parse_args_into_dataclasses(args=argv))
        if parsed.lora.lora_enable:
            check_lora(parsed.lora, parsed.training)
        check_quantization(parsed.model, parsed.lora, parsed.training)
    except ConfigurationError:
        raise
    except ValueError as error:
        raise ConfigurationError(str(error)) from error
    load_in_deepspeed_precision(parsed.model, parsed.training)
    return parsed


def _read_config(path: str, parser: HfArgumentParser) -> dict:
    """The keys of config file `path`, checked against the flags `parser` knows (a typo is refused, not ignored).

    They become the parser's defaults, so flags after the file override them and argparse converts their values
    as it converts flags (YAML reads `1e-3` as a string)."""
    import yaml  # only config files need it

    if not os.path.isfile(path):
        raise ConfigurationError(f"config file {path} not found.")
    with open(path, encoding="utf-8") as f:
        try:
            values = json.load(f) if path.lower().endswith(".json") else yaml.safe_load(f)
        except (ValueError, yaml.YAMLError) as error:
            raise ConfigurationError(f"{path}: not a readable config file ({error}).") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a config file holds a mapping of flag names to values, got "
                         f"{type(values).__name__}.")
    unknown = sorted(set(values) - flag_names(parser))
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; they must be flag names without the leading --.")
    return values


def load_in_deepspeed_precision(model_args: ModelArguments, training_args: LlavaTrainingArguments) -> None:
    """Under --deepspeed with --bf16/--fp16, load the weights in that 16-bit dtype instead of float32.

    Why: DeepSpeed casts the whole model to the 16-bit dtype when it takes it over and keeps the fp32 master
    weights of what trains in its optimizer, so fp32 weights at load time only double each process's host memory
    until then. (Plain DDP and FSDP with --bf16 train under autocast: there the fp32 weights are the master weights
    and stay.)
    """
    if not training_args.deepspeed or model_args.dtype != "float32" or model_args.quantized:
        return
    if training_args.bf16 or training_args.fp16:
        model_args.dtype = "bfloat16" if training_args.bf16 else "float16"
        logger.info("--deepspeed with --%s True: loading the weights in %s (DeepSpeed keeps the fp32 master "
                    "weights in its optimizer).", "bf16" if training_args.bf16 else "fp16", model_args.dtype)


def _is_local_path(name: str) -> bool:
    """A hub id is `name` or `org/name`; anything else (absolute, ./, ~, more than one /) can only be a folder."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1


def check_model_paths(model_args: ModelArguments) -> None:
    """Refuse a model flag naming a folder that does not exist, before anything loads (transformers would try it
    as a hub id and fail with a long OSError). Not part of `parse_args`: a pipeline parses its later stages before
    the folders they start from exist."""
    for flag in START_FLAGS:
        value = getattr(model_args, flag)
        if value and _is_local_path(value) and not os.path.isdir(os.path.expanduser(value)):
            raise ConfigurationError(f"--{flag} {value}: no such folder. Pass the folder of a saved model (one with "
                                     "config.json) or a hub id such as openai/clip-vit-large-patch14-336.")


def check_quantization(model_args: ModelArguments, lora_args: LoraArguments,
                       training_args: LlavaTrainingArguments) -> None:
    """4-/8-bit weights cannot be trained or saved as trained weights: quantization is only for QLoRA.

    Why not allow a quantized, frozen LM without adapters (a low-memory stage 1)? Its checkpoints would hold
    the LM in 4-bit, and stage 2 would then start from rounded weights; `--dtype bfloat16` is the safe saving.
    """
    if not model_args.quantized or lora_args.lora_enable:
        return
    flag = model_args.quantization_flag
    if training_args.freeze_language_model:
        raise ValueError(f"{flag} True is for QLoRA and needs --lora_enable True. To save memory with a frozen LM "
                         f"(stage 1), use --dtype bfloat16 instead of {flag}.")
    raise ValueError(f"{flag} True keeps the language model's weights quantized, and those cannot be trained "
                     f"directly: add --lora_enable True (QLoRA: adapters on the quantized LM), or drop {flag} "
                     "for full fine-tuning.")


def check_lora(lora: LoraArguments, training: LlavaTrainingArguments) -> None:
    """Adapters go only where a component is unfrozen, and something must carry them."""
    vision = [t for t in lora.lora_targets if t.startswith(VISION_TARGET_PREFIX)]
    language = [t for t in lora.lora_targets if not t.startswith(VISION_TARGET_PREFIX)]
    if language and training.freeze_language_model:
        raise ValueError(
            f"--lora_enable True puts adapters on the language model ({','.join(language)}), but "
            "--freeze_language_model True keeps it fixed. Pass --freeze_language_model False to train the LM "
            "through adapters, or drop --lora_enable to train only the projector (stage 1)."
            + ("" if lora.lora_target_modules else " For adapters on the vision tower only, name them: "
               "--lora_target_modules vision_tower.all-linear --freeze_vision_model False.")
        )
    if not language and not training.freeze_language_model:
        raise ValueError(
            "--lora_enable True with --freeze_language_model False: the LM learns only through adapters, but "
            f"--lora_target_modules ({lora.lora_target_modules}) names none of its modules. Add LM modules "
            "(e.g. all-linear) or pass --freeze_language_model True."
        )
    if vision and training.freeze_vision_model:
        raise ValueError(
            f"--lora_target_modules names vision-tower modules ({','.join(vision)}), but --freeze_vision_model "
            "True keeps the tower fixed. Pass --freeze_vision_model False, or drop the vision_tower.* names."
        )
    if vision and training.vision_tune_last_n_layers is not None:
        raise ValueError(
            f"--vision_tune_last_n_layers {training.vision_tune_last_n_layers} trains the tower's last layers in full, "
            f"but --lora_target_modules also puts adapters on it ({','.join(vision)}). Pick one: drop the "
            "vision_tower.* names, or drop --vision_tune_last_n_layers."
        )
