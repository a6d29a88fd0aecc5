#!/usr/bin/env bash
# Stage 1 — align: the language model stays frozen; the projector learns to turn image features into
# "words" the LM reads.
#
#   bash run_stage1.sh                          # the embedded demo (assets: `make demo` prepares them)
#   bash run_stage1.sh --data_path X --output_dir Y --vision_model_name_or_path V ...
#                                               # any train_llava.py flag; yours override the defaults below
#
# Real-model recipe (LLaVA-1.5, 8 GPUs, global batch 256 = 8 x 32):
#   torchrun --nproc_per_node 8 train_llava.py \
#     --vision_model_name_or_path openai/clip-vit-large-patch14-336 \
#     --language_model_name_or_path Qwen/Qwen2.5-7B-Instruct \
#     --data_path blip_laion_cc_sbu_558k.json --image_folder llava_pretrain/images \
#     --freeze_vision_model True --freeze_language_model True \
#     --learning_rate 1e-3 --per_device_train_batch_size 32 --num_train_epochs 1 \
#     --warmup_steps 0.03 --lr_scheduler_type cosine --weight_decay 0 --model_max_length 2048 \
#     --bf16 True --dataloader_num_workers 4 --save_steps 500 --output_dir out/stage1
set -euo pipefail
cd "$(dirname "$0")"
source llava/demo/stage_defaults.sh

flags=(
  "${demo_parts[@]}"
  "${demo_data[@]}"
  --data_path data/easy_vqa/stage1_captions.json   # one short caption per train image: "A red circle."
  # The demo's tower is pretrained (llava.demo.pretrain_vision), so it stays fixed, as LLaVA-1.5 keeps CLIP.
  # Set False when the tower is random or weak for your images: it then learns with the projector
  # (add --vision_lr 1e-4, gentler than the projector's rate; a rate for a frozen part is refused).
  --freeze_vision_model True
  --freeze_language_model True                     # stage 1: the LM stays as it is
  --freeze_projector False
  --learning_rate 1e-3                             # LLaVA-1.5 stage 1
  --warmup_steps 0.03 --lr_scheduler_type cosine --weight_decay 0
  --per_device_train_batch_size 16
  --max_steps "${DEMO_STAGE1_STEPS:-60}"           # the demo's budget: 60 x 16 = 960 captions (~4 min on 2 cores)
  --model_max_length 2048                         # demo samples are far shorter; real towers need room (CLIP-336: 576 image tokens)
  --logging_steps 10 --save_steps 1000 --save_total_limit 1
  --dataloader_num_workers 1
  --output_dir output/demo/stage1
)
exec python train_llava.py "${flags[@]}" "$@"
