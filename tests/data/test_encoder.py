"""Label masks for every published chat template we ship (tests/helpers/chat_templates, see SOURCES.md) x every sample kind.

The trained tokens of a sample must decode to each assistant answer followed by the template's end-of-turn token,
with that control token exactly once per answer (a literal `<|im_end|>` typed in an answer stays text), and the
prompt the model is asked to continue at inference must be exactly what preceded the answer in training.
"""

import copy
import re

import pytest

from llava.data.encoder import ConversationEncoder
from llava.data.records import to_sample
from llava.data.types import IGNORE_INDEX, DataError, Message
from llava.model.processor import image_tokens
from llava.training.arguments import ModelArguments
from llava.training.build import processor_for
from tests.helpers.conversations import END_OF_TURN, samples, trained_runs, turns
from tests.helpers.families import FAMILIES, family_tokenizer
from tests.helpers.tiny_parts import save_vision_model

# Templates whose own generation prompt (add_generation_prompt=True) is not what precedes a trained answer, and why.
GENERATION_PROMPT_DIFFERS = {
    "deepseek_r1_distill": "its generation prompt always opens a think block (`<think>\\n`); rendered answers have none",
    "llava_1_5": "it renders no eos after answers, so training appends one; its history turns lack it",
}


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    vision = save_vision_model(str(root / "vision"))
    built = {}
    for name, family in FAMILIES.items():
        path = str(root / name)
        family_tokenizer(name).save_pretrained(path)
        processor = processor_for(ModelArguments(vision_model_name_or_path=vision, language_model_name_or_path=path))
        if family.content_parts:  # as a llava-hf checkpoint ships it: typed content parts, no string wrapper
            processor.chat_template = family.template
        built[name] = ConversationEncoder(processor, 4096, image_tokens(processor))
    return built


@pytest.mark.parametrize("kind", list(samples("")))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_trained_tokens_are_each_answer_and_its_end_of_turn(encoders, family, kind):
    encoder = encoders[family]
    assert encoder.template.end_of_turn == END_OF_TURN[family]
    record = {"id": kind, **samples(FAMILIES[family].eos_token or "</s>")[kind]}
    sample = to_sample(record, "mem")
    encoded = encoder.encode(sample)
    tokenizer = encoder.tokenizer
    answers = [m.content for m in sample.messages if m.role == "assistant"]
    runs = trained_runs(encoded)
    # A template may write a space before the answer ("[/INST] Red."), which the answer's first token carries.
    assert [tokenizer.decode(run).lstrip(" ") for run in runs] == [a + encoder.template.end_of_turn for a in answers]
    end_id = tokenizer.convert_tokens_to_ids(encoder.template.end_of_turn)
    for run in runs:  # the control token once, at the end; typed-in control tokens became plain text
        assert run[-1] == end_id and not set(encoder.template.special_tokens) & set(run[:-1]), tokenizer.convert_ids_to_tokens(run)
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(encoded["input_ids"], encoded["labels"]))
    assert encoded["input_ids"].count(encoder.image_token_id) == encoder.image_tokens.count() * len(sample.images)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_inference_prompt_is_what_training_put_before_the_answer(encoders, family):
    encoder = encoders[family]
    for kind in ("single", "system", "multi_turn"):
        sample = to_sample({"id": kind, **samples("</s>")[kind]}, "mem")
        encoded = encoder.encode(sample)
        first_trained_of_last_answer = len(encoded["labels"]) - len(trained_runs(encoded)[-1])
        assert encoder.prompt_ids(sample.messages[:-1]) == encoded["input_ids"][:first_trained_of_last_answer], kind


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - set(GENERATION_PROMPT_DIFFERS)))
def test_template_generation_prompt_matches_training(encoders, family):
    """What plain transformers (and vLLM, lmms-eval) render with add_generation_prompt=True is the training prompt."""
    encoder = encoders[family]
    history = [Message("user", "<image>\nWhat colour is it?")]
    text, spans, _ = encoder.trained_spans([*history, Message("assistant", "Red.", trained=True)], "probe")
    # A space the template writes before the answer goes with the answer's first token ("[/INST] Red.").
    assert encoder.template.render(history, add_generation_prompt=True).rstrip(" ") == text[:spans[0][0]].rstrip(" ")


