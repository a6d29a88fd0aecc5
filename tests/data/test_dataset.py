import json

import pytest

from llava.data.encoder import ConversationEncoder
from llava.data.records import load_samples, read_records, to_sample
from llava.data.types import IGNORE_INDEX, DataError
from llava.model.processor import image_tokens
from llava.training.arguments import ModelArguments
from llava.training.build import processor_for
from tests.helpers.conversations import trained_runs
from tests.helpers.tiny_parts import (CHATML_DEFAULT_SYSTEM_TEMPLATE, CHATML_TEMPLATE, LLAMA2_TEMPLATE,
                                      TOKENS_PER_IMAGE, conversation_records, dataset_from, save_language_model,
                                      write_dataset)

# llava-hf style: content must be a list of {"type": ...} items (a plain string renders nothing).
STRUCTURED_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() + ': ' }}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ '<image>\\n' }}{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% if m['role'] == 'assistant' %}{{ '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT: ' }}{% endif %}"
)
# template -> how one trained answer must read (answer text, then the template's end-of-turn token)
TEMPLATES = {
    "chatml": (CHATML_TEMPLATE, "{}<|im_end|>"),
    "chatml_default_system": (CHATML_DEFAULT_SYSTEM_TEMPLATE, "{}<|im_end|>"),
    "llama2": (LLAMA2_TEMPLATE, "{} <|im_end|>"),
    "structured_only": (STRUCTURED_TEMPLATE, "{}<|im_end|>"),
}


def make_processor(parts, tmp_path_factory, chat_template=None):
    lm = parts["lm"]
    if chat_template is not None:
        lm = save_language_model(str(tmp_path_factory.mktemp("lm")), chat_template=chat_template)
    processor = processor_for(ModelArguments(vision_model_name_or_path=parts["vision"],
                                               language_model_name_or_path=lm))
    if chat_template is STRUCTURED_TEMPLATE:  # as a llava-hf checkpoint ships it: no string-content wrapper
        processor.chat_template = chat_template
    return processor


@pytest.mark.parametrize("template_name", sorted(TEMPLATES))
def test_trained_spans_are_each_answer_plus_end_of_turn(parts, tmp_path_factory, template_name):
    template, answer_format = TEMPLATES[template_name]
    processor = make_processor(parts, tmp_path_factory, template)
    encoder = ConversationEncoder(processor, 512, image_tokens(processor))
    for record in conversation_records():
        sample = to_sample(record, "mem")
        encoded = encoder.encode(sample)
        answers = [m.content for m in sample.messages if m.role == "assistant"]
        runs = [processor.tokenizer.decode(run) for run in trained_runs(encoded)]
        assert [r.strip() for r in runs] == [answer_format.format(a) for a in answers], (template_name, sample.id)
        assert all(label == token for token, label in zip(encoded["input_ids"], encoded["labels"])
                   if label != IGNORE_INDEX)


def test_image_tokens_expand_to_tower_length_and_are_not_trained(parts, tmp_path_factory):
    processor = make_processor(parts, tmp_path_factory)
    encoder = ConversationEncoder(processor, 512, image_tokens(processor))
    assert encoder.image_tokens.count() == TOKENS_PER_IMAGE
    for record in conversation_records():
        sample = to_sample(record, "mem")
        encoded = encoder.encode(sample)
        image_positions = [i for i, t in enumerate(encoded["input_ids"]) if t == processor.image_token_id]
        assert len(image_positions) == TOKENS_PER_IMAGE * len(sample.images)
        assert all(encoded["labels"][i] == IGNORE_INDEX for i in image_positions)


def test_dataset_items_and_multi_file_mixing(parts, tmp_path):
    processor = make_processor(parts, None)
    jsonl_path, _ = write_dataset(str(tmp_path), name="more.jsonl")
    dataset = dataset_from([parts["data"], jsonl_path], processor, 512, parts["images"])
    assert len(dataset) == 2 * len(conversation_records())
    assert dataset.samples[6].location == f"{jsonl_path}:1"
    by_id = {s.id: dataset[i] for i, s in enumerate(dataset.samples[:6])}
    assert "pixel_values" not in by_id["text_only"]
    assert tuple(by_id["two_images"]["pixel_values"].shape) == (2, 3, 32, 32)
    assert tuple(by_id["single"]["pixel_values"].shape) == (1, 3, 32, 32)


