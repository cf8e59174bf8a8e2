"""One record -> (input_ids, labels): the token-level half of the data pipeline, without `datasets`.

Labels are `IGNORE` (-100, what transformers' loss skips) on prompt tokens unless the caller trains
on inputs. Two encoders serve every format:
- `encode_chat`: messages rendered by the tokenizer's chat template. The tokens of each assistant
  turn are the full rendering up to that turn minus the rendering of the turns before it with the
  generation prompt, which must be a prefix of it (checked): the answer's labels include the
  template's end-of-turn tokens, never the "assistant" header.
- `encode_completion`: a prompt and a completion as plain text, the completion followed by EOS.
Instruction records (Alpaca's `instruction`/`input`/`output`) become chat messages when the
tokenizer has a chat template, else Alpaca's own prompt text and a completion.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import InvalidArgumentError

IGNORE = -100

ALPACA = (
    "Below is an instruction that describes a task{inp}. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n"
)
# Columns that name each format (the first format whose columns a dataset has wins).
FORMAT_COLUMNS = {
    "chat": ("messages",),
    "instruction": ("instruction", "output"),
    "completion": ("prompt", "completion"),
    "text": ("text",),
}


class RecordError(InvalidArgumentError):
    """A record that cannot be encoded; the caller adds which file and row."""


def ids_of(encoded) -> list[int]:
    """apply_chat_template returns a list or (transformers 5) a BatchEncoding."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> list[int]:
    try:
        return ids_of(
            tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
        )
    except Exception as e:  # noqa: BLE001  (jinja's TemplateError and the template's raise_exception)
        raise RecordError(f"the chat template refused it: {e}") from None


def check_messages(messages, train_on_inputs: bool) -> None:
    """Each message a mapping with a role and a content; a user turn, and an assistant turn to learn."""
    if not isinstance(messages, list) or not messages:
        raise RecordError("'messages' must be a non-empty list of {role, content}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m.get("content") is None:
            raise RecordError(f"message {i} needs a 'role' and a 'content', got {m!r}")
    roles = [m["role"] for m in messages]
    needed = ("user",) if train_on_inputs else ("user", "assistant")
    missing = [r for r in needed if r not in roles]
    if missing:
        raise RecordError(
            f"chat record has no {' or '.join(map(repr, missing))} message (roles: {', '.join(roles)})"
        )


def encode_chat(
    tokenizer, messages: list[dict], train_on_inputs: bool = False
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a conversation rendered by the chat template; labels on assistant turns."""
    ids = _render(tokenizer, messages)
    if train_on_inputs:
        return ids, list(ids)
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = _render(tokenizer, messages[:i], generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1])
        if upto[: len(head)] != head or ids[: len(upto)] != upto:
            raise RecordError(
                "the chat template's rendering of the turns before an answer is not a prefix of the "
                "whole conversation, so the answer tokens cannot be found (train_on_inputs: true avoids it)"
            )
        labels[len(head) : len(upto)] = ids[len(head) : len(upto)]
    return ids, labels


def encode_completion(
    tokenizer, prompt: str, completion: str, train_on_inputs: bool = False
) -> tuple[list[int], list[int]]:
    """(input_ids, labels): the prompt's tokens (with the tokenizer's special tokens), then the
    completion's and EOS; labels on the completion and EOS."""
    head = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    tail = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = list(head) + list(tail)
    return ids, list(ids) if train_on_inputs else [IGNORE] * len(head) + ids[len(head) :]


def encode_text(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """Plain text: every token trained, EOS appended."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"]) + [tokenizer.eos_token_id]
    return ids, list(ids)


def _text(record: dict, key: str, optional: bool = False) -> str:
    value = record.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise RecordError(f"{key!r} must be text, got {value!r}")
    return value


def _system(system_prompt: str | None) -> list[dict]:
    return [{"role": "system", "content": system_prompt}] if system_prompt else []


def _instruction(tokenizer, record: dict, train_on_inputs: bool, system_prompt: str | None):
    instruction, extra = _text(record, "instruction"), _text(record, "input", optional=True)
    output = _text(record, "output")
    if has_chat_template(tokenizer):
        user = instruction + (f"\n\n{extra}" if extra else "")
        messages = [*_system(system_prompt), {"role": "user", "content": user},
                    {"role": "assistant", "content": output}]  # fmt: skip
        return encode_chat(tokenizer, messages, train_on_inputs)
    prompt = ALPACA.format(
        inp=", paired with an input that provides further context" if extra else "",
        instruction=instruction,
        input=f"### Input:\n{extra}\n\n" if extra else "",
    )
    return encode_completion(tokenizer, prompt, output, train_on_inputs)


def _chat(tokenizer, record: dict, train_on_inputs: bool, system_prompt: str | None):
    messages = record.get("messages")
    check_messages(messages, train_on_inputs)
    return encode_chat(
        tokenizer, [{"role": m["role"], "content": m["content"]} for m in messages], train_on_inputs
    )


ENCODERS: dict[str, Callable] = {
    "chat": _chat,
    "instruction": _instruction,
    "completion": lambda tok, r, t, s: encode_completion(tok, _text(r, "prompt"), _text(r, "completion"), t),
    "text": lambda tok, r, t, s: encode_text(tok, _text(r, "text")),
}


def detect_format(columns: list[str]) -> str | None:
    """The first format whose columns are all present, or None."""
    for name, needed in FORMAT_COLUMNS.items():
        if all(c in columns for c in needed):
            return name
    return None


def encode_record(tokenizer, record: dict, fmt: str, train_on_inputs: bool, system_prompt: str | None):
    return ENCODERS[fmt](tokenizer, record, train_on_inputs, system_prompt)
