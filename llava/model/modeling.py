"""The LLaVA model classes: transformers' `LlavaForConditionalGeneration`, `LlavaNextForConditionalGeneration`
(anyres, see `llava.model.anyres`) and `LlavaOnevisionForConditionalGeneration` (`llava.model.onevision`) with a
loss computed only on trained tokens; what they share is `LlavaTraining` (and `AnyresTraining`, the two anyres ones).

Layout in memory (transformers 5.x): `model.model.vision_tower` (CLIP/SigLIP/DINOv2 vision model),
`model.model.multi_modal_projector` (linear_1 -> act -> linear_2), `model.model.language_model` (the LM's
decoder, no head) and `model.lm_head`. On disk every save writes the llava-hf layout (`llava.model.hub_format`);
assembling one from parts is `llava.model.building`'s job.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import transformers
from torch.utils.checkpoint import checkpoint
from transformers import LlavaConfig, LlavaNextConfig, LlavaOnevisionConfig
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import remove_tied_weights_from_state_dict
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
from transformers.utils.generic import is_flash_attention_requested

from llava.data.types import IGNORE_INDEX
from llava.model.final_output import check_final_output
from llava.model.hub_format import FROM_HUB, check_loading_info, hub_state_dict, make_config_portable
from llava.model.sharding import multi_process, parameters_sharded
from llava.utils.files import follow_umask

# What the anyres models take beside pixel_values to encode images: each image's size (its grid) and, for OneVision,
# each sample's image count (one image is tiled, several are base views).
IMAGE_INPUTS = ("image_sizes", "batch_num_images")
# Shorter shared prefixes are computed per row: the extra batch-1 pass would cost more than it saves.
_MIN_SHARED_PREFIX = 8
# Logits (trained tokens x vocabulary) held at once by the training loss; a batch with more trained tokens computes
# its loss in chunks of this many logits (128 MB in float32).
_LOSS_CHUNK_LOGITS = 1 << 25


class LlavaProjector(LlavaMultiModalProjector):
    """transformers' projector (same weights and names), fed in its own dtype.

    Why: with `--dtype auto` the tower and LM keep the dtypes they were saved in (e.g. an fp32 CLIP and a bf16 LM),
    and the projector is built in the LM's dtype; passes without autocast (generate, evaluate, the sample callback,
    served outputs) would then feed fp32 features into bf16 weights ("mat1 and mat2 must have the same dtype").
    Its output is cast to the LM's embedding dtype where it is merged (transformers' `LlavaModel.forward` and
    `_embed_with_image_features`).
    """

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return super().forward(image_features.to(self.linear_1.weight.dtype))


class LlavaTraining:
    """What this project adds to transformers' LLaVA classes (mixed in before them): a training loss computed only
    where labels are not -100, loading and saving in the llava-hf layout.

    Same weights, config and `architectures` name as the upstream class, so checkpoints load with plain
    transformers. Without `labels` it is the upstream forward (generation, inference). A subclass says how its
    model encodes images (`_image_features`) and what a blank image is (`_blank_image`).

    Why: the upstream loss projects every position to the full vocabulary; in LLaVA data most positions are
    image tokens, prompts and padding whose labels are -100. Projecting only the trained positions gives
    the same loss with far less compute and memory (the (B, T, V) logits tensor is never built).
    Likewise, the leading tokens that every sample of a batch shares (system prompt, user header) go through
    the LM once per batch instead of once per row (see `_shared_prefix_length`).
    """

    @classmethod
    def from_pretrained(cls, *args, key_mapping: dict[str, str] | None = None, output_loading_info: bool = False,
                        **kwargs):
        """transformers' `from_pretrained` that also reads the llava-hf layout, and never returns a partly random model.

        Why: transformers treats this class as custom code (it lives outside the library), so it skips Llava's own
        renaming of llava-hf names; `key_mapping` brings it back. Names of earlier saves of this project
        (`model.language_model.model.*`) are mapped by the LM's own transformers mapping, as before. transformers
        only warns about missing or unexpected weights and initialises them randomly; this raises instead. A run's
        final output that a kill left half-published is refused (`check_final_output`).
        """
        path = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        check_final_output(path)
        model, info = super().from_pretrained(*args, key_mapping={**FROM_HUB, **(key_mapping or {})},
                                              output_loading_info=True, **kwargs)
        check_loading_info(info, model, path)
        return (model, info) if output_loading_info else model

    def save_pretrained(self, save_directory, *args, state_dict: dict | None = None, **kwargs) -> None:
        """transformers' `save_pretrained`, writing the llava-hf tensor names (`hub_state_dict`) and a config.json
        that serves as published (`make_config_portable`: `use_cache` true, the rotary fields 4.x reads).

        Why: as custom code, this class would be saved under whatever names transformers' mappings of the model's
        parts produce (e.g. `model.language_model.model.layers.*`), which transformers 4.x and vLLM do not load.
        Every save of the project (Trainer's final and checkpoint saves, FSDP/ZeRO-3 consolidated state dicts,
        LoRA bases and merges) comes through here. Tied weights (lm_head = embeddings) are left out, as upstream.
        """
        state_dict = remove_tied_weights_from_state_dict(self.state_dict() if state_dict is None else state_dict,
                                                         self)
        kwargs["save_original_format"] = False  # names are final: no reversal of load-time renamings
        super().save_pretrained(save_directory, *args, state_dict=hub_state_dict(self, state_dict), **kwargs)
        if kwargs.get("is_main_process", True):
            make_config_portable(os.path.join(save_directory, "config.json"))
            follow_umask(save_directory)

    def __init__(self, config: LlavaConfig | LlavaNextConfig | LlavaOnevisionConfig):
        super().__init__(config)
        self.model.multi_modal_projector = LlavaProjector(config)

    def post_init(self) -> None:
        """Keep only the no-split (FSDP wrap) layer classes that exist in this model.

        Why: CLIP's shared class attribute also names `CLIPTextEmbeddings`, which a vision-only tower lacks, and
        FSDP's transformer auto-wrap (`--fsdp "full_shard auto_wrap"`, accelerate's FSDP config) raises "Could not
        find the transformer layer class CLIPTextEmbeddings in the model" for any listed class that is absent.
        """
        super().post_init()
        present = {type(module).__name__ for module in self.modules()}
        self._no_split_modules = {name for name in self._no_split_modules if name in present}

    def enable_input_require_grads(self) -> None:
        """Make only the LM's input embeddings' output require grad (transformers hooks every sub-model's
        embeddings, the vision tower's patch embedding too).

        Why: checkpointed LM layers (and adapters on a frozen LM) need inputs that require grad, or the gradient
        stops there. A frozen tower's features requiring grad would make autograd record, recompute and
        back-propagate the whole tower every step for nothing.
        """
        def require_grads(module, inputs, output):
            output.requires_grad_(True)

        self._require_grads_hooks = [self.get_input_embeddings().register_forward_hook(require_grads)]

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=checkpoint,
                                    every_n_layers: int = 1) -> None:
        """transformers' switch for activation checkpointing, which leaves a frozen vision tower alone: nothing
        of it is kept for a backward pass, so checkpointing it would only add a forward pass per step."""
        super()._set_gradient_checkpointing(enable, gradient_checkpointing_func, every_n_layers)
        tower = self.model.vision_tower
        if enable and not any(p.requires_grad for p in tower.parameters()):
            for module in tower.modules():
                if hasattr(module, "gradient_checkpointing"):
                    module.gradient_checkpointing = False

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, labels=None, image_sizes=None,
                logits_to_keep=0, **kwargs):
        if image_sizes is not None:  # LLaVA-NeXT's; named here, where `generate` looks for the inputs it may pass
            kwargs["image_sizes"] = image_sizes
        if labels is None:  # `generate` asks for the last position's logits only when forward names logits_to_keep
            return super().forward(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                                   logits_to_keep=logits_to_keep, **kwargs)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        kwargs.setdefault("use_cache", False)
        # The last position's output would predict a token after the sequence: it is never used, so the last
        # token is only a target, not an input.
        targets = labels[:, 1:]
        input_ids = input_ids[:, :-1] if input_ids is not None else None
        attention_mask = attention_mask[:, :-1] if attention_mask is not None else None
        for name in ("inputs_embeds", "position_ids"):
            if kwargs.get(name) is not None:
                kwargs[name] = kwargs[name][:, :-1]
        varlen = self._flash_varlen_kwargs(kwargs.get("position_ids"))
        kwargs.update(varlen)
        if self._encodes_images_first(pixel_values) or (varlen and pixel_values is not None):
            kwargs["inputs_embeds"] = self._embed_with_image_features(
                input_ids, pixel_values, {name: kwargs.pop(name) for name in IMAGE_INPUTS if name in kwargs})
            input_ids = pixel_values = None
        prefix = self._shared_prefix_length(input_ids, attention_mask, targets, kwargs)
        if prefix:
            kwargs["cache"] = self._prefix_cache(input_ids, prefix)
            kwargs["use_cache"] = True
            input_ids, targets = input_ids[:, prefix:], targets[:, prefix:]
        outputs = self.model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, **kwargs)
        hidden = outputs.last_hidden_state  # (B, T-1, H): position t predicts token t+1
        targets = targets.to(hidden.device)  # (B, T-1)
        trained = targets != IGNORE_INDEX
        logits, loss = self._summed_loss(hidden[trained], targets[trained])  # N = trained tokens in the batch
        # Same normalisation as transformers' ForCausalLMLoss: by the tokens of the whole accumulated batch
        # when the Trainer passes that count, else by this batch's.
        denominator = num_items_in_batch if num_items_in_batch is not None else trained.sum().clamp(min=1)
        loss = loss / denominator
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def _summed_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(logits (N, V), summed cross-entropy) of the N trained positions' `hidden` states (N, H).

        Training a batch whose logits would exceed `_LOSS_CHUNK_LOGITS` (long answers: 4,000 trained tokens of a
        150k vocabulary are 2.4 GB of float32 logits, and the loss holds about three such tensors until backward),
        the loss is summed over chunks whose logits are recomputed in backward instead of kept: memory stays at one
        chunk's, for one more lm_head pass over the trained tokens. Logits are then not returned (None). Not when
        several processes train sharded weights (FSDP, ZeRO-3): each lm_head pass gathers its weight collectively,
        and ranks whose batches hold different numbers of trained tokens would make different numbers of passes."""
        chunk = max(256, _LOSS_CHUNK_LOGITS // self.config.text_config.vocab_size)
        if not (torch.is_grad_enabled() and len(targets) > chunk) or (multi_process() and parameters_sharded(self)):
            logits = self.lm_head(hidden)
            return logits, F.cross_entropy(logits.float(), targets, reduction="sum")
        loss = sum(checkpoint(self._chunk_loss, part, part_targets, use_reentrant=False)
                   for part, part_targets in zip(hidden.split(chunk), targets.split(chunk)))
        return None, loss

    def _chunk_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.lm_head(hidden).float(), targets, reduction="sum")

    def _flash_varlen_kwargs(self, position_ids: torch.Tensor | None) -> dict:
        """Flash attention's sequence boundaries for packed rows (`llava.data.packing`): where `position_ids` restart at
        0 over the flattened batch (each sample, each row's padding); empty without flash attention or positions.

        Why: transformers' flash attention finds packed sequences from `position_ids` alone only in a batch of one
        row; with several rows and no attention mask it would attend across samples. Given these, it runs its
        varlen kernel over the flattened rows instead. The images are then encoded before the LM runs
        (`_embed_with_image_features`): transformers' `LlavaModel.forward` hands the LM's keyword arguments to the
        vision tower too, which would apply the text's boundaries to its patches.
        """
        if position_ids is None or not is_flash_attention_requested(self.model.language_model.config):
            return {}
        (cu_seq_lens_q, cu_seq_lens_k), (max_length_q, max_length_k) = prepare_fa_kwargs_from_position_ids(
            position_ids)
        return {"cu_seq_lens_q": cu_seq_lens_q, "cu_seq_lens_k": cu_seq_lens_k,
                "max_length_q": int(max_length_q), "max_length_k": int(max_length_k)}

    def _shared_prefix_length(self, input_ids, attention_mask, targets, kwargs) -> int:
        """How many leading tokens every row of the batch shares and the loss does not need; 0 to not share.

        Typically the system prompt and the user-turn header, identical in every sample (~20% of a short LLaVA
        sample). Shared tokens end before the first image token (image features differ per sample), at the first
        difference between rows or padding, and before any trained target (`targets[:, t]` is the token that
        position t predicts; its hidden state must come out of the LM for every row when that token is trained).
        """
        if input_ids is None or input_ids.shape[0] < 2 or not self._can_share_prefix(kwargs):
            return 0
        shareable = (input_ids == input_ids[:1]).all(0) & (input_ids[0] != self.config.image_token_id)
        if attention_mask is not None:
            shareable &= attention_mask.bool().all(0)
        shareable &= (targets == IGNORE_INDEX).all(0).to(shareable.device)
        length = int(shareable.long().cumprod(0).sum())
        return length if length >= _MIN_SHARED_PREFIX else 0

    def _prefix_cache(self, input_ids: torch.Tensor, length: int):
        """The LM's key/value cache of the shared prefix, computed for one row and repeated for the batch.

        Its gradients (when the LM trains) flow back through the repetition, summed over the rows, as they would
        from per-row copies; with a frozen LM no graph is built at all.
        """
        cache = self.model.language_model(input_ids=input_ids[:1, :length], use_cache=True).cache
        cache.batch_repeat_interleave(input_ids.shape[0])
        return cache

    def _can_share_prefix(self, kwargs) -> bool:
        """Not under activation checkpointing (checkpointed layers drop the cache that carries the prefix), with
        active dropout (rows would share one dropout mask), when the caller brings embeddings, a cache or positions
        of its own, or when several processes train sharded weights (FSDP, ZeRO-3): there every LM pass gathers
        weights collectively, and a rank running an extra prefix pass would fall out of step with the others."""
        return not (self.is_activation_checkpointing or (self.training and self._has_active_dropout())
                    or any(kwargs.get(name) is not None for name in ("inputs_embeds", "cache", "position_ids"))
                    or (multi_process() and parameters_sharded(self)))

    def _has_active_dropout(self) -> bool:
        text_config = self.config.text_config
        if getattr(text_config, "attention_dropout", 0.0) or getattr(text_config, "hidden_dropout", 0.0):
            return True
        return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in self.model.language_model.modules())

    def _encodes_images_first(self, pixel_values) -> bool:
        """Whether this training batch goes embed -> tower + projector (real or blank image) -> merge -> LM with
        `inputs_embeds`, instead of transformers' own `LlavaModel.forward`.

        Always when several processes train together: under FSDP and DeepSpeed ZeRO-3 each module's weights are
        gathered (forward) and its gradients reduced (backward) collectively, by a recorded module order, so every
        process must run the same modules in the same order whether its batch has images or not (a mismatch fails
        with "Received data size doesn't match expected size" or hangs); under DDP the tower and projector would
        get no gradient on a process with a text-only batch. In one process, for a text-only batch when only the
        tower or projector trains (stage 1): the loss would have no path to any trainable weight and backward
        would fail ("element 0 of tensors does not require grad").
        """
        if multi_process():
            return True
        return (pixel_values is None and torch.is_grad_enabled()
                and not any(p.requires_grad for part in (self.model.language_model, self.lm_head)
                            for p in part.parameters()))

    def _embed_with_image_features(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                                   image_inputs: dict | None = None) -> torch.Tensor:
        """The LM's input embeddings with the projected image features in the image-token positions, computed in
        one fixed module order: embeddings, then the tower and projector, then the merge (see
        `_encodes_images_first`). A text-only batch encodes one blank image and adds 0 x its features, which
        changes neither the loss nor any gradient but gives every batch the same graph in both directions."""
        embeddings = self.get_input_embeddings()(input_ids)  # (B, T, H)
        blank = pixel_values is None
        if blank:
            pixel_values, image_inputs = self._blank_image(embeddings.device)
        features = self._image_features(pixel_values, image_inputs or {})
        features = torch.cat(features, dim=0).to(embeddings.device, embeddings.dtype)  # (images x tokens, H)
        if blank:
            return embeddings + 0.0 * features.sum()
        mask = self.model.get_placeholder_mask(input_ids, inputs_embeds=embeddings, image_features=features)
        if isinstance(mask, tuple):  # OneVision's gives (image mask, video mask)
            mask = mask[0]
        return embeddings.masked_scatter(mask, features)


