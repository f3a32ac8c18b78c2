"""SFT data files (JSONL) -> examples as text segments, each marked prompt or response.

One JSON object a line (blank lines skipped). A line is either a chat or a prompt/response record:

Chat: `{"messages": [{"role": ..., "content": ...}, ...]}` (key `SFTFormat.messages_field`).
Roles are system, user and assistant; each message is rendered by its role's template, where
`{content}` stands for the message's text:

    system     system_template      default "<|system|>\\n{content}\\n"
    user       user_template        default "<|user|>\\n{content}\\n"
    assistant  assistant_template   default "<|assistant|>\\n{content}\\n"

The loss covers assistant contents only: in the assistant template, the text before `{content}`
is prompt (no loss), the content is response (loss) and is followed by the EOS token (loss), and
the text after `{content}` comes after that EOS, as prompt. A chat needs an assistant message;
whatever follows the last assistant content and its EOS (template text, later messages) is left
out, as it would be context for nothing.

Prompt/response: `{"prompt": "...", "response": "..."}` (keys `prompt_field`, `response_field`),
rendered as `prompt_template` with `{prompt}` replaced, then the response, then EOS:

    "### Instruction:\\n{prompt}\\n\\n### Response:\\n" + response + EOS

When the response field holds a list of instances `[{"input": ..., "output": ...}, ...]` (the
self-instruct layout `{"instruction": ..., "instances": [...]}`, read with prompt_field=instruction
and response_field=instances), each instance is one example: its prompt is the instruction, plus
`instance_separator` (default "\\n\\n") and the instance's input when that input holds any
non-whitespace text; its response is the instance's output.

Templates are filled with `str.replace`, so braces elsewhere in a template or in the data need
no escaping. Bad input raises `InputError` with one line naming the file, line and key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, NamedTuple

from flaxpod.data.jsonl import read_jsonl
from flaxpod.model.errors import ConfigError, InputError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class SFTFormat:
    """How SFT records are read and rendered (see the module docstring for the layout)."""

    prompt_field: str = "prompt"
    """Key of the prompt (or instruction) text in prompt/response records."""
    response_field: str = "response"
    """Key of the response text, or of a list of {input, output} instances to expand."""
    messages_field: str = "messages"
    """Key of a chat's list of {role, content} messages; a record holding it is read as a chat."""
    instance_input_field: str = "input"
    """Key of an instance's input, appended to the prompt when it holds non-whitespace text."""
    instance_output_field: str = "output"
    """Key of an instance's output: the response."""
    instance_separator: str = "\n\n"
    """Text between the instruction and an instance's input."""
    prompt_template: str = "### Instruction:\n{prompt}\n\n### Response:\n"
    """Text before a response; `{prompt}` is replaced by the prompt. The response follows it directly."""
    system_template: str = "<|system|>\n{content}\n"
    """Rendering of a system message (no loss)."""
    user_template: str = "<|user|>\n{content}\n"
    """Rendering of a user message (no loss)."""
    assistant_template: str = "<|assistant|>\n{content}\n"
    """Rendering of an assistant message: loss on `{content}` and the EOS after it, not on the rest."""

    def __post_init__(self) -> None:
        for name, placeholder in (
            ("prompt_template", "{prompt}"),
            ("system_template", "{content}"),
            ("user_template", "{content}"),
            ("assistant_template", "{content}"),
        ):
            count = getattr(self, name).count(placeholder)
            if count != 1:
                raise ConfigError(f"{name}: must hold {placeholder} exactly once, found it {count} times")
        for name in ("prompt_field", "response_field", "messages_field"):
            if not getattr(self, name):
                raise ConfigError(f"{name}: must not be empty")


class Segment(NamedTuple):
    """A piece of an example's text; a response piece is followed by EOS and carries the loss."""

    text: str
    is_response: bool


@dataclass(frozen=True)
class Example:
    """One training example: alternating prompt and response segments, from `path`:`line`."""

    segments: tuple[Segment, ...]
    path: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass(frozen=True)
class SFTEvalPair:
    """A prompt to generate from and the reference answer (an example's last response).

    `prompt` is the text before the reference; `context` its segments, earlier responses
    included, so the prompt can be tokenized exactly as in training (`sft.encode_prompt`).
    """

    prompt: str
    reference: str
    context: tuple[Segment, ...]
    path: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def _merged(segments: list[Segment]) -> tuple[Segment, ...]:
    """Adjacent prompt segments joined: the prompt text between two responses is encoded as one string."""
    out: list[Segment] = []
    for seg in segments:
        if out and not seg.is_response and not out[-1].is_response:
            out[-1] = Segment(out[-1].text + seg.text, False)
        elif seg.text or seg.is_response:
            out.append(seg)
    return tuple(out)


