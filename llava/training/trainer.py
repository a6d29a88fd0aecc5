"""`LlavaTrainer`: a thin `transformers.Trainer` subclass; what it adds is listed in its docstring."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator

import torch
from transformers import PreTrainedModel, Trainer
from transformers.trainer import TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from llava.data.dataset import LlavaDataset
from llava.data.types import ConfigurationError, DataError
from llava.data.packing import PlannedDataset
from llava.model.components import components, parameter_table
from llava.model.final_output import prepare_staging, publish_final_output, staging_folder
from llava.model.hub_format import find_end_of_turn_ids, load_saved_weights, make_processor_files_portable
from llava.training.arguments import LlavaTrainingArguments
from llava.training.checkpoint_errors import OutOfSpaceError
from llava.training.checkpoints import begin_save, latest_complete_checkpoint, mark_complete, rotate_checkpoints
from llava.training.preemption import PreemptionCallback, ignoring_sigterm, stop_dataloader_workers
from llava.training.samplers import SeededLengthGroupedSampler
from llava.training.trainable_weights import (holds_trainable_weights_only, load_trainable_weights,
                                              save_trainable_weights)
from llava.utils.files import follow_umask, write_json_atomically

TRAINING_ARGS_JSON = "training_args.json"

logger = logging.getLogger(__name__)


class LlavaTrainer(Trainer):
    """`Trainer` for LLaVA models (plain or wrapped with peft adapters).

    - Needs the processor as `processing_class`: the Trainer then writes it into every checkpoint-N and the
      final output, so each one loads with `AutoProcessor.from_pretrained` beside the weights.
    - Logs the per-component parameter table when training starts, so what trains is never a surprise.
    - Optimizer parameter groups per component (`--projector_lr`, `--vision_lr`), see `parameter_groups`.
    - Resuming a full-weight checkpoint restores every weight (see `_load_from_checkpoint`).
    - `--checkpoint_weights trainable`: checkpoint-N holds only the weights that train, resumed over the start model
      (see `llava.training.trainable_weights`); the final output stays complete.
    - Crash-safe checkpoints: a checkpoint-N counts only once complete (see `_save_checkpoint` and
      `llava.training.checkpoints`, whose `resolve_resume_checkpoint` says which one a run resumes); the final
      output is published atomically (`save_final_output`).
    - SIGTERM saves a checkpoint at the next step boundary and stops training; `preempted` then says so. Dataloader
      workers ignore it, so a signal to the whole process group still gets its checkpoint; training that ends by
      an exception kills them (`stop_dataloader_workers`), and a sample's `DataError` raised in a worker is
      re-raised as the sample's own one-line error.
    - Writes training arguments as JSON (`training_args.json`) instead of transformers' pickled training_args.bin.
    - Writes `checkpoint_records` (file name -> JSON value, e.g. the data mixture) into every checkpoint-N before
      it is marked complete, so a complete checkpoint always has them.
    """

    def __init__(self, *args, processing_class=None, **kwargs):
        if processing_class is None:
            raise ValueError("LlavaTrainer needs processing_class=<the LlavaProcessor>, so checkpoints are complete.")
        super().__init__(*args, processing_class=processing_class, **kwargs)
        self._deferred_save_total_limit: int | None = None  # set while `_inside_checkpoint_save` holds the user's value
        self._saving_checkpoint = False  # True inside `Trainer._save_checkpoint` (see `_inside_checkpoint_save`)
        self.checkpoint_records: dict[str, object] = {}
        self._seeded_sampler: SeededLengthGroupedSampler | None = None  # the train sampler, when length-grouped
        self.preemption = PreemptionCallback(self._any_process)
        self.add_callback(self.preemption)

    @property
    def preempted(self) -> bool:
        """True when training stopped early because of SIGTERM (after saving a checkpoint)."""
        return self.preemption.preempted

    def train(self, resume_from_checkpoint: str | None = None, **kwargs):
        """`Trainer.train` from the checkpoint folder `resume_from_checkpoint` (None: from the start), after logging
        what trains. `llava.training.run` decides the folder once, for every process
        (`llava.training.checkpoints.resolve_resume_checkpoint`)."""
        if self.is_world_process_zero():
            logger.info("Parameters per component:\n%s", parameter_table(self.model, component_rates(self.args)))
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        except DataError as error:  # a sample that failed in a DataLoader worker: reported as in the main process
            stop_dataloader_workers()
            raise error.without_worker_traceback() from None
        except BaseException:
            stop_dataloader_workers()
            raise

    def _init_training_state(self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint,
                             trial) -> tuple[int, int]:
        """Trainer's (epochs trained, steps trained in the current epoch) after restoring a checkpoint; all epochs
        when the checkpoint already reached `max_steps`.

        Why: rerunning a finished command (e.g. after a crash in the final save) resumes from its last checkpoint,
        and Trainer would run one more step before checking max_steps whenever max_steps does not end an epoch.
        """
        epochs_trained, steps_trained = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial)
        if self.state.global_step >= max_steps:
            return num_train_epochs, 0
        return epochs_trained, steps_trained

    def _save_checkpoint(self, model: torch.nn.Module, trial) -> None:
        """Trainer's checkpoint save, made crash-safe: the folder is marked complete only after every process has
        written its part, and old checkpoints are rotated (`--save_total_limit`) only after that.

        A folder of ours at this step (left by a save that was killed) is deleted first, so stale files never mix
        in; a foreign one is moved aside (`begin_save`). A full disk is reported as such, naming the folder.
        """
        folder = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save:
            begin_save(folder)
        self.accelerator.wait_for_everyone()  # no process writes into the folder while it is being deleted
        limit = self.args.save_total_limit
        try:
            with self._inside_checkpoint_save():
                super()._save_checkpoint(model, trial)
        except Exception as error:  # noqa: BLE001 - safetensors' SafetensorError is neither OSError nor RuntimeError
            if not _out_of_space(error):
                raise
            raise OutOfSpaceError(
                f"No space left on device while saving {folder} ({error}). That folder is incomplete and will not "
                "be resumed from; the previous checkpoint, "
                f"{latest_complete_checkpoint(os.path.dirname(folder)) or 'none'}, is kept. Free space (or lower "
                "--save_total_limit) and rerun with --resume_from_checkpoint True.") from error
        self.accelerator.wait_for_everyone()  # every process has written its files
        if self.args.should_save:
            for name, value in self.checkpoint_records.items():
                write_json_atomically(os.path.join(folder, name), value)
            mark_complete(folder, self.state.global_step)
            rotate_checkpoints(os.path.dirname(folder), limit, newest=folder,
                               protected=self.state.best_model_checkpoint)

    @contextlib.contextmanager
    def _inside_checkpoint_save(self) -> Iterator[None]:
        """Around `Trainer._save_checkpoint`: its rotation switched off, since it would delete old checkpoints while
        the new one is still incomplete (and count incomplete leftovers as checkpoints; `_save_checkpoint` rotates
        after); `_saving_checkpoint` True, so `_save` knows a checkpoint-N from the final output."""
        self._deferred_save_total_limit, self.args.save_total_limit = self.args.save_total_limit, None
        self._saving_checkpoint = True
        try:
            yield
        finally:
            self.args.save_total_limit, self._deferred_save_total_limit = self._deferred_save_total_limit, None
            self._saving_checkpoint = False

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Trainer's save of weights (llava-hf names, see `LlavaForConditionalGeneration.save_pretrained`), config
        and processor, the processor files completed by `make_processor_files_portable` so transformers 4.x and serving stacks read it too,
        with the training arguments as JSON: transformers pickles them to training_args.bin, and nothing we write
        should need unpickling to read. A checkpoint-N under --checkpoint_weights trainable gets the trainable
        weights and the training arguments only (`_saves_trainable_weights_only`)."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self._saves_trainable_weights_only:
            if self.args.should_save:
                save_trainable_weights(self.model, output_dir)
                follow_umask(output_dir)
                self._write_training_arguments(output_dir)
            return
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            follow_umask(output_dir)  # adapter weights too (peft writes them), not only `save_pretrained`'s
            make_processor_files_portable(self.processing_class, output_dir, self._end_of_turn_ids)
            self._write_training_arguments(output_dir)
            os.remove(os.path.join(output_dir, TRAINING_ARGS_NAME))

    @property
    def _saves_trainable_weights_only(self) -> bool:
        """Whether this save writes only the trainable weights: a checkpoint-N under --checkpoint_weights trainable.
        Never the final output, nor a peft model's checkpoint-N (which holds only what trains anyway)."""
        return (self._saving_checkpoint and self.args.checkpoint_weights == "trainable"
                and isinstance(self.model, PreTrainedModel))

    def _write_training_arguments(self, output_dir: str) -> None:
        """The run's flags as JSON; --save_total_limit as given, even while a checkpoint save defers it."""
        values = self.args.to_dict()
        if self._deferred_save_total_limit is not None:
            values["save_total_limit"] = self._deferred_save_total_limit
        with open(os.path.join(output_dir, TRAINING_ARGS_JSON), "w", encoding="utf-8") as f:
            json.dump(values, f, indent=2, sort_keys=True)

    @functools.cached_property
    def _end_of_turn_ids(self) -> list[int]:
        """What generation stops at in every saved generation config: found from the chat template once per run."""
        return find_end_of_turn_ids(self.processing_class)

    def save_final_output(self, write: Callable[[str], None]) -> None:
        """Write the run's final output atomically: `write(folder)` saves it into a staging folder inside
        output_dir (with the trainer state), which `publish_final_output` then moves into place (see
        `llava.model.final_output`). Every process calls this (saving may gather weights from all of them)."""
        output_dir = self.args.output_dir
        if self.args.should_save:
            staging = prepare_staging(output_dir)
            self.state.save_to_json(os.path.join(staging, TRAINER_STATE_NAME))
        self.accelerator.wait_for_everyone()
        try:
            write(staging_folder(output_dir))
        except Exception as error:  # noqa: BLE001 - see `_save_checkpoint`
            if not _out_of_space(error):
                raise
            shutil.rmtree(staging_folder(output_dir), ignore_errors=True)  # a partial copy: give its space back
            raise OutOfSpaceError(
                f"No space left on device while writing the final output of {output_dir} ({error}). Nothing there "
                "was replaced (a final output already there is intact) and the last checkpoint, "
                f"{latest_complete_checkpoint(output_dir) or 'none'}, is kept. Free space and rerun the same "
                "command: it resumes from that checkpoint and writes the final output.") from error
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            publish_final_output(output_dir)

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        """Trainer's dataloader, whose worker processes ignore SIGTERM: a scheduler signals the whole process
        group, and a worker dying of it would kill the run before the main process saves its checkpoint."""
        dataloader = super().get_train_dataloader()
        loader = getattr(dataloader, "base_dataloader", dataloader)  # accelerate's adapter wraps the DataLoader
        loader.worker_init_fn = ignoring_sigterm(loader.worker_init_fn)
        return dataloader

    def _any_process(self, flag: bool) -> bool:
        """True if `flag` is True on any process of the run (every process must call this at the same point)."""
        if self.args.world_size <= 1:
            return flag
        value = torch.tensor([int(flag)], device=self.args.device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item())

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        """Load checkpoint-N's full weights into the model being trained, strictly (`load_saved_weights`), or
        through `from_pretrained` for saved layouts that are not a renaming of the model's weights.

        Why: Trainer loads them with a raw `load_state_dict`, but checkpoints hold the llava-hf names
        (`language_model.model.*`), or earlier saves' names, that it does not map back. The raw load misses every
        LM weight, merely warns, and the run resumes from the LM it started with (transformers #43701).
        Adapter checkpoints (peft models), FSDP and DeepSpeed go through Trainer's own loading. A checkpoint holding
        only the trainable weights (`--checkpoint_weights trainable`) loads them over the start model the run was
        built from, which `llava.training.run` has checked is the one the checkpoint was trained from.
        """
        target = self.model if model is None else model
        if holds_trainable_weights_only(resume_from_checkpoint):
            return load_trainable_weights(target, resume_from_checkpoint)
        if not isinstance(target, PreTrainedModel) or self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        if not load_saved_weights(target, resume_from_checkpoint):
            saved = type(target).from_pretrained(resume_from_checkpoint, dtype=target.dtype)
            target.load_state_dict(saved.state_dict())  # strict: a missing or renamed weight fails

    def _get_train_sampler(self, train_dataset=None) -> torch.utils.data.Sampler | None:
        """Trainer's sampler, except that length grouping reads the lengths the dataset already knows (samples', or
        planned rows' and batches', see `llava.data.packing`): upstream would fetch every item to measure it, decoding
        every image once before the first step; and its order is a function of the seed (--data_seed, else --seed)
        and the epoch (`SeededLengthGroupedSampler`), so resuming in any epoch is exact."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        known_lengths = isinstance(dataset, (LlavaDataset, PlannedDataset))
        if self.args.train_sampling_strategy == "group_by_length" and known_lengths:
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            self._seeded_sampler = SeededLengthGroupedSampler(
                self.args.train_batch_size * self.args.gradient_accumulation_steps, lengths=dataset.lengths, seed=seed)
            return self._seeded_sampler
        return super()._get_train_sampler(train_dataset)

    def get_resumed_dataloader(self, dataloader, num_batches: int):
        """Trainer's dataloader that skips the batches a mid-epoch checkpoint already trained, with the epoch set on
        our sampler here: under DDP accelerate's skip wrapper (`SkipBatchSampler` around `BatchSamplerShard`) hides
        it from `set_epoch`, and the resumed epoch would be shuffled as epoch 0. Called only inside an epoch, so the
        checkpoint's fractional `state.epoch` rounds down to it."""
        if self._seeded_sampler is not None:
            self._seeded_sampler.set_epoch(int(self.state.epoch))
        return super().get_resumed_dataloader(dataloader, num_batches)

    def get_optimizer_cls_and_kwargs(self, args: LlavaTrainingArguments, model: torch.nn.Module | None = None):
        """Trainer's optimizer choice (--optim), with our parameter groups: `create_optimizer` takes
        `kwargs["params"]` in place of its own two groups. Optimizers that bring their own groups keep them."""
        optimizer_cls, optimizer_kwargs = super().get_optimizer_cls_and_kwargs(args, model)
        if model is not None and not {"params", "model", "optimizer_dict"} & optimizer_kwargs.keys():
            optimizer_kwargs["params"] = parameter_groups(model, args, set(self.get_decay_parameter_names(model)))
        return optimizer_cls, optimizer_kwargs


