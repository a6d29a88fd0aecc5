"""Exact packing and token-budget batches (`llava.data.packing`): a packed batch trains exactly as the padded batch of the
same samples (loss and every gradient, eager, sdpa and a flash-style varlen kernel; a few real CLI steps), the plans
keep their promises, and conflicting flags are refused with the fix."""

import random

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from llava.data.collator import LlavaDataCollator, PackingCollator, WholeBatches
from llava.data.packing import PlannedDataset, pack_rows, planned_batches, token_budget_batches
from llava.model.building import check_exact_packing
from llava.model.components import set_trainable
from llava.model.modeling import LlavaForConditionalGeneration
from llava.train import main
from llava.training import run as training_run
from llava.training.arguments import ModelArguments
from llava.training.build import base_model_for, processor_for
from llava.training.parsing import parse_args
from tests.helpers.families import FAMILY_OF, save_family_lm
from tests.helpers.tiny_parts import conversation_records, dataset_from, write_dataset

ROW = 100  # tokens per packed row in these tests: the six samples (18 to 57 tokens) make three rows


def assemble(parts, attention):
    args = ModelArguments(vision_model_name_or_path=parts["vision"], language_model_name_or_path=parts["lm"],
                          attn_implementation=attention)
    processor = processor_for(args)
    model = base_model_for(args, processor)
    set_trainable(model, vision_tower=True, projector=True, language_model=True)
    return model.train(), processor


def loss_and_grads(model, batch, num_items):
    model.zero_grad(set_to_none=True)
    loss = model(**batch, num_items_in_batch=num_items).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_training_signal(model, packed, padded):
    """Same loss and gradients for both batches, normalised by the same token count (as the Trainer does)."""
    num_items = padded["labels"][:, 1:].ne(-100).sum()
    assert packed["labels"][:, 1:].ne(-100).sum() == num_items  # what the Trainer counts for num_items_in_batch
    packed_loss, packed_grads = loss_and_grads(model, packed, num_items)
    padded_loss, padded_grads = loss_and_grads(model, padded, num_items)
    torch.testing.assert_close(packed_loss, padded_loss, rtol=0, atol=1e-5)
    assert packed_grads.keys() == padded_grads.keys() and len(packed_grads) > 10
    worst = max((packed_grads[n] - padded_grads[n]).abs().max().item() for n in padded_grads)
    assert worst <= 1e-5, worst


def packed_and_padded(parts, processor):
    """The six test samples (image+text, text-only, two images, ...) as packed rows and as one padded batch."""
    dataset = dataset_from([parts["data"]], processor, 512, parts["images"])
    rows = pack_rows(dataset.lengths, ROW, seed=0)
    assert len(rows) == 3 and any(len(row) > 1 for row in rows)
    assert len({sum(dataset.lengths[i] for i in row) for row in rows}) > 1  # so shorter rows are padded
    pad = processor.tokenizer.pad_token_id
    planned = PlannedDataset(dataset, rows, [sum(dataset.lengths[i] for i in row) for row in rows])
    packed = PackingCollator(pad)([planned[r] for r in range(len(planned))])
    padded = LlavaDataCollator(pad)([dataset[i] for row in rows for i in row])
    return packed, padded


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_packed_batch_trains_exactly_as_padded_batch(parts, attention):
    model, processor = assemble(parts, attention)
    packed, padded = packed_and_padded(parts, processor)
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] == 3
    assert_same_training_signal(model, packed, padded)


@pytest.mark.parametrize("architecture", sorted(FAMILY_OF))
def test_every_lm_architecture_packs_exactly_or_is_refused(parts, architecture, tmp_path):
    """OPT's decoder (transformers 5.x) builds its attention mask without the position_ids, so packed samples would
    see each other: `check_exact_packing` refuses it. Every other architecture packs exactly."""
    lm = save_family_lm(FAMILY_OF[architecture], str(tmp_path / "lm"), architecture=architecture)
    args = ModelArguments(vision_model_name_or_path=parts["vision"], language_model_name_or_path=lm)
    processor = processor_for(args)
    model = base_model_for(args, processor).eval()  # GPT-2's dropout would draw different masks for each layout
    set_trainable(model, vision_tower=False, projector=True, language_model=True)
    if architecture == "opt":
        with pytest.raises(ValueError, match="OPTModel does not keep packed samples apart"):
            check_exact_packing(model)
        return
    check_exact_packing(model)
    records = [r for r in conversation_records() if r["conversations"][0]["from"] != "system"]
    data, images = write_dataset(str(tmp_path / "data"), records)
    dataset = dataset_from([data], processor, 512, images)
    rows = pack_rows(dataset.lengths, 2 * max(dataset.lengths), seed=0)
    pad = processor.tokenizer.pad_token_id
    packed = PackingCollator(pad)([[dataset[i] for i in row] for row in rows])
    assert_same_training_signal(model, packed, LlavaDataCollator(pad)([dataset[i] for row in rows for i in row]))


