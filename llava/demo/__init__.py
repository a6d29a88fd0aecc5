"""The embedded easy-VQA demo (`make demo`): its data (`easy_vqa`), language model (`smollm2`), a small pretrained
CLIP tower (`pretrain_vision`), the stage scripts' defaults (`stage_defaults.sh`) and the whole run (`run`)."""
