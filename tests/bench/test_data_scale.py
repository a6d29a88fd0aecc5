"""bench/data_scale.py: the generated mix665k-shaped set has every source in its share, text beyond ASCII (as
ShareGPT's), and images that exist; and the start-up run on it completes cold and warm."""

import collections
import json
import os
import sys

import pytest

from llava.data.records import load_samples
from tests.helpers.outputs import REPO

sys.path.insert(0, os.path.join(REPO, "bench"))
import data_scale  # noqa: E402


def test_generated_mix_follows_the_sources(tmp_path):
    path, images = str(tmp_path / "mix.json"), str(tmp_path / "images")
    data_scale.generate_mix(path, images, 6650)
    samples = load_samples([path])
    assert len(samples) == 6650
    counts = collections.Counter(sample.id.rsplit("-", 1)[0] for sample in samples)
    for name, share, *_ in data_scale.SOURCES:
        assert abs(counts[name] - share / 100) <= 3, name
    assert all(os.path.isfile(os.path.join(images, sample.images[0])) for sample in samples if sample.images)
    assert not [s for s in samples if s.id.startswith("sharegpt") and s.images]
    assert any(ord(c) > 0xFFFF for c in open(path, encoding="utf-8").read())  # emoji, written as such


@pytest.mark.slow  # two short training runs on 300 samples: ~40 s
def test_start_up_runs_cold_and_warm(tmp_path):
    results = data_scale.main(["--num_samples", "300", "--work_dir", str(tmp_path)])
    assert results["ranks_1_cold"]["rc"] == 0 and results["ranks_1_warm"]["rc"] == 0
    assert json.dumps(results)
