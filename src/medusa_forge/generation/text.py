"""Chat prompts to token ids, token ids to reply text, streamed text, and the tokens that end a reply."""

from __future__ import annotations

from transformers import PreTrainedModel, PreTrainedTokenizerBase


def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    """Prompt ids exactly as training renders them: chat template text, then tokens without extra specials."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def decode_text(tokenizer: PreTrainedTokenizerBase, token_ids: list[int]) -> str:
    """Reply text: special tokens (end of turn, padding) left out."""
    return tokenizer.decode(token_ids, skip_special_tokens=True)


class StreamedText:
    """Hands out a growing reply's text in pieces: `update` returns only what is new since the last piece.

    Decoding a reply that ends inside a multi-byte character gives U+FFFD; that text is held back until the rest
    of the character arrives (or the reply ends), so a client never receives half a character.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.sent = ""

    def update(self, token_ids: list[int], final: bool = False) -> str:
        """The new text of the reply `token_ids` (all its tokens so far); "" when there is none to send yet."""
        text = decode_text(self.tokenizer, token_ids)
        if not final and text.endswith("\ufffd"):
            return ""
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        delta = text[len(self.sent) :]
        self.sent = text
        return delta


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Every token that ends a reply: the model's generation config's and the tokenizer's."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
