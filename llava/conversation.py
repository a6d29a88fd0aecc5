"""Conversations -> token ids and labels, with the chat template deciding what the model sees.

Labels come from the chat template itself: for every assistant turn the conversation is rendered up to
the turn's generation prompt and up to the turn's end, and the characters in between (the answer plus the
template's end-of-turn token, trailing whitespace excluded) are the trained span. Tokens are mapped to
characters with the tokenizer's offsets, so no per-template arithmetic exists that could drift from the
template and silently mask a whole sample.
"""

from __future__ import annotations

from transformers import ProcessorMixin

from llava.data import DataError, Sample
from llava.processor import IGNORE_INDEX, image_token_count


class ConversationEncoder:
    """Renders samples with the processor's chat template and returns `input_ids` and `labels`.

    Image placeholders are expanded to as many image tokens as the vision tower yields per image (labels
    -100). A sample longer than `max_length` loses text at its end; if that would cut an image span, or leave
    no trained token, the sample is refused with a `DataError`.
    """

    def __init__(self, processor: ProcessorMixin, max_length: int):
        self.tokenizer = processor.tokenizer
        self.chat_template = processor.chat_template
        if not self.chat_template:
            raise ValueError("The processor has no chat template; assemble with --chat_template.")
        self.image_token = processor.image_token
        self.image_token_id = processor.image_token_id
        self.tokens_per_image = image_token_count(processor)
        self.max_length = max_length
        self.string_content = self._template_takes_string_content()

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The chat template's text for `messages`, image placeholders left in place."""
        if not self.string_content:
            messages = [{"role": m["role"], "content": self._structured(m["content"])} for m in messages]
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def _template_takes_string_content(self) -> bool:
        """True for LM-style templates (and ours); llava-hf templates want [{"type": ...}] content instead."""
        probe = f"probe{self.image_token}text"
        try:
            return probe in self.tokenizer.apply_chat_template(
                [{"role": "user", "content": probe}], chat_template=self.chat_template, tokenize=False)
        except Exception:  # noqa: BLE001 - a template that fails on strings expects structured content
            return False

    def _structured(self, text: str) -> list[dict]:
        pieces = text.split(self.image_token)
        content = [{"type": "text", "text": pieces[0]}] if pieces[0].strip() else []
        for piece in pieces[1:]:
            content.append({"type": "image"})
            piece = piece[1:] if piece.startswith("\n") else piece  # the template writes its own separator
            if piece.strip():
                content.append({"type": "text", "text": piece})
        return content

    def trained_spans(self, sample: Sample) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans [start, end) of every assistant answer."""
        rendered = self.render(sample.messages, add_generation_prompt=False)
        spans = []
        for index, message in enumerate(sample.messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render(sample.messages[:index], add_generation_prompt=True)
            through_answer = self.render(sample.messages[: index + 1], add_generation_prompt=False)
            if not (through_answer.startswith(prompt) and rendered.startswith(through_answer)):
                raise DataError(
                    f"{sample.describe()}: the chat template renders turn {index} differently depending on what "
                    "follows it, so answer spans cannot be located. Use a template whose rendering of a "
                    "conversation prefix is a prefix of the whole (pass --chat_template).", kind="template_error"
                )
            spans.append((len(prompt), len(through_answer.rstrip())))
        return rendered, spans

    def encode(self, sample: Sample) -> dict[str, list[int]]:
        """Token ids and labels (-100 where not trained) for one sample."""
        try:
            rendered, spans = self.trained_spans(sample)
        except DataError:
            raise
        except Exception as error:  # jinja raises e.g. on roles out of order
            raise DataError(f"{sample.describe()}: the chat template rejected this conversation: {error}",
                            kind="template_error") from None
        if not spans:
            raise DataError(f"{sample.describe()}: no assistant turn, so nothing to train on.",
                            kind="no_assistant_turn")
        encoded = self.tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
        input_ids, labels = [], []
        span_index = 0
        for token_id, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"]):
            while span_index < len(spans) and spans[span_index][1] <= start:
                span_index += 1
            in_answer = span_index < len(spans) and start < spans[span_index][1] and end > spans[span_index][0]
            if token_id == self.image_token_id:
                input_ids.extend([token_id] * self.tokens_per_image)
                labels.extend([IGNORE_INDEX] * self.tokens_per_image)
            else:
                input_ids.append(token_id)
                labels.append(token_id if in_answer else IGNORE_INDEX)
        placeholders = input_ids.count(self.image_token_id) // self.tokens_per_image
        if placeholders != len(sample.images):
            raise DataError(f"{sample.describe()}: {placeholders} {self.image_token} placeholder(s) but "
                            f"{len(sample.images)} image(s); put one {self.image_token} in the text per image.",
                            kind="image_count_mismatch")
        return self._truncate(sample, input_ids, labels)

    def _truncate(self, sample: Sample, input_ids: list[int], labels: list[int]) -> dict[str, list[int]]:
        if len(input_ids) > self.max_length:
            image_tokens = input_ids.count(self.image_token_id)
            if image_tokens > self.max_length:
                raise DataError(f"{sample.describe()}: its images alone take {image_tokens} tokens, more than "
                                f"--model_max_length {self.max_length}; raise it or use fewer images.",
                                kind="images_exceed_max_length")
            if self.image_token_id in input_ids[self.max_length:]:
                raise DataError(
                    f"{sample.describe()}: {len(input_ids)} tokens, and --model_max_length {self.max_length} would "
                    "cut through an image's tokens; raise --model_max_length or shorten the sample.",
                    kind="truncation_cuts_image")
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        if all(label == IGNORE_INDEX for label in labels):
            raise DataError(f"{sample.describe()}: no answer token left within --model_max_length "
                            f"{self.max_length}; raise it or shorten the sample.", kind="no_answer_within_max_length")
        # Tokens after the last trained one (the template's closing newline, say) cannot change the loss of a
        # causal LM: dropping them saves their forward and backward.
        end = max(i for i, label in enumerate(labels) if label != IGNORE_INDEX) + 1
        return {"input_ids": input_ids[:end], "labels": labels[:end]}
