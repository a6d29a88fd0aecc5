"""Stage 2: the model. The class itself (`modeling`), its processor (`processor`), the parts freeze flags name
(`components`), assembly and loading (`building`, `quantization`, `sharding`), LoRA (`lora`), the activation
memory saver (`mlp_recompute`), the on-disk format (`hub_format`, `final_output`) and answering (`inference`).

Imports from `llava.data` (value types, the chat template), never from `llava.training`."""
