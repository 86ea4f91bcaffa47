"""Shared fixtures: a tiny BPE tokenizer with a ChatML template and tiny random models of several
architectures, all built in-process (no downloads)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import DynamicCache, PreTrainedTokenizerFast

from medusa_forge.decode.generation import SpeculativeDecoder
from medusa_forge.decode.verification import Sampling
from medusa_forge.drafts.medusa_drafter import MedusaDrafter
from medusa_forge.modeling import cache_kwarg

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "Hello there! How can I help you today?",
    "The quick brown fox jumps over the lazy dog.",
    "Medusa heads predict several future tokens at once, so decoding is faster.",
    "def add(a, b):\n    return a + b\n",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
] * 20

TINY_CONFIGS = {
    "llama": lambda v: transformers.LlamaConfig(
        vocab_size=v,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    ),
    "llama-tied": lambda v: transformers.LlamaConfig(
        vocab_size=v,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    ),
    "qwen2": lambda v: transformers.Qwen2Config(
        vocab_size=v,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    ),
    "mistral": lambda v: transformers.MistralConfig(
        vocab_size=v,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        sliding_window=None,
    ),
    "gemma": lambda v: transformers.GemmaConfig(
        vocab_size=v,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=512,
    ),
    "gpt2": lambda v: transformers.GPT2Config(vocab_size=v, n_embd=32, n_layer=2, n_head=4, n_positions=512),
}


def build_tokenizer(chat_template: str | None = CHATML) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>"
    )
    fast.chat_template = chat_template
    return fast


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


def make_tiny_model(arch: str, folder: Path, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> Path:
    """Save a tiny random model of `arch` plus the tokenizer into folder; returns folder."""
    torch.manual_seed(seed)
    config = TINY_CONFIGS[arch](len(tokenizer))
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.bos_token_id = tokenizer.bos_token_id
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"), tiny_tokenizer)


PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain recursion briefly."]


def write_prompt_files(folder: Path) -> list[Path]:
    """PROMPTS as a JSON list of strings, {"prompt": ...} JSONL, and ShareGPT with human turns only (ids q0, q1, ...;
    the other two files have none, so a record's id is its index)."""
    strings = folder / "prompts.json"
    strings.write_text(json.dumps(PROMPTS))
    jsonl = folder / "prompts.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    sharegpt = folder / "human_only.json"
    sharegpt.write_text(
        json.dumps([{"id": f"q{i}", "conversations": [{"from": "human", "value": p}]} for i, p in enumerate(PROMPTS)])
    )
    return [strings, jsonl, sharegpt]


# Train flags a kind needs to train in seconds on the tiny test models (400-token vocabulary), for the tests that run
# over every registered kind; a kind without a line trains with its own defaults (and adds one if they do not fit).
KIND_TRAIN_FLAGS = {"eagle3": ["--eagle3_ttt_steps", "2", "--eagle3_draft_vocab_size", "64"]}


def kind_train_flags(name: str) -> list[str]:
    """`--draft_kind NAME` and the flags the kind needs on the tiny test models."""
    return ["--draft_kind", name, *KIND_TRAIN_FLAGS.get(name, [])]


def write_conversations(path: Path, n: int = 12, sharegpt: bool = True) -> Path:
    """n small multi-turn conversations from the tokenizer's corpus, ShareGPT or role/content JSON."""
    records = []
    for i in range(n):
        turns = [
            ("human", f"Question {i}: {CORPUS[i % 6]}"),
            ("gpt", CORPUS[(i + 1) % 6] + " " + CORPUS[(i + 2) % 6]),
            ("human", "And then?"),
            ("gpt", CORPUS[(i + 3) % 6]),
        ]
        if sharegpt:
            records.append({"id": f"conv{i}", "conversations": [{"from": f, "value": v} for f, v in turns]})
        else:
            role = {"human": "user", "gpt": "assistant"}
            records.append([{"role": role[f], "content": v} for f, v in turns])
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory):
    """Point MEDUSA_FORGE_CACHE (read by us and by every CLI subprocess) at a folder of this test session, so
    the hidden-state caches tests write never pile up in the user's ~/.cache/medusa-forge. Only the converted
    embedded model (`models/`, ~30 s to convert) and vLLM's side environment (`engines/`, ~2 minutes to install)
    are shared with the user's cache, through links."""
    from medusa_forge.defaults import cache_dir

    root = tmp_path_factory.mktemp("medusa-forge-cache")
    for name in ("models", "engines"):
        shared = cache_dir() / name
        shared.mkdir(parents=True, exist_ok=True)
        (root / name).symlink_to(shared, target_is_directory=True)
    patch = pytest.MonkeyPatch()
    patch.setenv("MEDUSA_FORGE_CACHE", str(root))
    yield root
    patch.undo()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real embedded model, converted once into the cache (shared across test runs)."""
    from medusa_forge.defaults import smollm2_dir as convert

    return convert()


@torch.no_grad()
def plain_sample(base, prompt: list[int], max_new_tokens: int, temperature: float, seed: int, top_p: float = 1.0):
    """What a sampling decoder must give token for token: plain sampling with a KV cache, one token per forward
    pass, each drawn by `Sampling.pick` from a generator seeded as `SpeculativeDecoder.stream` seeds its own."""
    device = next(base.parameters()).device
    sampling = Sampling(temperature, top_p, torch.Generator(device=device).manual_seed(seed))
    ids, cached, tokens = torch.tensor([prompt], device=device), {cache_kwarg(base): DynamicCache()}, []
    while len(tokens) < max_new_tokens:
        tokens.append(sampling.pick(base(input_ids=ids, use_cache=True, **cached).logits[0, -1]))
        ids = torch.tensor([[tokens[-1]]], device=device)
    return tokens


def install_once(folder: Path, packages: list[str], steps: list[list[str]], what: str) -> None:
    """Run the install `steps` into `folder` unless it already holds `packages` (its packages.json says so); a
    failed step fails the test, naming `what` was being made and the step."""
    marker = folder / "packages.json"
    if marker.is_file() and json.loads(marker.read_text()) == packages:
        return
    shutil.rmtree(folder, ignore_errors=True)
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            pytest.fail(f"could not make {what} ({' '.join(step)}):\n{done.stderr}")
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(packages))


def medusa_decoder(model, choices, check: bool = True, draft_vocab: int | None = None) -> SpeculativeDecoder:
    """A decoder whose drafter is a MedusaModel's heads (`draft_vocab`: see MedusaDrafter)."""
    return SpeculativeDecoder(model.base, MedusaDrafter(model, draft_vocab), choices, check)
