"""Pretrain the demo's small CLIP vision tower to see colour and shape before any LLaVA training.

Why: a random tower that learns only through the language model barely learns at all in the demo's
budget (after 2,000 captioned images, at a full SmolLM2 forward+backward each, it carried 38 % colour and
40 % shape). Here the tower learns from direct labels instead: the colour and shape of each easy-VQA
*train* image, derived by `llava.demo.easy_vqa` (image_labels.json). Test images are only used for
the held-out probe at the end.

The heads read exactly what LLaVA will read with `vision_feature_layer=-2` and the "default" select
strategy: the penultimate layer's patch tokens (CLS dropped). They are mean-pooled, then two linear heads
predict colour and shape. The last encoder layer gets no gradient (LLaVA never uses its output) and is
skipped during training.

The output folder is an ordinary CLIP vision checkpoint: `CLIPVisionModel.from_pretrained(dir)` and
`AutoImageProcessor.from_pretrained(dir)` load it. `pretrain_report.json` records how it was made and the
probe accuracies.

Usage: python -m llava.demo.pretrain_vision --data_dir data/easy_vqa --output_dir DIR [--epochs N] [--max_minutes M]
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from tqdm import tqdm
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel, HfArgumentParser

DEFAULT_VISION_CONFIG = Path(__file__).with_name("vision_config.json")
ATTRIBUTES = ("colour", "shape")


@dataclass
class LabelledImages:
    """Preprocessed images of one split with class indices per attribute (-100 where unknown)."""

    pixel_values: torch.Tensor
    targets: dict[str, torch.Tensor]


def make_image_processor(config: CLIPVisionConfig) -> CLIPImageProcessorPil:
    """CLIP preprocessing at the tower's resolution. The PIL backend is used explicitly because the
    default (fast) backend needs torchvision; both save as `CLIPImageProcessor`, so whichever backend is
    installed loads the folder later."""
    side = config.image_size
    return CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})


def read_labels(data_dir: Path) -> tuple[Path, dict[str, list[dict]]]:
    """Image folder (meta.json) and per-split label records (image_labels.json) written by llava.demo.easy_vqa."""
    meta = json.loads((data_dir / "meta.json").read_text())
    return Path(meta["image_folder"]), json.loads((data_dir / "image_labels.json").read_text())


def class_names(records: list[dict]) -> dict[str, list[str]]:
    """Sorted class names per attribute, taken from the train labels."""
    return {a: sorted({r[a] for r in records if r[a] is not None}) for a in ATTRIBUTES}


def load_images(
    image_folder: Path, records: list[dict], classes: dict[str, list[str]], processor: CLIPImageProcessorPil, desc: str
) -> LabelledImages:
    """Preprocess every image once up front: PIL preprocessing costs more than a training step here."""
    pixels = []
    for start in tqdm(range(0, len(records), 256), desc=f"preprocess {desc}", unit="batch"):
        batch = [Image.open(image_folder / r["image"]).convert("RGB") for r in records[start : start + 256]]
        pixels.append(processor(images=batch, return_tensors="pt")["pixel_values"])
    targets = {
        a: torch.tensor([classes[a].index(r[a]) if r[a] in classes[a] else -100 for r in records]) for a in ATTRIBUTES
    }
    return LabelledImages(torch.cat(pixels), targets)


def penultimate_patch_tokens(tower: CLIPVisionModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """The penultimate layer's patch tokens, i.e. LLaVA's image features for `vision_feature_layer=-2` and
    strategy "default"; equal to `tower(..., output_hidden_states=True).hidden_states[-2][:, 1:]` without
    running the last layer."""
    hidden = tower.pre_layrnorm(tower.embeddings(pixel_values))
    for layer in tower.encoder.layers[:-1]:
        hidden = layer(hidden, None)
    return hidden[:, 1:]


class AttributeHeads(nn.Module):
    """Linear colour and shape classifiers on mean-pooled patch tokens: linear in what LLaVA's projector
    sees, so a good score means the features carry the attributes in an easily usable form."""

    def __init__(self, hidden_size: int, classes: dict[str, list[str]]):
        super().__init__()
        self.heads = nn.ModuleDict({a: nn.Linear(hidden_size, len(classes[a])) for a in ATTRIBUTES})

    def forward(self, patch_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = patch_tokens.mean(dim=1)
        return {a: head(pooled) for a, head in self.heads.items()}


def lr_at(progress: float, peak: float, warmup: float = 0.05) -> float:
    """Linear warmup over the first `warmup` of training, then cosine decay to zero."""
    if progress < warmup:
        return peak * progress / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (progress - warmup) / (1 - warmup)))


def train(
    tower: CLIPVisionModel,
    heads: AttributeHeads,
    data: LabelledImages,
    epochs: float,
    max_minutes: float | None,
    batch_size: int,
    lr: float,
    seed: int,
) -> dict[str, float | str]:
    """Train tower and heads jointly on the summed cross-entropies of both attributes.

    Progress is the larger of the fraction of `epochs` done and the fraction of `max_minutes` used, and
    the learning-rate schedule follows it: on a slower machine, a time limit still ends with a fully
    decayed learning rate instead of cutting training off mid-schedule."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW([*tower.parameters(), *heads.parameters()], lr=lr, weight_decay=0.05)
    loss_fn = nn.CrossEntropyLoss(ignore_index=-100)
    n = len(data.pixel_values)
    steps_per_epoch = math.ceil(n / batch_size)
    total = max(1, round(epochs * steps_per_epoch))
    budget = 60 * max_minutes if max_minutes else math.inf
    tower.train()
    heads.train()
    start, step, progress = time.monotonic(), 0, 0.0
    bar = tqdm(total=total, desc="pretrain vision", unit="step")
    while progress < 1:
        if step % steps_per_epoch == 0:
            order = torch.randperm(n, generator=generator)
        index = order[(step % steps_per_epoch) * batch_size :][:batch_size]
        logits = heads(penultimate_patch_tokens(tower, data.pixel_values[index]))
        losses = {a: loss_fn(logits[a], data.targets[a][index]) for a in ATTRIBUTES}
        for group in optimizer.param_groups:
            group["lr"] = lr_at(progress, lr)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()
        step += 1
        bar.update()
        bar.set_postfix({a: f"{loss.item():.3f}" for a, loss in losses.items()})
        progress = max(step / total, (time.monotonic() - start) / budget)
    bar.close()
    return {
        "steps": step,
        "epochs": step / steps_per_epoch,
        "seconds": time.monotonic() - start,
        "stopped_by": "epochs" if step >= total else "max_minutes",
    }


