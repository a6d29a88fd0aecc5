# Sourced by run_stage1.sh / run_stage2.sh: the embedded demo's model and data defaults, left out when the
# caller's own arguments ("$@") already name them, so a user with real models never triggers the demo's
# SmolLM2 conversion.
has_flag() {  # has_flag --name "$@": is --name among the arguments?
  local name=$1; shift
  for arg in "$@"; do [[ $arg == "$name" || $arg == "$name="* ]] && return 0; done
  return 1
}

demo_parts=()
if ! has_flag --model_name_or_path "$@"; then
  has_flag --vision_model_name_or_path "$@" || demo_parts+=(--vision_model_name_or_path output/demo/vision_tower)
  has_flag --language_model_name_or_path "$@" \
    || demo_parts+=(--language_model_name_or_path "$(python -m llava.demo.smollm2)")
fi

demo_data=()
if [[ -f data/easy_vqa/meta.json ]]; then
  has_flag --image_folder "$@" \
    || demo_data+=(--image_folder "$(python -c 'import json; print(json.load(open("data/easy_vqa/meta.json"))["image_folder"])')")
  # a few held-out (validation) questions answered at every save, in TensorBoard's Images and Text tabs
  has_flag --data_path "$@" || has_flag --sample_data_path "$@" || demo_data+=(--sample_data_path data/easy_vqa/validation.json)
fi
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}  # small CPU ops are far slower without it on some VMs
