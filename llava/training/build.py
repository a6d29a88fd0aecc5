"""From parsed arguments to the run's parts: the processor, and the model to train (frozen per component, or
wrapped with LoRA adapters on a base whose LM may be quantized)."""

from __future__ import annotations

import gc
import os

import torch
from peft import PeftModel
from transformers import ProcessorMixin

from llava.data.types import ConfigurationError
from llava.model.building import as_anyres, assemble_llava, load_llava
from llava.model.components import set_trainable
from llava.model.hub_format import save_processor
from llava.model.lora import add_adapters
from llava.model.mlp_recompute import recompute_mlp_activations
from llava.model.modeling import LlavaForConditionalGeneration, LlavaTraining
from llava.model.processor import architecture_of, build_processor, image_token_count, load_processor
from llava.model.quantization import quantization_config
from llava.model.vision_layers import train_last_vision_layers
from llava.training.arguments import LlavaTrainingArguments, LoraArguments, ModelArguments, ProcessorArguments
from llava.training.trainer import check_rates_reach_parameters

BASE_SUBFOLDER = "base_model"  # where a LoRA run assembled from parts keeps the base its adapters need


def processor_for(args: ProcessorArguments) -> ProcessorMixin:
    """The processor of the checkpoint being continued, or a new one for a model assembled from parts."""
    if not args.assembles_new_model:
        return load_processor(args.model_name_or_path, chat_template=args.chat_template,
                              trust_remote_code=args.trust_remote_code, architecture=args.architecture,
                              image_grid_pinpoints=args.grid_pinpoints, vision_aspect_ratio=args.vision_aspect_ratio)
    return build_processor(
        args.vision_model_name_or_path, args.language_model_name_or_path, image_token=args.image_token,
        chat_template=args.chat_template, image_aspect_ratio=args.image_aspect_ratio,
        vision_feature_layer=args.vision_feature_layer,
        vision_feature_select_strategy=args.vision_feature_select_strategy, trust_remote_code=args.trust_remote_code,
        architecture=args.architecture or "llava", image_grid_pinpoints=args.grid_pinpoints,
        vision_aspect_ratio=args.vision_aspect_ratio)


def check_architecture_flags(processor: ProcessorMixin, lora_args: LoraArguments,
                             training_args: LlavaTrainingArguments) -> None:
    """Refuse what the anyres models (LLaVA-NeXT, LLaVA-OneVision) do not support yet, before any weights load.

    Why each: LoRA keeps fully trained parts as peft `modules_to_save`, modules only, so `image_newline` (a bare
    tensor) would neither train with the projector nor reach the adapter checkpoints. `--checkpoint_weights
    trainable` resumes by rebuilding the frozen weights from the start model, which for a llava_next model made from
    a llava checkpoint lacks the newline it was given (a new random one would replace it).
    """
    architecture = architecture_of(processor)
    if architecture == "llava":
        return
    if lora_args.lora_enable:
        raise ConfigurationError(f"--lora_enable True (LoRA, and QLoRA with --load_in_4bit/8bit) is not supported "
                                 f"with --architecture {architecture} (LoRA would not train or save the image_newline "
                                 "with the projector): train it in full (the --freeze_* flags say what trains), or use "
                                 "--architecture llava.")
    if training_args.checkpoint_weights == "trainable":
        raise ConfigurationError(f"--checkpoint_weights trainable is not supported with --architecture {architecture} "
                                 "(a resume would rebuild the image_newline from a start model that may not "
                                 "have it): use --checkpoint_weights full.")


def base_model_for(args: ModelArguments, processor: ProcessorMixin) -> LlavaTraining:
    """The LLaVA checkpoint being continued, or a new one assembled from parts (full precision, all trainable); a
    LLaVA-NeXT or LLaVA-OneVision one when the processor is (`as_anyres`: a new model, or an earlier architecture's
    checkpoint continued so)."""
    if not args.assembles_new_model:
        model = load_llava(args.model_name_or_path, **args.load_kwargs)
    else:
        model = assemble_llava(args.vision_model_name_or_path, args.language_model_name_or_path, processor,
                               image_token_count(processor), vision_feature_layer=args.vision_feature_layer,
                               projector_hidden_act=args.projector_hidden_act, **args.load_kwargs)
    return as_anyres(model, processor)


