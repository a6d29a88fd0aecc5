"""`python train_llava.py` whose final save stalls half-way, so a test can kill it in the middle of writing the final
output: the weights are written, then it touches $SLOW_SAVE_STARTED and sleeps before the processor files."""

import os
import sys
import time

from llava.model.final_output import STAGING
from llava.training.trainer import LlavaTrainer

_original_save = LlavaTrainer._save


def _stalling_save(self, output_dir=None, state_dict=None):
    if output_dir is not None and os.path.basename(output_dir) == STAGING:
        self.model.save_pretrained(output_dir)
        open(os.environ["SLOW_SAVE_STARTED"], "w").close()
        time.sleep(600)
    _original_save(self, output_dir, state_dict)


LlavaTrainer._save = _stalling_save

if __name__ == "__main__":
    from llava.train import main

    main(sys.argv[1:])