calls: list = []  # the boundaries each `varlen_reference` call got


def varlen_reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seq_lens_q=None,
                     **kwargs):
    """What flash attention's varlen kernel computes: the (B, T) rows flattened, causal attention inside each
    `cu_seq_lens_q` segment only."""
    assert attention_mask is None and cu_seq_lens_q is not None
    calls.append(cu_seq_lens_q.tolist())
    batch, heads, length, dim = query.shape
    flat = [x.transpose(1, 2).reshape(batch * length, x.shape[1], dim) for x in (query, key, value)]
    out = torch.empty_like(flat[0])
    for start, end in zip(cu_seq_lens_q[:-1].tolist(), cu_seq_lens_q[1:].tolist()):
        q, k, v = (x[start:end].transpose(0, 1) for x in flat)
        out[start:end] = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling,
                                                        enable_gqa=True).transpose(0, 1)
    return out.view(batch, length, heads, dim), None


def test_flash_style_varlen_gets_every_sample_and_padding_as_its_own_sequence(parts):
    """flash_attention_2 cannot run on CPU: a pure-torch varlen kernel stands in, registered under a name that
    transformers treats as flash attention, to check the boundaries the model hands it."""
    AttentionInterface.register("flash_varlen_reference", varlen_reference)
    model, processor = assemble(parts, "sdpa")
    packed, padded = packed_and_padded(parts, processor)
    model.model.language_model.config._attn_implementation = "flash_varlen_reference"
    calls.clear()
    num_items = padded["labels"][:, 1:].ne(-100).sum()
    packed_loss, packed_grads = loss_and_grads(model, packed, num_items)
    assert calls
    positions = packed["position_ids"][:, :-1].reshape(-1)  # forward drops the last position
    assert calls[0] == [*positions.eq(0).nonzero().view(-1).tolist(), positions.numel()]
    model.model.language_model.config._attn_implementation = "sdpa"
    padded_loss, padded_grads = loss_and_grads(model, padded, num_items)
    torch.testing.assert_close(packed_loss, padded_loss, rtol=0, atol=1e-5)
    assert max((packed_grads[n] - padded_grads[n]).abs().max().item() for n in padded_grads) <= 1e-5


