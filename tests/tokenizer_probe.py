"""What a server sees of a tokenizer folder: chat text, token ids and special tokens. Run in-process under
transformers 5 and as a script under the transformers TGI pins (`python tokenizer_probe.py FOLDER...` prints one
JSON object per folder), so that the two can be compared. Imports nothing from medusa_forge."""

from __future__ import annotations

import json
import sys

MESSAGES = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Hello there! Où est le café ☕?"},
    {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog."},
    {"role": "user", "content": "def add(a, b):\n    return a + b\n"},
]


def probe(folder: str) -> dict:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as err:  # noqa: BLE001 - the failure is the result
        return {"error": f"{type(err).__name__}: {err}"}
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    return {
        "text": text,
        "chat_ids": tokenizer(text, add_special_tokens=False)["input_ids"],
        "raw_ids": tokenizer("Paris is the capital of France.", add_special_tokens=True)["input_ids"],
        "special": {
            name: getattr(tokenizer, name)
            for name in ("bos_token", "eos_token", "pad_token", "unk_token", "eos_token_id", "pad_token_id")
        },
        "all_special_tokens": sorted(tokenizer.all_special_tokens),
    }


if __name__ == "__main__":
    for folder in sys.argv[1:]:
        print(json.dumps(probe(folder)))
