"""The speed benchmark runs end to end (its --quick smoke mode; no timing is asserted here: speed targets are met
in the full benchmark's printed figures), every side trains the mixed-length set whole, and the baselines feed the
very token sequences ours trains on."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from PIL import Image
from transformers import AutoProcessor

from llava.data.encoder import ConversationEncoder
from llava.data.records import load_samples
from llava.model.processor import image_token_count
from tests.helpers.outputs import REPO

sys.path.insert(0, os.path.join(REPO, "bench", "speed"))
import harness  # noqa: E402
from side_zero_nlp import PerSampleCollator, RawDataset  # noqa: E402

pytestmark = pytest.mark.slow  # two-process jobs or whole benchmark runs: tens of seconds each


STAGES = ("stage2", "mixed1", "mixed2")  # stage1 shares mixed1's freezing and stage2's data path
HAS_TRL = importlib.util.find_spec("trl") is not None


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("speed")
    command = [sys.executable, "bench/speed/run.py", "--quick", "--work_dir", str(work), "--out",
               str(work / "results"), "--stages", ",".join(STAGES), "--sides", ",".join(_sides())]
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    with open(work / "results" / "results.jsonl") as f:
        records = [json.loads(line) for line in f]
    return work, json.loads(completed.stdout.strip().splitlines()[-1])["summary"], records


def test_quick_benchmark_measures_every_side_and_the_padding(quick_run):
    _, summary, _ = quick_run
    for stage in STAGES:
        assert set(_sides()) <= summary[stage].keys()
        for side in _sides():
            assert summary[stage][side]["samples_per_s"] > 0 and summary[stage][side]["peak_rss_mb"] > 0
        for side in {"ours", "ours_packed"} & set(_sides()):
            assert summary[stage]["vs_faster_baseline"][side]["ratio"] > 0
            assert summary[stage]["vs_faster_baseline"][side]["set_ratio"] > 0  # the whole-set estimate
        entry = summary[stage]["ours"]
        assert entry["set_samples_per_s"] > 0
    padding = summary["mixed_padding"]
    assert 0 <= padding["epoch_pad_fraction"] < padding["epoch_pad_fraction_random_batches"]


def test_sides_count_the_same_samples_and_tokens(quick_run):
    """Unpacked sides take 4 samples a step; the baselines draw the same samples (the Trainer's seeded sampler),
    and TRL's are the same tokens plus the chat template's closing newline per sample."""
    _, _, records = quick_run
    for stage in STAGES:
        run = {r["side"]: r for r in records if r["stage"] == stage}
        for side in {"ours", "zero_nlp", "trl"} & run.keys():
            assert run[side]["samples_measured"] == 4 * run[side]["steps_measured"], (stage, side)
        if HAS_TRL:
            assert run["trl"]["tokens_measured"] == run["zero_nlp"]["tokens_measured"] + run["zero_nlp"][
                "samples_measured"], stage
        if "ours_packed" in run:
            packed = run["ours_packed"]
            assert packed["samples_measured"] >= packed["steps_measured"] and packed["tokens_per_sample"] > 64


def test_baselines_train_the_same_tokens_as_ours(quick_run):
    """Every sample of both data files: zero_nlp's ids and labels are ours; TRL's ids are ours + one newline."""
    work, _, _ = quick_run
    with open(work / "assets.json") as f:
        assets = json.load(f)
    processor = AutoProcessor.from_pretrained(assets["model"])
    collator, encoder = PerSampleCollator(processor), ConversationEncoder(processor, 4096, image_token_count(processor))
    newline = processor.tokenizer("\n", add_special_tokens=False)["input_ids"]
    for name in ("stage2", "mixed"):
        records = harness.conversation_records(assets[name], assets["image_folder"])
        dataset = RawDataset(records)
        for index, (record, sample) in enumerate(zip(records, load_samples([assets[name]]))):
            ours = encoder.encode(sample)
            ids, labels, pixel_values = collator.encode(dataset[index]["messages"], dataset[index]["image"])
            assert ids.tolist() == ours["input_ids"] and labels.tolist() == ours["labels"], sample.id
            assert (pixel_values is None) == (record["image"] is None), sample.id
            if HAS_TRL:
                assert _trl_ids(processor, record) == ours["input_ids"] + newline, sample.id


def test_packed_rows_count_the_samples_inside_them():
    packing = pytest.importorskip("llava.data.packing")
    import torch

    items = [{"input_ids": torch.arange(1, n + 1), "labels": torch.tensor([-100] * (n - 2) + [7, 8])}
             for n in (5, 3, 6, 4)]
    batch = packing.PackingCollator(pad_token_id=0)([items[:2], items[2:3], items[3:]])
    assert harness.packed_samples(batch["position_ids"], batch["labels"]) == (4, 18)


def _trl_ids(processor, record: dict) -> list[int]:
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    images = [Image.open(record["image"]).convert("RGB")] if record["image"] else []
    batch = DataCollatorForVisionLanguageModeling(processor)([{"images": images, "messages": record["messages"]}])
    return batch["input_ids"][0].tolist()


def _sides() -> list[str]:
    from llava.training.arguments import LlavaTrainingArguments

    baselines = ["zero_nlp"] + (["trl"] if HAS_TRL else [])
    packed = ["ours_packed"] if "packing" in LlavaTrainingArguments.__dataclass_fields__ else []
    return ["ours", *packed, *baselines]
