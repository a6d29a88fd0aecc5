"""`--dry_run`: the plan of a pipeline, per stage, without loading weights: the start model, parameters per component
(total, trainable, learning rate; counted on a model built on the meta device from configs), the data mixture
(the checking pass, processor only: its token cache then serves the real run), the steps, the output folder and
what this run would do with the stage."""

from __future__ import annotations

import math

import torch
from transformers import AutoConfig, LlavaConfig

from llava.data.mixture import Mixture, mixture_table, select
from llava.data.packing import planned_batches
from llava.model.building import as_anyres
from llava.model.components import parameter_table
from llava.model.modeling import LlavaTraining, model_class
from llava.model.processor import image_tokens, tower_config
from llava.training.build import processor_for, trainable_model
from llava.training.checkpoints import latest_complete_checkpoint
from llava.training.parsing import RunArguments, parse_args
from llava.training.pipeline.plan import RESUME, SKIP, StagePlan
from llava.training.pipeline.spec import Pipeline, Stage, stage_argv
from llava.training.run import checked_dataset, data_seed
from llava.training.trainer import component_rates


def describe_plan(pipeline: Pipeline, plans: list[StagePlan], mixtures: dict[str, Mixture],
                  manifest: dict | None) -> str:
    blocks = [f"Pipeline {pipeline.path} -> {pipeline.output_dir} (manifest: "
              f"{'none yet' if manifest is None else 'pipeline.json'})"]
    processors = {}  # per root start: a chain of stages shares its processor
    for stage_plan in plans:
        stage = stage_plan.stage
        args = parse_args(stage_argv(stage, stage_plan.start_path))
        root = _root_start(pipeline, stage)
        model_args = parse_args(stage_argv(root, root.start.path)).model
        if root.name not in processors:
            processors[root.name] = processor_for(model_args)
        processor = processors[root.name]
        blocks.append("\n".join([
            f"stage {stage.name}: {_action(stage_plan)}",
            f"  start:  {stage.start.describe(stage.flags)}",
            f"  output: {stage.output_dir}",
            "  parameters:", _indent(parameter_rows(_meta_model(model_args, processor), args), 4),
            "  data:", _indent(_data_and_steps(args, mixtures[stage.name], processor), 4)]))
    return "\n\n".join(blocks)


def _action(stage_plan: StagePlan) -> str:
    if stage_plan.action == SKIP:
        return "done: skipped (final output verified)"
    if stage_plan.action == RESUME:
        checkpoint = latest_complete_checkpoint(stage_plan.stage.output_dir)
        return f"resumes from {checkpoint}" if checkpoint else "restarts (started before, no complete checkpoint)"
    return "trains"


def _root_start(pipeline: Pipeline, stage: Stage) -> Stage:
    """The stage whose flags or `from:` path name the model that `stage`'s chain of `from:` starts from: an earlier
    stage's output has its architecture and processor."""
    while stage.start.stage:
        stage = pipeline.stage(stage.start.stage)
    return stage


def _meta_model(model_args, processor) -> LlavaTraining:
    """The LLaVA that `model_args` load or assemble, on the meta device: every parameter's shape, no memory."""
    trust = model_args.trust_remote_code
    if model_args.assembles_new_model:
        vision = tower_config(model_args.vision_model_name_or_path, trust)
        text = AutoConfig.from_pretrained(model_args.language_model_name_or_path, trust_remote_code=trust)
        text.vocab_size = max(text.vocab_size, len(processor.tokenizer))
        config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=processor.image_token_id,
                             image_seq_length=image_tokens(processor).tokens_per_image,
                             vision_feature_layer=model_args.vision_feature_layer,
                             vision_feature_select_strategy=processor.vision_feature_select_strategy,
                             projector_hidden_act=model_args.projector_hidden_act,
                             tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)))
    else:
        config = AutoConfig.from_pretrained(model_args.model_name_or_path, trust_remote_code=trust)
    with torch.device("meta"):
        model = model_class(config)(config)
    return as_anyres(model, processor)


def parameter_rows(model: LlavaTraining, args: RunArguments) -> str:
    """Per component: parameters, trainable ones and their learning rate, as the stage would train `model`."""
    with torch.device("meta"):
        model = trainable_model(model, args.lora, args.training)
    return parameter_table(model, component_rates(args.training))


def _data_and_steps(args: RunArguments, mixture: Mixture, processor) -> str:
    """The mixture table of the stage's selection, and how many optimizer steps it trains (on one process)."""
    training = args.training
    dataset = checked_dataset(args.data, mixture, processor, image_tokens(processor))
    selection = select(mixture, dataset.samples, data_seed(training))
    items, _ = planned_batches(dataset.select(selection.indices), processor.tokenizer.pad_token_id,
                               args.data.model_max_length, training.packing, training.max_tokens_per_batch,
                               training.seed)
    if training.max_steps > 0:
        steps = f"{training.max_steps} (--max_steps)"
    else:
        batches = math.ceil(len(items) / training.per_device_train_batch_size)
        per_epoch = max(math.ceil(batches / training.gradient_accumulation_steps), 1)
        steps = (f"{math.ceil(training.num_train_epochs * per_epoch)} ({training.num_train_epochs:g} epochs x "
                 f"{per_epoch} steps of {training.per_device_train_batch_size} x "
                 f"{training.gradient_accumulation_steps} {'rows' if training.packing else 'items'} on one process; "
                 "N processes take 1/N as many)")
    return f"{mixture_table(mixture, selection)}\nsteps: {steps}"


def _indent(text: str, spaces: int) -> str:
    return "\n".join(" " * spaces + line for line in text.splitlines())
