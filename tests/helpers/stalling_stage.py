"""A pipeline's `--launcher` for tests: runs the stage (`-m llava.train <flags>`) as `python -m llava.train` would,
except that the final save of stage $STALL_STAGE stalls half-way (weights written, then $STALL_STARTED touched and a
long sleep), so a test can kill the pipeline in the middle of writing a final output."""

import os
import sys
import time

from llava.model.final_output import STAGING
from llava.training.trainer import LlavaTrainer

_original_save = LlavaTrainer._save


def _stalling_save(self, output_dir=None, state_dict=None):
    folder = output_dir or ""
    if os.path.basename(folder) == STAGING and os.path.basename(os.path.dirname(folder)) == os.environ["STALL_STAGE"]:
        self.model.save_pretrained(folder)
        open(os.environ["STALL_STARTED"], "w").close()
        time.sleep(600)
    _original_save(self, output_dir, state_dict)


LlavaTrainer._save = _stalling_save

if __name__ == "__main__":
    from llava.reporting import run_command
    from llava.train import main

    assert sys.argv[1:3] == ["-m", "llava.train"], sys.argv
    run_command(lambda: main(sys.argv[3:]))
