"""Command-line arguments: one dataclass per concern, parsed by `HfArgumentParser`.

A training stage is a set of flags, not code: stage 1 (align) is
`--freeze_vision_model True --freeze_language_model True`, stage 2 (instruct) is
`--freeze_vision_model True --freeze_language_model False --model_name_or_path <stage-1 output>`.
Low-memory stage 2 adds `--lora_enable True` (adapters on the LM) and, for QLoRA, `--load_in_4bit True`.
Cross-field checks run in `__post_init__` (and, for checks spanning two dataclasses, in `parse_args`), before
any model is loaded, and say how to fix the flags.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser, TrainingArguments
from transformers.trainer_pt_utils import AcceleratorConfig

from llava.distributed import start_deepspeed_on_cpu

from llava.cache import cache_root
from llava.mixture import read_mixture

logger = logging.getLogger(__name__)

DTYPE_CHOICES = ["float32", "bfloat16", "float16", "auto"]
SELECT_STRATEGY_CHOICES = ["default", "full"]
IMAGE_ASPECT_RATIO_CHOICES = ["pad", "crop", "resize"]
QUANT_TYPE_CHOICES = ["nf4", "fp4"]
# `--lora_target_modules` entries with this prefix name vision-tower modules; all others name LM modules.
VISION_TARGET_PREFIX = "vision_tower."


@dataclass
class ModelArguments:
    """Where the model comes from: one LLaVA checkpoint, or a vision tower plus a language model."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "An existing LLaVA checkpoint (ours or llava-hf) to continue from, e.g. stage 1's "
                          "output_dir. Excludes --vision_model_name_or_path/--language_model_name_or_path."},
    )
    vision_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Vision checkpoint with its image processor: CLIP, SigLIP (also fixed-resolution SigLIP2), "
                          "DINOv2 (with or without registers); a full CLIP/SigLIP checkpoint works too (its vision "
                          "part is taken). SigLIP2 NaFlex is refused. Hub id or local folder."},
    )
    language_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Causal LM with its tokenizer and chat template. Hub id or local folder."},
    )
    vision_feature_layer: int = field(
        default=-2, metadata={"help": "Vision hidden layer fed to the projector (LLaVA-1.5: -2, the penultimate)."}
    )
    vision_feature_select_strategy: str | None = field(
        default=None,
        metadata={"help": "'default' drops the first (CLS) token, 'full' keeps all tokens. Unset: 'default' when "
                          "the tower has a CLS token (CLIP, DINOv2: its registers are kept), 'full' otherwise "
                          "(SigLIP).",
                  "choices": SELECT_STRATEGY_CHOICES},
    )
    image_aspect_ratio: str | None = field(
        default=None,
        metadata={"help": "How a non-square image becomes the tower's square input: 'pad' (LLaVA-1.5: expand to a "
                          "square filled with the image processor's mean colour, then process), 'crop' (resize the "
                          "shortest edge, center-crop: CLIP's way), 'resize' (squash, nothing cropped). Unset: what "
                          "the tower's image processor does. Saved in the checkpoint's image processor; only for a "
                          "new model (a checkpoint keeps its own).", "choices": IMAGE_ASPECT_RATIO_CHOICES},
    )
    projector_hidden_act: str = field(
        default="gelu", metadata={"help": "Activation between the projector's two linear layers (LLaVA-1.5: gelu)."}
    )
    chat_template: str | None = field(
        default=None,
        metadata={"help": "Chat template (a Jinja string or a path to a .jinja file) for LMs without one, "
                          "e.g. base models, or to replace a --model_name_or_path checkpoint's template (saved with "
                          "the outputs). Default: the language model's (or checkpoint's) own template."},
    )
    dtype: str = field(
        default="float32",
        metadata={"help": "Weights' dtype when loading. Keep float32 and train with --bf16/--fp16 for mixed "
                          "precision; bfloat16 halves memory for pure-bf16 training.", "choices": DTYPE_CHOICES},
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Attention kernel: sdpa, eager, flash_attention_2 (default: transformers')."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow custom model code from the checkpoint. Off: nothing untrusted runs."}
    )
    image_token: str = field(
        default="<image>", metadata={"help": "Placeholder token for an image in the text (added when missing)."}
    )
    load_in_4bit: bool = field(
        default=False,
        metadata={"help": "QLoRA: keep the language model's decoder linear layers in 4-bit (bitsandbytes). The vision "
                          "tower, projector, embeddings, norms and lm_head stay in --dtype. Needs --lora_enable True."},
    )
    load_in_8bit: bool = field(
        default=False,
        metadata={"help": "Like --load_in_4bit with 8-bit (LLM.int8) weights: more memory, closer to full precision."},
    )
    bnb_4bit_quant_type: str = field(
        default="nf4", metadata={"help": "4-bit data type: nf4 (QLoRA's NormalFloat, default) or fp4.",
                                 "choices": QUANT_TYPE_CHOICES},
    )
    bnb_4bit_use_double_quant: bool = field(
        default=True, metadata={"help": "Also quantize the 4-bit quantization constants (saves ~0.4 bits/weight)."}
    )

    def __post_init__(self) -> None:
        _check_chat_template_path(self.chat_template)
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("--load_in_4bit and --load_in_8bit are exclusive: pick one.")
        parts = [self.vision_model_name_or_path, self.language_model_name_or_path]
        if self.model_name_or_path and any(parts):
            raise ValueError(
                "Give either --model_name_or_path (continue from a LLaVA checkpoint) or "
                "--vision_model_name_or_path with --language_model_name_or_path (assemble a new model), not both."
            )
        if self.model_name_or_path and self.image_aspect_ratio:
            raise ValueError(
                f"--image_aspect_ratio {self.image_aspect_ratio} sets up the image processor of a new model, but "
                f"{self.model_name_or_path} keeps the preprocessing it was trained with (its "
                "preprocessor_config.json). Drop the flag to continue as before, or assemble a new model with it."
            )
        if not self.model_name_or_path and not all(parts):
            raise ValueError(
                "No model given: pass --model_name_or_path DIR (a LLaVA checkpoint), or both "
                "--vision_model_name_or_path and --language_model_name_or_path to assemble a new one."
            )

    @property
    def assembles_new_model(self) -> bool:
        return self.model_name_or_path is None

    @property
    def quantized(self) -> bool:
        return self.load_in_4bit or self.load_in_8bit

    @property
    def quantization_flag(self) -> str:
        return "--load_in_4bit" if self.load_in_4bit else "--load_in_8bit"


# What a --chat_template value that names a file ends with; a Jinja string never does.
_TEMPLATE_FILE_SUFFIXES = (".jinja", ".j2", ".txt")


def _check_chat_template_path(value: str | None) -> None:
    """Refuse a --chat_template that looks like a file path (a template suffix, or a path separator and no Jinja
    braces) but names no file: it would be used as the literal template, and every sample then fails oddly."""
    if not value or os.path.isfile(value) or "{" in value:
        return
    if value.lower().endswith(_TEMPLATE_FILE_SUFFIXES) or os.sep in value:
        raise ValueError(f"--chat_template {value}: no such file. Pass the path of a template file, or the "
                         "template itself as a Jinja string.")


@dataclass
class DataArguments:
    """Training data in LLaVA JSON/JSONL, parquet or arrow, possibly a mixture (see README, 'Data format' and
    'Data mixtures')."""

    data_path: str = field(
        default=None,
        metadata={"help": "LLaVA .json/.jsonl file(s), .parquet/.arrow files or datasets.save_to_disk folders; "
                          "several comma-separated ones are mixed into one set, each optionally with an amount "
                          "(a.json:0.7,b.jsonl:2000: a fraction with a decimal point or %%, or a sample count), or "
                          "a mixture file (.yaml, or .json holding a mapping) with per-source amounts and image "
                          "folders."},
    )
    image_folder: str | None = field(
        default=None, metadata={"help": "Folder that the samples' relative `image` paths are resolved against "
                                        "(a mixture file's sources may name their own)."}
    )
    model_max_length: int = field(
        default=2048,
        metadata={"help": "Longest sample in tokens (image tokens included). Longer samples lose text at the end; "
                          "a sample whose image tokens would be cut is refused with its id."},
    )
    skip_invalid_samples: bool = field(
        default=False,
        metadata={"help": "Drop invalid samples (logged with their ids and a count per kind) instead of refusing "
                          "to train. Images that fail later, at load time, are then skipped too."},
    )
    allow_absolute_image_paths: bool = field(
        default=False,
        metadata={"help": "Accept absolute image paths and paths leaving --image_folder (off: data is untrusted)."},
    )
    max_image_pixels: int | None = field(
        default=None,
        metadata={"help": "Downsize (keeping the aspect ratio) images above this many pixels right after decoding, "
                          "before the image processor: in training, sample logging and inference alike. Saves "
                          "worker memory and time on huge photos. Unset: no limit (beyond PIL's ~89 MP refusal)."},
    )
    data_cache_dir: str = field(
        default="auto",
        metadata={"help": "Where the checked, tokenized samples are cached, keyed by the data files (path, size, "
                          "modification time), image folders, tokenizer, chat template and limits (not by mixture "
                          "amounts), so later runs and the other processes of a node read them instead of redoing "
                          "it: 'auto' is $TRAIN_LLAVA_CACHE/tokenized (default ~/.cache/train_llava/tokenized), "
                          "'none' turns the cache off."},
    )
    sample_data_path: str | None = field(
        default=None,
        metadata={"help": "LLaVA .json of held-out questions: the first --num_logged_samples are answered at every "
                          "save and at the end, and logged to TensorBoard (image, question, answer, truth)."},
    )
    sample_image_folder: str | None = field(
        default=None, metadata={"help": "Image folder of --sample_data_path (default: --image_folder)."}
    )
    num_logged_samples: int = field(default=4, metadata={"help": "How many --sample_data_path samples to log."})

    def __post_init__(self) -> None:
        if not self.data_path:
            raise ValueError("--data_path is required: one or more LLaVA .json/.jsonl files, comma-separated.")
        self.mixture = read_mixture(self.data_path, self.image_folder)
        if self.model_max_length <= 0:
            raise ValueError(f"--model_max_length must be positive, got {self.model_max_length}.")
        if self.max_image_pixels is not None and self.max_image_pixels <= 0:
            raise ValueError(f"--max_image_pixels must be positive, got {self.max_image_pixels}.")

    @property
    def data_paths(self) -> list[str]:
        return self.mixture.paths

    @property
    def tokenized_cache_dir(self) -> str | None:
        """The folder of the tokenized-data cache, None when it is off."""
        if self.data_cache_dir.lower() == "none":
            return None
        return str(cache_root() / "tokenized") if self.data_cache_dir == "auto" else self.data_cache_dir


@dataclass
class LlavaTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus what trains. Defaults are LLaVA-1.5 stage 2: tower frozen, projector and LM train."""

    freeze_vision_model: bool = field(
        default=True,
        metadata={"help": "Keep the vision tower fixed. Set False to train it (e.g. a randomly initialised tower)."},
    )
    freeze_projector: bool = field(default=False, metadata={"help": "Keep the multi-modal projector fixed."})
    freeze_language_model: bool = field(
        default=False,
        metadata={"help": "Keep the LM (embeddings, decoder, lm_head) fixed: True for stage 1, False for stage 2."},
    )
    report_to: None | str | list[str] = field(
        default="tensorboard",
        metadata={"help": "Where to log: tensorboard (default; events under <output_dir>/runs), wandb, none, ..."},
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: the collator needs every field the dataset returns."}
    )
    train_sampling_strategy: str = field(
        default="group_by_length",
        metadata={"help": "'group_by_length' (default): batches of similar length, so little compute goes to padding "
                          "(lengths come from the tokenized samples, no image is read); 'random', 'sequential', "
                          "'batch_rebalance' as in transformers.",
                  "choices": ["random", "sequential", "group_by_length", "batch_rebalance"]},
    )
    recompute_mlp_activations: bool = field(
        default=True,
        metadata={"help": "When the LM trains in full: keep its MLPs' matmul outputs for the backward pass and "
                          "recompute their activation function and product there (SmolLM2 benchmark: 7%% less peak "
                          "memory, ~5%% more time per step, same results). Off under --gradient_checkpointing, "
                          "which recomputes everything, and for LoRA/QLoRA."},
    )
    projector_lr: float | None = field(
        default=None, metadata={"help": "Learning rate of the projector (default: --learning_rate). LLaVA-1.5 LoRA "
                                        "recipe: 2e-5 next to a 2e-4 adapter learning rate."},
    )
    vision_lr: float | None = field(
        default=None, metadata={"help": "Learning rate of the vision tower when it trains (default: --learning_rate)."}
    )
    packing: bool = field(
        default=False,
        metadata={"help": "Pack whole samples (never split; image tokens counted) into rows of at most "
                          "--model_max_length tokens, planned once from the token counts. Each sample keeps its own "
                          "positions and attends only to itself, so losses and gradients equal unpacked training's; "
                          "far less compute goes to padding. --per_device_train_batch_size then counts rows. Works "
                          "with eager, sdpa and flash_attention_2; an LM whose attention ignores the per-sample "
                          "positions (OPT) is refused before training (see README, 'Packing')."},
    )
    max_tokens_per_batch: int | None = field(
        default=None,
        metadata={"help": "Batches by tokens instead of a fixed size: as many samples (rows, with --packing) as fit "
                          "in this many tokens, padding included (rows x longest row), so memory per step is bounded. "
                          "Needs --per_device_train_batch_size 1 (each planned batch is one DataLoader item)."},
    )
    lora_enable: bool = field(
        default=False,
        metadata={"help": "Train LoRA adapters instead of full weights. The frozen/unfrozen flags still say which "
                          "components learn: an unfrozen LM learns through adapters only (its weights stay fixed); "
                          "an unfrozen projector (and an unfrozen vision tower without adapters) trains fully."},
    )
    lora_r: int = field(
        default=16,
        metadata={"help": "LoRA rank. 16 suits LMs up to ~1B (the demo's SmolLM2-135M); LLaVA-1.5's 7B recipe uses "
                          "128 with --lora_alpha 256. Adapter memory grows linearly with r."},
    )
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator: updates are scaled by alpha/r."})
    lora_dropout: float = field(
        default=0.0,
        metadata={"help": "Dropout on the adapters' inputs. Default 0: dropout keeps an extra copy of every adapted "
                          "layer's input for the backward pass (+15%% peak memory for QLoRA on SmolLM2-135M); "
                          "LLaVA-1.5 used 0.05."},
    )
    lora_target_modules: str | None = field(
        default=None,
        metadata={"help": "Comma-separated names of the linear layers that get adapters, matched as name suffixes "
                          "inside the language model, e.g. 'q_proj,v_proj'; 'all-linear' (the default) is every "
                          "linear layer of the LM decoder (never lm_head). Names prefixed with 'vision_tower.' "
                          "(e.g. 'vision_tower.q_proj', 'vision_tower.all-linear') target the vision tower instead: "
                          "it never gets adapters unless named so."},
    )
    merge_lora: bool = field(
        default=True,
        metadata={"help": "LoRA runs: write the final --output_dir as a plain full-precision LLaVA checkpoint with "
                          "the adapters merged (the adapter itself goes to <output_dir>/adapter). False: the final "
                          "output_dir is an adapter checkpoint like checkpoint-N (merge later with llava.merge_lora)."},
    )

    def __post_init__(self) -> None:
        self._set_multi_process_defaults()
        super().__post_init__()
        fsdp = self.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"  # accelerate launch
        if fsdp and self.use_cpu:
            logger.warning("FSDP is ignored on CPU (accelerate shards only GPU runs): the processes run DDP, each "
                           "holding the whole model. Use GPUs for FSDP.")
        if self.deepspeed and self.use_cpu:
            raise ValueError("--deepspeed with --use_cpu True: accelerate would skip DeepSpeed and run plain DDP. "
                             "Drop --use_cpu: without a GPU DeepSpeed runs on its CPU accelerator over gloo.")
        if self.eval_strategy != "no" or self.load_best_model_at_end:
            raise ValueError(
                f"--eval_strategy {self.eval_strategy} / --load_best_model_at_end {self.load_best_model_at_end}: "
                "train_llava.py trains without an evaluation set, so there is nothing to evaluate or pick a best "
                "checkpoint by. Drop these flags; evaluate saved checkpoints with `python -m llava.evaluate`, and "
                "watch answers to held-out questions with --sample_data_path.")
        if self.freeze_vision_model and self.freeze_projector and self.freeze_language_model:
            raise ValueError(
                "Every component is frozen, so nothing would train. Unfreeze at least one of "
                "--freeze_vision_model False, --freeze_projector False, --freeze_language_model False."
            )
        for flag in ("projector_lr", "vision_lr"):
            value = getattr(self, flag)
            if value is not None and not value > 0:
                raise ValueError(f"--{flag} must be positive, got {value}: a negative rate trains away from the "
                                 "data, zero trains nothing (freeze the component instead).")
        if self.lora_enable:
            self._check_lora()
        self._check_planned_batches()

    def _set_multi_process_defaults(self) -> None:
        """Defaults for runs under torchrun / accelerate launch, where transformers' own would fail or mislead.

        - No GPU: accelerate then runs every process alone, each training on all the data and writing the same
          output_dir, unless --use_cpu True, which makes them one DDP run over gloo. Set it, except under
          --deepspeed, where --use_cpu True would make accelerate skip DeepSpeed (silently plain DDP): DeepSpeed
          runs on its CPU accelerator instead, over gloo (see `llava.distributed.start_deepspeed_on_cpu`).
        - --ddp_find_unused_parameters unset: True only when the vision tower trains, because its layers after
          --vision_feature_layer (and post_layernorm) never get a gradient; transformers' default (False under
          gradient checkpointing) then fails at the second step. Every other trainable weight is used at every step
          (text-only batches too, see `LlavaForConditionalGeneration._encodes_images_first`), so DDP skips the search.
        """
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size > 1 and not self.use_cpu and not torch.accelerator.is_available():
            if self.deepspeed:
                logger.info("%d processes and no GPU: DeepSpeed on its CPU accelerator over gloo.", world_size)
                start_deepspeed_on_cpu(self.ddp_timeout)
                self.accelerator_config = _keeping_started_state(self.accelerator_config)
            else:
                logger.info("%d processes and no GPU: training on CPU with gloo (--use_cpu True).", world_size)
                self.use_cpu = True
        if self.ddp_find_unused_parameters is None:
            self.ddp_find_unused_parameters = not self.freeze_vision_model

    def _check_planned_batches(self) -> None:
        """--max_tokens_per_batch plans whole batches (one DataLoader item each); the Trainer's length-balancing
        sampler cannot read planned rows or batches."""
        if self.max_tokens_per_batch is not None:
            if self.max_tokens_per_batch <= 0:
                raise ValueError(f"--max_tokens_per_batch must be positive, got {self.max_tokens_per_batch}.")
            if self.per_device_train_batch_size != 1:
                raise ValueError(
                    f"--max_tokens_per_batch {self.max_tokens_per_batch} sets each batch's size by tokens, so "
                    f"--per_device_train_batch_size {self.per_device_train_batch_size} cannot also apply: pass "
                    "--per_device_train_batch_size 1 (each step then takes one token-bounded batch).")
        if (self.packing or self.max_tokens_per_batch) and self.train_sampling_strategy == "batch_rebalance":
            raise ValueError("--train_sampling_strategy batch_rebalance cannot read planned rows or batches "
                             "(--packing, --max_tokens_per_batch): use group_by_length or random.")

    @property
    def lora_targets(self) -> list[str]:
        """`--lora_target_modules` as a list; the LM's 'all-linear' when unset."""
        return [t.strip() for t in (self.lora_target_modules or "all-linear").split(",") if t.strip()]

    def _check_lora(self) -> None:
        """Adapters go only where a component is unfrozen, and something must carry them."""
        vision = [t for t in self.lora_targets if t.startswith(VISION_TARGET_PREFIX)]
        language = [t for t in self.lora_targets if not t.startswith(VISION_TARGET_PREFIX)]
        if language and self.freeze_language_model:
            raise ValueError(
                f"--lora_enable True puts adapters on the language model ({','.join(language)}), but "
                "--freeze_language_model True keeps it fixed. Pass --freeze_language_model False to train the LM "
                "through adapters, or drop --lora_enable to train only the projector (stage 1)."
                + ("" if self.lora_target_modules else " For adapters on the vision tower only, name them: "
                   "--lora_target_modules vision_tower.all-linear --freeze_vision_model False.")
            )
        if not language and not self.freeze_language_model:
            raise ValueError(
                "--lora_enable True with --freeze_language_model False: the LM learns only through adapters, but "
                f"--lora_target_modules ({self.lora_target_modules}) names none of its modules. Add LM modules "
                "(e.g. all-linear) or pass --freeze_language_model True."
            )
        if vision and self.freeze_vision_model:
            raise ValueError(
                f"--lora_target_modules names vision-tower modules ({','.join(vision)}), but --freeze_vision_model "
                "True keeps the tower fixed. Pass --freeze_vision_model False, or drop the vision_tower.* names."
            )
        if self.lora_r <= 0 or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"Need --lora_r > 0 and 0 <= --lora_dropout < 1, got {self.lora_r} and "
                             f"{self.lora_dropout}.")


