"""The LLaVA model: assembly from a vision tower and a causal LM, loading, freezing, and a loss on trained tokens.

Layout in memory (transformers 5.x): `model.model.vision_tower` (CLIP/SigLIP/DINOv2 vision model),
`model.model.multi_modal_projector` (linear_1 -> act -> linear_2), `model.model.language_model` (the LM's
decoder, no head) and `model.lm_head`. On disk every save writes the llava-hf layout that the hub checkpoints,
transformers 4.x, vLLM and SGLang use (`language_model.model.*`, `language_model.lm_head.*`,
`vision_tower.vision_model.*` for CLIP/SigLIP, `multi_modal_projector.*`), see `hub_state_dict`; loading accepts
that, the in-memory names and what earlier versions of this project wrote, and fails on anything else.

QLoRA loads a LLaVA checkpoint with only the LM decoder's linear layers in 4-/8-bit (`load_llava(...,
quantization=quantization_config(...))`); everything else stays in full precision.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
import transformers
from safetensors import safe_open
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM,
                          BitsAndBytesConfig, GenerationConfig, LlavaConfig,
                          LlavaProcessor, PreTrainedModel, ProcessorMixin)
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, get_model_conversion_mapping
from transformers.core_model_loading import PrefixChange, revert_weight_conversion
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import remove_tied_weights_from_state_dict
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME
from transformers.utils.generic import is_flash_attention_requested

from llava.arguments import ModelArguments
from llava.distributed import multi_process, without_zero3_init
from llava.final_output import check_final_output
from llava.processor import IGNORE_INDEX, image_token_count, tower_config

logger = logging.getLogger(__name__)

# Shorter shared prefixes are computed per row: the extra batch-1 pass would cost more than it saves.
_MIN_SHARED_PREFIX = 8

# In-memory (5.x) prefix -> llava-hf name on disk. The vision tower's entry gets the tower class's own legacy
# prefix (`vision_model.` for CLIP/SigLIP), see `_hub_tower_prefix`.
_HUB_PREFIXES = {"model.language_model.": "language_model.model.", "lm_head.": "language_model.lm_head.",
                 "model.multi_modal_projector.": "multi_modal_projector.", "model.vision_tower.": "vision_tower."}
# llava-hf name -> in-memory name, for loading (`from_pretrained(key_mapping=...)`). transformers' own mapping of the
# tower class then drops `vision_model.` where the 5.x class has no such submodule.
_FROM_HUB = {r"^language_model\.model\.": "model.language_model.", r"^language_model\.lm_head\.": "lm_head.",
             r"^vision_tower\.": "model.vision_tower.", r"^multi_modal_projector\.": "model.multi_modal_projector."}


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


class LlavaForConditionalGeneration(transformers.LlavaForConditionalGeneration):
    """transformers' LLaVA with a training loss computed only where labels are not -100.

    Same weights, config and `architectures` name as the upstream class, so checkpoints load with plain
    transformers. Without `labels` it is the upstream forward (generation, inference).

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
        model, info = super().from_pretrained(*args, key_mapping={**_FROM_HUB, **(key_mapping or {})},
                                              output_loading_info=True, **kwargs)
        _check_loading_info(info, model, path)
        return (model, info) if output_loading_info else model

    def save_pretrained(self, save_directory, *args, state_dict: dict | None = None, **kwargs) -> None:
        """transformers' `save_pretrained`, writing the llava-hf tensor names (`hub_state_dict`).

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
            _add_legacy_rope_fields(os.path.join(save_directory, "config.json"))

    def __init__(self, config: LlavaConfig):
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

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, labels=None, **kwargs):
        if labels is None:
            return super().forward(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                                   **kwargs)
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
            kwargs["inputs_embeds"] = self._embed_with_image_features(input_ids, pixel_values)
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
        logits = self.lm_head(hidden[trained])  # (N, V), N = trained tokens in the batch
        loss = F.cross_entropy(logits.float(), targets[trained], reduction="sum")
        # Same normalisation as transformers' ForCausalLMLoss: by the tokens of the whole accumulated batch
        # when the Trainer passes that count, else by this batch's.
        denominator = num_items_in_batch if num_items_in_batch is not None else trained.sum().clamp(min=1)
        loss = loss / denominator
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def _flash_varlen_kwargs(self, position_ids: torch.Tensor | None) -> dict:
        """Flash attention's sequence boundaries for packed rows (`llava.packing`): where `position_ids` restart at
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

    def _embed_with_image_features(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """The LM's input embeddings with the projected image features in the image-token positions, computed in
        one fixed module order: embeddings, then the tower and projector, then the merge (see
        `_encodes_images_first`). A text-only batch encodes one blank image and adds 0 x its features, which
        changes neither the loss nor any gradient but gives every batch the same graph in both directions."""
        embeddings = self.get_input_embeddings()(input_ids)  # (B, T, H)
        images = pixel_values if pixel_values is not None else self._blank_image(embeddings.device)
        features = self.model.get_image_features(
            pixel_values=images, vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy).pooler_output
        features = torch.cat(features, dim=0).to(embeddings.device, embeddings.dtype)  # (images x tokens, H)
        if pixel_values is None:
            return embeddings + 0.0 * features.sum()
        mask = self.model.get_placeholder_mask(input_ids, inputs_embeds=embeddings, image_features=features)
        return embeddings.masked_scatter(mask, features)

    def _blank_image(self, device: torch.device) -> torch.Tensor:
        vision = self.config.vision_config
        return torch.zeros(1, vision.num_channels, vision.image_size, vision.image_size, device=device,
                           dtype=self.model.vision_tower.dtype)


def _hub_tower_prefix(model: transformers.LlavaForConditionalGeneration) -> str:
    """`vision_tower.` plus the legacy prefix the tower's class dropped in transformers 5.x (CLIP, SigLIP:
    `vision_model.`), read off transformers' own load-time mapping of that class; DINOv2-style towers have none."""
    mapping = get_checkpoint_conversion_mapping(type(model.model.vision_tower).__name__) or []
    dropped = [t.prefix_to_remove for t in mapping if isinstance(t, PrefixChange) and t.prefix_to_remove
               and not t.model_prefix]
    return "vision_tower." + "".join(prefix + "." for prefix in dropped)


def hub_state_dict(model: transformers.LlavaForConditionalGeneration, state_dict: dict) -> dict:
    """`state_dict` (in-memory names) under the llava-hf names, whatever the LM family: the decoder's own names
    go under `language_model.model.`, as in transformers 4.x's Llava (whose language model is `AutoModel` of the
    text config). The tower's and the LM's tensors are first written as transformers 4.x laid them out for their
    class (`_legacy_layout`: DINOv2's `attention.attention.query`, Mixtral's per-expert weights)."""
    prefixes = {**_HUB_PREFIXES, "model.vision_tower.": _hub_tower_prefix(model)}
    parts: dict[str, dict] = {prefix: {} for prefix in prefixes}
    for key, value in state_dict.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"Cannot save {key!r}: not part of the vision tower, projector, LM or lm_head.")
        parts[prefix][key[len(prefix):]] = value
    for prefix, module in (("model.vision_tower.", model.model.vision_tower),
                           ("model.language_model.", model.model.language_model)):
        parts[prefix] = _legacy_layout(module, parts[prefix])
    return {prefixes[prefix] + key: value for prefix, part in parts.items() for key, value in part.items()}


