#!/usr/bin/env bash
# Stage 2 — instruct: continue from stage 1's output and train the LM end to end on conversations.
#
#   bash run_stage2.sh                          # the embedded demo, from output/demo/stage1
#   bash run_stage2.sh --model_name_or_path out/stage1 --data_path X --output_dir Y ...
#   bash run_stage2.sh --lora_enable True --load_in_4bit True     # QLoRA: LoRA adapters on a 4-bit LM
#
# Real-model recipe (LLaVA-1.5, 8 GPUs, global batch 128 = 8 x 16):
#   torchrun --nproc_per_node 8 train_llava.py --model_name_or_path out/stage1 \
#     --data_path llava_v1_5_mix665k.json --image_folder data/ \
#     --freeze_vision_model True --freeze_language_model False \
#     --learning_rate 2e-5 --per_device_train_batch_size 16 --num_train_epochs 1 \
#     --warmup_steps 0.03 --lr_scheduler_type cosine --weight_decay 0 --model_max_length 2048 \
#     --bf16 True --gradient_checkpointing True --dataloader_num_workers 4 --output_dir out/stage2
#   LoRA instead (LLaVA-1.5: r 128, alpha 256, projector lr 2e-5):
#     --lora_enable True --lora_r 128 --lora_alpha 256 --lora_dropout 0.05 --learning_rate 2e-4 --projector_lr 2e-5
#   QLoRA on one 24 GB GPU: add --load_in_4bit True --bf16 True
set -euo pipefail
cd "$(dirname "$0")"
source llava/demo/stage_defaults.sh

flags=(
  --model_name_or_path output/demo/stage1          # stage 1's output: tower + projector + LM
  "${demo_data[@]}"
  # One question per sample. The multi-turn file (stage2_instruct.json, all of an image's questions in one
  # conversation) is ~2x cheaper per answer, but later answers can be read off earlier ones: measured here, the
  # model then answered single yes/no test questions at 49 % (50 steps x 8 conversations) against 83 % with
  # single questions (120 steps x 16), colour and shape being ~95 % either way.
  --data_path data/easy_vqa/stage2_single_turn.json
  --freeze_vision_model True                       # LLaVA-1.5: the encoder stays fixed in stage 2 too
  --freeze_language_model False                    # stage 2: end-to-end instruction tuning
  --freeze_projector False
  --learning_rate 5e-5                             # LLaVA-1.5 uses 2e-5 for 7B; a 135M LM in a short run takes more
  --warmup_steps 0.03 --lr_scheduler_type cosine --weight_decay 0
  --per_device_train_batch_size 16
  --max_steps "${DEMO_STAGE2_STEPS:-150}"          # the demo's budget: 150 x 16 = 2,400 questions (~10 min)
  --model_max_length 2048                         # demo samples are far shorter; real towers need room (CLIP-336: 576 image tokens)
  --logging_steps 10 --save_steps 1000 --save_total_limit 1
  --dataloader_num_workers 1
  --output_dir output/demo/stage2
)
exec python train_llava.py "${flags[@]}" "$@"
