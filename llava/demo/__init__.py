"""Assets for the easy-VQA demo: the SmolLM2 language model and a small pretrained CLIP vision tower."""
