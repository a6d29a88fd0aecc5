#!/usr/bin/env python
"""Train a LLaVA model. `python train_llava.py --help` lists every flag; see README.md and run_stage*.sh."""

from llava.reporting import run_command
from llava.train import main

if __name__ == "__main__":
    run_command(main)