def model_class(path_or_config) -> type[LlavaTraining]:
    """The class of the LLaVA checkpoint at `path_or_config` (or of its config), by `model_type`: llava, llava_next
    or llava_onevision."""
    config = transformers.AutoConfig.from_pretrained(path_or_config) if isinstance(path_or_config, str) \
        else path_or_config
    return {"llava_next": LlavaNextForConditionalGeneration,
            "llava_onevision": LlavaOnevisionForConditionalGeneration}.get(config.model_type,
                                                                           LlavaForConditionalGeneration)


class LlavaForConditionalGeneration(LlavaTraining, transformers.LlavaForConditionalGeneration):
    """transformers' LLaVA (LLaVA-1.5: one tower-sized view per image) with this project's training loss and
    on-disk format (`LlavaTraining`)."""

    def _image_features(self, pixel_values: torch.Tensor, image_inputs: dict) -> list[torch.Tensor]:
        """Projected features of each image, (tokens, H) each."""
        return self.model.get_image_features(
            pixel_values=pixel_values, vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy).pooler_output

    def _blank_image(self, device: torch.device) -> tuple[torch.Tensor, dict]:
        vision = self.config.vision_config
        return torch.zeros(1, vision.num_channels, vision.image_size, vision.image_size, device=device,
                           dtype=self.model.vision_tower.dtype), {}


