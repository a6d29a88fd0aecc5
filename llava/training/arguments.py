"""Training flags: one dataclass per concern (model, data, LoRA, training), read by `HfArgumentParser`.

A stage is a set of flags, not code: stage 1 (align) is `--freeze_vision_model True --freeze_language_model True`,
stage 2 (instruct) `--freeze_language_model False --model_name_or_path <stage-1 output>`.
Low-memory stage 2 adds `--lora_enable True` (adapters on the LM) and, for QLoRA, `--load_in_4bit True`.
Cross-field checks run in `__post_init__` (spanning two dataclasses: `llava.training.parsing.parse_args`), before any
model loads, and say how to fix the flags. Nothing here reads data or starts processes (`_setup_devices` aside).
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from llava.model.processor import check_chat_template_path
from llava.training.architecture_arguments import ArchitectureArguments
from llava.training.distributed import keeping_started_state, start_deepspeed_on_cpu
from llava.training.numeric_flags import check_numeric_flags
from llava.training.trainable_weights import CheckpointWeightsArguments
from llava.utils.files import cache_root

logger = logging.getLogger(__name__)

DTYPE_CHOICES = ["float32", "bfloat16", "float16", "auto"]
SELECT_STRATEGY_CHOICES = ["default", "full"]
IMAGE_ASPECT_RATIO_CHOICES = ["pad", "crop", "resize"]
QUANT_TYPE_CHOICES = ["nf4", "fp4"]


@dataclass
class ProcessorArguments(ArchitectureArguments):
    """Where the model comes from, and how its processor turns text and images into tokens: one LLaVA checkpoint,
    or a vision tower plus a language model, and the architecture. All that checking or showing data needs."""

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
    vision_feature_layer: int | None = field(default=None, metadata={
        "help": "Vision hidden layer fed to the projector of a new model. Unset: -2, the penultimate (LLaVA-1.5's, "
                "LLaVA-NeXT's); -1, the last, for --architecture llava_onevision (OneVision's)."})
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
    chat_template: str | None = field(
        default=None,
        metadata={"help": "Chat template (a Jinja string or a path to a .jinja file) for LMs without one, "
                          "e.g. base models, or to replace a --model_name_or_path checkpoint's template (saved with "
                          "the outputs). Default: the language model's (or checkpoint's) own template."},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow custom model code from the checkpoint. Off: nothing untrusted runs."}
    )
    image_token: str = field(
        default="<image>", metadata={"help": "Placeholder token for an image in the text (added when missing)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vision_feature_layer is None:
            self.vision_feature_layer = -1 if self.architecture == "llava_onevision" else -2
        check_chat_template_path(self.chat_template)
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
            raise ValueError("No model given: pass --model_name_or_path DIR (a LLaVA checkpoint), or both "
                             "--vision_model_name_or_path and --language_model_name_or_path to assemble a new one.")

    @property
    def assembles_new_model(self) -> bool:
        return self.model_name_or_path is None


@dataclass
class ModelArguments(ProcessorArguments):
    """`ProcessorArguments` plus how the weights load: dtype, attention kernel, 4-/8-bit LM for QLoRA."""

    projector_hidden_act: str = field(
        default="gelu", metadata={"help": "Activation between the projector's two linear layers (LLaVA-1.5: gelu)."}
    )
    dtype: str = field(
        default="float32",
        metadata={"help": "Weights' dtype when loading. Keep float32 and train with --bf16/--fp16 for mixed "
                          "precision; bfloat16 halves memory for pure-bf16 training.", "choices": DTYPE_CHOICES},
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Attention kernel: sdpa, eager, flash_attention_2 (default: transformers')."}
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
        super().__post_init__()
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("--load_in_4bit and --load_in_8bit are exclusive: pick one.")

    @property
    def quantized(self) -> bool:
        return self.load_in_4bit or self.load_in_8bit

    @property
    def quantization_flag(self) -> str:
        return "--load_in_4bit" if self.load_in_4bit else "--load_in_8bit"

    @property
    def load_kwargs(self) -> dict:
        """The loading settings `llava.model.building` takes (dtype, attention kernel, remote code)."""
        return {"dtype": self.dtype, "attn_implementation": self.attn_implementation,
                "trust_remote_code": self.trust_remote_code}


@dataclass
class DataSourceArguments:
    """Training data in LLaVA JSON/JSONL, parquet or arrow, possibly a mixture (see README, 'Data format' and
    'Data mixtures'), and the longest sample: what checking or showing data needs."""

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
    allow_absolute_image_paths: bool = field(
        default=False,
        metadata={"help": "Accept absolute image paths and paths leaving --image_folder (off: data is untrusted)."},
    )
    decode_images: bool | None = field(
        default=None,
        metadata={"help": "Check every image by decoding it fully (finds truncated pixel data and formats this "
                          "machine cannot decode) instead of reading its header only. Unset: headers only in "
                          "training (a bad image then fails when its batch is built, under "
                          "--skip_invalid_samples), full decode in llava.validate_data."},
    )

    max_image_pixels: int | None = field(
        default=None,
        metadata={"help": "Downsize (keeping the aspect ratio) images above this many pixels right after decoding, "
                          "before the image processor: in training, sample logging and inference alike; "
                          "llava.validate_data and llava.inspect_data count image tokens after it. Saves worker "
                          "memory and time on huge photos. Unset: no limit (beyond PIL's ~89 MP refusal)."},
    )

    def __post_init__(self) -> None:
        if not self.data_path:
            raise ValueError("--data_path is required: one or more LLaVA .json/.jsonl files, comma-separated.")
        if self.model_max_length <= 0:
            raise ValueError(f"--model_max_length must be positive, got {self.model_max_length}.")
        if self.max_image_pixels is not None and self.max_image_pixels <= 0:
            raise ValueError(f"--max_image_pixels must be positive, got {self.max_image_pixels}.")


@dataclass
class DataArguments(DataSourceArguments):
    """`DataSourceArguments` plus what a training run does with the data: skipping, image limits, the token
    cache, samples answered at every save."""

    skip_invalid_samples: bool = field(
        default=False,
        metadata={"help": "Drop invalid samples (logged with their ids and a count per kind) instead of refusing "
                          "to train. Images that fail later, at load time, are then skipped too."},
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

    @property
    def tokenized_cache_dir(self) -> str | None:
        """The folder of the tokenized-data cache, None when it is off."""
        if self.data_cache_dir.lower() == "none":
            return None
        return str(cache_root() / "tokenized") if self.data_cache_dir == "auto" else self.data_cache_dir


@dataclass
class LoraArguments:
    """LoRA and QLoRA: adapters instead of full weights (with --load_in_4bit/8bit: on a quantized LM)."""

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

    @property
    def lora_targets(self) -> list[str]:
        """`--lora_target_modules` as a list; the LM's 'all-linear' when unset."""
        return [t.strip() for t in (self.lora_target_modules or "all-linear").split(",") if t.strip()]

    def __post_init__(self) -> None:
        if self.lora_enable and (self.lora_r <= 0 or not 0.0 <= self.lora_dropout < 1.0):
            raise ValueError(f"Need --lora_r > 0 and 0 <= --lora_dropout < 1, got {self.lora_r} and "
                             f"{self.lora_dropout}.")