def _legacy_layout(module: torch.nn.Module, state_dict: dict) -> dict:
    """`state_dict` (names relative to `module`) as transformers 4.x's class of `module` names and shapes it: the
    reverse of the renamings and merges transformers 5.x applies when it loads such weights. Prefix changes are left
    to `_hub_tower_prefix`, which knows where LLaVA puts the tower."""
    if not isinstance(module, PreTrainedModel) or not state_dict:
        return state_dict
    conversions = [c for c in get_model_conversion_mapping(module, add_legacy=False) if not isinstance(c, PrefixChange)]
    if not conversions:
        return state_dict
    # revert_weight_conversion reverses the conversions a model was loaded with; name these explicitly, since a part
    # moved into the LLaVA keeps those of its own earlier load (prefix changes included).
    loaded_with = module.__dict__.get("_weight_conversions")
    module._weight_conversions = conversions
    try:
        return dict(revert_weight_conversion(module, state_dict))
    finally:
        if loaded_with is None:
            del module._weight_conversions
        else:
            module._weight_conversions = loaded_with


def _add_legacy_rope_fields(config_path: str) -> None:
    """Repeat the LM's `rope_parameters` as `rope_theta`/`rope_scaling`, the fields transformers 4.x reads.

    Why: 4.x ignores `rope_parameters` and silently uses its default base (10000), so a Qwen2 (1e6) or Llama 3
    (500000) LM would load with the wrong rotary frequencies. transformers 5.x reads the legacy fields too.
    """
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    rope = config["text_config"].get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" not in rope:  # absent, or one entry per layer type
        return
    config["text_config"]["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") != "default":
        config["text_config"]["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def _check_loading_info(info: dict, model: PreTrainedModel, path) -> None:
    """Raise unless every weight of `model` came from the checkpoint (tied weights excepted) and every tensor of the
    checkpoint found its place."""
    tied = set(model.all_tied_weights_keys)
    missing = sorted(set(info["missing_keys"]) - tied)
    unexpected = sorted(info["unexpected_keys"])
    mismatched = [key for key, *_ in info.get("mismatched_keys", [])]
    problems = [f"{len(names)} {what} (e.g. {names[:5]})" for what, names in [
        ("tensors with unknown names", unexpected), ("weights missing", missing),
        ("weights with the wrong shape", mismatched)] if names]
    if problems:
        raise ValueError(
            f"{path} is not a LLaVA checkpoint this model loads completely: {'; '.join(problems)}. Known tensor "
            "name layouts: llava-hf (language_model.model.*, language_model.lm_head.*, vision_tower.*, "
            "multi_modal_projector.*), transformers 5.x (model.language_model.*, lm_head.*, model.vision_tower.*, "
            "model.multi_modal_projector.*) and earlier train_llava saves.")


def parameters_sharded(model: torch.nn.Module) -> bool:
    """Whether FSDP (1 or 2) or DeepSpeed ZeRO-3 shards this model's weights across processes, so that every
    process must take part in each forward pass."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    return (any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules())
            or any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in model.parameters()))


# --------------------------------------------------------------------------------------------- components

def components(model: PreTrainedModel) -> dict[str, torch.nn.Module]:
    """The four parts that freeze flags and the parameter table talk about (of the base model, under peft)."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {
        "vision_tower": model.model.vision_tower,
        "projector": model.model.multi_modal_projector,
        "language_model": model.model.language_model,
        "lm_head": model.lm_head,
    }


