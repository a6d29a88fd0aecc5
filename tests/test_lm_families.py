"""Any causal LM: a tiny random model of every architecture in tests/families.py, with its family's published chat
template and one of the vision towers (rotated), goes through stage 1 (from parts) and stage 2 with the real CLI,
answers with `llava.generate`, and its output loads in plain transformers 5.x and 4.57 with no missing or
unexpected weights and the same logits."""

import json
import os
import subprocess

import pytest
import torch
from PIL import Image

from llava import generate
from llava.arguments import ModelArguments
from llava.model import assemble_llava
from llava.processor import build_processor
from llava.train import main
from tests.families import ARCHITECTURES, save_family_lm
from tests.portable_consumer import consume
from tests.test_portable import consumer_python
from tests.tiny_towers import TOWERS

# architecture -> the family whose template it is tested with (its real models' template where we ship one)
FAMILY_OF = {"llama": "llama3_2", "qwen2": "qwen2_5", "qwen3": "qwen3", "mistral": "mistral_v0_3",
             "mixtral": "mixtral_v0_1", "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3",
             "gpt_neox": "smollm2", "opt": "vicuna_v1", "gpt2": "deepseek_r1_distill"}
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


@pytest.fixture(scope="module")
def stage2_outputs(parts, tmp_path_factory):
    """architecture -> stage-2 output folder, each trained from its own stage 1."""
    root = tmp_path_factory.mktemp("lm_families")
    towers = sorted(TOWERS)
    outputs = {}
    for index, (architecture, family) in enumerate(sorted(FAMILY_OF.items())):
        tower_builder = TOWERS[towers[index % len(towers)]][0]
        vision = tower_builder(str(root / f"vision_{architecture}"))
        lm = save_family_lm(family, str(root / f"lm_{architecture}"), architecture=architecture)
        data = ["--data_path", parts["data"], "--image_folder", parts["images"], *STEPS]
        stage1, stage2 = str(root / f"stage1_{architecture}"), str(root / f"stage2_{architecture}")
        main(["--vision_model_name_or_path", vision, "--language_model_name_or_path", lm,
              "--freeze_language_model", "True", "--output_dir", stage1, *data])
        main(["--model_name_or_path", stage1, "--freeze_language_model", "False", "--output_dir", stage2, *data])
        outputs[architecture] = stage2
    return outputs


@pytest.mark.slow
@pytest.mark.parametrize("architecture", sorted(FAMILY_OF))
def test_trains_generates_and_loads_in_transformers_5(parts, stage2_outputs, architecture, capsys):
    answer = generate.main(["--model_name_or_path", stage2_outputs[architecture], "--image",
                            os.path.join(parts["images"], "img0.png"), "--prompt", "Colour?", "--max_new_tokens", "3"])
    assert isinstance(answer, str) and capsys.readouterr().out.strip() == answer
    result = consume(stage2_outputs[architecture], _image(parts), "What colour?")
    assert result["missing"] == [] and result["unexpected"] == []


@pytest.mark.slow
def test_every_architecture_loads_in_transformers_4_57_with_the_same_logits(parts, stage2_outputs, tmp_path):
    spec, result_path = tmp_path / "spec.json", tmp_path / "result.pt"
    # eager in both: 4.57's sdpa path skips Gemma 2's attention-logit softcapping (4.57 warns), 5.x picks eager.
    spec.write_text(json.dumps({"folders": list(stage2_outputs.values()), "question": "What colour?",
                                "image": os.path.join(parts["images"], "img0.png"), "attn_implementation": "eager"}))
    subprocess.run([consumer_python(), os.path.join(os.path.dirname(__file__), "portable_consumer.py"), str(spec),
                    str(result_path)], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    theirs = torch.load(result_path, weights_only=False)
    assert theirs["transformers"].startswith("4.57")
    differences = {}
    for architecture, folder in stage2_outputs.items():
        ours, old = consume(folder, _image(parts), "What colour?", "eager"), theirs["results"][folder]
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
        assemble_llava(args, build_processor(args))


def _image(parts) -> Image.Image:
    return Image.open(os.path.join(parts["images"], "img0.png")).convert("RGB")
