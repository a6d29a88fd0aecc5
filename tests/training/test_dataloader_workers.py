"""A sample whose image fails only when a DataLoader worker decodes it (its header passed the checking pass): the run
ends as without workers, with the sample's one-line error, exit status 2, within seconds, its last complete
checkpoint intact; SIGTERM arriving meanwhile changes none of that; under --skip_invalid_samples the worker skips it."""

import io
import json
import os
import re
import signal
import time

import numpy as np
import pytest
from PIL import Image

from llava.reporting import USER_ERROR_EXIT_CODE
from llava.training.checkpoints import latest_complete_checkpoint
from llava.training.preemption import PREEMPTED_EXIT_CODE
from tests.helpers.runs import Run
from tests.helpers.tiny_parts import qa, save_images

# Sequential order, 2 a step: step 6, fetched during step 5 (accelerate reads one batch ahead), after checkpoint-4.
BAD_INDEX = 11


@pytest.fixture(scope="module")
def late_corrupt_data(tmp_path_factory):
    """16 samples, the 12th's JPEG cut in half: its header reads, its pixels do not decode."""
    folder = tmp_path_factory.mktemp("late_corrupt")
    images = str(folder / "images")
    save_images(images)
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    with open(os.path.join(images, "cut.jpg"), "wb") as f:
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    records = [qa(f"s{i}", image=f"img{i % 4}.png") for i in range(16)]
    records[BAD_INDEX]["image"] = "cut.jpg"
    path = str(folder / "data.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path, images


def _run(parts, data, output_dir, workers, *extra):
    path, images = data
    flags = ["--vision_model_name_or_path", parts["vision"], "--language_model_name_or_path", parts["lm"],
             "--data_path", path, "--image_folder", images, "--output_dir", str(output_dir),
             "--per_device_train_batch_size", "2", "--max_steps", "8", "--save_steps", "2", "--logging_steps", "1",
             "--report_to", "none", "--train_sampling_strategy", "sequential", "--dataloader_num_workers",
             str(workers), "--use_cpu", "True", *extra]
    return Run("train_llava.py", flags, str(output_dir) + ".log", new_session=True)


def _wait_bounded(run, seconds):
    """The run's exit status, failing (and killing its group) if it is still running after `seconds`."""
    try:
        return run.process.wait(timeout=seconds)
    except Exception:
        os.killpg(run.process.pid, signal.SIGKILL)
        raise AssertionError(f"still running after {seconds} s (hung):\n{run.log()[-3000:]}") from None


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_a_sample_failing_in_a_worker_ends_the_run_in_one_line(parts, late_corrupt_data, tmp_path, workers):
    run = _run(parts, late_corrupt_data, tmp_path / "out", workers)
    assert _wait_bounded(run, 120) == USER_ERROR_EXIT_CODE, run.log()[-3000:]
    log = run.log()
    errors = re.findall(r"error: .*", log)  # a progress bar may precede it on its line
    assert errors == [f"error: {late_corrupt_data[0]}[{BAD_INDEX}] (id 's{BAD_INDEX}'): cannot read image "
                      f"{os.path.join(late_corrupt_data[1], 'cut.jpg')}: image file is truncated "
                      "(1 bytes not processed)"], log[-3000:]
    assert "Traceback" not in log and "Caught DataError" not in log
    assert latest_complete_checkpoint(str(tmp_path / "out")) == str(tmp_path / "out" / "checkpoint-4")


def test_sigterm_while_a_worker_fails_still_ends_within_seconds(parts, late_corrupt_data, tmp_path):
    """SIGTERM to the whole group (as a scheduler sends it), again and again from checkpoint-4 on, while the worker
    reaches the corrupt sample: the run reports the sample (2), or saves and stops (143; a later SIGTERM may end it
    by the signal once its checkpoint is saved), within seconds, and its newest checkpoint is complete."""
    out = tmp_path / "out"
    run = _run(parts, late_corrupt_data, out, 2)
    run.wait_for(lambda: latest_complete_checkpoint(str(out)) is not None
                 and latest_complete_checkpoint(str(out)).endswith("checkpoint-4"))
    deadline = time.monotonic() + 60
    while run.process.poll() is None and time.monotonic() < deadline:
        os.killpg(run.process.pid, signal.SIGTERM)
        time.sleep(0.1)
    status = _wait_bounded(run, 10)
    assert status in (USER_ERROR_EXIT_CODE, PREEMPTED_EXIT_CODE, -signal.SIGTERM), run.log()[-3000:]
    saved = sorted((name for name in os.listdir(out) if name.startswith("checkpoint-")), key=lambda n: int(n[11:]))
    assert latest_complete_checkpoint(str(out)) == str(out / saved[-1])


def test_skip_invalid_samples_skips_in_the_worker(parts, late_corrupt_data, tmp_path):
    run = _run(parts, late_corrupt_data, tmp_path / "out", 2, "--skip_invalid_samples", "True")
    assert _wait_bounded(run, 120) == 0, run.log()[-3000:]
    assert f"skipping a sample that failed at load time: {late_corrupt_data[0]}[{BAD_INDEX}]" in run.log()
    assert (tmp_path / "out" / "final_output_complete.json").is_file()