def set_trainable(model: PreTrainedModel, *, vision_tower: bool, projector: bool, language_model: bool) -> None:
    """Set `requires_grad` per component; the lm_head goes with the language model.

    Frozen parts build no autograd graph of their own (their weights need no gradient and, for the vision
    tower, neither do its inputs), yet stay ordinary modules: passing True later really trains them.
    """
    wanted = {"vision_tower": vision_tower, "projector": projector,
              "language_model": language_model, "lm_head": language_model}
    for name, module in components(model).items():
        module.requires_grad_(wanted[name])


def module_name(model: torch.nn.Module, component: str) -> str:
    """Full name of a component inside `model`, e.g. 'model.multi_modal_projector'."""
    return {id(module): name for name, module in model.named_modules()}[id(components(model)[component])]


def linear_layer_names(model: torch.nn.Module, component: str) -> list[str]:
    """Full names (from the model's root) of the `nn.Linear` layers of one component, in model order.

    bitsandbytes' `Linear4bit`/`Linear8bitLt` subclass `nn.Linear`, so quantized layers are included.
    """
    prefix = module_name(model, component)
    return [f"{prefix}.{name}" for name, module in components(model)[component].named_modules()
            if isinstance(module, torch.nn.Linear)]


def parameter_table(model: PreTrainedModel) -> str:
    """Total and trainable parameters per component, each shared tensor counted once (tied lm_head); the full
    sizes also when DeepSpeed ZeRO-3 has partitioned the weights."""
    seen: set[int] = set()
    rows = []
    for name, module in components(model).items():
        total = trainable = 0
        for param in module.parameters():
            if id(param) in seen:
                continue
            seen.add(id(param))
            numel = getattr(param, "ds_numel", param.numel())  # ZeRO-3 keeps an empty tensor in place of a shard
            total += numel
            trainable += numel if param.requires_grad else 0
        note = " (tied to input embeddings)" if name == "lm_head" and total == 0 else ""
        rows.append((name + note, total, trainable))
    rows.append(("total", sum(r[1] for r in rows), sum(r[2] for r in rows)))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'component':<{width}}  {'parameters':>14}  {'trainable':>14}"]
    lines += [f"{name:<{width}}  {total:>14,}  {trainable:>14,}" for name, total, trainable in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- model

def _torch_dtype(name: str):
    return "auto" if name == "auto" else getattr(torch, name)


def assemble_llava(args: ModelArguments, processor: LlavaProcessor) -> LlavaForConditionalGeneration:
    """Assemble a new LLaVA from a pretrained vision tower and a pretrained causal LM.

    The LLaVA shell is built on the meta device (no memory), then its tower, decoder and lm_head are replaced
    by the pretrained modules themselves, so no second full-size random copy is ever allocated (7B+ LMs).
    The LM's embeddings are resized only when the tokenizer outgrew them (new rows: transformers' mean
    resizing). The projector is new: two `nn.Linear` layers with PyTorch's default initialisation
    (Kaiming-uniform weights, uniform biases), as the original LLaVA's `mm_projector`.
    """
    with without_zero3_init():
        return _assemble_llava(args, processor)


def _assemble_llava(args: ModelArguments, processor: LlavaProcessor) -> LlavaForConditionalGeneration:
    dtype = _torch_dtype(args.dtype)
    tokenizer = processor.tokenizer
    load_kwargs = {"dtype": dtype, "trust_remote_code": args.trust_remote_code}
    if args.attn_implementation:
        load_kwargs["attn_implementation"] = args.attn_implementation
    vision_config = tower_config(args.vision_model_name_or_path, args.trust_remote_code)
    vision_tower = AutoModel.from_pretrained(args.vision_model_name_or_path, config=vision_config, **load_kwargs)
    lm = AutoModelForCausalLM.from_pretrained(args.language_model_name_or_path, **load_kwargs)
    if len(tokenizer) > lm.get_input_embeddings().num_embeddings:
        lm.resize_token_embeddings(len(tokenizer))
    # What transformers' LLaVA builds as its language model (AutoModel of the text config), for any family:
    # LlamaModel, GPT2Model, OPTModel (not OPT's inner decoder, which `get_decoder()` returns).
    decoder = lm.base_model
    if getattr(lm.get_output_embeddings(), "bias", None) is not None:
        raise ValueError(f"{args.language_model_name_or_path} ({type(lm).__name__}) has an lm_head with a bias, which "
                         "transformers' LlavaForConditionalGeneration cannot hold (its lm_head has none), so no "
                         "checkpoint of it would load elsewhere. Use an LM whose output layer has no bias (e.g. "
                         "Phi-3/Phi-4 instead of Phi-1/2).")
    if getattr(lm.config, "tie_word_embeddings", False) and _embedding_name(decoder) != "embed_tokens":
        _untie_output_embeddings(lm)
    config = LlavaConfig(
        vision_config=vision_tower.config, text_config=lm.config,
        image_token_index=processor.image_token_id, image_seq_length=image_token_count(processor),
        vision_feature_layer=args.vision_feature_layer,
        vision_feature_select_strategy=processor.vision_feature_select_strategy,
        projector_hidden_act=args.projector_hidden_act,
        tie_word_embeddings=bool(getattr(lm.config, "tie_word_embeddings", False)),
    )
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = vision_tower
    model.model.language_model = decoder
    model.lm_head = lm.get_output_embeddings()
    model.model.multi_modal_projector = LlavaProjector(config).to(lm.dtype)
    leftovers = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftovers:
        raise RuntimeError(f"Assembly left tensors without data (unsupported model layout): {leftovers[:5]}")
    model.generation_config = lm.generation_config
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _embedding_name(decoder: torch.nn.Module) -> str:
    """Name of the input embeddings inside the LM's base model (`embed_tokens`, GPT-2's `wte`, ...)."""
    return {id(module): name for name, module in decoder.named_modules()}[id(decoder.get_input_embeddings())]


def _untie_output_embeddings(lm: PreTrainedModel) -> None:
    """Give a tied lm_head its own copy of the embeddings.

    Why: transformers' LLaVA ties lm_head to `language_model.embed_tokens` by that name, and raises at
    construction, in plain transformers too, for an LM whose embeddings live elsewhere (GPT-2's `wte`, OPT's
    `decoder.embed_tokens`). Untied, such a checkpoint loads everywhere; the head then trains on its own.
    """
    head = lm.get_output_embeddings()
    head.weight = torch.nn.Parameter(lm.get_input_embeddings().weight.detach().clone(),
                                     requires_grad=head.weight.requires_grad)
    lm.config.tie_word_embeddings = False
    logger.info("%s ties lm_head to embeddings named %r, which LLaVA cannot tie: lm_head is now a copy.",
                type(lm).__name__, _embedding_name(lm.base_model))


def load_model(args: ModelArguments, processor: ProcessorMixin) -> LlavaForConditionalGeneration:
    """Load the LLaVA checkpoint being continued, or assemble a new one (always in full precision)."""
    if args.assembles_new_model:
        return assemble_llava(args, processor)
    return load_llava(args.model_name_or_path, args)


def load_llava(path: str, args: ModelArguments,
               quantization: BitsAndBytesConfig | None = None) -> LlavaForConditionalGeneration:
    """Load a LLaVA checkpoint with `args`' dtype and attention settings, optionally quantized (see `_quantized`)."""
    kwargs = {"dtype": _torch_dtype(args.dtype), "trust_remote_code": args.trust_remote_code}
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    if quantization is None:
        return LlavaForConditionalGeneration.from_pretrained(path, **kwargs)
    return _quantized(path, quantization, **kwargs)


def load_saved_weights(model: LlavaForConditionalGeneration, folder: str) -> bool:
    """Copy the weights saved in `folder` (a checkpoint of the same model) into `model` in place, tensor by tensor,
    strictly; False, loading nothing, when the files are not exactly what `save_pretrained` writes for this model
    (earlier saves' names, towers or LMs whose 4.x layout merges or splits tensors, .bin checkpoints): then load
    with `from_pretrained`, which maps those.

    Why: resuming through `from_pretrained` builds a second full model next to the one being trained (a full host
    copy per process, in the checkpoint's dtype). Here at most one tensor is held at a time, cast to the dtype of
    the weight it replaces.
    """
    files = _safetensors_files(folder)
    in_memory = _saved_names(model)
    if not files or in_memory is None:
        return False
    handles_keys = []
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as handle:
            handles_keys.append((file, list(handle.keys())))
    if sorted(key for _, keys in handles_keys for key in keys) != sorted(in_memory):
        return False
    weights = model.state_dict()  # tensors sharing storage with the parameters and buffers
    with torch.no_grad():
        for file, keys in handles_keys:
            with safe_open(file, framework="pt", device="cpu") as handle:
                for key in keys:
                    weights[in_memory[key]].copy_(handle.get_tensor(key))
    return True


def _saved_names(model: LlavaForConditionalGeneration) -> dict[str, str] | None:
    """On-disk (llava-hf) name -> in-memory name of each weight, as `save_pretrained` writes them; None when a
    legacy layout merges or splits tensors. Found by passing weightless stand-ins through `hub_state_dict`."""
    tied = set(model.all_tied_weights_keys)  # left out of saves, as `save_pretrained` does
    stand_ins = {name: torch.empty(0, device="meta") for name in model.state_dict() if name not in tied}
    by_identity = {id(t): name for name, t in stand_ins.items()}
    saved = hub_state_dict(model, stand_ins)
    names = {key: by_identity.get(id(t)) for key, t in saved.items()}
    return None if None in names.values() else names


# --------------------------------------------------------------------------------------------- quantization

# Modules kept in full precision, as full names from the LLaVA root. transformers 5.x matches skip patterns from
# the start of a module's name or as a suffix, so the bare "vision_tower"/"multi_modal_projector" would not match
# "model.vision_tower.*" and the tower and projector would be quantized too (NOTES.md). Naming them explicitly
# also drops transformers' default skips, hence lm_head here.
_FULL_PRECISION_MODULES = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]


