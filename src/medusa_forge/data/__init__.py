"""Conversation files in; token ids with assistant-only labels out."""

from medusa_forge.data.conversations import Conversation, load_conversations
from medusa_forge.data.tokenize import ensure_chat_template, tokenize_conversation

__all__ = ["Conversation", "ensure_chat_template", "load_conversations", "tokenize_conversation"]
