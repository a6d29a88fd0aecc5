"""Building the model to train: a new LLaVA assembled from a pretrained vision tower and causal LM, or a LLaVA
checkpoint loaded (optionally with its LM quantized, see `llava.model.quantization`); either turned into a LLaVA-NeXT
or LLaVA-OneVision model when its processor is one (`as_anyres`)."""

from __future__ import annotations

import logging
import math

import torch
from transformers import (AutoModel, AutoModelForCausalLM, BitsAndBytesConfig, LlavaConfig, LlavaNextConfig,
                          LlavaOnevisionConfig, LlavaProcessor, PreTrainedModel, ProcessorMixin)

from llava.data.types import IGNORE_INDEX, ConfigurationError
from llava.model.components import components
from llava.model.modeling import (AnyresTraining, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration,
                                  LlavaOnevisionForConditionalGeneration, LlavaProjector, LlavaTraining, model_class)
from llava.model.processor import architecture_of, image_tokens, tower_config
from llava.model.quantization import load_quantized
from llava.model.sharding import parameters_sharded, without_zero3_init

logger = logging.getLogger(__name__)


def _load_kwargs(dtype: str, attn_implementation: str | None, trust_remote_code: bool) -> dict:
    """`from_pretrained` keywords for a dtype name ("float32", "bfloat16", ..., "auto") and attention kernel."""
    kwargs = {"dtype": "auto" if dtype == "auto" else getattr(torch, dtype), "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    return kwargs


def assemble_llava(vision_model: str, language_model: str, processor: LlavaProcessor, tokens_per_image: int, *,
                   vision_feature_layer: int = -2, projector_hidden_act: str = "gelu", dtype: str = "float32",
                   attn_implementation: str | None = None, trust_remote_code: bool = False
                   ) -> LlavaForConditionalGeneration:
    """Assemble a new LLaVA from a pretrained vision tower and a pretrained causal LM (hub ids or folders).

    The LLaVA shell is built on the meta device (no memory), then its tower, decoder and lm_head are replaced
    by the pretrained modules themselves, so no second full-size random copy is ever allocated (7B+ LMs).
    The LM's embeddings are resized only when the tokenizer outgrew them (new rows: transformers' mean
    resizing). The projector is new: two `nn.Linear` layers with PyTorch's default initialisation
    (Kaiming-uniform weights, uniform biases), as the original LLaVA's `mm_projector`. `processor` is the new
    model's (`llava.model.processor.build_processor`), `tokens_per_image` its `image_token_count`.
    """
    load_kwargs = _load_kwargs(dtype, attn_implementation, trust_remote_code)
    with without_zero3_init():
        vision_config = tower_config(vision_model, trust_remote_code)
        vision_tower = AutoModel.from_pretrained(vision_model, config=vision_config, **load_kwargs)
        lm = AutoModelForCausalLM.from_pretrained(language_model, **load_kwargs)
        tokenizer = processor.tokenizer
        if len(tokenizer) > lm.get_input_embeddings().num_embeddings:
            lm.resize_token_embeddings(len(tokenizer))
        # What transformers' LLaVA builds as its language model (AutoModel of the text config), for any family:
        # LlamaModel, GPT2Model, OPTModel (not OPT's inner decoder, which `get_decoder()` returns).
        decoder = lm.base_model
        if getattr(lm.get_output_embeddings(), "bias", None) is not None:
            raise ConfigurationError(f"{language_model} ({type(lm).__name__}) has an lm_head with a bias, which "
                             "transformers' LlavaForConditionalGeneration cannot hold (its lm_head has none), so no "
                             "checkpoint of it would load elsewhere. Use an LM whose output layer has no bias (e.g. "
                             "Phi-3/Phi-4 instead of Phi-1/2).")
        if getattr(lm.config, "tie_word_embeddings", False) and _embedding_name(decoder) != "embed_tokens":
            _untie_output_embeddings(lm)
        config = LlavaConfig(
            vision_config=vision_tower.config, text_config=lm.config,
            image_token_index=processor.image_token_id, image_seq_length=tokens_per_image,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=processor.vision_feature_select_strategy,
            projector_hidden_act=projector_hidden_act,
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


def load_llava(path: str, *, dtype: str = "float32", attn_implementation: str | None = None,
               trust_remote_code: bool = False, quantization: BitsAndBytesConfig | None = None
               ) -> LlavaTraining:
    """Load a LLaVA or LLaVA-NeXT checkpoint (ours or llava-hf), optionally with its LM quantized
    (`llava.model.quantization`)."""
    kwargs = _load_kwargs(dtype, attn_implementation, trust_remote_code)
    if quantization is None:
        return model_class(path).from_pretrained(path, **kwargs)
    return load_quantized(path, quantization, **kwargs)


def as_anyres(model: LlavaTraining, processor: ProcessorMixin) -> LlavaTraining:
    """`model` as the anyres model its `processor` is for (LLaVA-NeXT or LLaVA-OneVision; unchanged when it is one
    already, or when the processor is LLaVA-1.5's): the same tower, projector, LM and lm_head moved into the new
    class built on the meta device, with the `image_newline` a LLaVA-NeXT model had, or a new one (normal, std
    1/sqrt(hidden), as transformers initialises it; it trains with the projector).

    Why a move and not a copy: a stage 2 that starts LLaVA-NeXT or OneVision from an earlier stage's output (or a
    new model) keeps every pretrained weight, and never holds a second full-size model. OneVision's feature layer
    and select strategy stay the model's: its projector was trained on them.
    """
    target = architecture_of(processor)
    if target == "llava" or model_class(model.config) is _CLASSES[target]:
        return model
    old = model.config
    common = dict(
        vision_config=old.vision_config, text_config=old.text_config, image_token_index=old.image_token_id,
        image_grid_pinpoints=processor.image_processor.image_grid_pinpoints,
        vision_feature_layer=old.vision_feature_layer,
        vision_feature_select_strategy=processor.vision_feature_select_strategy,
        projector_hidden_act=old.projector_hidden_act, multimodal_projector_bias=old.multimodal_projector_bias,
        tie_word_embeddings=old.tie_word_embeddings, image_seq_length=image_tokens(processor).tokens_per_image,
        pad_token_id=getattr(old, "pad_token_id", None))
    if target == "llava_onevision":
        config = LlavaOnevisionConfig(**common, vision_aspect_ratio=processor.vision_aspect_ratio)
    else:
        config = LlavaNextConfig(**common)
    with without_zero3_init():
        with torch.device("meta"):
            new_model = _CLASSES[target](config)
        for name in ("vision_tower", "multi_modal_projector", "language_model"):
            setattr(new_model.model, name, getattr(model.model, name))
        new_model.lm_head = model.lm_head
        if isinstance(model, AnyresTraining):
            new_model.model.image_newline = model.model.image_newline
        else:
            hidden = config.text_config.hidden_size
            head = model.lm_head.weight
            new_model.model.image_newline = torch.nn.Parameter(
                torch.randn(hidden, dtype=head.dtype, device=head.device) / math.sqrt(hidden))
    new_model.generation_config = model.generation_config
    new_model.name_or_path = model.name_or_path
    return new_model


_CLASSES = {"llava_next": LlavaNextForConditionalGeneration,
            "llava_onevision": LlavaOnevisionForConditionalGeneration}


def check_exact_packing(model: torch.nn.Module) -> None:
    """Refuse --packing for a language model whose attention would cross the boundaries of packed samples.

    Why: packed rows rely on the LM building its attention mask from the restarting `position_ids`
    (`transformers.masking_utils.create_causal_mask(..., position_ids=...)`); a decoder that leaves them out (OPT in
    transformers 5.x, possibly remote code) lets each sample attend to those before it in its row, silently. Two
    forward passes of 20 tokens decide: a 4-token sample packed after one 16-token sample must come out as it does
    after another (kept apart, nothing of the first reaches it; leaking, its logits change at every layer).
    Skipped (with a warning) when weights are already partitioned over processes (ZeRO-3 loading): no pass can run
    before DeepSpeed takes the model over.
    """
    decoder = type(components(model)["language_model"]).__name__
    if parameters_sharded(model):
        logger.warning("--packing: weights are sharded, so the check that %s keeps packed samples apart is skipped.",
                       decoder)
        return
    device = model.get_input_embeddings().weight.device
    second = torch.arange(17, 21)
    positions = torch.cat([torch.arange(16), torch.arange(4)]).to(device)[None]
    logits = []
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for first in (torch.arange(1, 17), torch.arange(21, 37)):
                row = torch.cat([first, second]).to(device)[None]
                labels = torch.full_like(row, IGNORE_INDEX)
                labels[:, -3:] = row[:, -3:]
                logits.append(model(input_ids=row, labels=labels, position_ids=positions).logits.float())
    finally:
        model.train(training)
    if (logits[0] - logits[1]).abs().max() > 1e-3 * logits[0].abs().max():
        raise ConfigurationError(f"--packing: {decoder} does not keep packed samples apart (its attention mask ignores the "
                         "restarting position_ids), so they would attend to each other. Train it without --packing; "
                         "--max_tokens_per_batch and --train_sampling_strategy group_by_length also keep padding "
                         "low.")
