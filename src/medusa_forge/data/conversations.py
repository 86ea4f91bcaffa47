"""Read conversation files (ShareGPT or role/content lists, JSON or JSONL) into one normal form.

Normal form: `Conversation(id, messages)` with messages `{"role": "system"|"user"|"assistant", "content"}`.
Prompts are records too: a plain string or `{"prompt": "..."}` is a conversation of one user turn. Training needs
assistant replies; distill (which writes them) and eval (which measures on the model's own answers) do not.
Aliases: `sharegpt` (training split of the embedded ShareGPT file) and `sharegpt-heldout` (the fixed
held-out split that training never sees; evaluation uses it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from medusa_forge.errors import UserError

logger = logging.getLogger(__name__)

DATA_ALIASES = ("sharegpt", "sharegpt-heldout")
# Held-out split: a conversation is held out when sha1 of its root id ("abc" for chunks "abc_0", "abc_1")
# falls in the first HELDOUT_PERCENT of 100 buckets. Chunks of one conversation stay on one side.
HELDOUT_PERCENT = 2

ROLE_MAP = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "system": "system",
}


NO_REPLY = "without an assistant reply"
_WARNED_TRUNCATED: set[str] = set()  # warn once per file and process, not on every load


@dataclass
class Conversation:
    id: str
    messages: list[dict[str, str]] = field(default_factory=list)


@dataclass
class LoadStats:
    """What was skipped and why, so nothing is dropped silently."""

    skipped: Counter = field(default_factory=Counter)

    def warn(self, source: str) -> None:
        if self.skipped:
            reasons = ", ".join(f"{n} {why}" for why, n in self.skipped.most_common())
            logger.warning("%s: skipped %d records (%s)", source, sum(self.skipped.values()), reasons)


def split_of(record_id: str) -> str:
    """'heldout' or 'train' for a record id; stable across runs, machines and Python versions."""
    root = re.sub(r"_\d+$", "", record_id)
    bucket = int(hashlib.sha1(root.encode("utf-8")).hexdigest(), 16) % 100
    return "heldout" if bucket < HELDOUT_PERCENT else "train"


def _read_json_records(path: Path) -> list:
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if not stripped:
        raise UserError(f"{path}: the file is empty")
    if stripped[0] == "[" and path.suffix != ".jsonl":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            if err.msg != "Extra data":  # "Extra data": a JSONL file whose lines are lists
                return _recover_truncated_list(path, text, err)
        else:
            return records
    if stripped[0] == "{" and path.suffix != ".jsonl":
        try:
            return [json.loads(text)]  # a single JSON object (or a one-line JSONL file)
        except json.JSONDecodeError:
            pass  # JSONL: parsed line by line below, with line numbers in errors
    records = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise UserError(
                f"{path}: line {line_no} is not valid JSON ({err.msg}, column {err.colno}); "
                f"fix or remove that line (JSONL expects one JSON object per line)"
            ) from None
    return records


def _recover_truncated_list(path: Path, text: str, err: json.JSONDecodeError) -> list:
    """A JSON list cut off mid-record (like the embedded ShareGPT file): keep every complete record.

    Only a cut at the end is recovered; broken JSON in the middle is an error naming the position.
    """
    decoder = json.JSONDecoder()
    separators = re.compile(r"[\s,]*")
    pos = text.index("[") + 1
    records = []
    while True:
        pos = separators.match(text, pos).end()
        if pos >= len(text) or text[pos] == "]":
            break
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as inner:
            if _reaches_end_of_file(text, inner):
                if str(path) in _WARNED_TRUNCATED:
                    return records
                _WARNED_TRUNCATED.add(str(path))
                logger.warning(
                    "%s is truncated: recovered %d complete records, dropped the incomplete last one",
                    path,
                    len(records),
                )
                return records
            break
        records.append(record)
    raise UserError(
        f"{path}: invalid JSON at line {err.lineno}, column {err.colno} ({err.msg}); "
        f"it was read as a JSON list because it starts with '['"
    )


def _reaches_end_of_file(text: str, err: json.JSONDecodeError) -> bool:
    # json reports "Unterminated string" only when no closing quote exists before the end of the text.
    return err.msg.startswith("Unterminated string") or err.pos >= len(text.rstrip())


def has_reply(conversation: Conversation) -> bool:
    """Whether the conversation holds an assistant reply (what training and reference accuracy read)."""
    return any(m["role"] == "assistant" and m["content"].strip() for m in conversation.messages)


def _normalise(
    record: object, index: int, path: str, stats: LoadStats, need_reply: bool
) -> Conversation | None:
    """One raw record -> Conversation; errors name the file and record, odd-but-expected cases skip."""
    where = f"{path}: record {index}"
    if isinstance(record, str):
        record_id, turns = str(index), [{"role": "user", "content": record}]
    elif isinstance(record, list):
        record_id, turns = str(index), record
    elif isinstance(record, dict):
        record_id = str(record.get("id", index))
        turns = record.get("conversations", record.get("messages"))
        if turns is None and "prompt" in record:
            if not isinstance(record["prompt"], str):
                raise UserError(f"{where}: 'prompt' is a {type(record['prompt']).__name__}, expected a string")
            turns = [{"role": "user", "content": record["prompt"]}]
        if turns is None:
            raise UserError(
                f"{where} has neither 'conversations' (ShareGPT), 'messages' (role/content) nor 'prompt'; "
                f"its keys are {sorted(record)}"
            )
    else:
        raise UserError(
            f"{where} is a {type(record).__name__}; expected an object, a list of messages or a prompt string"
        )
    if not isinstance(turns, list):
        raise UserError(f"{where}: the conversation is a {type(turns).__name__}, expected a list of messages")
    messages = []
    for turn_index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise UserError(f"{where}, message {turn_index} is a {type(turn).__name__}, expected an object")
        speaker = turn.get("from", turn.get("role"))
        content = turn.get("value", turn.get("content"))
        if not isinstance(speaker, str) or not isinstance(content, str):
            raise UserError(
                f"{where}, message {turn_index}: needs a string 'from'/'role' and a string 'value'/'content', "
                f"got {turn!r:.200}"
            )
        role = ROLE_MAP.get(speaker.lower())
        if role is None:
            stats.skipped[f"with unknown speaker {speaker!r}"] += 1
            return None
        messages.append({"role": role, "content": content})
    conversation = Conversation(id=record_id, messages=messages)
    if need_reply and not has_reply(conversation):
        stats.skipped[NO_REPLY] += 1
        return None
    if not any(m["role"] == "user" and m["content"].strip() for m in messages):
        stats.skipped["without a user turn"] += 1
        return None
    return conversation


def load_conversations(source: str, max_samples: int | None = None, need_reply: bool = True) -> list[Conversation]:
    """Load a file or alias into normalised conversations, in file order. need_reply=False also keeps prompt-only
    records (each needs a user turn then)."""
    if source in DATA_ALIASES:
        from medusa_forge.defaults import sharegpt_path

        path, split = sharegpt_path(), ("heldout" if source.endswith("heldout") else "train")
    else:
        path, split = Path(source), None
        if not path.is_file():
            raise UserError(
                f"data file {source!r} not found; pass a JSON/JSONL conversation file or one of {DATA_ALIASES}"
            )
    records = _read_json_records(path)
    if not isinstance(records, list):
        raise UserError(f"{path}: expected a JSON list of conversations or JSONL, got a {type(records).__name__}")
    stats = LoadStats()
    conversations = []
    for index, record in enumerate(records):
        if split is not None and split_of(str(record.get("id", index))) != split:
            continue
        conversation = _normalise(record, index, str(path), stats, need_reply)
        if conversation is None:
            continue
        conversations.append(conversation)
        if max_samples is not None and len(conversations) >= max_samples:
            break
    if not conversations and stats.skipped[NO_REPLY]:
        raise UserError(
            f"{source}: no record has an assistant reply ({stats.skipped[NO_REPLY]} prompts only): training needs "
            f"replies; generate them first with `medusa-forge distill --input-filename {source} --output-filename "
            f"replies.jsonl --url URL` (or --model MODEL) and train on that file"
        )
    stats.warn(source)
    if not conversations:
        needs = "an assistant reply" if need_reply else "a user turn"
        raise UserError(f"{source}: no usable conversations (each needs at least {needs})")
    return conversations
