"""Recomputing the MLP's elementwise activations keeps less for the backward pass and changes no gradient."""

import copy

import torch

from llava.model.mlp_recompute import recompute_mlp_activations
from tests.helpers.tiny_parts import assemble, batch


def saved_bytes_and_grads(model, inputs):
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**inputs).loss
    loss.backward()
    return sum(saved), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_mlp_recomputation_saves_memory_and_keeps_gradients(parts):
    model, processor = assemble(parts)
    model.train()
    inputs = batch(parts, processor)
    plain_bytes, plain_grads = saved_bytes_and_grads(model, inputs)
    recomputing = copy.deepcopy(model)
    assert recompute_mlp_activations(recomputing.model.language_model) == len(model.model.language_model.layers)
    recomputing_bytes, recomputing_grads = saved_bytes_and_grads(recomputing, inputs)
    assert recomputing_bytes < plain_bytes
    assert plain_grads.keys() == recomputing_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(recomputing_grads[name], grad, rtol=0, atol=0, msg=name)
