"""What a user does with an output folder: load it with plain transformers and generate."""

import os

from PIL import Image
from transformers import AutoProcessor, pipeline
from transformers import LlavaForConditionalGeneration as PlainLlava

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def assert_loads_and_generates(path):
    """What a user serving the model elsewhere does: plain transformers, no train_llava code."""
    model = PlainLlava.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=[Image.new("RGB", (48, 40), (255, 0, 0))], return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]


def assert_pipeline_answers(path, images, question="What colour is it?"):
    """`pipeline("image-text-to-text", model=path)` answers a question on `images` (one prompt): the processor,
    model class and generation config found from the folder alone, as a user of transformers 5.x finds them."""
    content = [*({"type": "image", "image": image} for image in images), {"type": "text", "text": question}]
    # The untrained model may end its turn at once: min_new_tokens keeps the answer from being empty.
    (answer,) = pipeline("image-text-to-text", model=path)(
        text=[{"role": "user", "content": content}], generate_kwargs={"min_new_tokens": 4, "max_new_tokens": 4},
        return_full_text=False)
    assert isinstance(answer["generated_text"], str) and answer["generated_text"]
