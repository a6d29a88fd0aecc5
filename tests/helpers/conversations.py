"""Sample conversations of every kind, written with a chat family's end-of-turn token, and what their trained tokens
should decode to."""

import itertools

from llava.data.types import IGNORE_INDEX

# The end-of-turn each family's published template writes after an answer (llava-hf's writes none: eos is added).
END_OF_TURN = {
    "llama3_1": "<|eot_id|>", "llama3_2": "<|eot_id|>", "qwen2_5": "<|im_end|>", "qwen3": "<|im_end|>",
    "mistral_v0_1": "</s>", "mistral_v0_1_original": "</s>", "mistral_v0_3": "</s>", "mistral_nemo": "</s>",
    "mixtral_v0_1": "</s>", "mixtral_v0_1_original": "</s>", "gemma2": "<end_of_turn>", "gemma3": "<end_of_turn>",
    "phi3": "<|end|>", "phi3_5": "<|end|>", "phi4": "<|im_end|>", "smollm2": "<|im_end|>",
    "deepseek_r1_distill": "<｜end▁of▁sentence｜>", "vicuna_v1": "</s>", "llava_1_5": "</s>",
}


def turns(*pairs, system=None):
    conversation = [{"from": "system", "value": system}] if system else []
    for question, answer in pairs:
        conversation += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return conversation


def samples(end_token: str) -> dict[str, dict]:
    """One record per sample kind; `end_token` is typed literally into an answer."""
    return {
        "single": {"image": "a.png", "conversations": turns(("<image>\nWhat colour is it?", "Red."))},
        "multi_turn": {"image": "a.png", "conversations": turns(
            ("<image>\nWhat colour is it?", "Blue."), ("Is it dark?", "No, light blue."),
            ("Any shapes?", "One circle."))},
        "system": {"image": "a.png", "conversations": turns(("<image>\nColour?", "Green"),
                                                            system="Answer in one word.")},
        "system_multi_turn": {"image": "a.png", "conversations": turns(
            ("<image>\nColour?", "Green"), ("Shape?", "Square"), system="Answer in one word.")},
        "text_only": {"conversations": turns(("What is two plus two?", "Four."))},
        "two_images": {"image": ["a.png", "b.png"], "conversations": turns(
            ("<image>\n<image>\nSame colour?", "No: red and blue."))},
        "image_at_end": {"image": "a.png", "conversations": turns(("Describe this picture:\n<image>", "A red disc."))},
        "literal_end_token": {"conversations": turns(
            (f"Does {end_token} end a turn?", f"Yes: {end_token} ends it, and <|im_end|> or </s> too."))},
        "emoji": {"image": "a.png", "conversations": turns(("<image>\nMood? 🙂", "Happy 😀🎉, naïve café."))},
    }


def trained_runs(encoded) -> list[list[int]]:
    return [[token for token, _ in group] for trained, group in itertools.groupby(
        zip(encoded["input_ids"], encoded["labels"]), key=lambda pair: pair[1] != IGNORE_INDEX) if trained]
