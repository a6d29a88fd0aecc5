"""Recompute the LM's MLP activations in the backward pass instead of keeping them: less memory, matmuls kept.

In a gated MLP (`down(act(gate(x)) * up(x))`, Llama/Qwen/Mistral/SmolLM), autograd keeps four hidden-size x4
tensors per token for the backward pass: gate(x) for the activation's derivative, act(gate(x)) and up(x) for the
product's, and the product itself for down's weight gradient. Wrapping each MLP in a selective checkpoint keeps
the matmul outputs and recomputes only the elementwise activation and product (two cheap operations) when the
backward pass reaches the layer, so two of those four tensors are never kept. Results are bitwise the same.
Full activation checkpointing (--gradient_checkpointing) recomputes everything, matmuls included, instead.
"""

from __future__ import annotations

from functools import partial

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

_MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


def _keep_matmul_outputs(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _MATMULS else CheckpointPolicy.PREFER_RECOMPUTE


def recompute_mlp_activations(language_model: torch.nn.Module) -> int:
    """Wrap the `mlp` of every decoder layer of `language_model` (see the module docstring); returns how many."""
    wrapped = 0
    for layer in getattr(language_model, "layers", []):
        mlp = getattr(layer, "mlp", None)
        if mlp is None:
            continue
        mlp.forward = partial(_selectively_checkpointed, mlp.forward)
        wrapped += 1
    return wrapped


def _selectively_checkpointed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():  # inference, evaluation: nothing is kept anyway
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False,
                      context_fn=partial(create_selective_checkpoint_contexts, _keep_matmul_outputs), **kwargs)