@dataclass
class LlavaTrainingArguments(CheckpointWeightsArguments, TrainingArguments):
    """`TrainingArguments` plus what trains and what checkpoints hold; defaults: LLaVA-1.5 stage 2 (tower frozen)."""

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
    vision_tune_last_n_layers: int | None = field(
        default=None,
        metadata={"help": "Train only the vision tower's last N encoder layers (with --freeze_vision_model False; at "
                          "--vision_lr), counted among the layers feeding the projector: under --vision_feature_layer "
                          "-2, N=1 trains the penultimate layer (the last one's output is never read). The final norm "
                          "stays frozen (the features are taken before it); the embeddings train only when N is "
                          "every feeding layer, which trains the whole tower. Unset: the whole tower."},
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
    def __post_init__(self) -> None:
        self._set_multi_process_defaults()
        super().__post_init__()
        check_numeric_flags(self)
        fsdp = self.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"  # accelerate launch
        if fsdp and self.use_cpu:
            logger.warning("FSDP is ignored on CPU (accelerate shards only GPU runs): the processes run DDP, each "
                           "holding the whole model. Use GPUs for FSDP.")
        self._check_checkpoint_weights(sharded=bool(self.deepspeed) or fsdp)
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
            raise ValueError("Every component is frozen, so nothing would train. Unfreeze at least one of "
                             "--freeze_vision_model False, --freeze_projector False, --freeze_language_model False.")
        for flag, frozen in (("projector_lr", "freeze_projector"), ("vision_lr", "freeze_vision_model")):
            value = getattr(self, flag)
            if value is not None and getattr(self, frozen):
                raise ValueError(f"--{flag} {value} is the learning rate of a component that --{frozen} True keeps "
                                 f"fixed, so it would reach no parameter. Drop --{flag}, or pass --{frozen} False to "
                                 "train the component at that rate.")
        self._check_vision_tuning()
        self._check_planned_batches()

    def _set_multi_process_defaults(self) -> None:
        """Defaults for runs under torchrun / accelerate launch, where transformers' own would fail or mislead.

        - No GPU: accelerate then runs every process alone, each training on all the data and writing the same
          output_dir, unless --use_cpu True, which makes them one DDP run over gloo. Set it, except under
          --deepspeed, where --use_cpu True would make accelerate skip DeepSpeed (silently plain DDP): DeepSpeed
          runs on its CPU accelerator instead, over gloo (started in `_setup_devices`).
        - --ddp_find_unused_parameters unset: True only when the vision tower trains (also partly: an N of
          --vision_tune_last_n_layers covering every feeding layer trains it whole), because its layers after
          --vision_feature_layer and its final norm never get a gradient; transformers' default (False under gradient
          checkpointing) then fails at the second step. Every other trainable weight is used at every step (text-only
          batches too, see `LlavaTraining._encodes_images_first`), so DDP skips the search.
        """
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self._deepspeed_on_cpu = False
        if world_size > 1 and not self.use_cpu and not torch.accelerator.is_available():
            if self.deepspeed:
                logger.info("%d processes and no GPU: DeepSpeed on its CPU accelerator over gloo.", world_size)
                self._deepspeed_on_cpu = True
                self.accelerator_config = keeping_started_state(self.accelerator_config)
            else:
                logger.info("%d processes and no GPU: training on CPU with gloo (--use_cpu True).", world_size)
                self.use_cpu = True
        if self.ddp_find_unused_parameters is None:
            self.ddp_find_unused_parameters = not self.freeze_vision_model

    @functools.cached_property
    def _setup_devices(self) -> torch.device:
        """transformers' device and process-group set-up, after starting DeepSpeed's group over gloo where there is
        no GPU (see `_set_multi_process_defaults`): the one place a process group starts."""
        if self._deepspeed_on_cpu:
            start_deepspeed_on_cpu(self.ddp_timeout)
        return super()._setup_devices

    def _check_vision_tuning(self) -> None:
        """--vision_tune_last_n_layers: at least one layer, of a tower that trains (the model checks the count)."""
        n = self.vision_tune_last_n_layers
        if n is not None and (n <= 0 or self.freeze_vision_model):
            raise ValueError(f"--vision_tune_last_n_layers {n} " + (
                "must be at least 1; to keep the tower fixed, drop it." if n <= 0 else
                "trains the vision tower's last layers, but --freeze_vision_model True (the default) keeps the "
                "tower fixed. Pass --freeze_vision_model False with it, or drop --vision_tune_last_n_layers."))

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
