"""Conversations -> token ids and labels, with the model's own chat template deciding what the model sees.

Trained tokens are each assistant text as the template rendered it, plus the template's end-of-turn token(s) right
after it (`llava.data.chat_template` finds both); everything else is -100. Text is tokenized as text: a literal
special token typed in a message (`<|im_end|>` inside an answer) becomes the tokens of its characters, not the
control token.
"""

from __future__ import annotations

import numpy as np
from transformers import ProcessorMixin

from llava.data.chat_template import ANSWER_STAND_IN, ChatTemplate, TemplateTimeout
from llava.data.image_tokens import ImageTokens
from llava.data.types import IGNORE_INDEX, DataError, Message, Sample


class ConversationEncoder:
    """Renders conversations with the processor's chat template (`template`); returns `input_ids` and `labels`.

    Image placeholders are expanded to `image_tokens.counts(sizes)` image tokens each (labels -100): the number of
    features the model produces for that image (`llava.model.processor.image_tokens`: one number for LLaVA-1.5, one
    per image size for anyres). A sample longer than `max_length` loses text at its end; if that would cut an image
    span, or leave no trained token, the sample is refused with a `DataError`.

    Raises (at construction, before any weights load): see `ChatTemplate`.
    """

    def __init__(self, processor: ProcessorMixin, max_length: int, image_tokens: ImageTokens):
        self.tokenizer = processor.tokenizer
        self.image_token = processor.image_token
        self.image_token_id = processor.image_token_id
        self.image_tokens = image_tokens
        self.max_length = max_length
        self.template = ChatTemplate(self.tokenizer, processor.chat_template, self.image_token, self.image_token_id)
        self.model_name = self.template.model_name
        special = self.template.special_tokens
        self._is_special = np.zeros(max(len(self.tokenizer), max(special, default=0) + 1), dtype=bool)
        self._is_special[list(special)] = True  # indexed by token id: cheaper than np.isin per sample
        self._backend = None  # the Rust tokenizer, once shown to tokenize as the wrapper does
        probe = self.template.locate([Message("system", "Be brief."),
                                      Message("user", f"{self.image_token}\nWhat is it? 😀"),
                                      Message("assistant", "A café, naïve 42.", trained=True)])[0]
        self._backend = getattr(self.tokenizer, "backend_tokenizer", None) if self._backend_agrees(probe) else None

    def prompt_ids(self, messages: list[Message], image_sizes: list[tuple[int, int]] | None = None) -> list[int]:
        """The token ids training put before an assistant answer that follows `messages` (image tokens expanded;
        `image_sizes`, (height, width) per image, where the count depends on it): what to generate from.

        Cut from the tokens of a rendering with a stand-in answer, so they are exactly what the model saw in
        training, also where a template's generation prompt differs from a rendered assistant turn and where a
        tokenizer would split the prompt's end differently on its own (`\n\n` then text vs. a final `\n\n`).
        """
        conversation = [*messages, Message("assistant", ANSWER_STAND_IN, trained=True)]
        text, spans, regions = self.trained_spans(conversation, "the prompt")
        input_ids, trained = self._tokenize(text, spans, regions, "the prompt")
        start = int(np.flatnonzero(trained)[-1])  # in the stand-in answer: walk back to where it starts
        while trained[start - 1]:
            start -= 1
        counts = self.image_counts(int((input_ids[:start] == self.image_token_id).sum()), image_sizes, "the prompt")
        return self.expand(input_ids[:start], trained[:start], counts)[0].tolist()

    def trained_spans(self, messages: list[Message], where: str
                      ) -> tuple[str, list[tuple[int, int]], list[tuple[int, int]]]:
        """The rendered conversation, the character spans of every trained answer (its text plus the
        end-of-turn), and the spans of every message's text. `where` names the sample in errors."""
        text, regions, messages = self.template.locate(messages)
        end_of_turn = self.template.end_of_turn
        spans = []
        for (start, end), message in zip(regions, messages):
            if not message.trained:
                continue
            gap = len(text[end:]) - len(text[end:].lstrip())
            if not text.startswith(end_of_turn, end + gap):
                raise DataError(
                    f"{where}: the chat template of {self.model_name} does not end this assistant turn "
                    f"with its end-of-turn {end_of_turn!r} (it writes {text[end:end + 40]!r}), so the turn "
                    "cannot be trained to stop. Fix the template (--chat_template) or the turn.",
                    kind="template_error")
            spans.append((start, end + gap + len(end_of_turn)))
        return text, spans, regions

    def encode(self, sample: Sample, image_sizes: list[tuple[int, int]] | None = None) -> dict[str, list[int]]:
        """Token ids and labels (-100 where not trained) for one sample, image tokens expanded: what the collator
        feeds the model (`llava.inspect_data --json` prints it)."""
        compact = self.encode_compact(sample, image_sizes=image_sizes)
        input_ids, labels = self.expand(compact["input_ids"], compact["trained"], compact["image_tokens"])
        return {"input_ids": input_ids.tolist(), "labels": labels.tolist()}

    def expand(self, input_ids: np.ndarray, trained: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return expand_image_tokens(input_ids, trained, counts, self.image_token_id)

    def image_counts(self, num_images: int, image_sizes: list[tuple[int, int]] | None, where: str) -> np.ndarray:
        """Tokens of each image (int32), from its (height, width) in `image_sizes` where the count depends on it."""
        if not self.image_tokens.needs_sizes:
            return np.asarray(self.image_tokens.counts(None, num_images), dtype=np.int32)
        if image_sizes is None or len(image_sizes) < num_images:
            raise ValueError(f"{where}: the image sizes are needed to count an anyres image's tokens.")
        # All of the sample's images, not only the first `num_images`: a count may depend on how many it has.
        return np.asarray(self.image_tokens.counts(image_sizes)[:num_images], dtype=np.int32)

    def encode_compact(self, sample: Sample, warnings: list[DataError] | None = None,
                       image_sizes: list[tuple[int, int]] | None = None) -> dict[str, np.ndarray]:
        """One sample as stored for training: `input_ids` (int32) with one image token per image (expanded when
        batched, see `expand`), `trained` (bool, where the label is the token itself) and `image_tokens` (int32,
        what each image expands to; `image_sizes` gives the images' (height, width) where that depends on it).
        ~35x less memory than expanded label lists for LLaVA-1.5's 576-token images. What is trained but likely not
        meant (an answer cut by truncation) is appended to `warnings`."""
        if not any(m.trained for m in sample.messages):
            raise DataError(f"{sample.describe()}: no assistant turn, so nothing to train on.",
                            kind="no_assistant_turn")
        try:
            text, spans, regions = self.trained_spans(sample.messages, sample.describe())
        except TemplateTimeout as error:
            raise DataError(f"{sample.describe()}: {error}", kind=error.kind) from None
        except DataError:
            raise
        except Exception as error:  # jinja raises e.g. on roles out of order
            raise DataError(f"{sample.describe()}: the chat template of {self.model_name} rejected this "
                            f"conversation: {error}. Fix the sample or pass a --chat_template that accepts it.",
                            kind="template_error") from None
        input_ids, trained = self._tokenize(text, spans, regions, sample.describe())
        placeholders = int((input_ids == self.image_token_id).sum())
        if placeholders != len(sample.images):
            raise DataError(f"{sample.describe()}: {placeholders} {self.image_token} placeholder(s) but "
                            f"{len(sample.images)} image(s); put one {self.image_token} in the text per image.",
                            kind="image_count_mismatch")
        counts = self.image_counts(placeholders, image_sizes, sample.describe())
        return self._truncate(sample, input_ids, trained, counts, [] if warnings is None else warnings)

    def _tokenize(self, text: str, spans: list[tuple[int, int]], regions: list[tuple[int, int]], where: str
                  ) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of `text` (one image token per image) and whether each is trained: it overlaps a span.

        Control tokens inside a message's text (`regions`) were typed, not written by the template: they become
        the tokens of their characters."""
        input_ids, offsets = self._token_offsets(text)
        trained = _overlaps_any(offsets, spans)
        special = self._is_special[input_ids]
        if not special.any():
            return input_ids, trained
        typed = special & _inside_any(offsets, regions)
        if not typed.any():
            return input_ids, trained
        pieces_ids, pieces_trained = [], []
        for token_id, (start, end), is_trained, is_typed in zip(input_ids, offsets, trained, typed):
            ids = self._as_text(text[start:end], where) if is_typed else [token_id]
            pieces_ids += ids
            pieces_trained += [is_trained] * len(ids)
        return np.asarray(pieces_ids, dtype=np.int32), np.asarray(pieces_trained, dtype=bool)

    def _token_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Token ids (int32) and character spans (N, 2) of `text`, no special tokens added.

        Straight from the Rust tokenizer when it gives what the Python wrapper does (checked once, on the probe
        conversation): the wrapper's per-call overhead is ~20% of tokenizing a sample, repeated 665k times."""
        if self._backend is not None:
            # The wrapper leaves the flag as its last call set it (`_as_text` splits control tokens).
            if self._backend.encode_special_tokens:
                self._backend.encode_special_tokens = False
            encoding = self._backend.encode(text, add_special_tokens=False)
            ids, offsets = encoding.ids, encoding.offsets
        else:
            encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        return np.asarray(ids, dtype=np.int32), np.asarray(offsets, dtype=np.int64).reshape(-1, 2)

    def _backend_agrees(self, text: str) -> bool:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            return False
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        encoding = backend.encode(text, add_special_tokens=False)
        return encoding.ids == list(encoded["input_ids"]) and \
            [tuple(o) for o in encoding.offsets] == [tuple(o) for o in encoded["offset_mapping"]]

    def _as_text(self, literal: str, where: str) -> list[int]:
        """Token ids of a control token's text typed inside a message, read as characters."""
        ids = self.tokenizer(literal, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        if self.tokenizer.decode(ids) != literal or any(i in self.tokenizer.all_special_ids for i in ids):
            raise DataError(f"{where}: its text contains {literal!r}, a control token of this tokenizer, "
                            "which cannot be tokenized as plain text here; remove or rephrase it.",
                            kind="literal_special_token")
        return ids

    def _truncate(self, sample: Sample, input_ids: np.ndarray, trained: np.ndarray, counts: np.ndarray,
                  warnings: list[DataError]) -> dict[str, np.ndarray]:
        """Cut text beyond `max_length` (counted with images expanded), never an image; drop what follows the last
        trained token."""
        is_image = input_ids == self.image_token_id
        length = expanded_length(input_ids, counts)
        if length > self.max_length:
            per_image = ", ".join(map(str, counts.tolist()))
            if int(counts.sum()) > self.max_length:
                raise DataError(f"{sample.describe()}: its images alone take {int(counts.sum())} tokens ({per_image}"
                                f" per image), more than --model_max_length {self.max_length}; raise it or use fewer "
                                "or smaller images.", kind="images_exceed_max_length")
            repeats = np.ones(len(input_ids), dtype=np.int64)
            repeats[is_image] = counts
            ends = np.cumsum(repeats)  # expanded end of each token
            keep = int(np.searchsorted(ends, self.max_length, side="right"))
            if is_image[keep:].any():
                raise DataError(
                    f"{sample.describe()}: {length} tokens (its images {per_image}), and --model_max_length "
                    f"{self.max_length} would cut through an image's tokens; raise --model_max_length or shorten "
                    "the sample.", kind="truncation_cuts_image")
            if trained[keep:].any():
                warnings.append(DataError(
                    f"{sample.describe()}: {length} tokens; --model_max_length {self.max_length} cuts an "
                    "answer, which is then trained without its end-of-turn (the model learns not to stop). Raise "
                    "--model_max_length or shorten the sample.", kind="truncated_answer"))
            input_ids, trained = input_ids[:keep], trained[:keep]
        if not trained.any():
            raise DataError(f"{sample.describe()}: no answer token left within --model_max_length "
                            f"{self.max_length}; raise it or shorten the sample.", kind="no_answer_within_max_length")
        # Tokens after the last trained one (the template's closing newline, say) cannot change the loss of a
        # causal LM: dropping them saves their forward and backward.
        end = int(np.flatnonzero(trained)[-1]) + 1
        kept = int((input_ids[:end] == self.image_token_id).sum())  # the counts of the images still in the text
        return {"input_ids": input_ids[:end], "trained": trained[:end], "image_tokens": counts[:kept]}


def expanded_length(input_ids: np.ndarray, counts: np.ndarray) -> int:
    """Length of a stored sample with each of its image tokens expanded to its count."""
    return len(input_ids) + int(np.sum(counts, dtype=np.int64)) - len(counts)


def expand_image_tokens(input_ids: np.ndarray, trained: np.ndarray, counts: np.ndarray, image_token_id: int
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(ids, labels) of a stored sample: the i-th image token repeated `counts[i]` times (its features), labels the
    ids where trained and -100 elsewhere (image tokens, prompts)."""
    is_image = input_ids == image_token_id
    repeats = np.ones(len(input_ids), dtype=np.int64)
    repeats[is_image] = counts
    expanded, trained = np.repeat(np.asarray(input_ids, dtype=np.int64), repeats), np.repeat(trained, repeats)
    return expanded, np.where(trained, expanded, IGNORE_INDEX)


def _overlaps_any(offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """For each token's character span [start, end) (rows of `offsets`), whether it overlaps one of the sorted,
    disjoint `spans`."""
    if not spans:
        return np.zeros(len(offsets), dtype=bool)
    starts, ends = np.asarray(spans, dtype=np.int64).T
    index = np.minimum(np.searchsorted(ends, offsets[:, 0], side="right"), len(spans) - 1)  # first span ending after
    return (offsets[:, 0] < ends[index]) & (offsets[:, 1] > starts[index])


def _inside_any(offsets: np.ndarray, regions: list[tuple[int, int]]) -> np.ndarray:
    """For each token's character span, whether it lies within one of the sorted, disjoint `regions`."""
    if not regions:
        return np.zeros(len(offsets), dtype=bool)
    starts, ends = np.asarray(regions, dtype=np.int64).T
    index = np.maximum(np.searchsorted(starts, offsets[:, 0], side="right") - 1, 0)  # last region starting before
    return (starts[index] <= offsets[:, 0]) & (offsets[:, 1] <= ends[index])