def _out_of_space(error: Exception) -> bool:
    """Whether a save failed for a full disk: ENOSPC, or torch's zip writer's way of saying so ("unexpected pos"),
    or safetensors' ("I/O error: No space left on device (os error 28)")."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    return "unexpected pos" in str(error) or "No space left on device" in str(error)


# The components with a learning rate flag of their own; every other parameter trains at --learning_rate.
RATE_FLAGS = {"projector": "projector_lr", "vision_tower": "vision_lr"}


def component_rates(args: LlavaTrainingArguments) -> dict[str, float]:
    """The learning rate of each component: `--projector_lr` and `--vision_lr` (the tower's adapters included),
    each defaulting to `--learning_rate`, which the LM (or its adapters) and lm_head train at."""
    rates = dict.fromkeys(("vision_tower", "projector", "language_model", "lm_head"), args.learning_rate)
    rates.update({component: getattr(args, flag) for component, flag in RATE_FLAGS.items()
                  if getattr(args, flag) is not None})
    return rates


def check_rates_reach_parameters(model: torch.nn.Module, args: LlavaTrainingArguments) -> None:
    """Refuse `--projector_lr`/`--vision_lr` when its component ends up with nothing trainable (after freezing,
    partial vision tuning and LoRA): the flag-level check in `LlavaTrainingArguments` sees only the freeze flags.

    Raises:
        ConfigurationError: the flag, its component and the fix.
    """
    for component, flag in RATE_FLAGS.items():
        value = getattr(args, flag)
        if value is not None and not any(p.requires_grad for p in components(model)[component].parameters()):
            raise ConfigurationError(
                f"--{flag} {value} is the learning rate of the {component}, but nothing of it is trainable in this "
                f"model (after the freeze flags, --vision_tune_last_n_layers and LoRA), so it would reach no "
                f"parameter. Drop --{flag}, or make part of the {component} train.")


def parameter_groups(model: torch.nn.Module, args: LlavaTrainingArguments, decay_names: set[str]) -> list[dict]:
    """Trainable parameters grouped by (component, weight decay or not), each at its `component_rates` rate;
    lm_head joins the LM's groups (same rate). Parameters outside `decay_names` (biases and norms) get no weight
    decay. Each group carries a "name" for logs and tests.
    """
    rates = component_rates(args)
    component_of = {id(p): name for name, module in components(model).items() if name in RATE_FLAGS
                    for p in module.parameters()}
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        component = component_of.get(id(param), "language_model")
        decay = name in decay_names
        key = component if decay else f"{component}/no_decay"
        group = groups.setdefault(key, {"name": key, "params": [], "weight_decay": args.weight_decay if decay else 0.0,
                                        "lr": rates[component]})
        group["params"].append(param)
    return list(groups.values())