@torch.no_grad()
def pooled_features(tower: CLIPVisionModel, pixel_values: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Mean-pooled penultimate patch tokens, the features the probe reads."""
    tower.eval()
    batches = pixel_values.split(batch_size)
    return torch.cat([penultimate_patch_tokens(tower, batch).mean(1) for batch in batches])


def linear_probe(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, num_classes: int
) -> float:
    """Held-out accuracy of a fresh logistic regression fitted on frozen train features.

    Fitting a new classifier (rather than reusing the training head) measures what the features carry,
    which is what the LLaVA projector will have to work with."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    known = train_y >= 0
    probe = nn.Linear(train_x.shape[1], num_classes)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(probe(train_x[known]), train_y[known]) + 1e-4 * probe.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        scored = test_y >= 0
        return (probe(test_x[scored]).argmax(-1) == test_y[scored]).float().mean().item()


def probe_accuracies(
    tower: CLIPVisionModel, train_data: LabelledImages, test_data: LabelledImages, classes: dict[str, list[str]]
) -> dict[str, float]:
    train_x, test_x = pooled_features(tower, train_data.pixel_values), pooled_features(tower, test_data.pixel_values)
    return {
        a: linear_probe(train_x, train_data.targets[a], test_x, test_data.targets[a], len(classes[a]))
        for a in ATTRIBUTES
    }


@dataclass
class PretrainArguments:
    data_dir: Path = field(metadata={"help": "Output folder of llava.demo.easy_vqa."})
    output_dir: Path = field(metadata={"help": "Where the CLIP vision checkpoint and its image processor go."})
    vision_config: Path = field(default=DEFAULT_VISION_CONFIG, metadata={"help": "CLIPVisionConfig JSON file."})
    epochs: float = field(default=20.0, metadata={"help": "Passes over the train images."})
    max_minutes: float | None = field(
        default=None, metadata={"help": "Time limit for training; the learning-rate schedule follows it."})
    batch_size: int = field(default=64, metadata={"help": "Images per step."})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate."})
    seed: int = field(default=0, metadata={"help": "Seed of the tower's initialisation and the batch order."})


def main(argv: list[str] | None = None) -> None:
    (args,) = HfArgumentParser(PretrainArguments).parse_args_into_dataclasses(argv)
    torch.manual_seed(args.seed)
    config = CLIPVisionConfig.from_json_file(args.vision_config)
    processor = make_image_processor(config)
    image_folder, labels = read_labels(args.data_dir)
    classes = class_names(labels["train"])
    started = time.monotonic()
    train_data = load_images(image_folder, labels["train"], classes, processor, "train")
    test_data = load_images(image_folder, labels["test"], classes, processor, "test")
    preprocess_seconds = time.monotonic() - started

    tower = CLIPVisionModel(config)
    heads = AttributeHeads(config.hidden_size, classes)
    run = train(tower, heads, train_data, args.epochs, args.max_minutes, args.batch_size, args.learning_rate, args.seed)
    probe = probe_accuracies(tower, train_data, test_data, classes)

    tower.save_pretrained(args.output_dir)
    processor.save_pretrained(args.output_dir)
    report = {
        "vision_config": config.to_diff_dict(),
        "image_tokens": (config.image_size // config.patch_size) ** 2,
        "train_images": len(train_data.pixel_values),
        "probe_test_images": len(test_data.pixel_values),
        "classes": classes,
        "probe_accuracy": probe,
        "preprocess_seconds": preprocess_seconds,
        "torch_threads": torch.get_num_threads(),
        **{f"train_{k}": v for k, v in run.items()},
        "total_seconds": time.monotonic() - started,
    }
    (args.output_dir / "pretrain_report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(
        f"held-out linear probe on mean-pooled penultimate patch tokens ({len(test_data.pixel_values)} test images): "
        + ", ".join(f"{a} {acc:.1%}" for a, acc in probe.items())
    )
    print(f"train {run['seconds']:.0f} s, total {report['total_seconds']:.0f} s; saved to {args.output_dir}")


if __name__ == "__main__":
    main()
