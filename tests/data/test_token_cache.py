"""Tokenized data: compact storage gives the collator exactly the expanded ids and labels, and the disk cache is reused
only while it matches its data, tokenizer and limits; a partial cache is rebuilt; a node's processes build it once."""

import json
import multiprocessing
import os

import numpy as np
import pytest

import llava.data.checking
import llava.data.dataset
from llava.data.encoder import ConversationEncoder, expanded_length
from llava.data.records import load_samples
from llava.data.token_cache import TokenStore, cached
from llava.model.processor import image_tokens
from llava.training.arguments import ModelArguments
from llava.training.build import processor_for
from tests.helpers.tiny_parts import conversation_records, dataset_from, prepared, write_dataset


@pytest.fixture(scope="module")
def processor(parts):
    return processor_for(ModelArguments(vision_model_name_or_path=parts["vision"],
                                          language_model_name_or_path=parts["lm"]))


def items(dataset):
    return [(dataset[i]["input_ids"].tolist(), dataset[i]["labels"].tolist()) for i in range(len(dataset))]


def test_stored_samples_expand_to_what_the_encoder_gives(parts, processor):
    dataset = dataset_from([parts["data"]], processor, 512, parts["images"])
    encoder = ConversationEncoder(processor, 512, image_tokens(processor))
    expected = [encoder.encode(sample) for sample in load_samples([parts["data"]])]
    assert items(dataset) == [(e["input_ids"], e["labels"]) for e in expected]
    assert dataset.lengths == [len(e["input_ids"]) for e in expected]
    # one image token per image is stored, not one per image feature
    images = sum(len(sample.images) for sample in dataset.samples)
    assert dataset.store.input_ids.dtype == np.int32
    assert len(dataset.store.input_ids) == sum(dataset.lengths) - images * (encoder.image_tokens.count() - 1)
    assert all(sample.messages == [] for sample in dataset.samples)  # the texts are not kept


@pytest.mark.parametrize("workers", [1, 2])
def test_samples_checked_in_chunks_by_workers_are_stored_as_encoded_one_by_one(parts, processor, tmp_path,
                                                                               monkeypatch, workers):
    """Many chunks (read one ahead of the workers) give what encoding each sample alone gives, in file order, with
    the invalid samples' problems in order too."""
    monkeypatch.setattr(llava.data.checking, "_CHUNK", 7)
    monkeypatch.setattr(llava.data.checking, "_POOL_THRESHOLD", 2)
    good = conversation_records()
    records = []
    for index in range(40):
        record = json.loads(json.dumps(good[index % len(good)]))
        record["id"] = f"s{index}"
        if index % 9 == 4:
            record["conversations"] = record["conversations"][:1]  # ends with the user: invalid
        records.append(record)
    data_path, image_folder = write_dataset(str(tmp_path), records)
    result = prepared([data_path], processor, 512, image_folder, num_workers=workers)
    encoder = ConversationEncoder(processor, 512, image_tokens(processor))
    valid = [sample for sample in load_samples([data_path]) if len(sample.messages) > 1]
    assert [s.id for s in result.samples] == [s.id for s in valid]
    assert [e.kind for e in result.problems] == ["last_turn_not_assistant"] * 4
    assert [f"(id 's{i}')" in str(problem) for i, problem in zip((4, 13, 22, 31), result.problems)] == [True] * 4
    for index, sample in enumerate(valid):
        expected = encoder.encode_compact(sample)
        ids, trained, counts = result.store[index]
        assert ids.tolist() == expected["input_ids"].tolist() and trained.tolist() == expected["trained"].tolist()
        assert counts.tolist() == expected["image_tokens"].tolist()
        assert result.store.lengths[index] == expanded_length(expected["input_ids"], expected["image_tokens"])


def test_cache_is_reused_until_data_or_limits_change(parts, processor, tmp_path, monkeypatch):
    data_path, image_folder = write_dataset(str(tmp_path / "data"))
    cache_dir = str(tmp_path / "cache")
    first = dataset_from([data_path], processor, 512, image_folder, cache_dir=cache_dir)
    calls = []
    real_prepare = llava.data.dataset.prepare_samples
    monkeypatch.setattr(llava.data.dataset, "prepare_samples", lambda *a, **k: calls.append(a) or real_prepare(*a, **k))
    second = dataset_from([data_path], processor, 512, image_folder, cache_dir=cache_dir)
    assert calls == [] and items(second) == items(first) and [s.images for s in second.samples] == \
        [s.images for s in first.samples]
    dataset_from([data_path], processor, 256, image_folder, cache_dir=cache_dir)  # another --model_max_length
    assert len(calls) == 1
    records = conversation_records()[:2]
    with open(data_path, "w", encoding="utf-8") as f:  # edited data: same path, new size and time
        json.dump(records, f)
    edited = dataset_from([data_path], processor, 512, image_folder, cache_dir=cache_dir)
    assert len(calls) == 2 and len(edited) == 2


def test_invalid_samples_are_reported_from_the_cache_too(parts, processor, tmp_path):
    bad = [{"id": "bad", "conversations": [{"from": "human", "value": "Hi"}]}]
    data_path, image_folder = write_dataset(str(tmp_path), conversation_records()[:1] + bad)
    for _ in range(2):  # built, then read from the cache
        with pytest.raises(ValueError, match=r"1 of 2 samples invalid: last_turn_not_assistant 1.*") as error:
            dataset_from([data_path], processor, 512, image_folder, cache_dir=str(tmp_path / "cache"))
        assert "'bad'" in str(error.value)


def test_a_partial_or_unreadable_cache_is_rebuilt(parts, processor, tmp_path):
    data_path, image_folder = write_dataset(str(tmp_path / "data"))
    cache_dir = tmp_path / "cache"
    reference = items(dataset_from([data_path], processor, 512, image_folder, cache_dir=str(cache_dir)))
    (folder,) = [p for p in cache_dir.iterdir() if p.is_dir()]
    (folder / "input_ids.npy").write_bytes(b"\x93NUMPY truncated")  # killed while writing, say
    assert items(dataset_from([data_path], processor, 512, image_folder, cache_dir=str(cache_dir))) == reference
    (folder / "complete.json").unlink()  # never completed
    (folder / "samples.jsonl").write_text("")
    assert items(dataset_from([data_path], processor, 512, image_folder, cache_dir=str(cache_dir))) == reference


def _build_once(cache_dir: str, log: str) -> int:
    def build():
        with open(log, "a", encoding="utf-8") as f:
            f.write("built\n")
        return _prepared()
    return len(cached(cache_dir, "key", build).samples)


def _prepared():
    from llava.data.token_cache import PreparedData
    from llava.data.types import Sample

    encoded = [{"input_ids": np.arange(3, dtype=np.int32), "trained": np.array([0, 1, 1], dtype=bool),
                "image_tokens": np.zeros(0, dtype=np.int32)}]
    return PreparedData([Sample("a", "f[0]", [], [])], TokenStore.from_samples(encoded, [3]), [])


def test_processes_of_a_node_build_the_cache_once(tmp_path):
    log = str(tmp_path / "log")
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        counts = pool.starmap(_build_once, [(str(tmp_path / "cache"), log)] * 3)
    assert counts == [1, 1, 1]
    with open(log, encoding="utf-8") as f:
        assert f.read() == "built\n"
    assert not [name for name in os.listdir(tmp_path / "cache") if name.startswith(".")]  # no temporary left
