"""Command-line arguments: one dataclass per concern, parsed by `HfArgumentParser`.

A training stage is a set of flags, not code: stage 1 (align) is
`--freeze_vision_model True --freeze_language_model True`, stage 2 (instruct) is
`--freeze_vision_model True --freeze_language_model False --model_name_or_path <stage-1 output>`.
Cross-field checks run in `__post_init__`, before any model is loaded, and say how to fix the flags.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser, TrainingArguments

DTYPE_CHOICES = ["float32", "bfloat16", "float16", "auto"]
SELECT_STRATEGY_CHOICES = ["default", "full"]


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
        metadata={"help": "CLIP/SigLIP vision checkpoint (a full CLIP/SigLIP checkpoint works too: its vision "
                          "part is taken) with its image processor. Hub id or local folder."},
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
        metadata={"help": "'default' drops the CLS token, 'full' keeps all tokens. Unset: 'default' when the "
                          "tower has a CLS token (CLIP), 'full' otherwise (SigLIP).",
                  "choices": SELECT_STRATEGY_CHOICES},
    )
    projector_hidden_act: str = field(
        default="gelu", metadata={"help": "Activation between the projector's two linear layers (LLaVA-1.5: gelu)."}
    )
    chat_template: str | None = field(
        default=None,
        metadata={"help": "Chat template (a Jinja string or a path to a .jinja file) for LMs without one, "
                          "e.g. base models. Default: the language model's own template."},
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

    def __post_init__(self) -> None:
        parts = [self.vision_model_name_or_path, self.language_model_name_or_path]
        if self.model_name_or_path and any(parts):
            raise ValueError(
                "Give either --model_name_or_path (continue from a LLaVA checkpoint) or "
                "--vision_model_name_or_path with --language_model_name_or_path (assemble a new model), not both."
            )
        if not self.model_name_or_path and not all(parts):
            raise ValueError(
                "No model given: pass --model_name_or_path DIR (a LLaVA checkpoint), or both "
                "--vision_model_name_or_path and --language_model_name_or_path to assemble a new one."
            )

    @property
    def assembles_new_model(self) -> bool:
        return self.model_name_or_path is None


@dataclass
class DataArguments:
    """Training data in LLaVA JSON/JSONL (see README, 'Data format')."""

    data_path: str = field(
        default=None,
        metadata={"help": "LLaVA .json or .jsonl file(s); several comma-separated files are mixed into one set."},
    )
    image_folder: str | None = field(
        default=None, metadata={"help": "Folder that the samples' relative `image` paths are resolved against."}
    )
    model_max_length: int = field(
        default=2048,
        metadata={"help": "Longest sample in tokens (image tokens included). Longer samples lose text at the end; "
                          "a sample whose image tokens would be cut is refused with its id."},
    )

    def __post_init__(self) -> None:
        if not self.data_path:
            raise ValueError("--data_path is required: one or more LLaVA .json/.jsonl files, comma-separated.")
        if self.model_max_length <= 0:
            raise ValueError(f"--model_max_length must be positive, got {self.model_max_length}.")

    @property
    def data_paths(self) -> list[str]:
        return [p.strip() for p in self.data_path.split(",") if p.strip()]


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

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.freeze_vision_model and self.freeze_projector and self.freeze_language_model:
            raise ValueError(
                "Every component is frozen, so nothing would train. Unfreeze at least one of "
                "--freeze_vision_model False, --freeze_projector False, --freeze_language_model False."
            )


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, LlavaTrainingArguments]:
    """Parse flags, or a single .json/.yaml config file holding the same keys.

    Example:
        parse_args(["--vision_model_name_or_path", "V", "--language_model_name_or_path", "L",
                    "--data_path", "d.json", "--output_dir", "out"])
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = HfArgumentParser((ModelArguments, DataArguments, LlavaTrainingArguments))
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(argv[0], allow_extra_keys=False)
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(argv[0], allow_extra_keys=False)
    return parser.parse_args_into_dataclasses(args=argv)
