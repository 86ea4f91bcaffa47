"""Conversations -> token ids and labels with the model's own chat template; loss only on assistant turns.

How assistant tokens are found, for any template: render the conversation up to each assistant turn with
the generation prompt, and up to the end of that turn; the characters in between are what the model
must produce (the reply and its end-of-turn marker). Tokens whose characters start inside such a span
get their id as label; all others (system, user, template scaffolding) get IGNORE_INDEX.
"""

from __future__ import annotations

import logging

from transformers import PreTrainedTokenizerBase

from medusa_forge.errors import UserError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100

# Documented fallback for tokenizers without a chat template (base models such as GPT-2):
# "User: ...\n\nAssistant:\n...<eos>\n\n". It is prefix-consistent, so the masking below works with it.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}:\n{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:\n{% endif %}"
)


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give a tokenizer without a chat template the documented fallback (warns once per tokenizer)."""
    if not getattr(tokenizer, "chat_template", None):
        logger.warning(
            "the tokenizer has no chat template; using medusa-forge's fallback 'User: ... Assistant: ...' "
            "format. Train and serve with the same tokenizer folder so both use it."
        )
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    if not tokenizer.is_fast:
        raise UserError(
            f"tokenizer {tokenizer.name_or_path!r} is a slow (Python) tokenizer; medusa-forge needs a fast "
            f"tokenizer (tokenizer.json) to map template characters to tokens"
        )
    return tokenizer


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The full rendered text and the character spans the assistant produces in it."""
    text = _render(tokenizer, messages, generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True) if i else ""
        through = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not text.startswith(through) or not through.startswith(before):
            raise ValueError(
                "the chat template renders a conversation differently from its own prefixes "
                "(it rewrites earlier turns), so assistant tokens cannot be located"
            )
        spans.append((len(before), len(through)))
    return text, spans


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], max_length: int
) -> dict[str, list[int]]:
    """input_ids and labels (IGNORE_INDEX outside assistant spans), truncated to max_length tokens.

    Raises ValueError when the template rejects the conversation (e.g. roles that do not alternate).
    """
    text, spans = assistant_spans(tokenizer, messages)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=False)
    input_ids = encoding["input_ids"][:max_length]
    labels = []
    span_index = 0
    for token_id, (start, end) in zip(input_ids, encoding["offset_mapping"], strict=False):
        while span_index < len(spans) and start >= spans[span_index][1]:
            span_index += 1
        if span_index < len(spans):
            span_start, span_end = spans[span_index]
            # overlap: a BPE token that merges the prompt's last space into the reply's first word is learned too
            inside = start < span_end and (end > span_start if end > start else start >= span_start)
        else:
            inside = False
        labels.append(token_id if inside else IGNORE_INDEX)
    return {"input_ids": input_ids, "labels": labels}
