#!/usr/bin/env bash
# A declared pipeline of stages (README, "Pipelines"): every stage of the file in order, each in
# <output_dir>/<stage>; the same command again skips finished stages and resumes an interrupted one.
#
#   bash run_pipeline.sh                                  # the embedded demo, configs/demo.yaml (assets: `make demo`)
#   bash run_pipeline.sh configs/llava_v1_5.yaml --output_dir out/llava15 ...   # any pipeline file, then flags
#   bash run_pipeline.sh configs/demo.yaml --dry_run True # the plan, loading no weights
#   bash run_pipeline.sh configs/demo.yaml --stages align,instruct --instruct.learning_rate 1e-4
#
# Multi-GPU: the pipeline runs once and starts each stage with the launcher, e.g.
#   bash run_pipeline.sh configs/llava_v1_5.yaml --launcher "torchrun --nproc_per_node 8"
set -euo pipefail
cd "$(dirname "$0")"
pipeline=configs/demo.yaml
if [[ $# -gt 0 && $1 != --* ]]; then pipeline=$1; shift; fi
demo=()
if [[ $pipeline == configs/demo.yaml ]]; then  # its LM and images live in the pip cache / site-packages
  source llava/demo/stage_defaults.sh
  demo=("${demo_parts[@]}")
  has_flag --image_folder "$@" || demo+=("${demo_data[@]:0:2}")  # --image_folder <the installed easy-VQA data>
fi
exec python train_llava.py "$pipeline" "${demo[@]}" "$@"
