"""Outputs load elsewhere: llava-hf tensor names on disk, transformers 4.57 reads every output like 5.x does.

The 4.57 side runs `tests/helpers/portable_consumer.py` in a separate venv (`consumer_python`), built once and cached in
$TRAIN_LLAVA_CACHE (default ~/.cache/train_llava): `venv --system-site-packages` reuses this environment's torch,
and pip installs transformers 4.57 with its tokenizers/huggingface_hub into the venv, shadowing ours.
"""

import json
import os

import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file

from llava.model.building import load_llava
from llava.model.hub_format import save_processor
from llava.model.modeling import LlavaForConditionalGeneration
from llava.train import main
from llava.training.arguments import ModelArguments
from llava.training.build import processor_for
from tests.helpers.outputs import assert_loads_and_generates, assert_pipeline_answers
from tests.helpers.portable import HUB_PREFIXES, run_consumer, tensor_names
from tests.helpers.portable_consumer import consume, preprocess
from tests.helpers.tiny_parts import save_language_model
from tests.helpers.tiny_towers import TOWERS

TRAIN = ["--per_device_train_batch_size", "2", "--logging_steps", "1", "--save_steps", "2", "--max_steps", "3",
         "--learning_rate", "1e-2", "--report_to", "none", "--seed", "0"]
QUESTION = "What colour is it?"


def tied_lm_with_backend_tokenizer(path: str) -> str:
    """A tied-embeddings LM with Qwen2's rotary base (1e6; 4.x's default is 1e4) whose tokenizer_config names
    "TokenizersBackend", as transformers 5.x writes for most hub tokenizers (the class 4.x cannot import)."""
    save_language_model(path, tie=True, rope_theta=1e6)
    config_path = os.path.join(path, "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump({**config, "tokenizer_class": "TokenizersBackend"}, f)
    return path


@pytest.fixture(scope="module")
def outputs(parts, tmp_path_factory):
    """A full run's final output and checkpoint-2, and a LoRA run's merged output (tied LM) with its base."""
    root = tmp_path_factory.mktemp("portable")
    data = ["--vision_model_name_or_path", parts["vision"], "--data_path", parts["data"],
            "--image_folder", parts["images"], *TRAIN]
    full, lora = str(root / "full"), str(root / "lora")
    main(["--language_model_name_or_path", parts["lm"], "--freeze_vision_model", "True",
          "--freeze_language_model", "False", "--output_dir", full, *data])
    main(["--language_model_name_or_path", tied_lm_with_backend_tokenizer(str(root / "lm_tied")),
          "--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8", "--merge_lora", "True",
          "--output_dir", lora, *data])
    return {"final": full, "checkpoint": os.path.join(full, "checkpoint-2"), "merged": lora,
            "lora_base": os.path.join(lora, "base_model")}


def read_json(folder: str, name: str) -> dict:
    with open(os.path.join(folder, name), encoding="utf-8") as f:
        return json.load(f)


def test_every_output_holds_llava_hf_names(outputs):
    for kind, folder in outputs.items():
        names = tensor_names(folder)
        assert all(name.startswith(HUB_PREFIXES) for name in names), (kind, names[:5])
        assert ("language_model.lm_head.weight" in names) == (kind in ("final", "checkpoint")), kind  # tied: left out


@pytest.mark.parametrize("protobuf", [True, False], ids=["with_protobuf", "without_protobuf"])
def test_transformers_4_57_loads_every_output_as_5x_does(outputs, parts, tmp_path, protobuf):
    """The tiny LM's tokenizer lists extra special tokens (as Qwen's and Llama's do), which 5.x saves in a form 4.x
    cannot read; without protobuf 4.57 would also misreport that as a missing library."""
    spec = {"folders": list(outputs.values()), "image": os.path.join(parts["images"], "img0.png"),
            "question": QUESTION, "pipeline": True}
    results = run_consumer(spec, tmp_path, protobuf=protobuf)
    image = Image.open(spec["image"]).convert("RGB")
    for folder in spec["folders"]:
        theirs, ours = results[folder], consume(folder, image, QUESTION)
        assert theirs["missing"] == theirs["unexpected"] == [], folder
        assert ours["missing"] == ours["unexpected"] == [], folder
        assert torch.equal(theirs["input_ids"], ours["input_ids"]), folder
        assert theirs["special_tokens"] == ours["special_tokens"], folder
        assert {"<|im_start|>", "<|im_end|>"} <= {token for token, _ in ours["special_tokens"]}, folder
        assert theirs["tied"] == ours["tied"] == (folder.startswith(outputs["merged"])), folder
        torch.testing.assert_close(theirs["logits"], ours["logits"], atol=1e-4, rtol=0)
        assert isinstance(theirs["answer"], str), folder


# (architecture, --image_aspect_ratio) of each processor; the anyres ones on the towers they tile (DINOv2's crop is
# not its configured input size, which anyres refuses).
PROCESSOR_SETUPS = [("llava", mode) for mode in (None, "pad", "crop", "resize")] + [
    ("llava_next", None), ("llava_onevision", None)]
ANYRES_TOWERS = {"clip", "siglip"}


def test_transformers_4_57_preprocesses_images_as_5x_for_every_tower_and_aspect_ratio(parts, tmp_path):
    """--image_aspect_ratio and the anyres grids are stored in the processor files; 4.57 must read them into the
    same pixels and tokens."""
    folders = []
    for tower, (builder, *_) in sorted(TOWERS.items()):
        vision = builder(str(tmp_path / tower))
        for architecture, mode in PROCESSOR_SETUPS:
            if architecture != "llava" and tower not in ANYRES_TOWERS:
                continue
            args = ModelArguments(vision_model_name_or_path=vision, language_model_name_or_path=parts["lm"],
                                  image_aspect_ratio=mode, architecture=architecture)
            folder = str(tmp_path / f"{tower}_{architecture}_{mode}")
            save_processor(processor_for(args), folder)
            folders.append(folder)
    wide = Image.new("RGB", (48, 24), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 10, 24))  # a blue left edge, so crops and pads differ
    wide.save(tmp_path / "wide.png")
    theirs = run_consumer({"folders": folders, "image": str(tmp_path / "wide.png"), "question": "",
                           "processor_only": True}, tmp_path)
    for folder in folders:
        ours = preprocess(folder, wide)
        assert theirs[folder]["image_processor"] == ours["image_processor"], folder
        assert torch.equal(theirs[folder]["input_ids"], ours["input_ids"]), folder
        torch.testing.assert_close(theirs[folder]["pixel_values"], ours["pixel_values"], atol=1e-6, rtol=0)


