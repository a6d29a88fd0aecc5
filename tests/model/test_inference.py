import json
import os

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import TrainerControl, TrainerState, TrainingArguments

from llava import generate
from llava.data.images import load_image
from llava.data.records import load_samples
from llava.model.inference import Answerer, load_for_inference
from llava.training.callbacks import SampleAnswersCallback


def test_batched_answers_equal_one_by_one(parts, llava_checkpoint):
    """Left padding must not change greedy answers: a batch of different-length prompts vs. each alone."""
    model, processor = load_for_inference(llava_checkpoint)
    samples = load_samples([parts["data"]])
    images = [[load_image(os.path.join(parts["images"], p)) for p in s.images] for s in samples]
    answerer = Answerer(model, processor, max_new_tokens=4)
    together = answerer.answer([s.messages[:-1] for s in samples], images)
    alone = [answerer.answer([s.messages[:-1]], [i])[0] for s, i in zip(samples, images)]
    assert together == alone and all(isinstance(a, str) for a in together)


def test_generate_cli_prints_the_answer(parts, llava_checkpoint, capsys):
    answer = generate.main(["--model_name_or_path", llava_checkpoint, "--image", f"{parts['images']}/img0.png",
                            "--prompt", "What colour?", "--max_new_tokens", "3"])
    assert capsys.readouterr().out.strip() == answer


def test_sample_callback_logs_images_and_text(parts, llava_checkpoint, tmp_path):
    model, processor = load_for_inference(llava_checkpoint)
    samples = load_samples([parts["data"]])[:2]
    callback = SampleAnswersCallback(samples, parts["images"], processor, max_new_tokens=2)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    state = TrainerState(global_step=3)
    callback.on_train_end(args, state, TrainerControl(), model=model)
    events = EventAccumulator(str(tmp_path / "runs" / "samples"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    assert sorted(events.Tags()["images"]) == ["samples/0_single", "samples/1_multi_turn"]
    assert "samples/text_summary" in events.Tags()["tensors"]


def test_generation_puts_only_the_last_prompt_position_through_lm_head(parts, llava_checkpoint):
    """`generate` passes logits_to_keep=1 only to a forward that names it; otherwise the prompt's every position
    goes through lm_head (for the demo's 57-token prompts and SmolLM2's 49k vocabulary, a fifth of prefill)."""
    model, processor = load_for_inference(llava_checkpoint)
    sample = load_samples([parts["data"]])[0]
    positions = []
    model.lm_head.register_forward_hook(lambda module, inputs, output: positions.append(inputs[0].shape[1]))
    Answerer(model, processor, max_new_tokens=3).answer(
        [sample.messages[:-1]], [[load_image(os.path.join(parts["images"], p)) for p in sample.images]])
    assert positions and set(positions) == {1}