CONFIG_SUFFIXES = (".json", ".yaml", ".yml")


def _keeping_started_state(config: AcceleratorConfig | dict | str | None) -> AcceleratorConfig:
    """`--accelerator_config` (None, a dict or a JSON file, as TrainingArguments reads it) with
    `use_configured_state` on, so that TrainingArguments keeps the process group started before it instead of
    resetting it."""
    if not isinstance(config, AcceleratorConfig):
        config = AcceleratorConfig.from_json_file(config) if isinstance(config, str) else AcceleratorConfig(
            **(config or {}))
    config.use_configured_state = True
    return config


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, LlavaTrainingArguments]:
    """Parse flags, or a .json/.yaml config file holding the same keys, optionally followed by flags that
    override the file's values.

    Example:
        parse_args(["--vision_model_name_or_path", "V", "--language_model_name_or_path", "L",
                    "--data_path", "d.json", "--output_dir", "out"])
        parse_args(["configs/stage1.yaml", "--output_dir", "out"])
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = HfArgumentParser((ModelArguments, DataArguments, LlavaTrainingArguments))
    if argv and argv[0].lower().endswith(CONFIG_SUFFIXES):
        parser.set_defaults(**_read_config(argv[0], parser))
        argv = argv[1:]
    parsed = parser.parse_args_into_dataclasses(args=argv)
    check_quantization(parsed[0], parsed[2])
    load_in_deepspeed_precision(parsed[0], parsed[2])
    return parsed


def _read_config(path: str, parser: HfArgumentParser) -> dict:
    """The keys of config file `path`, checked against the flags `parser` knows (a typo is refused, not ignored).

    They become the parser's defaults, so flags after the file override them and argparse converts their values
    as it converts flags (YAML reads `1e-3` as a string)."""
    import yaml  # only config files need it

    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} not found.")
    with open(path, encoding="utf-8") as f:
        values = json.load(f) if path.lower().endswith(".json") else yaml.safe_load(f)
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a config file holds a mapping of flag names to values, got "
                         f"{type(values).__name__}.")
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(values) - known)
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


def check_quantization(model_args: ModelArguments, training_args: LlavaTrainingArguments) -> None:
    """4-/8-bit weights cannot be trained or saved as trained weights: quantization is only for QLoRA.

    Why not allow a quantized, frozen LM without adapters (a low-memory stage 1)? Its checkpoints would hold
    the LM in 4-bit, and stage 2 would then start from rounded weights; `--dtype bfloat16` is the safe saving.
    """
    if not model_args.quantized or training_args.lora_enable:
        return
    flag = model_args.quantization_flag
    if training_args.freeze_language_model:
        raise ValueError(f"{flag} True is for QLoRA and needs --lora_enable True. To save memory with a frozen LM "
                         f"(stage 1), use --dtype bfloat16 instead of {flag}.")
    raise ValueError(f"{flag} True keeps the language model's weights quantized, and those cannot be trained "
                     f"directly: add --lora_enable True (QLoRA: adapters on the quantized LM), or drop {flag} "
                     "for full fine-tuning.")