def test_processor_and_generation_files_serve_elsewhere(outputs):
    for kind, folder in outputs.items():
        tokenizer = read_json(folder, "tokenizer_config.json")
        assert tokenizer["tokenizer_class"] == ("PreTrainedTokenizerFast" if kind in ("merged", "lora_base")
                                                else "GPT2Tokenizer"), kind
        processor = read_json(folder, "processor_config.json")
        assert (processor["patch_size"], processor["vision_feature_select_strategy"],
                processor["num_additional_image_tokens"]) == (8, "default", 1), kind
        assert read_json(folder, "preprocessor_config.json")["crop_size"] == {"height": 32, "width": 32}, kind
        assert os.path.isfile(os.path.join(folder, "chat_template.jinja")), kind
        assert read_json(folder, "config.json")["use_cache"] is True, kind
        generation = read_json(folder, "generation_config.json")
        im_end = transformers.AutoTokenizer.from_pretrained(folder).convert_tokens_to_ids("<|im_end|>")
        eos = generation["eos_token_id"]
        assert im_end in (eos if isinstance(eos, list) else [eos]) and generation["pad_token_id"] is not None, kind


def test_pipeline_answers_an_image_question(outputs, parts):
    assert_pipeline_answers(outputs["final"], [Image.open(os.path.join(parts["images"], "img0.png")).convert("RGB")])


