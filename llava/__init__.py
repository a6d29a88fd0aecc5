"""train_llava: train LLaVA-style vision-language models in stages on `transformers.Trainer`."""

__version__ = "0.1.0"
