"""Grouped SDPA attention (grouped_attention.py): the base models we load give transformers' SDPA
outputs bit for bit, a padded batch and a tree verification included, without copying key/value heads."""

import pytest
import torch
import transformers.integrations.sdpa_attention as transformers_sdpa
from conftest import make_tiny_model
from transformers import AutoModelForCausalLM, DynamicCache

from medusa_forge.decode.verification import TreeVerifier, causal_bias
from medusa_forge.drafts.drafter import TreeBuffers
from medusa_forge.grouped_attention import GROUPED_SDPA, use_grouped_attention
from medusa_forge.modeling import load_base_model

GQA_ARCHS = ["llama", "qwen2", "mistral", "gemma"]  # fewer key/value heads than query heads (gemma: one)


def _no_copies(*args, **kwargs):
    raise AssertionError("repeat_kv called: key/value heads were copied")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", GQA_ARCHS)
def test_same_outputs_as_transformers_sdpa_without_copies(arch, dtype, tiny_tokenizer, tmp_path, monkeypatch):
    folder = make_tiny_model(arch, tmp_path / arch, tiny_tokenizer)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    grouped = load_base_model(str(folder), dtype=dtype)
    assert reference.config._attn_implementation == "sdpa"
    assert grouped.config._attn_implementation == GROUPED_SDPA

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, tiny_tokenizer.vocab_size, (2, 12), generator=gen)
    padded = torch.ones_like(ids)
    padded[1, :5] = 0  # a left-padded row, as the frozen pass batches them
    tree = TreeBuffers.from_choices([[0], [1], [0, 0], [1, 0], [0, 0, 0]])
    tree_tokens = torch.randint(3, tiny_tokenizer.vocab_size, (tree.size,), generator=gen)

    def run(model: torch.nn.Module) -> list[torch.Tensor]:
        with torch.no_grad():
            batch = model(ids, attention_mask=padded).logits
            verifier = TreeVerifier(model, tree)
            cache = DynamicCache()
            verifier.forward(ids[0], torch.arange(12), causal_bias(12, dtype), cache)
            hidden, _ = verifier.verify(tree_tokens, cache, 12)
        return [batch, hidden]

    expected = run(reference)
    monkeypatch.setattr(transformers_sdpa, "repeat_kv", _no_copies)
    for got, want in zip(run(grouped), expected, strict=True):
        assert torch.equal(got, want)


def test_other_attention_implementations_are_left_alone(tiny_model_dir):
    eager = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    assert not use_grouped_attention(eager)
    assert eager.config._attn_implementation == "eager"
