"""The speed benchmark runs end to end (its --quick smoke mode; no timing is asserted here: speed targets are met
in the full benchmark's printed figures), every side trains one pass over the same subset (the same samples and
tokens), and the baselines feed the very token sequences ours trains on; the LLaVA-NeXT stage too (a few samples,
zero_nlp skipped)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from PIL import Image
from transformers import AutoProcessor

from llava.data.encoder import ConversationEncoder
from llava.data.images import check_image
from llava.data.records import load_samples
from llava.model.processor import image_tokens
from tests.helpers.outputs import REPO

sys.path.insert(0, os.path.join(REPO, "bench", "speed"))
import harness  # noqa: E402
from side_zero_nlp import PerSampleCollator, RawDataset  # noqa: E402

_spec = importlib.util.spec_from_file_location("speed_run", os.path.join(REPO, "bench", "speed", "run.py"))
speed_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(speed_run)

pytestmark = pytest.mark.slow  # two-process jobs or whole benchmark runs: tens of seconds each


STAGES = ("stage2", "mixed1", "mixed2")  # stage1 shares mixed1's freezing and stage2's data path
NEXT_STAGE, NEXT_SAMPLES = "next_mixed2", 4  # one batch: TRL's LLaVA-NeXT steps take ~10 s here even at --quick
HAS_TRL = importlib.util.find_spec("trl") is not None
QUICK_SAMPLES = speed_run.QUICK_SAMPLES


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The work folder every run of this module shares: whichever runs first prepares the models and data."""
    return tmp_path_factory.mktemp("speed")


def run_quick(work, out: str, *flags: str) -> tuple[str, dict, list[dict]]:
    """`run.py --quick FLAGS` into `work`/`out`: its stdout, its summary and the records of its runs."""
    command = [sys.executable, "bench/speed/run.py", "--quick", "--work_dir", str(work), "--out", str(work / out),
               *flags]
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    with open(work / out / "results.jsonl") as f:
        records = [json.loads(line) for line in f]
    return completed.stdout, json.loads(completed.stdout.strip().splitlines()[-1])["summary"], records


@pytest.fixture(scope="module")
def assets(work) -> dict:
    """prepare.py's models and data in `work`, as --quick builds them (built once, then reused by every run)."""
    subprocess.run([sys.executable, "bench/speed/prepare.py", "--work_dir", str(work), *speed_run.QUICK_PREPARE],
                   cwd=REPO, check=True, capture_output=True)
    with open(work / "assets.json") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def quick_run(work):
    _, summary, records = run_quick(work, "results", "--stages", ",".join(STAGES), "--sides", ",".join(_sides()))
    return work, summary, records


def test_quick_benchmark_measures_every_side_over_the_same_subset(quick_run):
    work, summary, _ = quick_run
    for stage in STAGES:
        assert set(_sides()) <= summary[stage].keys()
        for side in _sides():
            entry = summary[stage][side]
            assert entry["samples"] == QUICK_SAMPLES and entry["samples_per_s"] > 0 and entry["peak_rss_mb"] > 0
            assert entry["tokens_per_s"] == pytest.approx(entry["tokens"] / entry["train_s"], rel=0.02)
        assert len({summary[stage][side]["tokens"] for side in _sides()}) == 1  # one count for every side
        for side in {"ours", "ours_packed"} & set(_sides()):
            assert summary[stage]["vs_faster_baseline"][side]["ratio"] > 0
        with open(work / "results" / f"subset-{stage}.json") as f:
            assert len(json.load(f)) == QUICK_SAMPLES


def test_sides_train_the_same_samples_and_tokens(quick_run):
    """Every side trains each of the subset's samples once; zero_nlp and ours (packed or not) feed the subset's
    tokens as our encoder counts them, TRL the same plus the chat template's closing newline per sample."""
    _, _, records = quick_run
    for stage in STAGES:
        run = {r["side"]: r for r in records if r["stage"] == stage}
        for side, record in run.items():
            assert record["samples"] == QUICK_SAMPLES, (stage, side)
            expected = record["subset_tokens"] + (QUICK_SAMPLES if side == "trl" else 0)
            assert record["tokens_fed"] == expected, (stage, side)
        for side in {"ours", "zero_nlp", "trl"} & run.keys():
            assert run[side]["steps"] == QUICK_SAMPLES // 4, (stage, side)  # --quick: batches of 4
        if "ours_packed" in run:
            assert run["ours_packed"]["steps"] < QUICK_SAMPLES and run["ours_packed"]["pad_fraction"] < 0.5


