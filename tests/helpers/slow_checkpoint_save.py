"""`python train_llava.py` whose checkpoint saves stall half-way from step $SLOW_SAVE_STEP on, so a test can kill it
in the middle of writing a checkpoint: the weights and optimizer state are written, then it touches
$SLOW_SAVE_STARTED and sleeps before the RNG and trainer states."""

import os
import sys
import time

from transformers import Trainer

_original_save_rng_state = Trainer._save_rng_state


def _stalling_save_rng_state(self, output_dir):
    if self.state.global_step >= int(os.environ["SLOW_SAVE_STEP"]):
        open(os.environ["SLOW_SAVE_STARTED"], "w").close()
        time.sleep(600)
    _original_save_rng_state(self, output_dir)


Trainer._save_rng_state = _stalling_save_rng_state

if __name__ == "__main__":
    from llava.train import main

    main(sys.argv[1:])