class AnyresTraining(LlavaTraining):
    """How the anyres models (LLaVA-NeXT, LLaVA-OneVision) encode images: tiles on the grid, packed by transformers'
    own `get_image_features` with the config's grid, select strategy (and OneVision's feature cap)."""

    def _image_features(self, pixel_values: torch.Tensor, image_inputs: dict) -> list[torch.Tensor]:
        """Projected, packed features of each image (its tiles unpadded, newlines, base view), (tokens, H) each."""
        return self.model.get_image_features(
            pixel_values=pixel_values, vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy, **image_inputs).pooler_output

    def _blank_image(self, device: torch.device) -> tuple[torch.Tensor, dict]:
        """One blank tower-sized image: its tiles on the grid, and its size (one image alone: tiled)."""
        vision = self.config.vision_config
        size = [vision.image_size, vision.image_size]
        tiles = image_size_to_num_patches(size, self.config.image_grid_pinpoints, vision.image_size)
        pixels = torch.zeros(1, tiles, vision.num_channels, *size, device=device, dtype=self.model.vision_tower.dtype)
        return pixels, {"image_sizes": torch.tensor([size], device=device)}


class LlavaNextForConditionalGeneration(AnyresTraining, transformers.LlavaNextForConditionalGeneration):
    """transformers' LLaVA-NeXT (anyres tiles, `image_newline` after each row of features, see
    `llava.model.anyres`) with this project's training loss and on-disk format (`LlavaTraining`)."""


class LlavaOnevisionForConditionalGeneration(AnyresTraining, transformers.LlavaOnevisionForConditionalGeneration):
    """transformers' LLaVA-OneVision (a sample's only image tiled with its features capped, several images one base
    view each, see `llava.model.onevision`) with this project's training loss and on-disk format."""

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, labels=None, image_sizes=None,
                logits_to_keep=0, batch_num_images=None, **kwargs):
        if batch_num_images is not None:  # named here, where `generate` looks for the inputs it may pass
            kwargs["batch_num_images"] = batch_num_images
        return super().forward(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                               labels=labels, image_sizes=image_sizes, logits_to_keep=logits_to_keep, **kwargs)
