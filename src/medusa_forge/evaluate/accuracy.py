"""Teacher-forced draft accuracy on the held-out reference answers or on the model's own greedy answers: the
samples each kind's scorer (`DecodingDraft.accuracy`) ranks the true tokens on."""

from __future__ import annotations

from tqdm import tqdm

from medusa_forge.data.tokenize import IGNORE_INDEX, tokenize_conversation
from medusa_forge.drafts.accuracy import HeadAccuracy
from medusa_forge.drafts.kind import DecodingDraft


def conversation_samples(tokenizer, conversations, max_length: int = 1024) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of each conversation that tokenizes (labels: the assistant tokens)."""
    samples = []
    for conversation in conversations:
        try:
            sample = tokenize_conversation(tokenizer, conversation.messages, max_length)
        except ValueError:
            continue
        samples.append((sample["input_ids"], sample["labels"]))
    return samples


def measure_accuracy(
    draft: DecodingDraft, tokenizer, conversations, max_length: int = 1024, progress: bool = True
) -> list[HeadAccuracy]:
    """Teacher-forced accuracy on the conversations' assistant tokens (the reference answers), as deep as the draft
    fills trees."""
    samples = conversation_samples(tokenizer, conversations, max_length)
    return draft.accuracy(samples, draft.max_depth, progress=progress)


def own_answer_samples(
    base, prompts: list[list[int]], max_new_tokens: int, eos: set[int]
) -> list[tuple[list[int], list[int]]]:
    """(prompt + greedy answer, labels on the answer) per prompt: the text greedy decoding must accept."""
    from medusa_forge.decode.generation import greedy_generate

    samples = []
    for prompt in tqdm(prompts, desc="greedy answers for calibration", leave=False):
        answer = greedy_generate(base, prompt, max_new_tokens, eos)
        samples.append((prompt + answer, [IGNORE_INDEX] * len(prompt) + answer))
    return samples