def model_for_training(model_args: ModelArguments, lora_args: LoraArguments, training_args: LlavaTrainingArguments,
                       processor: ProcessorMixin) -> torch.nn.Module:
    """The model to train: full weights frozen per component, or (--lora_enable) a frozen base, its LM quantized
    with --load_in_4bit/8bit, carrying adapters next to the fully trained unfrozen components."""
    if lora_args.lora_enable:
        model = lora_base_model(model_args, training_args, processor)
    else:
        model = base_model_for(model_args, processor)
    model = trainable_model(model, lora_args, training_args)
    # --gradient_checkpointing: the Trainer switches it on, through `LlavaForConditionalGeneration`'s overrides
    # (only the LM's embeddings made to require grad; a frozen tower is not checkpointed).
    if training_args.recompute_mlp_activations and not (
            training_args.gradient_checkpointing or lora_args.lora_enable or training_args.freeze_language_model):
        recompute_mlp_activations(model.model.language_model)
    return model


def trainable_model(model: LlavaForConditionalGeneration, lora_args: LoraArguments,
                    training_args: LlavaTrainingArguments) -> torch.nn.Module:
    """`model` set to train what the flags say: adapters (`add_lora`), or full weights frozen per component, the
    vision tower only in its last layers under --vision_tune_last_n_layers.

    Raises:
        ConfigurationError: --projector_lr/--vision_lr would reach no trainable parameter, or the tower has fewer
            feeding layers than --vision_tune_last_n_layers.
    """
    if lora_args.lora_enable:
        model = add_lora(model, lora_args, training_args)
    else:
        set_trainable(model, vision_tower=not training_args.freeze_vision_model,
                      projector=not training_args.freeze_projector,
                      language_model=not training_args.freeze_language_model)
        if training_args.vision_tune_last_n_layers is not None:
            train_last_vision_layers(model, training_args.vision_tune_last_n_layers)
    check_rates_reach_parameters(model, training_args)
    return model


def add_lora(model: LlavaForConditionalGeneration, lora_args: LoraArguments,
             training_args: LlavaTrainingArguments) -> PeftModel:
    """`model` with the adapters the flags ask for (`llava.model.lora.add_adapters`)."""
    return add_adapters(model, lora_args.lora_targets, r=lora_args.lora_r, alpha=lora_args.lora_alpha,
                        dropout=lora_args.lora_dropout, train_projector=not training_args.freeze_projector,
                        train_vision_tower=not training_args.freeze_vision_model,
                        vision_last_n_layers=training_args.vision_tune_last_n_layers)


def training_dtype(args: LlavaTrainingArguments) -> torch.dtype:
    """What quantized layers compute in: the mixed-precision dtype of --bf16/--fp16, else float32."""
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def lora_base_model(model_args: ModelArguments, training_args: LlavaTrainingArguments, processor: ProcessorMixin,
                    ) -> LlavaForConditionalGeneration:
    """The base LLaVA that a LoRA run's adapters go on (its LM quantized for QLoRA).

    Adapter checkpoints name their base by path, so the base must exist on disk in full precision: a model
    assembled from parts is first saved to `<output_dir>/base_model` (for QLoRA then reloaded from there
    quantized; the full-precision copy is freed before the quantized one loads).
    """
    quantization = None
    if model_args.quantized:
        quantization = quantization_config(4 if model_args.load_in_4bit else 8, training_dtype(training_args),
                                           model_args.bnb_4bit_quant_type, model_args.bnb_4bit_use_double_quant)
    if model_args.assembles_new_model:
        base_path = os.path.join(training_args.output_dir, BASE_SUBFOLDER)
        model = base_model_for(model_args, processor)
        with training_args.main_process_first(desc="saving the base model for the adapters"):
            if training_args.should_save:
                model.save_pretrained(base_path)
                save_processor(processor, base_path)
        if quantization is not None:
            del model
            gc.collect()
            model = load_llava(base_path, **model_args.load_kwargs, quantization=quantization)
    else:
        base_path = model_args.model_name_or_path
        model = load_llava(base_path, **model_args.load_kwargs, quantization=quantization)
    if os.path.isdir(base_path):  # an absolute path keeps the checkpoints loadable from any working directory
        model.name_or_path = model.config.name_or_path = os.path.abspath(base_path)
    return model