def test_llava_next_stage_runs_every_side_but_zero_nlp(work, assets):
    """next_mixed2 trains prepare.py's LLaVA-NeXT checkpoint: ours (packed: rows long enough for its samples, so
    none is cut) and TRL feed the subset's tokens (TRL + its newline), zero_nlp is skipped with a line saying so."""
    # Unpacked ours is left out to keep this small: it runs the same side script as packed ours.
    sides = [side for side in _sides() if side != "ours"]
    stdout, summary, records = run_quick(work, "next_results", "--stages", NEXT_STAGE, "--sides", ",".join(sides),
                                         "--samples", f"{NEXT_STAGE}={NEXT_SAMPLES}")
    assert f"zero_nlp trains LLaVA-1.5 models only: skipping it for {NEXT_STAGE}" in stdout
    trained = set(sides) - {"zero_nlp"}
    compared = {"vs_faster_baseline"} if "trl" in trained else set()  # without trl installed, ours alone
    assert set(summary[NEXT_STAGE]) == trained | compared
    assert {r["side"] for r in records} == trained and all(r["model"] == "next_model" for r in records)
    for record in records:
        newlines = NEXT_SAMPLES if record["side"] == "trl" else 0
        assert record["samples"] == NEXT_SAMPLES and record["tokens_fed"] == record["subset_tokens"] + newlines


def test_a_work_folder_built_with_other_flags_is_refused(work, assets):
    """`work` was prepared as --quick prepares it; a full-size preparation there must not reuse its 2-layer LM."""
    completed = subprocess.run([sys.executable, "bench/speed/prepare.py", "--work_dir", str(work)], cwd=REPO,
                               capture_output=True, text=True)
    assert completed.returncode == 1
    assert f"{work} holds models and images built with" in completed.stderr and "another --work_dir" in completed.stderr


def test_zero_nlp_refuses_a_llava_next_checkpoint_by_name(assets):
    """Run by hand on a LLaVA-NeXT checkpoint, zero_nlp's side says why it cannot train it, before loading it."""
    completed = subprocess.run(
        [sys.executable, "bench/speed/side_zero_nlp.py", "--stage", "stage2", "--model", assets["next_model"],
         "--data", assets["next_mixed"], "--image_folder", assets["next_image_folder"]],
        cwd=REPO, capture_output=True, text=True)
    assert completed.returncode == 1
    assert f"{assets['next_model']} is a llava_next checkpoint" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_llava_next_set_gives_each_image_size_its_own_token_count(assets):
    """next_mixed.json's images come at four sizes and aspect ratios, each expanded by ours to another number of
    image tokens (prepare.py's NEXT_IMAGE_SIZES); with TRL, its collator expands each to as many tokens as ours, so
    its ids are ours + the closing newline."""
    processor = AutoProcessor.from_pretrained(assets["next_model"])
    encoder = ConversationEncoder(processor, 4096, image_tokens(processor))
    newline = processor.tokenizer("\n", add_special_tokens=False)["input_ids"]
    records = harness.conversation_records(assets["next_mixed"], assets["next_image_folder"])
    counts = set()
    for record, sample in zip(records, load_samples([assets["next_mixed"]])):
        sizes = [check_image(record["image"], sample)] if record["image"] else []
        ids = encoder.encode(sample, sizes)["input_ids"]
        if record["image"]:
            counts.add((sizes[0], ids.count(processor.image_token_id)))
        if HAS_TRL:
            assert _trl_ids(processor, record) == ids + newline, sample.id
    assert counts == {((64, 64), 136), ((64, 128), 200), ((128, 64), 208), ((128, 128), 336)}


def test_subsets_are_drawn_with_the_seed(tmp_path):
    records = [{"id": str(i), "conversations": []} for i in range(50)]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    first = speed_run.make_subset(str(data), 8, 42, str(tmp_path / "a.json"))
    assert first == speed_run.make_subset(str(data), 8, 42, str(tmp_path / "b.json")) != \
        speed_run.make_subset(str(data), 8, 43, str(tmp_path / "c.json"))
    assert first == sorted(first, key=int) and [r["id"] for r in json.loads((tmp_path / "a.json").read_text())] == first


def test_baselines_train_the_same_tokens_as_ours(quick_run):
    """Every sample of both data files: zero_nlp's ids and labels are ours; TRL's ids are ours + one newline."""
    work, _, _ = quick_run
    with open(work / "assets.json") as f:
        assets = json.load(f)
    processor = AutoProcessor.from_pretrained(assets["model"])
    collator, encoder = PerSampleCollator(processor), ConversationEncoder(processor, 4096, image_tokens(processor))
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
