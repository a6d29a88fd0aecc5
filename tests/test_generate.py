"""`python -m llava.generate` (and `llava.evaluate`) on what users hand them: a corrupt image is one error line,
an image placeholder in --prompt takes the image, and images training refuses are answered with a warning."""

import json

import pytest
from PIL import Image

from llava import evaluate, generate
from llava.data.types import ConfigurationError
from llava.model.hub_format import save_processor
from llava.reporting import USER_ERROR_EXIT_CODE, run_command
from llava.training.arguments import ModelArguments
from llava.training.build import base_model_for, processor_for
from tests.data.test_hostile_input import broken_images


@pytest.fixture(scope="module")
def llava_next_checkpoint(parts, tmp_path_factory):
    """An untrained llava_next checkpoint of the tiny parts: 32-pixel tiles of 8-pixel patches, llava-v1.6's grid."""
    args = ModelArguments(vision_model_name_or_path=parts["vision"], language_model_name_or_path=parts["lm"],
                          architecture="llava_next")
    processor = processor_for(args)
    path = str(tmp_path_factory.mktemp("llava_next"))
    base_model_for(args, processor).save_pretrained(path)
    save_processor(processor, path)
    return path


def test_a_corrupt_image_is_one_error_line_naming_the_file(llava_checkpoint, tmp_path, capsys):
    image = tmp_path / broken_images(str(tmp_path))["cut_jpg"]
    with pytest.raises(SystemExit) as exit_info:
        run_command(lambda: generate.main(["--model_name_or_path", llava_checkpoint, "--image", str(image),
                                           "--prompt", "What colour?"]))
    assert exit_info.value.code == USER_ERROR_EXIT_CODE
    error = capsys.readouterr().err  # after the progress bars of loading the model
    (line,) = [line for line in error.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: --image (id 'cut.jpg'): unreadable or corrupt image {image}: image file is "
                           "truncated") and "Traceback" not in error, error


def test_one_image_token_in_the_prompt_is_where_the_image_goes(parts, llava_checkpoint):
    """"<image>\\nWhat colour?" is the prompt generate writes for "What colour?": the same answer, not two images."""
    image = ["--model_name_or_path", llava_checkpoint, "--image", f"{parts['images']}/img0.png", "--max_new_tokens",
             "3"]
    assert generate.main([*image, "--prompt", "<image>\nWhat colour?"]) == generate.main([*image, "--prompt",
                                                                                          "What colour?"])


@pytest.mark.parametrize("prompt, with_image, counts", [
    ("<image> and <image>: what?", True, r"2 <image> placeholder\(s\) for 1 image"),
    ("<image> what?", False, r"1 <image> placeholder\(s\) for 0 image")], ids=["two_for_one", "one_for_none"])
def test_placeholders_that_are_not_one_per_image_are_refused(parts, llava_next_checkpoint, prompt, with_image,
                                                             counts):
    image = ["--image", f"{parts['images']}/img0.png"] if with_image else []
    with pytest.raises(ConfigurationError, match=counts + r".*Drop <image> from --prompt \(generate places"):
        generate.main(["--model_name_or_path", llava_next_checkpoint, *image, "--prompt", prompt])


@pytest.mark.parametrize("size", [(1, 1), (4000, 300)], ids=["1x1", "4000x300"])
def test_images_training_refuses_are_answered_with_a_warning(llava_next_checkpoint, tmp_path, caplog, size):
    """Training's checking pass refuses these for a 32-pixel anyres grid (a side under one patch; no row of tile
    features left); generate and evaluate answer, and say so."""
    Image.new("RGB", size, (200, 30, 30)).save(tmp_path / "odd.png")
    answer = generate.main(["--model_name_or_path", llava_next_checkpoint, "--image", str(tmp_path / "odd.png"),
                            "--prompt", "What colour?", "--max_new_tokens", "2"])
    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps({"id": "odd", "image": "odd.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]}) + "\n")
    result = evaluate.main(["--model_name_or_path", llava_next_checkpoint, "--data_path", str(data),
                            "--image_folder", str(tmp_path), "--max_new_tokens", "2", "--blind_control", "False"])
    assert isinstance(answer, str) and result["num_samples"] == 1 and result["skipped"] == 0
    warnings = [r.getMessage() for r in caplog.records if "image_size_unsupported" in r.getMessage()]
    assert len(warnings) == 2, caplog.text
    assert warnings[0].startswith("--image (id 'odd.png')") and warnings[1].startswith(f"{data}:1 (id 'odd')")
    assert all(f"odd.png ({size[0]}x{size[1]} pixels)" in w and "answering anyway" in w for w in warnings)
