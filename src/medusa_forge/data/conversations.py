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


@dataclass
class Conversation:
    id: str
    messages: list[dict[str, str]] = field(default_factory=list)


def named_skips(skipped: dict[str, list[str]], shown: int = 10) -> str:
    """'2 without an assistant reply: record 1 (id a), record 3; 1 ...': what was skipped, why, and which."""
    parts = []
    for why, names in sorted(skipped.items(), key=lambda item: -len(item[1])):
        more = f" and {len(names) - shown} more" if len(names) > shown else ""
        parts.append(f"{len(names)} {why}: {', '.join(names[:shown])}{more}")
    return "; ".join(parts)


@dataclass
class LoadStats:
    """What was skipped, why, and which records, so nothing is dropped silently."""

    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> records

    def skip(self, why: str, record: str) -> None:
        self.skipped.setdefault(why, []).append(record)

    def warn(self, source: str) -> None:
        if self.skipped:
            total = sum(map(len, self.skipped.values()))
            logger.warning("%s: skipped %d records (%s)", source, total, named_skips(self.skipped))


def split_of(record_id: str) -> str:
    """'heldout' or 'train' for a record id; stable across runs, machines and Python versions."""
    root = re.sub(r"_\d+$", "", record_id)
    bucket = int(hashlib.sha1(root.encode("utf-8")).hexdigest(), 16) % 100
    return "heldout" if bucket < HELDOUT_PERCENT else "train"


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(
            f"{path}: not UTF-8 text (byte {err.start} is 0x{data[err.start]:02x}); save it as UTF-8, e.g. "
            f"`iconv -f latin1 -t utf-8 IN > OUT` for a Latin-1 file"
        ) from None


def _read_json_records(path: Path, recover: bool, recover_flag: str | None) -> list:
    text = _read_text(path)
    stripped = text.lstrip()
    if not stripped:
        raise UserError(f"{path}: the file is empty")
    if stripped[0] == "[" and path.suffix != ".jsonl":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            if err.msg != "Extra data":  # "Extra data": a JSONL file whose lines are lists
                return _recover_truncated_list(path, text, err, recover, recover_flag)
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


def _recover_truncated_list(
    path: Path, text: str, err: json.JSONDecodeError, recover: bool, recover_flag: str | None
) -> list:
    """A JSON list cut off mid-record (like the embedded ShareGPT file): every complete record when `recover`, else
    an error naming the byte where the cut record starts. Broken JSON in the middle is an error naming the position.
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
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as inner:
            if not _reaches_end_of_file(text, inner):
                break
            if not recover:
                raise UserError(
                    f"{path}: the file ends in the middle of record {len(records)} (byte "
                    f"{len(text[:pos].encode('utf-8'))}): it was cut short (an interrupted copy or download?). "
                    f"Re-create it, or pass {recover_flag} to use the {len(records)} complete records before the cut"
                ) from None
            if recover_flag:  # asked for by the user (the embedded file, shipped cut short, passes none)
                logger.warning(
                    "%s: the file ends in the middle of record %d: recovered %d complete records (%s)",
                    path, len(records), len(records), recover_flag,
                )  # fmt: skip
            return records
        pos = end
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
    name = f"record {index}" + (f" (id {record_id})" if isinstance(record, dict) and "id" in record else "")
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
            stats.skip(f"with unknown speaker {speaker!r}", name)
            return None
        messages.append({"role": role, "content": content})
    conversation = Conversation(id=record_id, messages=messages)
    if need_reply and not has_reply(conversation):
        stats.skip(NO_REPLY, name)
        return None
    if not any(m["role"] == "user" and m["content"].strip() for m in messages):
        stats.skip("without a user turn", name)
        return None
    return conversation


def load_conversations(
    source: str,
    max_samples: int | None = None,
    recover_truncated: bool = False,
    recover_flag: str = "--recover_truncated_data",
    need_reply: bool = True,
) -> list[Conversation]:
    """Load a file or alias into normalised conversations, in file order. A file cut in the middle of a record is
    refused (the error names `recover_flag`) unless `recover_truncated`; the embedded ShareGPT file, shipped cut
    short, always gives its complete records. need_reply=False also keeps prompt-only records (each needs a user
    turn then)."""
    if source in DATA_ALIASES:
        from medusa_forge.defaults import sharegpt_path

        path, split = sharegpt_path(), ("heldout" if source.endswith("heldout") else "train")
    else:
        path, split = Path(source), None
        if not path.is_file():
            raise UserError(
                f"data file {source!r} not found; pass a JSON/JSONL conversation file or one of {DATA_ALIASES}"
            )
    embedded = split is not None
    try:
        records = _read_json_records(path, recover_truncated or embedded, None if embedded else recover_flag)
    except RecursionError:  # the JSON parser recurses once per level
        raise UserError(
            f"{path}: lists or objects nested thousands of levels deep, which no conversation has; check the file"
        ) from None
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
    if not conversations and stats.skipped.get(NO_REPLY):
        raise UserError(
            f"{source}: no record has an assistant reply ({len(stats.skipped[NO_REPLY])} prompts only): training needs "
            f"replies; generate them first with `medusa-forge distill --input-filename {source} --output-filename "
            f"replies.jsonl --url URL` (or --model MODEL) and train on that file"
        )
    stats.warn(source)
    if not conversations:
        needs = "an assistant reply" if need_reply else "a user turn"
        raise UserError(f"{source}: no usable conversations (each needs at least {needs})")
    return conversations