def test_saved_configs_turn_the_cache_on_while_training_keeps_it_off(llava_checkpoint, tmp_path):
    """Trainer sets `use_cache` False for training (`TrainingArguments.use_cache`), and every save (checkpoint-N,
    final output, LoRA base and merge) comes through `save_pretrained`: the file says true, so servers and plain
    transformers keep past keys and values; the model being trained keeps it off."""
    model = LlavaForConditionalGeneration.from_pretrained(llava_checkpoint)
    model.config.use_cache = False  # what Trainer sets
    model.save_pretrained(tmp_path)
    save_processor(transformers.AutoProcessor.from_pretrained(llava_checkpoint), str(tmp_path))
    config = read_json(str(tmp_path), "config.json")
    assert config["use_cache"] is True and config["text_config"]["use_cache"] is True
    assert model.config.use_cache is False
    assert transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path).config.text_config.use_cache is True
    assert_loads_and_generates(str(tmp_path))


# --------------------------------------------------------------------------------------------- layouts on load

def rewrite_tensors(source: str, target, rename=lambda name: name, drop=()) -> str:
    """A copy of checkpoint `source` with its tensors renamed or some left out."""
    model = LlavaForConditionalGeneration.from_pretrained(source)
    os.makedirs(target, exist_ok=True)
    model.config.save_pretrained(target)
    tensors = {rename(name): t.contiguous() for name, t in model.state_dict().items() if name not in drop}
    save_file(tensors, os.path.join(target, "model.safetensors"), metadata={"format": "pt"})
    return str(target)


def test_in_memory_and_earlier_layouts_load_the_same(llava_checkpoint, tmp_path):
    reference = LlavaForConditionalGeneration.from_pretrained(llava_checkpoint)
    # What this project wrote before: transformers' own save of our (custom code) class, built in code as
    # assemble_llava builds it (a model that from_pretrained loaded would revert its load-time renamings instead).
    built = LlavaForConditionalGeneration(reference.config)
    built.load_state_dict(reference.state_dict())
    earlier = str(tmp_path / "earlier")
    transformers.LlavaForConditionalGeneration.save_pretrained(built, earlier)
    assert any(name.startswith("model.language_model.model.") for name in tensor_names(earlier))
    for folder in (rewrite_tensors(llava_checkpoint, tmp_path / "in_memory"), earlier):
        loaded = LlavaForConditionalGeneration.from_pretrained(folder).state_dict()
        assert loaded.keys() == reference.state_dict().keys()
        assert all(torch.equal(loaded[k], v) for k, v in reference.state_dict().items()), folder


def test_unknown_tensor_names_fail_with_the_names(llava_checkpoint, tmp_path):
    folder = rewrite_tensors(llava_checkpoint, tmp_path / "unknown", rename=lambda name: "backbone." + name)
    with pytest.raises(ValueError, match=r"tensors with unknown names \(e\.g\. \['backbone\.lm_head\.weight'"):
        load_llava(folder)


def test_a_missing_weight_fails(llava_checkpoint, tmp_path):
    folder = rewrite_tensors(llava_checkpoint, tmp_path / "missing", drop={"model.multi_modal_projector.linear_2.bias"})
    with pytest.raises(ValueError, match=r"1 weights missing \(e\.g\. \['model\.multi_modal_projector\.linear_2\.bias'"):
        LlavaForConditionalGeneration.from_pretrained(folder)


def test_generation_stops_at_the_templates_end_of_turn(llava_checkpoint, tmp_path):
    """An LM whose EOS is not the end-of-turn token (as Llama 3's <|end_of_text|> vs <|eot_id|>) gets both."""
    processor = transformers.AutoProcessor.from_pretrained(llava_checkpoint)
    processor.tokenizer.eos_token = "<|endoftext|>"
    LlavaForConditionalGeneration.from_pretrained(llava_checkpoint).save_pretrained(tmp_path)
    save_processor(processor, str(tmp_path))
    generation = read_json(str(tmp_path), "generation_config.json")
    tokens = processor.tokenizer.convert_ids_to_tokens(generation["eos_token_id"])
    assert set(tokens) == {"<|endoftext|>", "<|im_end|>"}
    assert generation["pad_token_id"] == processor.tokenizer.pad_token_id