def test_system_text_is_folded_into_the_first_user_turn_where_the_template_has_no_system_role(encoders):
    encoder = encoders["gemma2"]  # raises "System role not supported" on a system turn
    assert not encoder.template.system_role
    sample = to_sample({"id": "s", "conversations": turns(("Colour?", "Green"), system="Be brief.")}, "mem")
    text, _, _ = encoder.trained_spans(sample.messages, sample.describe())
    assert "<start_of_turn>user\nBe brief.\n\nColour?<end_of_turn>" in text
    assert encoders["gemma3"].template.system_role and encoders["qwen2_5"].template.system_role


def test_template_errors_name_the_sample_and_the_model(encoders):
    sample = to_sample({"id": "two_users", "conversations": [
        {"from": "human", "value": "Hi"}, {"from": "human", "value": "Again"}, {"from": "gpt", "value": "Yes"}]},
        "f.json[3]")
    with pytest.raises(DataError, match=r"f.json\[3\] \(id 'two_users'\).*mixtral_v0_1.*rejected") as error:
        encoders["mixtral_v0_1"].encode(sample)  # roles must alternate
    assert error.value.kind == "template_error"


def test_template_without_any_end_of_turn_and_no_eos_is_refused_before_training(tmp_path):
    tokenizer = family_tokenizer("smollm2")
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tokenizer.eos_token = None
    tokenizer.save_pretrained(str(tmp_path / "lm"))
    processor = processor_for(ModelArguments(vision_model_name_or_path=save_vision_model(str(tmp_path / "v")),
                                             language_model_name_or_path=str(tmp_path / "lm")))
    with pytest.raises(ValueError, match="never learn to stop"):
        ConversationEncoder(processor, 512, image_tokens(processor))


def _reference_encoder(encoder: ConversationEncoder) -> ConversationEncoder:
    """`encoder` without its shortcuts: each sample rendered through `apply_chat_template`, twice (plain and with
    marked texts), as `ChatTemplate.locate` does when no per-role-sequence skeleton matches."""
    reference = copy.copy(encoder)
    reference.template = copy.copy(encoder.template)
    reference.template._compiled_template = None
    reference.template._align_with_known_skeleton = lambda rendered, contents, messages: None
    return reference


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_one_rendering_per_sample_encodes_exactly_as_the_probing_renderings(encoders, family):
    """The fast path (the compiled template called directly, texts aligned to a skeleton rendered once per role
    sequence) gives the same tokens and labels as rendering each sample's probes, also for texts that templates
    edit (surrounding whitespace: Llama 3 trims) or that change the scaffolding (Qwen3 drops earlier think blocks)."""
    encoder = encoders[family]
    reference = _reference_encoder(encoder)
    tricky = {
        "whitespace": {"conversations": turns(("  Hi there \n", " Hello. \n"), ("\nMore?\n", "\tYes "))},
        "think": {"conversations": turns(("Q1?", "<think>hm</think>\n\nA1."), ("Q2?", "<think>ok</think>A2."))},
        "scaffolding_typed": {"conversations": turns(("user\nassistant\n[INST]", "<start_of_turn>model\n### x"))},
    }
    kinds = {**samples(FAMILIES[family].eos_token or "</s>"), **tricky}
    for _ in range(2):  # the second pass finds every skeleton already there
        for kind, record in kinds.items():
            sample = to_sample({"id": kind, **record}, "mem")
            try:
                expected = reference.encode(sample)
            except DataError as error:
                with pytest.raises(DataError, match=re.escape(str(error).split(":")[0])):
                    encoder.encode(sample)
                continue
            assert encoder.encode(sample) == expected, kind
    assert encoder.template._compiled_template is not None
    single = encoder.template._fold_system(to_sample({"id": "s", **kinds["system_multi_turn"]}, "mem").messages)
    rendered = encoder.template.render(single)
    if encoder.template.string_content:  # the shortcut is taken for plain samples (llava-hf's typed-parts template: never)
        assert encoder.template._align_with_known_skeleton(rendered, [m.content for m in single], single) is not None
