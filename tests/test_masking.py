"""Labels exist only on assistant tokens, for ChatML, SmolLM2's real template, other template styles and
the fallback; truncation respects --model_max_length."""

import pytest
from conftest import build_tokenizer

from medusa_forge.data.tokenize import IGNORE_INDEX, ensure_chat_template, tokenize_conversation
from medusa_forge.modeling import load_tokenizer

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
    {"role": "user", "content": "And Germany?"},
    {"role": "assistant", "content": "Berlin is the capital of Germany."},
]

# Template styles of common model families (written out here: no downloads).
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "<start_of_turn>{{ role }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% else %}{{ m['content'] }}\n{% endif %}"
    "{% endfor %}"
)


def labelled_text(tokenizer, item) -> str:
    return tokenizer.decode(
        [t for t, lab in zip(item["input_ids"], item["labels"], strict=True) if lab != IGNORE_INDEX]
    )


def unlabelled_text(tokenizer, item) -> str:
    return tokenizer.decode(
        [t for t, lab in zip(item["input_ids"], item["labels"], strict=True) if lab == IGNORE_INDEX]
    )


def check_masks(tokenizer) -> str:
    item = tokenize_conversation(tokenizer, MESSAGES, max_length=4096)
    assert len(item["input_ids"]) == len(item["labels"])
    labelled, other = labelled_text(tokenizer, item), unlabelled_text(tokenizer, item)
    for m in MESSAGES:
        if m["role"] == "assistant":
            assert m["content"] in labelled and m["content"] not in other
        else:
            assert m["content"] not in labelled and m["content"] in other
    for t, lab in zip(item["input_ids"], item["labels"], strict=True):
        assert lab in (t, IGNORE_INDEX)
    return labelled


def test_chatml_masks_user_and_system(tiny_tokenizer):
    labelled = check_masks(tiny_tokenizer)
    # the end-of-turn marker is learned (the model must learn to stop), the role header is not
    assert labelled.count("<|im_end|>") == 2 and "assistant" not in labelled


@pytest.mark.parametrize("template", [LLAMA3, GEMMA, MISTRAL], ids=["llama3", "gemma", "mistral"])
def test_other_template_styles(template):
    check_masks(build_tokenizer(template))


def test_fallback_template_for_tokenizer_without_one(caplog):
    tokenizer = ensure_chat_template(build_tokenizer(chat_template=None))
    assert "fallback" in caplog.text
    labelled = check_masks(tokenizer)
    assert "User:" not in labelled and "Assistant:" not in labelled


def test_smollm2_real_template(smollm2_dir):
    tokenizer = load_tokenizer(str(smollm2_dir))
    labelled = check_masks(tokenizer)
    assert labelled.count("<|im_end|>") == 2


def test_truncation_to_max_length(tiny_tokenizer):
    full = tokenize_conversation(tiny_tokenizer, MESSAGES, max_length=4096)
    cut = tokenize_conversation(tiny_tokenizer, MESSAGES, max_length=20)
    assert len(cut["input_ids"]) == 20
    assert cut["input_ids"] == full["input_ids"][:20] and cut["labels"] == full["labels"][:20]


def test_template_that_rewrites_history_is_refused():
    # drops all but the last assistant reply: assistant spans cannot be located
    rewriting = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}{{ m['role'] }}: {{ m['content'] }}\n"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(ValueError, match="rewrites earlier turns"):
        tokenize_conversation(build_tokenizer(rewriting), MESSAGES, max_length=100)
