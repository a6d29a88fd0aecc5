"""Conversations -> token ids and labels, with the model's own chat template deciding what the model sees.

A `Message` is one turn: its role, its text (image placeholders in place) and whether it is trained.
`ConversationEncoder` renders a whole conversation once with the chat template and finds where the template put
each message's text by rendering it again with every text wrapped in unique markers. Trained tokens are each
assistant text as the template rendered it, plus the template's end-of-turn token(s) right after it (found once
per template); everything else is -100. Nothing assumes that rendering a prefix of a conversation gives a prefix
of the whole (Phi-3, Qwen3 and Mistral v0.3 break that), and there is no per-template arithmetic.

Templates that cannot express a conversation's system turn (Gemma 2 raises, Mixtral v0.1 needs strictly
alternating user/assistant roles) get the system text at the start of the first user turn, as Gemma 3's own
template does. Text is tokenized as text: a literal special token typed in a message (`<|im_end|>` inside an
answer) becomes the tokens of its characters, not the control token.
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from transformers import ProcessorMixin

from llava.errors import DataError
from llava.processor import IGNORE_INDEX, image_token_count

if TYPE_CHECKING:
    from llava.data import Sample

logger = logging.getLogger(__name__)

# Markers around (or in place of) each text in a probing render. Private-use code points: no template trims or
# splits on them, and no tokenizer ever sees them.
_MARK = re.compile("\ue000(\\d+)\ue001")
# A word-like stand-in for an answer that is not known yet (inference prompts, end-of-turn probe).
_ANSWER = "Answer"
_SYSTEM_PROBE = "\ue002system probe\ue002"


def _mark(index: int) -> str:
    return f"\ue000{index}\ue001"


@dataclass
class Message:
    """One turn of a conversation (torchtune's `Message`, minus what LLaVA data does not have).

    Attributes:
        role: "system", "user" or "assistant".
        content: the text, with one image placeholder (`<image>`) where each image goes.
        trained: whether the model learns to produce this text (assistant turns of training data).
    """

    role: str
    content: str
    trained: bool = False


class ConversationEncoder:
    """Renders conversations with the processor's chat template; returns `input_ids` and `labels`.

    Image placeholders are expanded to as many image tokens as the vision tower yields per image (labels -100).
    A sample longer than `max_length` loses text at its end; if that would cut an image span, or leave no trained
    token, the sample is refused with a `DataError`.

    A template that ends assistant turns with no special token (llava-hf's LLaVA-1.5 template) gets the eos token
    appended to every assistant text, as LLaVA's own training did, so the model learns to stop.

    Raises (at construction, before any weights load):
        ValueError: the processor has no chat template, or its template ends assistant turns with no special
            token and the tokenizer has no eos token either.
    """

    # Seconds one rendering may take: a template with nested loops (`range(100000)` twice) would otherwise hang
    # data preparation, which has no other way to tell a slow template from a stuck one.
    render_time_limit: float = 10.0

    def __init__(self, processor: ProcessorMixin, max_length: int):
        self.tokenizer = processor.tokenizer
        self.chat_template = processor.chat_template
        self.model_name = self.tokenizer.name_or_path or "this model"
        if not self.chat_template:
            raise ValueError(f"The processor of {self.model_name} has no chat template; pass one with "
                             "--chat_template when assembling the model.")
        self.image_token = processor.image_token
        self.image_token_id = processor.image_token_id
        self.tokens_per_image = image_token_count(processor)
        self.max_length = max_length
        # Control tokens (turn markers, eos) the tokenizer would read out of text; the image token is meant to be.
        special = {i: t.content for i, t in self.tokenizer.added_tokens_decoder.items()
                   if t.special and i != self.image_token_id}
        self.special_ids = set(special)
        self._is_special = np.zeros(max(len(self.tokenizer), max(special, default=0) + 1), dtype=bool)
        self._is_special[list(special)] = True  # indexed by token id: cheaper than np.isin per sample
        self.special_tokens = sorted(special.values(), key=len, reverse=True)  # longest first, for matching
        self._compiled_template, self._template_variables = None, {}  # see `_compile_template`
        self._skeletons: dict[tuple[str, ...], str] = {}  # role sequence -> rendering with markers for texts
        self.string_content = self._template_takes_string_content()
        self.system_role = self._template_has_system_role()
        self._compile_template()
        if not self.system_role:
            logger.warning("The chat template of %s cannot render a system turn: each conversation's system text is "
                           "put at the start of its first user turn.", self.model_name)
        self.appends_end_of_turn = False  # set by `_end_of_turn` for templates that write none
        self._backend = None  # the Rust tokenizer, once shown to tokenize as the wrapper does
        self.end_of_turn = self._end_of_turn()
        probe = self._locate([Message("system", "Be brief."), Message("user", f"{self.image_token}\nWhat is it? 😀"),
                              Message("assistant", "A café, naïve 42.", trained=True)])[0]
        self._backend = getattr(self.tokenizer, "backend_tokenizer", None) if self._backend_agrees(probe) else None

    # ----------------------------------------------------------------------------------------- rendering

    def render(self, messages: list[Message], add_generation_prompt: bool = False) -> str:
        """The chat template's text for `messages`, image placeholders left in place."""
        return self._render([m.content for m in messages], self._fold_system(messages), add_generation_prompt)

    def prompt_ids(self, messages: list[Message]) -> list[int]:
        """The token ids training put before an assistant answer that follows `messages` (image tokens expanded):
        what to generate from.

        Cut from the tokens of a rendering with a stand-in answer, so they are exactly what the model saw in
        training, also where a template's generation prompt differs from a rendered assistant turn and where a
        tokenizer would split the prompt's end differently on its own (`\n\n` then text vs. a final `\n\n`).
        """
        conversation = [*messages, Message("assistant", _ANSWER, trained=True)]
        text, spans, regions = self.trained_spans(conversation, "the prompt")
        input_ids, trained = self._tokenize(text, spans, regions, "the prompt")
        start = int(np.flatnonzero(trained)[-1])  # in the stand-in answer: walk back to where it starts
        while trained[start - 1]:
            start -= 1
        return self.expand(input_ids[:start], trained[:start])[0].tolist()

    def _render(self, texts: list[str], messages: list[Message], add_generation_prompt: bool) -> str:
        """Render `messages` with `texts` in place of their contents (`texts[i]` for `messages[i]`)."""
        conversation = [{"role": m.role, "content": text if self.string_content else self._structured(text)}
                        for m, text in zip(messages, texts)]
        with _time_limit(self.render_time_limit):
            if self._compiled_template is not None:
                return self._compiled_template.render(messages=conversation, tools=None, documents=None,
                                                      add_generation_prompt=add_generation_prompt,
                                                      **self._template_variables)
            return self.tokenizer.apply_chat_template(conversation, chat_template=self.chat_template,
                                                      tokenize=False, add_generation_prompt=add_generation_prompt)

    def _compile_template(self) -> None:
        """Render with transformers' compiled template directly, when that gives what `apply_chat_template` gives
        (checked on the probe conversations): the wrapper re-validates and copies every message on every call,
        ~40% of a rendering, repeated twice per sample."""
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template
            compiled = _compile_jinja_template(self.chat_template)
        except Exception:  # noqa: BLE001 - a transformers without it (or a template it cannot compile) keeps the wrapper
            return
        variables = {k: v for k, v in self.tokenizer.special_tokens_map.items()
                     if type(v) is str or (type(v) is list and all(type(x) is str for x in v))}
        if len(variables) != len(self.tokenizer.special_tokens_map):
            return  # token objects: the wrapper turns them into plain data first
        probes = [[Message("system", "Be brief."), Message("user", f"{self.image_token}\nWhat is it?"),
                   Message("assistant", "A cat.", trained=True), Message("user", "And?")],
                  [Message("user", "Hi"), Message("assistant", "Hello", trained=True)]]
        try:
            expected = [(self._render([m.content for m in p], self._fold_system(p), g), p, g)
                        for p in probes for g in (False, True)]
            self._compiled_template, self._template_variables = compiled, variables
            if all(self._render([m.content for m in p], self._fold_system(p), g) == text for text, p, g in expected):
                return
        except Exception:  # noqa: BLE001 - templates that reject a probe keep the wrapper
            pass
        self._compiled_template = None

    def _fold_system(self, messages: list[Message]) -> list[Message]:
        """`messages`, with a leading system turn merged into the first user turn when the template has none."""
        if self.system_role or not messages or messages[0].role != "system":
            return list(messages)
        if len(messages) < 2 or messages[1].role != "user":
            raise ValueError("the template has no system role, and the system turn is not followed by a user turn "
                             "it could be merged into")
        first_user = Message("user", f"{messages[0].content}\n\n{messages[1].content}", messages[1].trained)
        return [first_user, *messages[2:]]

    def _template_takes_string_content(self) -> bool:
        """True for LM-style templates (and ours); llava-hf templates want [{"type": ...}] content instead."""
        probe = f"probe{self.image_token}text"
        try:
            return probe in self.tokenizer.apply_chat_template(
                [{"role": "user", "content": probe}], chat_template=self.chat_template, tokenize=False)
        except Exception:  # noqa: BLE001 - a template that fails on strings expects structured content
            return False

    def _template_has_system_role(self) -> bool:
        """Whether the template renders a leading system turn (Gemma 2 raises; some templates drop it silently)."""
        probe = [Message("system", _SYSTEM_PROBE), Message("user", "Hi"), Message("assistant", "Hello", True)]
        try:
            return _SYSTEM_PROBE in self._render([m.content for m in probe], probe, add_generation_prompt=False)
        except Exception:  # noqa: BLE001 - jinja's raise_exception, or a template that indexes roles
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

    # ----------------------------------------------------------------------------------------- locating text

    def _locate(self, messages: list[Message]) -> tuple[str, list[tuple[int, int]], list[Message]]:
        """The rendered conversation, the character span [start, end) of each message's text in it, and the
        messages as rendered (a leading system turn folded into the first user turn where the template needs it).

        First the texts are wrapped in markers and the markers removed again: when that gives the real rendering,
        the spans are exact. A template that edits texts (Llama 3 trims them) makes the two differ; then the texts
        are replaced by markers alone and the template's own text between them (its scaffolding) is matched
        against the real rendering.

        Raises:
            ValueError: the template renders a text in a way neither method can locate.
        """
        messages = self._fold_system(messages)
        contents = [m.content for m in messages]
        rendered = self._render(contents, messages, add_generation_prompt=False)
        regions = self._align_with_known_skeleton(rendered, contents, messages)
        if regions is not None:
            return self._with_end_of_turn(rendered, regions, messages)
        wrapped = self._render([_mark(2 * i) + text + _mark(2 * i + 1) for i, text in enumerate(contents)],
                               messages, add_generation_prompt=False)
        regions = _unwrap(wrapped, rendered, len(messages))
        if regions is None:
            skeleton = self._render([_mark(i) for i in range(len(messages))], messages, add_generation_prompt=False)
            regions = _align(skeleton, rendered, contents)
        if regions is None:
            raise ValueError("the template changes this conversation's texts in a way that hides where each turn "
                             "is (only the texts themselves may differ between renderings)")
        return self._with_end_of_turn(rendered, regions, messages)

    def _align_with_known_skeleton(self, rendered: str, contents: list[str], messages: list[Message]
                                   ) -> list[tuple[int, int]] | None:
        """The spans of the texts in `rendered`, from the skeleton (markers in place of texts) rendered once per
        sequence of roles; None when the rendering does not match it, i.e. the template writes something else
        around these texts (then `_locate` renders the probing versions of this conversation itself).

        Why: a skeleton depends only on the roles, so one rendering per sample suffices for almost every sample
        instead of two; the alignment checks every character of the scaffolding, so a match is exact. Only for
        string-content templates, whose skeleton does not depend on where images are."""
        if not self.string_content:
            return None
        roles = tuple(m.role for m in messages)
        skeleton = self._skeletons.get(roles)
        if skeleton is None:
            if len(self._skeletons) >= 4096:  # distinct role sequences are few; bound memory all the same
                self._skeletons.clear()
            skeleton = self._skeletons[roles] = self._render([_mark(i) for i in range(len(messages))], messages,
                                                             add_generation_prompt=False)
        return _align(skeleton, rendered, contents)

    def _with_end_of_turn(self, rendered: str, regions: list[tuple[int, int]], messages: list[Message]
                          ) -> tuple[str, list[tuple[int, int]], list[Message]]:
        if self.appends_end_of_turn:
            rendered, regions = _insert_after_trained(rendered, regions, messages, self.end_of_turn)
        return rendered, regions, messages

    def _end_of_turn(self) -> str:
        """The special token(s) the template writes right after every assistant text (`<|im_end|>`, `<|eot_id|>`,
        `</s>`, Phi-3's `<|end|>`): what each trained answer ends with, so the model learns to stop.

        Found on conversations of 1 and 3 rounds as the special tokens common to what follows each answer, so a
        conversation-final extra (Phi-3's `<|endoftext|>` after `<|end|>`) or the next turn's header (Llama 3's
        `<|start_header_id|>`) is not part of it.
        """
        runs = []
        for rounds in (1, 3):
            messages = []
            for index in range(rounds):
                messages += [Message("user", f"Question {index}?"), Message("assistant", _ANSWER, trained=True)]
            text, regions, _ = self._locate(messages)
            runs += [self._special_run(text, end) for (_, end), m in zip(regions, messages) if m.trained]
        common = runs[0]
        for run in runs[1:]:
            length = next((i for i, (a, b) in enumerate(zip(common, run)) if a != b), min(len(common), len(run)))
            common = common[:length]
        if common:
            return "".join(common)
        if not self.tokenizer.eos_token:
            raise ValueError(
                f"The chat template of {self.model_name} puts no special token right after an assistant answer and "
                "the tokenizer has no eos token, so a model trained on it would never learn to stop. Pass a "
                "--chat_template that ends each assistant turn with an end-of-turn token.")
        logger.warning("The chat template of %s puts no special token right after an assistant answer: %r is "
                       "appended to each answer so the model learns to stop.", self.model_name,
                       self.tokenizer.eos_token)
        self.appends_end_of_turn = True
        return self.tokenizer.eos_token

    def _special_run(self, text: str, position: int) -> list[str]:
        """The special tokens that follow `position` in `text`, after optional whitespace, with nothing between."""
        position += len(text[position:]) - len(text[position:].lstrip())
        run = []
        while True:
            token = next((t for t in self.special_tokens if text.startswith(t, position)), None)
            if token is None:
                return run
            run.append(token)
            position += len(token)

    # ----------------------------------------------------------------------------------------- encoding

    def trained_spans(self, messages: list[Message], where: str
                      ) -> tuple[str, list[tuple[int, int]], list[tuple[int, int]]]:
        """The rendered conversation, the character spans of every trained answer (its text plus the
        end-of-turn), and the spans of every message's text. `where` names the sample in errors."""
        text, regions, messages = self._locate(messages)
        spans = []
        for (start, end), message in zip(regions, messages):
            if not message.trained:
                continue
            gap = len(text[end:]) - len(text[end:].lstrip())
            if not text.startswith(self.end_of_turn, end + gap):
                raise DataError(
                    f"{where}: the chat template of {self.model_name} does not end this assistant turn "
                    f"with its end-of-turn {self.end_of_turn!r} (it writes {text[end:end + 40]!r}), so the turn "
                    "cannot be trained to stop. Fix the template (--chat_template) or the turn.",
                    kind="template_error")
            spans.append((start, end + gap + len(self.end_of_turn)))
        return text, spans, regions

    def encode(self, sample: Sample) -> dict[str, list[int]]:
        """Token ids and labels (-100 where not trained) for one sample, image tokens expanded: what the collator
        feeds the model (`llava.inspect_data --json` prints it)."""
        compact = self.encode_compact(sample)
        input_ids, labels = self.expand(compact["input_ids"], compact["trained"])
        return {"input_ids": input_ids.tolist(), "labels": labels.tolist()}

    def expand(self, input_ids: np.ndarray, trained: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return expand_image_tokens(input_ids, trained, self.image_token_id, self.tokens_per_image)

    def expanded_length(self, input_ids: np.ndarray) -> int:
        return len(input_ids) + int((input_ids == self.image_token_id).sum()) * (self.tokens_per_image - 1)

    def encode_compact(self, sample: Sample, warnings: list[DataError] | None = None) -> dict[str, np.ndarray]:
        """One sample as stored for training: `input_ids` (int32) with one image token per image (expanded when
        batched, see `expand`) and `trained` (bool, where the label is the token itself). ~35x less memory than
        expanded label lists for LLaVA-1.5's 576-token images. What is trained but likely not meant (an answer
        cut by truncation) is appended to `warnings`."""
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
        return self._truncate(sample, input_ids, trained, [] if warnings is None else warnings)

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

    def _truncate(self, sample: Sample, input_ids: np.ndarray, trained: np.ndarray,
                  warnings: list[DataError]) -> dict[str, np.ndarray]:
        """Cut text beyond `max_length` (counted with images expanded), never an image; drop what follows the last
        trained token."""
        is_image = input_ids == self.image_token_id
        length = self.expanded_length(input_ids)
        if length > self.max_length:
            image_tokens = int(is_image.sum()) * self.tokens_per_image
            if image_tokens > self.max_length:
                raise DataError(f"{sample.describe()}: its images alone take {image_tokens} tokens, more than "
                                f"--model_max_length {self.max_length}; raise it or use fewer images.",
                                kind="images_exceed_max_length")
            ends = np.cumsum(np.where(is_image, self.tokens_per_image, 1))  # expanded end of each token
            keep = int(np.searchsorted(ends, self.max_length, side="right"))
            if is_image[keep:].any():
                raise DataError(
                    f"{sample.describe()}: {length} tokens, and --model_max_length {self.max_length} would "
                    "cut through an image's tokens; raise --model_max_length or shorten the sample.",
                    kind="truncation_cuts_image")
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
        return {"input_ids": input_ids[:end], "trained": trained[:end]}


def expand_image_tokens(input_ids: np.ndarray, trained: np.ndarray, image_token_id: int, tokens_per_image: int
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(ids, labels) of a stored sample: each image token repeated to the tower's token count, labels the ids
    where trained and -100 elsewhere (image tokens, prompts)."""
    repeats = np.where(input_ids == image_token_id, tokens_per_image, 1)
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


class TemplateTimeout(DataError):
    """A rendering took longer than `ConversationEncoder.render_time_limit`."""

    def __init__(self, seconds: float):
        super().__init__(f"rendering with the chat template took over {seconds:g} s and was stopped (a loop in "
                         "the template?); fix the template (--chat_template)", kind="template_timeout")


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise `TemplateTimeout` in the block after `seconds` (SIGALRM; a timer already running is restored).

    Why a signal: Jinja's sandbox bounds a single range() but not loops nested in each other, and a render cannot
    be stopped from outside its process. Validation renders in the main thread of its process (pool workers
    too); elsewhere (threads) the block runs without a limit.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise TemplateTimeout(seconds)

    previous = signal.signal(signal.SIGALRM, expire)
    outer_delay, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_delay:
            signal.setitimer(signal.ITIMER_REAL, outer_delay)


def _insert_after_trained(text: str, regions: list[tuple[int, int]], messages: list[Message], insert: str
                          ) -> tuple[str, list[tuple[int, int]]]:
    """`text` with `insert` written right after every trained message's text, and the regions moved with it."""
    pieces, moved, shift, previous = [], [], 0, 0
    for (start, end), message in zip(regions, messages):
        moved.append((start + shift, end + shift))
        if message.trained:
            pieces += [text[previous:end], insert]
            previous, shift = end, shift + len(insert)
    return "".join(pieces) + text[previous:], moved


def _unwrap(wrapped: str, rendered: str, count: int) -> list[tuple[int, int]] | None:
    """Spans of the texts in `rendered`, from a rendering whose texts were wrapped in markers 2i, 2i+1; None when
    removing the markers does not give `rendered` back (the template edited a text) or a marker went missing."""
    pieces, positions, length = [], {}, 0
    previous = 0
    for match in _MARK.finditer(wrapped):
        pieces.append(wrapped[previous:match.start()])
        length += match.start() - previous
        index = int(match.group(1))
        if index in positions:
            return None
        positions[index] = length
        previous = match.end()
    pieces.append(wrapped[previous:])
    if "".join(pieces) != rendered or sorted(positions) != list(range(2 * count)):
        return None
    regions = [(positions[2 * i], positions[2 * i + 1]) for i in range(count)]
    if any(start > end for start, end in regions) or any(a[1] > b[0] for a, b in zip(regions, regions[1:])):
        return None
    return regions


def _align(skeleton: str, rendered: str, contents: list[str]) -> list[tuple[int, int]] | None:
    """Spans of the texts in `rendered`, matching the template's scaffolding from `skeleton` (the rendering with
    marker i in place of text i); None when the scaffolding does not match."""
    matches = list(_MARK.finditer(skeleton))
    if [int(m.group(1)) for m in matches] != list(range(len(contents))):
        return None
    scaffolding = [skeleton[:matches[0].start()]]
    scaffolding += [skeleton[a.end():b.start()] for a, b in zip(matches, matches[1:])]
    scaffolding.append(skeleton[matches[-1].end():])
    if not rendered.startswith(scaffolding[0]):
        return None
    position, regions = len(scaffolding[0]), []
    for index, content in enumerate(contents):
        following = scaffolding[index + 1]
        if index == len(contents) - 1:
            end = len(rendered) - len(following)
            if not rendered.endswith(following) or end < position:
                return None
        elif rendered.startswith(content + following, position):
            end = position + len(content)
        elif following:
            end = rendered.find(following, position)
            if end < 0:
                return None
        else:
            return None
        regions.append((position, end))
        position = end + len(following)
    return regions
