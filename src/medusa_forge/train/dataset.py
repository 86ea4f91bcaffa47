"""Tokenised conversation datasets (eager or lazy) and the padding collator."""

from __future__ import annotations

import logging

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from medusa_forge.data.conversations import Conversation, named_skips
from medusa_forge.data.tokenize import IGNORE_INDEX, tokenize_conversation
from medusa_forge.drafts.shapes import padded_length

logger = logging.getLogger(__name__)


class ConversationDataset(Dataset):
    """Token ids + assistant-only labels. Eager mode tokenises everything up front and drops (with a
    counted warning) conversations that the template rejects or that have no label within max_length;
    lazy mode tokenises on first access (`--lazy_preprocess`) and caches the result."""

    def __init__(
        self,
        conversations: list[Conversation],
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        lazy: bool = False,
        source: str = "data",
    ) -> None:
        self.tokenizer, self.max_length, self.lazy = tokenizer, max_length, lazy
        self.conversations = conversations
        self._cache: dict[int, dict[str, list[int]]] = {}
        if not lazy:
            self.conversations, skipped = [], {}
            for conversation in tqdm(conversations, desc=f"tokenising {source}", leave=False):
                try:
                    item = tokenize_conversation(tokenizer, conversation.messages, max_length)
                except Exception as err:  # a template may raise anything (jinja errors)
                    why = f"rejected by the chat template ({str(err).splitlines()[0][:80]})"
                    skipped.setdefault(why, []).append(f"conversation {conversation.id}")
                    continue
                if all(label == IGNORE_INDEX for label in item["labels"][2:]):
                    why = f"with no assistant token within {max_length} tokens"
                    skipped.setdefault(why, []).append(f"conversation {conversation.id}")
                    continue
                self._cache[len(self.conversations)] = item
                self.conversations.append(conversation)
            if skipped:
                total = sum(map(len, skipped.values()))
                logger.warning("%s: skipped %d conversations (%s)", source, total, named_skips(skipped))
            if not self.conversations:
                from medusa_forge.errors import UserError

                raise UserError(f"{source}: no conversation left to train on after tokenisation")

    def __len__(self) -> int:
        return len(self.conversations)

    def all_items(self) -> list[dict[str, list[int]]]:
        """Every tokenised conversation, in order (tokenises the rest first in lazy mode)."""
        return [self[i] for i in range(len(self))]

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        if index not in self._cache:
            conversation = self.conversations[index]
            try:
                self._cache[index] = tokenize_conversation(self.tokenizer, conversation.messages, self.max_length)
            except Exception as err:
                logger.warning(
                    "conversation %s rejected by the chat template (%s); it gets no loss", conversation.id, err
                )
                ids = self.tokenizer("", add_special_tokens=True)["input_ids"] or [0]
                self._cache[index] = {"input_ids": ids, "labels": [IGNORE_INDEX] * len(ids)}
        return self._cache[index]


class PadCollator:
    """Right-pads a batch: token ids with pad_token_id (attention_mask 0 there), cached hidden states with
    zeros, labels with IGNORE_INDEX (so padding never reaches the loss). Items with cached hidden states may
    carry their token ids too (EAGLE-3); then both are returned. The padded length is the longest row's rounded
    up to a multiple of 64 (`shapes.padded_length`, at most max_length), so that training sees a few shapes."""

    def __init__(self, pad_token_id: int, max_length: int | None = None) -> None:
        self.pad_token_id, self.max_length = pad_token_id, max_length

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        length = padded_length(max(len(item["labels"]) for item in items), self.max_length)
        labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
        for row, item in enumerate(items):
            labels[row, : len(item["labels"])] = torch.tensor(item["labels"])
        if "hidden_states" in items[0]:
            hidden = torch.zeros((len(items), length, items[0]["hidden_states"].shape[-1]), dtype=torch.float16)
            for row, item in enumerate(items):
                hidden[row, : len(item["labels"])] = item["hidden_states"]
            if "input_ids" not in items[0]:
                return {"hidden_states": hidden, "labels": labels}
            return {"hidden_states": hidden, **self._ids(items, length), "labels": labels}
        return {**self._ids(items, length), "labels": labels}

    def _ids(self, items: list[dict], length: int) -> dict[str, torch.Tensor]:
        input_ids = torch.full((len(items), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            input_ids[row, :n] = torch.tensor(item["input_ids"])
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}
