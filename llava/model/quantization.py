"""QLoRA's base: a LLaVA checkpoint loaded with only its LM decoder's linear layers in 4-/8-bit (bitsandbytes);
the vision tower, projector, embeddings, norms and lm_head stay in full precision."""

from __future__ import annotations

import contextlib
import os

import torch
from safetensors import safe_open
from transformers import AutoConfig, BitsAndBytesConfig, GenerationConfig

from llava.model.components import linear_layer_names
from llava.model.hub_format import safetensors_files
from llava.model.modeling import LlavaForConditionalGeneration

# Modules kept in full precision, as full names from the LLaVA root. transformers 5.x matches skip patterns from
# the start of a module's name or as a suffix, so the bare "vision_tower"/"multi_modal_projector" would not match
# "model.vision_tower.*" and the tower and projector would be quantized too (seen with transformers 5.24; `load_quantized`
# checks it). Naming them explicitly also drops transformers' default skips, hence lm_head here.
_FULL_PRECISION_MODULES = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]


def quantization_config(bits: int, compute_dtype: torch.dtype, quant_type: str = "nf4",
                        double_quant: bool = True) -> BitsAndBytesConfig:
    """bitsandbytes settings for an LM in `bits` (4: QLoRA's `quant_type` nf4/fp4, optionally `double_quant`; 8:
    LLM.int8). `compute_dtype` is what the 4-bit matmuls run in: bf16/fp16 under --bf16/--fp16, else fp32."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}.")
    return BitsAndBytesConfig(
        load_in_4bit=bits == 4, load_in_8bit=bits == 8,
        bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=_FULL_PRECISION_MODULES,
    )


def quantized_module_names(model: torch.nn.Module) -> list[str]:
    """Names of the bitsandbytes 4-/8-bit linear layers in `model`."""
    import bitsandbytes as bnb  # imported late: only quantized runs need it

    return [name for name, module in model.named_modules()
            if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]


def _from_pretrained_with_pread(path: str, **kwargs) -> LlavaForConditionalGeneration:
    """`LlavaForConditionalGeneration.from_pretrained(path, **kwargs)`, reading local safetensors with pread.

    Why not transformers' default mmap: every page read through a mapping stays resident, and counted in the
    process's memory, for as long as any tensor still uses the mapping. When loading quantizes (each
    full-precision weight is read once, then replaced by its 4-bit copy) that would keep the whole
    full-precision checkpoint resident for the entire run. Read with pread, a weight that is quantized lives
    only until then.
    """
    files = safetensors_files(path)
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


def load_quantized(path: str, quantization: BitsAndBytesConfig, **kwargs) -> LlavaForConditionalGeneration:
    """Load a LLaVA checkpoint with its LM decoder's linear layers quantized, and check that only those were."""
    model = _from_pretrained_with_pread(path, quantization_config=quantization, **kwargs)
    expected = linear_layer_names(model, "language_model")
    if quantized_module_names(model) != expected:
        raise RuntimeError(f"Quantization reached other modules than the LM decoder's linear layers: got "
                           f"{quantized_module_names(model)[:5]}..., expected {expected[:5]}...")
    return model
