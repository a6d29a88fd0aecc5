"""train_llava: train LLaVA-style vision-language models in stages on `transformers.Trainer`.

Subpackages, in the order a run uses them: `utils` (files and cache folder, used by all), `data` (records ->
tokens, labels and batches), `model` (the LLaVA model, its processor and on-disk format), `training` (flags, the
Trainer subclass, checkpoints), `demo` (the embedded easy-VQA demo). The modules at the top are the commands:
`python -m llava.train` (= `python train_llava.py`), `llava.validate_data`, `llava.inspect_data`,
`llava.generate`, `llava.evaluate`, `llava.merge_lora`.
"""

__version__ = "0.1.0"
