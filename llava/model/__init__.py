"""Stage 2: the model. The classes themselves (`modeling`), their processor (`processor`) and LLaVA-NeXT's anyres
grid and token counts (`anyres`), LLaVA-OneVision's variant of them (`onevision`), the parts freeze flags name
(`components`), assembly and loading (`building`, `quantization`, `sharding`), LoRA (`lora`), the activation
memory saver (`mlp_recompute`), the on-disk format (`hub_format`, `final_output`) and answering (`inference`).

Imports from `llava.data` (value types, the chat template), never from `llava.training`."""