def test_packing_collator_restarts_positions_and_untrains_sample_starts():
    def item(ids, images=0):
        out = {"input_ids": torch.tensor(ids), "labels": torch.tensor(ids)}  # every token trained
        if images:
            out["pixel_values"] = torch.full((images, 3, 2, 2), float(ids[0]))
        return out

    batch = PackingCollator(pad_token_id=0)([[item([1, 2, 3], 1), item([4, 5])], [item([6, 7], 2)]])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5], [-100, 7, -100, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [1.0, 6.0, 6.0]  # the order of the image tokens


def test_shared_prefix_is_not_used_under_packing(parts, monkeypatch):
    model, _ = assemble(parts, "sdpa")
    model.eval()
    shared = []
    prefix_cache = LlavaForConditionalGeneration._prefix_cache
    monkeypatch.setattr(LlavaForConditionalGeneration, "_prefix_cache",
                        lambda self, ids, length: shared.append(length) or prefix_cache(self, ids, length))
    ids = torch.tensor([[5] * 10 + [7, 8, 9], [5] * 10 + [7, 9, 8]])
    labels = torch.full_like(ids, -100)
    labels[:, -2:] = ids[:, -2:]
    model(input_ids=ids, labels=labels)
    assert shared == [10]  # the rows' common start is shared when unpacked...
    model(input_ids=ids, labels=labels, position_ids=torch.arange(13).expand(2, -1))
    assert shared == [10]  # ...never when positions come with the batch (packed rows)


def test_packing_plan_keeps_whole_samples_within_rows_deterministically():
    lengths = [random.Random(1).randint(1, 120) for _ in range(500)] + [128, 128, 1]
    rows = pack_rows(lengths, 128, seed=3)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))  # every sample once per epoch
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    assert rows == pack_rows(lengths, 128, seed=3)
    assert len(rows) <= -(-sum(lengths) // 128) * 1.1  # close to the fewest rows possible
    ties = [5] * 30
    assert pack_rows(ties, 12, seed=0) != pack_rows(ties, 12, seed=1)  # the seed decides who shares a row
    with pytest.raises(ValueError, match="more than the 128"):
        pack_rows([129], 128, seed=0)


def test_token_budget_bounds_every_batch():
    lengths = [random.Random(2).randint(1, 200) for _ in range(300)]
    batches = token_budget_batches(lengths, 500, seed=0)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    assert all(len(batch) * max(lengths[i] for i in batch) <= 500 for batch in batches)
    assert batches == token_budget_batches(lengths, 500, seed=0)


@pytest.fixture(scope="module")
def twelve_samples(parts, tmp_path_factory):
    data, images = write_dataset(str(tmp_path_factory.mktemp("twelve")), conversation_records() * 2)
    return {**parts, "data": data, "images": images}


def train_run(parts, output_dir, *flags):
    trainer = main(["--vision_model_name_or_path", parts["vision"], "--language_model_name_or_path", parts["lm"],
                    "--data_path", parts["data"], "--image_folder", parts["images"], "--output_dir", output_dir,
                    "--model_max_length", str(ROW), "--freeze_vision_model", "True", "--freeze_language_model",
                    "False", "--learning_rate", "1e-2", "--logging_steps", "1", "--save_strategy", "no",
                    "--report_to", "none", "--seed", "0", "--data_cache_dir", "none", *flags])
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return trainer, losses


def test_packed_cli_run_equals_unpacked_run_of_the_same_batches(twelve_samples, tmp_path, monkeypatch):
    """Packed: two rows per step. Unpacked reference: each step one padded batch of exactly those rows' samples
    (the packing plan, regrouped, fed through `LlavaDataCollator`)."""
    packed_trainer, packed = train_run(twelve_samples, str(tmp_path / "packed"), "--packing", "True",
                                       "--per_device_train_batch_size", "2", "--max_steps", "3",
                                       "--train_sampling_strategy", "sequential")
    rows = packed_trainer.train_dataset.groups
    assert len(rows) == 6 and sum(map(len, rows)) == 12

    def same_samples_unpacked(dataset, pad_token_id, *args):
        steps = [rows[i] + rows[i + 1] for i in range(0, len(rows), 2)]
        return PlannedDataset(dataset, steps, [0] * len(steps)), WholeBatches(LlavaDataCollator(pad_token_id))

    monkeypatch.setattr(training_run, "planned_batches", same_samples_unpacked)
    unpacked_trainer, unpacked = train_run(twelve_samples, str(tmp_path / "unpacked"),
                                           "--per_device_train_batch_size", "1", "--max_steps", "3",
                                           "--train_sampling_strategy", "sequential")
    assert len(packed) == len(unpacked) == 3 and packed[-1] < packed[0]
    assert max(abs(a - b) for a, b in zip(packed, unpacked)) <= 1e-5
    after = unpacked_trainer.model.state_dict()
    assert max((t - after[n]).abs().max().item() for n, t in packed_trainer.model.state_dict().items()) <= 1e-5


def test_token_budget_cli_run_bounds_every_batch(twelve_samples, tmp_path):
    trainer, losses = train_run(twelve_samples, str(tmp_path / "budget"), "--packing", "True",
                                "--max_tokens_per_batch", "250", "--per_device_train_batch_size", "1",
                                "--max_steps", "2")
    assert len(losses) == 2
    sizes = [batch["input_ids"].numel() for batch in trainer.get_train_dataloader()]
    assert len(sizes) == len(trainer.train_dataset) and max(sizes) <= 250 and min(sizes) >= ROW // 2


PARTS = ["--vision_model_name_or_path", "V", "--language_model_name_or_path", "L", "--data_path", "d.json",
         "--output_dir", "out"]


@pytest.mark.parametrize("flags, message", [
    (["--max_tokens_per_batch", "4096"], "pass --per_device_train_batch_size 1"),
    (["--max_tokens_per_batch", "0", "--per_device_train_batch_size", "1"], "must be positive"),
    (["--packing", "True", "--train_sampling_strategy", "batch_rebalance"], "use group_by_length or random"),
])
def test_conflicting_flags_are_refused_with_the_fix(flags, message):
    with pytest.raises(ValueError, match=message):
        parse_args(PARTS + flags)


def test_budget_below_the_longest_sample_is_refused(parts):
    processor = processor_for(ModelArguments(vision_model_name_or_path=parts["vision"],
                                               language_model_name_or_path=parts["lm"]))
    dataset = dataset_from([parts["data"]], processor, 512, parts["images"])
    with pytest.raises(ValueError, match=r"longest sample \(57 tokens\).*Raise --max_tokens_per_batch"):
        planned_batches(dataset, 0, 512, False, 50, 0)
    with pytest.raises(ValueError, match=r"longest packed row"):
        planned_batches(dataset, 0, ROW, True, 60, 0)