def _string(value: Any, where: str, key: str) -> str:
    if not isinstance(value, str):
        raise InputError(f"{where}: key {key!r}: expected a string, got {type(value).__name__}")
    return value


def _chat_segments(messages: Any, fmt: SFTFormat, where: str) -> tuple[Segment, ...]:
    key = fmt.messages_field
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where}: key {key!r}: expected a non-empty list of {{role, content}} messages")
    segments: list[Segment] = []
    for i, message in enumerate(messages):
        item = f"{key}[{i}]"
        if not isinstance(message, dict):
            raise InputError(f"{where}: key {item!r}: expected an object, got {type(message).__name__}")
        if "role" not in message or "content" not in message:
            missing = "role" if "role" not in message else "content"
            raise InputError(f"{where}: key {item!r}: message has no {missing!r}")
        role = message["role"]
        if role not in ROLES:
            raise InputError(f"{where}: key {item + '.role'!r}: unknown role {role!r}, expected one of {ROLES}")
        content = _string(message["content"], where, f"{item}.content")
        template = getattr(fmt, f"{role}_template")
        before, after = template.split("{content}")
        if role == "assistant":
            segments += [Segment(before, False), Segment(content, True), Segment(after, False)]
        else:
            segments.append(Segment(before + content + after, False))
    if not any(s.is_response for s in segments):
        raise InputError(f"{where}: key {key!r}: the chat has no assistant message, so nothing to learn")
    # Text after the last response would only be context for nothing: it is left out.
    merged = _merged(segments)
    return merged[: max(i for i, s in enumerate(merged) if s.is_response) + 1]


def _prompt_response_segments(record: dict, fmt: SFTFormat, where: str) -> list[tuple[Segment, ...]]:
    for key in (fmt.prompt_field, fmt.response_field):
        if key not in record:
            raise InputError(
                f"{where}: missing key {key!r} (a record needs {fmt.prompt_field!r} and "
                f"{fmt.response_field!r}, or {fmt.messages_field!r}); it has {sorted(record)}"
            )
    prompt = _string(record[fmt.prompt_field], where, fmt.prompt_field)
    response = record[fmt.response_field]
    if isinstance(response, str):
        pairs = [(prompt, response)]
    elif isinstance(response, list):
        if not response:
            raise InputError(f"{where}: key {fmt.response_field!r}: empty list of instances")
        pairs = []
        for i, instance in enumerate(response):
            key = f"{fmt.response_field}[{i}]"
            if not isinstance(instance, dict):
                raise InputError(f"{where}: key {key!r}: expected an object, got {type(instance).__name__}")
            for field in (fmt.instance_input_field, fmt.instance_output_field):
                if field not in instance:
                    raise InputError(f"{where}: key {key!r}: missing key {field!r}")
            text_in = _string(instance[fmt.instance_input_field], where, f"{key}.{fmt.instance_input_field}")
            text_out = _string(instance[fmt.instance_output_field], where, f"{key}.{fmt.instance_output_field}")
            full_prompt = prompt + fmt.instance_separator + text_in if text_in.strip() else prompt
            pairs.append((full_prompt, text_out))
    else:
        raise InputError(
            f"{where}: key {fmt.response_field!r}: expected a string or a list of instances, "
            f"got {type(response).__name__}"
        )
    return [_merged([Segment(fmt.prompt_template.replace("{prompt}", p), False), Segment(r, True)]) for p, r in pairs]


def load_sft_examples(path: str | os.PathLike, fmt: SFTFormat | None = None) -> list[Example]:
    """Every example of a JSONL file, in file order (instances expanded in their order)."""
    fmt = fmt or SFTFormat()
    examples = []
    for lineno, record in read_jsonl(path):
        where = f"{path}:{lineno}"
        if fmt.messages_field in record:
            examples.append(Example(_chat_segments(record[fmt.messages_field], fmt, where), str(path), lineno))
        else:
            for segments in _prompt_response_segments(record, fmt, where):
                examples.append(Example(segments, str(path), lineno))
    return examples


def eval_pair(example: Example) -> SFTEvalPair:
    """The example's last response as the reference, everything before it as the prompt."""
    last = max(i for i, s in enumerate(example.segments) if s.is_response)
    context = example.segments[:last]
    return SFTEvalPair(
        prompt="".join(s.text for s in context),
        reference=example.segments[last].text,
        context=context,
        path=example.path,
        line=example.line,
    )


def load_sft_eval_pairs(path: str | os.PathLike, fmt: SFTFormat | None = None) -> list[SFTEvalPair]:
    """(prompt, reference) pairs of a JSONL file for generation-based evaluation, in file order."""
    return [eval_pair(e) for e in load_sft_examples(path, fmt)]
