"""Any causal LM: a tiny random model of every architecture in tests/families.py, with its family's published chat
template and one of the vision towers (rotated), goes through stage 1 (from parts) and stage 2 with the real CLI on
every sample kind of tests/test_conversation.py, shows exact masks in `llava.inspect_data --json`, answers with
`llava.generate`, and its output loads in plain transformers 5.x and 4.57 with no missing or unexpected weights and
the same logits."""

import json
import os

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from llava import generate, inspect_data
from llava.train import main
from llava.training.arguments import ModelArguments
from llava.training.build import base_model_for, processor_for
from tests.helpers.conversations import END_OF_TURN, samples, trained_runs
from tests.helpers.families import ARCHITECTURES, FAMILIES, FAMILY_OF, save_family_lm
from tests.helpers.portable import run_consumer
from tests.helpers.portable_consumer import consume
from tests.helpers.tiny_parts import write_dataset
from tests.helpers.tiny_towers import TOWERS

UNHOSTABLE = {"phi": "lm_head with a bias"}  # Phi-1/2: transformers' LLaVA has no lm_head bias
# Architectures whose image+text logits differ between transformers 4.57 and 5.x for the same weights, and why.
LOGITS_DIFFER_IN_4_57 = {
    "gemma2": "4.57 multiplies all input embeddings by sqrt(hidden) inside the model, image features included; 5.x "
              "scales token embeddings in the embedding layer only (text-only logits agree)",
}
STEPS = ["--per_device_train_batch_size", "3", "--max_steps", "1", "--save_strategy", "no", "--report_to", "none",
         "--learning_rate", "1e-2", "--seed", "0"]


def test_every_architecture_is_covered():
    assert set(FAMILY_OF) | set(UNHOSTABLE) == set(ARCHITECTURES)


def every_kind_dataset(folder: str, family: str) -> tuple[str, str]:
    """tests/test_conversation.py's sample kinds (the family's eos typed into an answer) as a LLaVA JSON file."""
    rename = {"a.png": "img0.png", "b.png": "img1.png"}
    records = []
    for kind, record in samples(FAMILIES[family].eos_token or "</s>").items():
        images = record.get("image", [])
        images = [rename[i] for i in ([images] if isinstance(images, str) else images)]
        records.append({"id": kind, **record, **({"image": images} if images else {})})
    return write_dataset(folder, records)


@pytest.fixture(scope="module")
def stage2_outputs(tmp_path_factory):
    """architecture -> (stage-2 output folder, its data file, its image folder), each trained from its own stage 1."""
    root = tmp_path_factory.mktemp("lm_families")
    towers = sorted(TOWERS)
    outputs = {}
    for index, (architecture, family) in enumerate(sorted(FAMILY_OF.items())):
        tower_builder = TOWERS[towers[index % len(towers)]][0]
        vision = tower_builder(str(root / f"vision_{architecture}"))
        lm = save_family_lm(family, str(root / f"lm_{architecture}"), architecture=architecture)
        data_path, image_folder = every_kind_dataset(str(root / f"data_{architecture}"), family)
        data = ["--data_path", data_path, "--image_folder", image_folder, *STEPS]
        stage1, stage2 = str(root / f"stage1_{architecture}"), str(root / f"stage2_{architecture}")
        main(["--vision_model_name_or_path", vision, "--language_model_name_or_path", lm,
              "--freeze_language_model", "True", "--output_dir", stage1, *data])
        main(["--model_name_or_path", stage1, "--freeze_language_model", "False", "--output_dir", stage2, *data])
        outputs[architecture] = (stage2, data_path, image_folder)
    return outputs


@pytest.mark.slow
@pytest.mark.parametrize("architecture", sorted(FAMILY_OF))
def test_trains_masks_generates_and_loads_in_transformers_5(stage2_outputs, architecture, capsys):
    folder, data_path, image_folder = stage2_outputs[architecture]
    inspect_data.main(["--model_name_or_path", folder, "--data_path", data_path, "--num_samples", "100", "--json"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    end_of_turn = END_OF_TURN[FAMILY_OF[architecture]]
    assert [line["id"] for line in lines] == list(samples(""))
    with open(data_path, encoding="utf-8") as f:
        records = json.load(f)
    for line, record in zip(lines, records):
        answers = [turn["value"] for turn in record["conversations"] if turn["from"] == "gpt"]
        decoded = [tokenizer.decode(run).lstrip(" ") for run in trained_runs(line)]
        assert decoded == [answer + end_of_turn for answer in answers], (architecture, line["id"])
    answer = generate.main(["--model_name_or_path", folder, "--image", os.path.join(image_folder, "img0.png"),
                            "--prompt", "Colour?", "--max_new_tokens", "3"])
    assert isinstance(answer, str) and capsys.readouterr().out.strip() == answer
    result = consume(folder, _image(image_folder), "What colour?")
    assert result["missing"] == [] and result["unexpected"] == []


@pytest.mark.slow
def test_every_architecture_loads_in_transformers_4_57_with_the_same_logits(parts, stage2_outputs, tmp_path):
    folders = {architecture: folder for architecture, (folder, _, _) in stage2_outputs.items()}
    # eager in both: 4.57's sdpa path skips Gemma 2's attention-logit softcapping (4.57 warns), 5.x picks eager.
    theirs = run_consumer({"folders": list(folders.values()), "question": "What colour?",
                           "image": os.path.join(parts["images"], "img0.png"), "attn_implementation": "eager"}, tmp_path)
    differences = {}
    for architecture, folder in folders.items():
        ours, old = consume(folder, _image(parts["images"]), "What colour?", "eager"), theirs[folder]
        assert old["missing"] == [] and old["unexpected"] == [], (architecture, old["missing"][:3], old["unexpected"][:3])
        assert torch.equal(old["input_ids"], ours["input_ids"]), architecture
        differences[architecture] = (old["logits"] - ours["logits"]).abs().max().item()
    assert all(difference < 1e-4 for architecture, difference in differences.items()
               if architecture not in LOGITS_DIFFER_IN_4_57), str(differences)
    assert all(differences[architecture] > 1e-4 for architecture in LOGITS_DIFFER_IN_4_57), str(differences)


def test_lm_head_with_bias_is_refused_with_the_fix(parts, tmp_path):
    lm = save_family_lm("phi4", str(tmp_path / "phi"), architecture="phi")
    args = ModelArguments(vision_model_name_or_path=parts["vision"], language_model_name_or_path=lm)
    with pytest.raises(ValueError, match="lm_head with a bias.*Phi-3/Phi-4"):
        base_model_for(args, processor_for(args))


def _image(image_folder: str) -> Image.Image:
    return Image.open(os.path.join(image_folder, "img0.png")).convert("RGB")
