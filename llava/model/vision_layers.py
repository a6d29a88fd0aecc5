"""Partial vision tuning (--vision_tune_last_n_layers): which modules of the vision tower train when only its last
layers do.

Layers are counted on the tower's real encoder layer list, the modules whose outputs are its hidden states (what
`vision_feature_layer` indexes): CLIP's and SigLIP's `encoder.layers`, DINOv2's `encoder.layer`. Only the layers
that feed the projector count: with LLaVA-1.5's `vision_feature_layer` -2 the last layer's output is never read,
so "the last 2 layers" are the two below it. What follows the encoder (CLIP's and SigLIP's `post_layernorm`,
DINOv2's `layernorm`, SigLIP's pooling head) is not part of any hidden state and stays frozen; the embeddings (and
CLIP's `pre_layrnorm`) train only when every feeding layer does, which trains the whole tower.
"""

from __future__ import annotations

import torch

from llava.data.types import ConfigurationError
from llava.model.components import components, module_name


def encoder_layers(tower: torch.nn.Module) -> list[torch.nn.Module]:
    """The tower's encoder layers in order: the modules of the class its `hidden_states` are recorded from.

    Raises:
        ConfigurationError: the tower's class declares no such layer class (not a supported family).
    """
    recorded = (getattr(type(tower), "_can_record_outputs", None) or {}).get("hidden_states")
    layers = [module for module in tower.modules() if isinstance(recorded, type) and isinstance(module, recorded)]
    if not layers:
        raise ConfigurationError(f"--vision_tune_last_n_layers: the vision tower {type(tower).__name__} has no "
                                 "encoder layer list this toolkit knows (CLIP, SigLIP and DINOv2 towers have). "
                                 "Train the whole tower (--freeze_vision_model False) instead.")
    return layers


def feeding_layer_count(model: torch.nn.Module) -> int:
    """How many of the tower's first encoder layers feed the projector: up to the deepest hidden state
    `vision_feature_layer` selects (hidden state 0 is the embeddings' output, hidden state i layer i's)."""
    count = len(encoder_layers(components(model)["vision_tower"]))
    selected = model.config.vision_feature_layer
    indices = selected if isinstance(selected, list) else [selected]
    return max(index % (count + 1) for index in indices)


def tuned_vision_modules(model: torch.nn.Module, last_n_layers: int | None) -> list[str]:
    """Full names of the tower modules that train: its last `last_n_layers` feeding layers, or the whole tower
    when that is every feeding layer (or None).

    Raises:
        ConfigurationError: `last_n_layers` is more than the feeding layers (the message gives their count).
    """
    tower = components(model)["vision_tower"]
    if last_n_layers is None:
        return [module_name(model, "vision_tower")]
    layers, feeding = encoder_layers(tower), feeding_layer_count(model)
    if last_n_layers > feeding:
        raise ConfigurationError(
            f"--vision_tune_last_n_layers {last_n_layers}: the {type(tower).__name__} tower has {len(layers)} "
            f"encoder layers, of which {feeding} feed the projector (--vision_feature_layer "
            f"{model.config.vision_feature_layer}). Pass at most {feeding} ({feeding} trains the whole tower).")
    if last_n_layers == feeding:
        return [module_name(model, "vision_tower")]
    names = {id(module): name for name, module in model.named_modules()}
    return [names[id(layer)] for layer in layers[feeding - last_n_layers:feeding]]


def train_last_vision_layers(model: torch.nn.Module, last_n_layers: int) -> None:
    """Make only `tuned_vision_modules` of the tower trainable (the rest of the model is left as it is)."""
    components(model)["vision_tower"].requires_grad_(False)
    for name in tuned_vision_modules(model, last_n_layers):
        model.get_submodule(name).requires_grad_(True)
