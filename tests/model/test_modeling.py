import torch
import transformers
from safetensors.torch import load_file

from llava.model import modeling
from llava.model.components import components, parameter_table, set_trainable
from llava.model.modeling import LlavaForConditionalGeneration
from tests.helpers.tiny_parts import TOKENS_PER_IMAGE, assemble, batch, save_vision_model


def test_assembly_copies_pretrained_weights_and_adds_image_token(parts):
    model, processor = assemble(parts)
    lm_source = load_file(f"{parts['lm']}/model.safetensors")
    vision_source = transformers.CLIPVisionModel.from_pretrained(parts["vision"]).state_dict()
    n_vocab = lm_source["model.embed_tokens.weight"].shape[0]
    assert processor.image_token_id == n_vocab  # appended, not a hard-coded id
    assert model.config.text_config.vocab_size == n_vocab + 1
    embed = model.model.language_model.embed_tokens.weight
    assert torch.equal(embed[:n_vocab], lm_source["model.embed_tokens.weight"])
    assert torch.equal(model.lm_head.weight[:n_vocab], lm_source["lm_head.weight"])
    for name, tensor in model.model.language_model.state_dict().items():
        if name != "embed_tokens.weight":
            assert torch.equal(tensor, lm_source[f"model.{name}"]), name
    for name, tensor in model.model.vision_tower.state_dict().items():
        assert torch.equal(tensor, vision_source[name]), name
    assert processor.num_additional_image_tokens == 1 and processor.vision_feature_select_strategy == "default"
    assert model.config.vision_feature_layer == -2 and model.config.image_seq_length == TOKENS_PER_IMAGE


def test_full_clip_checkpoint_gives_its_vision_part(parts, tmp_path):
    full_clip = save_vision_model(str(tmp_path / "clip"), full_clip=True)
    model, _ = assemble(parts, vision=full_clip)
    reference = transformers.CLIPModel.from_pretrained(full_clip).vision_model.state_dict()
    for name, tensor in model.model.vision_tower.state_dict().items():
        assert torch.equal(tensor, reference[name]), name


def test_loss_on_trained_positions_equals_upstream_full_logits_loss(parts):
    model, processor = assemble(parts)
    inputs = batch(parts, processor)
    ours = model(**inputs).loss
    upstream = transformers.LlavaForConditionalGeneration.forward(model, **inputs).loss
    torch.testing.assert_close(ours, upstream, rtol=1e-5, atol=1e-6)
    count = torch.tensor(37)  # the Trainer passes the token count of the whole accumulated batch
    torch.testing.assert_close(model(**inputs, num_items_in_batch=count).loss,
                               transformers.LlavaForConditionalGeneration.forward(
                                   model, **inputs, num_items_in_batch=count).loss, rtol=1e-5, atol=1e-6)


def test_loss_in_chunks_gives_the_same_loss_and_gradients(parts, monkeypatch):
    """A batch whose trained logits exceed the budget computes its loss chunk by chunk (logits recomputed in
    backward): same loss and gradients as in one piece."""
    model, processor = assemble(parts)
    set_trainable(model, vision_tower=True, projector=True, language_model=True)
    inputs = batch(parts, processor)
    results = []
    for budget in (1 << 40, 1):  # one piece; chunks of 256 trained tokens (the floor)
        monkeypatch.setattr(modeling, "_LOSS_CHUNK_LOGITS", budget)
        model.zero_grad(set_to_none=True)
        repeated = {name: torch.cat([value] * 40) for name, value in inputs.items()}  # > 256 trained tokens
        outputs = model(**repeated)
        outputs.loss.backward()
        results.append((outputs.loss.detach(), outputs.logits,
                        {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}))
    (whole, logits, whole_grads), (chunked, no_logits, chunked_grads) = results
    assert logits is not None and logits.shape[0] > 256 and no_logits is None
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    assert whole_grads.keys() == chunked_grads.keys() and len(whole_grads) > 10
    for name, grad in whole_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_loss_is_one_piece_where_processes_shard_weights(parts, monkeypatch):
    """Under FSDP / ZeRO-3 every lm_head pass gathers its weight collectively: ranks with different trained-token
    counts would make different numbers of chunk passes and fall out of step, so the loss is never chunked there."""
    model, processor = assemble(parts)
    inputs = {name: torch.cat([value] * 40) for name, value in batch(parts, processor).items()}
    monkeypatch.setattr(modeling, "_LOSS_CHUNK_LOGITS", 1)
    assert model(**inputs).logits is None
    monkeypatch.setattr(modeling, "multi_process", lambda: True)
    monkeypatch.setattr(modeling, "parameters_sharded", lambda module: True)
    assert model(**inputs).logits.shape[0] > 256