def test_truncation_cuts_text_after_images_but_never_an_image_span(parts):
    processor = make_processor(parts, None)
    long_answer = " ".join(["word"] * 100)
    record = {"id": "long", "image": "img0.png",
              "conversations": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": long_answer}]}
    sample = to_sample(record, "mem")
    encoded = ConversationEncoder(processor, 40, image_tokens(processor)).encode(sample)
    assert len(encoded["input_ids"]) == 40
    assert encoded["input_ids"].count(processor.image_token_id) == TOKENS_PER_IMAGE
    with pytest.raises(DataError, match=r"id 'long'.*cut through an image") as error:
        ConversationEncoder(processor, TOKENS_PER_IMAGE + 1, image_tokens(processor)).encode(sample)
    assert error.value.kind == "truncation_cuts_image"
    with pytest.raises(DataError, match=r"id 'long'.*images alone take 16 tokens") as error:
        ConversationEncoder(processor, 10, image_tokens(processor)).encode(sample)
    assert error.value.kind == "images_exceed_max_length"


@pytest.mark.parametrize("record, message", [
    ({"id": "a", "image": ["img0.png", "img1.png"],
      "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Yo"}]},
     r"id 'a'.*1 <image> placeholder\(s\) but 2 image\(s\)"),
    ({"id": "b", "conversations": [{"from": "human", "value": "Hi"}]}, r"id 'b'.*no assistant turn"),
])
def test_bad_samples_are_named(parts, record, message):
    processor = make_processor(parts, None)
    with pytest.raises(DataError, match=message):
        ConversationEncoder(processor, 512, image_tokens(processor)).encode(to_sample(record, "f.json[0]"))


def test_dataset_reports_every_bad_sample(parts, tmp_path):
    processor = make_processor(parts, None)
    bad = [{"id": f"bad{i}", "conversations": [{"from": "human", "value": "Hi"}]} for i in range(3)]
    data_path, image_folder = write_dataset(str(tmp_path), conversation_records()[:1] + bad)
    with pytest.raises(DataError, match=r"3 of 4 samples invalid: last_turn_not_assistant 3") as error:
        dataset_from([data_path], processor, 512, image_folder)
    assert all(f"bad{i}" in str(error.value) for i in range(3))


def test_reader_errors_name_file_and_position(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(conversation_records()[0]) + "\n{\"id\": \"x\", \n")
    with pytest.raises(DataError, match=r"broken.jsonl:2: malformed JSON at column \d+"):
        load_samples([str(broken)])
    role = tmp_path / "role.json"
    role.write_text(json.dumps([{"id": "r", "conversations": [{"from": "robot", "value": "beep"}]}]))
    with pytest.raises(DataError, match=r"role.json\[0\] \(id 'r'\): turn 0 has an unknown role"):
        load_samples([str(role)])


@pytest.mark.parametrize("text, message", [
    ('[{"id": "a"},\n {"id": "b" "x": 1}]', r"line 2, column 13: Expecting ',' delimiter"),
    ('[{"id": "a"} {"id": "b"}]', r"column 14: Expecting ',' delimiter"),
    ('[{"id": "a"}] trailing', r"column 15: Extra data"),
    ('[{"id": "a"},', r"column 14: Expecting value"),
    ('{"id": "a"}', r"expected a JSON list of samples, got dict"),
    ('{"id": ', r"malformed JSON at column 8"),
])
def test_json_lists_are_read_item_by_item_with_exact_error_positions(tmp_path, text, message):
    """.json lists are parsed one record at a time (memory: the text, not 5x its size as objects), and still
    report where a file is broken."""
    path = tmp_path / "data.json"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        list(read_records(str(path)))


def test_json_list_reading_gives_what_json_loads_gives(tmp_path):
    records = [*conversation_records(), {"id": "ü 😀", "nested": {"a": [1, 2.5, None, True]}}, [], "x"]
    path = tmp_path / "data.json"
    path.write_text(" \n[ " + ",\n  ".join(json.dumps(r, ensure_ascii=False) for r in records) + " ]\n")
    assert [record for _, record in read_records(str(path))] == records
    (tmp_path / "empty.json").write_text("[ ]")
    assert list(read_records(str(tmp_path / "empty.json"))) == []

def test_images_without_image_folder_are_refused(parts):
    processor = make_processor(parts, None)
    with pytest.raises(DataError, match=r"no_image_folder.*--image_folder is not set"):
        dataset_from([parts["data"]], processor, 512, image_folder=None)


def test_messages_form_with_content_parts_reads_like_llava_conversations(parts, tmp_path):
    """TRL / LLaMA-Factory records (`messages` + `images`, content as a string or typed parts) give the same tokens as
    the LLaVA form of the same conversation."""
    llava_form = conversation_records()[5]  # two images
    messages_form = {"id": "two_images", "images": ["img0.png", "img1.png"], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                     {"type": "text", "text": "Are these the same colour?"}]},
        {"role": "assistant", "content": "No: red and blue."}]}
    processor = make_processor(parts, None)
    encoder = ConversationEncoder(processor, 512, image_tokens(processor))
    assert encoder.encode(to_sample(messages_form, "m")) == encoder.encode(to_sample(llava_form, "l"))
    with pytest.raises(DataError, match=r"id 'x'.*turn 0 needs a string 'value'"):
        to_sample({"id": "x", "messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "m")


@pytest.mark.parametrize("key", ["video", "videos"])
def test_video_samples_are_refused_not_trained_without_their_video(key):
    """No architecture here reads video yet: a record with a video field is named and refused, never trained as a
    text-only sample with the video left in its metadata."""
    record = {"id": "clip_7", key: "clips/7.mp4",
              "conversations": [{"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "A cat jumps."}]}
    with pytest.raises(DataError, match=rf"data.json\[3\] \(id 'clip_7'\): has a '{key}' field.*frames as 'images'") as error:
        to_sample(record, "data.json[3]")
    assert error.value.kind == "video_unsupported"
