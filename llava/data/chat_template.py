"""A model's chat template as training reads it: render a conversation, find where each text landed, and the
end-of-turn token(s) every trained answer ends with.

Nothing assumes that rendering a prefix of a conversation gives a prefix of the whole (Phi-3, Qwen3 and Mistral
v0.3 break that), and there is no per-template arithmetic: each text is located by rendering the conversation again
with every text wrapped in unique markers (or, for templates that edit texts, by matching the template's own
scaffolding). Templates that cannot express a conversation's system turn (Gemma 2 raises, Mixtral v0.1 needs
strictly alternating user/assistant roles) get the system text at the start of the first user turn, as Gemma 3's
own template does.
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import threading
from collections.abc import Iterator

from llava.data.types import ConfigurationError, DataError, Message

logger = logging.getLogger(__name__)

# Markers around (or in place of) each text in a probing render. Private-use code points: no template trims or
# splits on them, and no tokenizer ever sees them.
_MARK = re.compile("\ue000(\\d+)\ue001")
# A word-like stand-in for an answer that is not known yet (inference prompts, end-of-turn probe).
ANSWER_STAND_IN = "Answer"
_SYSTEM_PROBE = "\ue002system probe\ue002"


def _mark(index: int) -> str:
    return f"\ue000{index}\ue001"


class ChatTemplate:
    """Renders conversations with `template` (the processor's chat template) and locates each message's text.

    Attributes:
        end_of_turn: the special token(s) right after every assistant text (`<|im_end|>`, `<|eot_id|>`, `</s>`).
        appends_end_of_turn: True for a template that ends assistant turns with no special token (llava-hf's
            LLaVA-1.5 template): the eos token is then appended to every assistant text, as LLaVA's own training
            did, so the model learns to stop.
        string_content: the template takes message content as strings (LM templates, ours); False: as
            [{"type": ...}] parts (llava-hf templates).
        system_role: the template renders a leading system turn; False: it is folded into the first user turn.

    Raises (at construction, before any weights load):
        ValueError: no template, or one that ends assistant turns with no special token while the tokenizer has
            no eos token either.
    """

    # Seconds one rendering may take: a template with nested loops (`range(100000)` twice) would otherwise hang
    # data preparation, which has no other way to tell a slow template from a stuck one.
    render_time_limit: float = 10.0

    def __init__(self, tokenizer, template: str | None, image_token: str, image_token_id: int):
        self.tokenizer = tokenizer
        self.template = template
        self.image_token = image_token
        self.model_name = tokenizer.name_or_path or "this model"
        if not template:
            raise ConfigurationError(f"The processor of {self.model_name} has no chat template; pass one with "
                             "--chat_template when assembling the model.")
        # Control tokens (turn markers, eos) the tokenizer would read out of text; the image token is meant to be.
        self.special_tokens = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()
                               if t.special and i != image_token_id}
        self._by_length = sorted(self.special_tokens.values(), key=len, reverse=True)  # longest first, for matching
        self._compiled_template, self._template_variables = None, {}  # see `_compile_template`
        self._skeletons: dict[tuple[str, ...], str] = {}  # role sequence -> rendering with markers for texts
        self.string_content = self._template_takes_string_content()
        self.system_role = self._template_has_system_role()
        self._compile_template()
        if not self.system_role:
            logger.warning("The chat template of %s cannot render a system turn: each conversation's system text is "
                           "put at the start of its first user turn.", self.model_name)
        self.appends_end_of_turn = False  # set by `_end_of_turn` for templates that write none
        try:
            self.end_of_turn = self._end_of_turn()
        except TemplateTimeout as error:
            raise self._stuck(error) from None

    def render(self, messages: list[Message], add_generation_prompt: bool = False) -> str:
        """The chat template's text for `messages`, image placeholders left in place."""
        return self._render([m.content for m in messages], self._fold_system(messages), add_generation_prompt)

    def _render(self, texts: list[str], messages: list[Message], add_generation_prompt: bool) -> str:
        """Render `messages` with `texts` in place of their contents (`texts[i]` for `messages[i]`)."""
        conversation = [{"role": m.role, "content": text if self.string_content else self._structured(text)}
                        for m, text in zip(messages, texts)]
        with _time_limit(self.render_time_limit), self._sandbox_refusals_named():
            if self._compiled_template is not None:
                return self._compiled_template.render(messages=conversation, tools=None, documents=None,
                                                      add_generation_prompt=add_generation_prompt,
                                                      **self._template_variables)
            return self.tokenizer.apply_chat_template(conversation, chat_template=self.template,
                                                      tokenize=False, add_generation_prompt=add_generation_prompt)

    @contextlib.contextmanager
    def _sandbox_refusals_named(self) -> Iterator[None]:
        """Jinja's sandbox refusing what the template does (reaching Python internals), raised as a
        `ConfigurationError` naming whose template it is: Jinja's own error names neither."""
        from jinja2.exceptions import SecurityError

        try:
            yield
        except SecurityError as error:
            raise ConfigurationError(
                f"The chat template of {self.model_name} (--chat_template when given, else its chat_template.jinja "
                f"or tokenizer_config.json) does what Jinja's sandbox forbids: {error} Templates render untrusted "
                "text, so transformers runs them sandboxed and refuses this one everywhere: fix the template, or "
                "pass another with --chat_template.") from None

    def _compile_template(self) -> None:
        """Render with transformers' compiled template directly, when that gives what `apply_chat_template` gives
        (checked on the probe conversations): the wrapper re-validates and copies every message on every call,
        ~40% of a rendering, repeated twice per sample."""
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template
            compiled = _compile_jinja_template(self.template)
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
        except TemplateTimeout as error:
            raise self._stuck(error) from None
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
            with _time_limit(self.render_time_limit):
                return probe in self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": probe}], chat_template=self.template, tokenize=False)
        except TemplateTimeout as error:
            raise self._stuck(error) from None
        except Exception:  # noqa: BLE001 - a template that fails on strings expects structured content
            return False

    def _template_has_system_role(self) -> bool:
        """Whether the template renders a leading system turn (Gemma 2 raises; some templates drop it silently)."""
        probe = [Message("system", _SYSTEM_PROBE), Message("user", "Hi"), Message("assistant", "Hello", True)]
        try:
            return _SYSTEM_PROBE in self._render([m.content for m in probe], probe, add_generation_prompt=False)
        except TemplateTimeout as error:
            raise self._stuck(error) from None
        except Exception:  # noqa: BLE001 - jinja's raise_exception, or a template that indexes roles
            return False

    def _stuck(self, error: TemplateTimeout) -> DataError:
        """The error for a template that does not finish rendering a probe conversation (before any sample):
        every run would hang there, with the token cache's lock held."""
        return DataError(f"The chat template of {self.model_name}: {error}", kind=error.kind)

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

    def locate(self, messages: list[Message]) -> tuple[str, list[tuple[int, int]], list[Message]]:
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
                messages += [Message("user", f"Question {index}?"), Message("assistant", ANSWER_STAND_IN, trained=True)]
            text, regions, _ = self.locate(messages)
            runs += [self._special_run(text, end) for (_, end), m in zip(regions, messages) if m.trained]
        common = runs[0]
        for run in runs[1:]:
            length = next((i for i, (a, b) in enumerate(zip(common, run)) if a != b), min(len(common), len(run)))
            common = common[:length]
        if common:
            return "".join(common)
        if not self.tokenizer.eos_token:
            raise ConfigurationError(
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
            token = next((t for t in self._by_length if text.startswith(t, position)), None)
            if token is None:
                return run
            run.append(token)
            position += len(token)


class TemplateTimeout(DataError):
    """A rendering took longer than `ChatTemplate.render_time_limit`."""

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