def test_frozen_tower_builds_no_graph_and_unfrozen_tower_trains(parts):
    model, processor = assemble(parts)
    inputs = batch(parts, processor)
    seen = {}
    model.model.vision_tower.register_forward_hook(
        lambda module, args, output: seen.update(requires_grad=output.last_hidden_state.requires_grad))
    for train_tower in (False, True):
        set_trainable(model, vision_tower=train_tower, projector=True, language_model=False)
        model.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()
        assert seen["requires_grad"] is train_tower
        # layers above vision_feature_layer (-2) do not feed the projector, so look at the patch embedding
        patch_grad = model.model.vision_tower.embeddings.patch_embedding.weight.grad
        assert (patch_grad is not None and patch_grad.abs().sum() > 0) if train_tower else patch_grad is None
        assert all(p.grad is None for p in model.model.language_model.parameters())
        assert all(p.grad is not None for p in model.model.multi_modal_projector.parameters())


def test_parameter_table_counts_each_component_with_its_learning_rate(parts):
    model, _ = assemble(parts)
    set_trainable(model, vision_tower=False, projector=True, language_model=False)
    table = parameter_table(model, {"vision_tower": 1e-4, "projector": 2e-3, "language_model": 1.0, "lm_head": 1.0})
    projector = sum(p.numel() for p in components(model)["projector"].parameters())
    rows = [line.split() for line in table.splitlines()]
    assert rows[0] == ["group", "parameters", "trainable", "lr"]
    assert rows[2] == ["projector", f"{projector:,}", f"{projector:,}", "0.002"]
    assert [row[-1] for row in rows[1:5]] == ["frozen", "0.002", "frozen", "frozen"]  # no rate where nothing trains
    assert rows[-1] == ["total", rows[-1][1], f"{projector:,}"]


def test_checkpoint_class_name_is_upstream():
    assert LlavaForConditionalGeneration.__name__ == transformers.LlavaForConditionalGeneration.__name__


def test_no_split_classes_are_those_present_for_fsdp_auto_wrap(llava_checkpoint):
    # CLIP's class attribute also names CLIPTextEmbeddings; FSDP's auto wrap raises for a class it cannot find.
    model = LlavaForConditionalGeneration.from_pretrained(llava_checkpoint)
    assert model._no_split_modules == {"CLIPEncoderLayer", "CLIPVisionEmbeddings", "LlamaDecoderLayer"}


def test_shared_prefix_stops_at_images_differences_padding_and_trained_targets(parts):
    model, processor = assemble(parts)
    image = model.config.image_token_id
    ids = torch.tensor([[5] * 10 + [image, 7, 8], [5] * 10 + [image, 7, 9]])
    untrained = torch.full_like(ids, -100)
    mask = torch.ones_like(ids)

    def shared(ids=ids, mask=mask, labels=untrained):  # as forward calls it: the last token is only a target
        return model._shared_prefix_length(ids[:, :-1], mask[:, :-1], labels[:, 1:], {})

    assert shared() == 10  # up to the first image token
    differ = ids.clone()
    differ[1, 9] = 6
    assert shared(differ) == 9
    padded = mask.clone()
    padded[0, 9:] = 0
    assert shared(mask=padded) == 9
    trained = untrained.clone()
    trained[1, 9] = 5  # position 8's hidden state predicts it, so it must come out of the LM for every row
    assert shared(labels=trained) == 8
    trained[1, 4] = 5
    assert shared(labels=trained) == 0  # shorter than the minimum worth a separate pass
    assert shared(ids[:1], mask[:1], untrained[:1]) == 0  # one row: nothing to share
    model.gradient_checkpointing_enable()
    assert shared() == 0  # checkpointed layers drop the cache that would carry the prefix
    model.gradient_checkpointing_disable()
    model.train()
    model.config.text_config.attention_dropout = 0.1
    assert shared() == 0  # rows would share one dropout mask
