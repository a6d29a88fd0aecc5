"""`python -m llava.train` whose final save stalls half-way, so a test can kill it in the middle of writing a final
output: the weights are written, then it touches $STALL_STARTED and sleeps before the processor files. With
$STALL_STAGE set, only that pipeline stage's final save stalls.

    python tests/helpers/stalling_final_save.py <train flags>                  # one run
    --launcher "python tests/helpers/stalling_final_save.py"                  # a pipeline's stages (-m llava.train ...)
"""

import os
import sys
import time

from llava.model.final_output import STAGING
from llava.training.trainer import LlavaTrainer

_original_save = LlavaTrainer._save


def _stalling_save(self, output_dir=None, state_dict=None):
    folder = output_dir or ""
    stage = os.environ.get("STALL_STAGE")
    if os.path.basename(folder) == STAGING and stage in (None, os.path.basename(os.path.dirname(folder))):
        self.model.save_pretrained(folder)
        open(os.environ["STALL_STARTED"], "w").close()
        time.sleep(600)
    _original_save(self, output_dir, state_dict)


LlavaTrainer._save = _stalling_save

if __name__ == "__main__":
    from llava.reporting import run_command
    from llava.train import main

    flags = sys.argv[3:] if sys.argv[1:3] == ["-m", "llava.train"] else sys.argv[1:]
    run_command(lambda: main(flags))
