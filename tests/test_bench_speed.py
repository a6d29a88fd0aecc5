"""The speed benchmark runs end to end (its --quick smoke mode; no timing is asserted here: speed targets are met
in the full benchmark's printed figures), and the zero_nlp baseline feeds the very token sequences ours trains on."""

import json
import os
import subprocess
import sys

import pytest
from transformers import AutoProcessor

from llava.conversation import ConversationEncoder
from llava.data import load_samples

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench", "speed"))

import harness  # noqa: E402
from side_zero_nlp import PerSampleCollator  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("speed")
    completed = subprocess.run([sys.executable, "bench/speed/run.py", "--quick", "--work_dir", str(work),
                                "--out", str(work / "results")], cwd=REPO, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return work, json.loads(completed.stdout.strip().splitlines()[-1])["summary"]


def test_quick_benchmark_measures_every_side_and_the_padding(quick_run):
    _, summary = quick_run
    sides = {"ours", "zero_nlp"} | ({"trl"} if _has_trl() else set())
    for stage in ("stage1", "stage2"):
        assert sides <= summary[stage].keys()
        for side in sides:
            assert summary[stage][side]["samples_per_s"] > 0 and summary[stage][side]["peak_rss_mb"] > 0
        assert summary[stage]["vs_faster_baseline"]["ratio"] > 0
    mixed = summary["mixed"]
    assert 0 <= mixed["epoch_pad_fraction"] < mixed["epoch_pad_fraction_random_batches"]


def test_zero_nlp_recipe_trains_the_same_tokens_as_ours(quick_run):
    work, _ = quick_run
    with open(work / "assets.json") as f:
        assets = json.load(f)
    processor = AutoProcessor.from_pretrained(assets["model"])
    collator, encoder = PerSampleCollator(processor), ConversationEncoder(processor, 4096)
    records = harness.single_turn_records(assets["stage2"], assets["image_folder"])
    samples = load_samples([assets["stage2"]])
    for record, sample in list(zip(records, samples))[:32]:
        ids, labels, _ = collator.encode("<image>\n" + record["question"], record["answer"], record["image"])
        ours = encoder.encode(sample)
        assert ids.tolist() == ours["input_ids"] and labels.tolist() == ours["labels"], sample.id


def _has_trl() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None