def quantization_config(args: ModelArguments, compute_dtype: torch.dtype) -> BitsAndBytesConfig | None:
    """bitsandbytes settings for `--load_in_4bit/--load_in_8bit` (None without them).

    `compute_dtype` is what the 4-bit matmuls run in: bf16/fp16 under --bf16/--fp16, else fp32.
    """
    if not args.quantized:
        return None
    return BitsAndBytesConfig(
        load_in_4bit=args.load_in_4bit, load_in_8bit=args.load_in_8bit,
        bnb_4bit_quant_type=args.bnb_4bit_quant_type, bnb_4bit_use_double_quant=args.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=_FULL_PRECISION_MODULES,
    )


def quantized_module_names(model: torch.nn.Module) -> list[str]:
    """Names of the bitsandbytes 4-/8-bit linear layers in `model`."""
    import bitsandbytes as bnb  # imported late: only quantized runs need it

    return [name for name, module in model.named_modules()
            if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]


def _safetensors_files(path: str) -> list[str]:
    """The local checkpoint's safetensors files (one or several shards); empty for hub ids and .bin checkpoints."""
    single, index = os.path.join(path, SAFE_WEIGHTS_NAME), os.path.join(path, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            return [os.path.join(path, name) for name in sorted(set(json.load(f)["weight_map"].values()))]
    return []


def _from_pretrained_with_pread(path: str, **kwargs) -> LlavaForConditionalGeneration:
    """`LlavaForConditionalGeneration.from_pretrained(path, **kwargs)`, reading local safetensors with pread.

    Why not transformers' default mmap: every page read through a mapping stays resident, and counted in the
    process's memory, for as long as any tensor still uses the mapping. When loading quantizes (each
    full-precision weight is read once, then replaced by its 4-bit copy) that would keep the whole
    full-precision checkpoint resident for the entire run. Read with pread, a weight that is quantized lives
    only until then.
    """
    files = _safetensors_files(path)
    if not files:
        return LlavaForConditionalGeneration.from_pretrained(path, **kwargs)
    config = AutoConfig.from_pretrained(path, trust_remote_code=kwargs.get("trust_remote_code", False))
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(safe_open(f, framework="pt", device="cpu", backend="pread")) for f in files]
        state_dict = {key: handle.get_slice(key) for handle in handles for key in handle.keys()}
        model = LlavaForConditionalGeneration.from_pretrained(None, config=config, state_dict=state_dict, **kwargs)
    if os.path.isfile(os.path.join(path, "generation_config.json")):
        model.generation_config = GenerationConfig.from_pretrained(path)
    model.name_or_path = model.config.name_or_path = path
    return model


def _quantized(path: str, quantization: BitsAndBytesConfig, **kwargs) -> LlavaForConditionalGeneration:
    """Load a LLaVA checkpoint with its LM decoder's linear layers quantized, and check that only those were."""
    model = _from_pretrained_with_pread(path, quantization_config=quantization, **kwargs)
    expected = linear_layer_names(model, "language_model")
    if quantized_module_names(model) != expected:
        raise RuntimeError(f"Quantization reached other modules than the LM decoder's linear layers: got "
                           f"{quantized_module_names(model)[:5]}..., expected {expected[:5]}...")
    return model
