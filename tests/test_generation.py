"""The generation package's shared helpers: streamed text, the context check, end-of-sequence ids, dtype/device."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM

from medusa_forge.decode.generation import greedy_generate
from medusa_forge.errors import UserError
from medusa_forge.generation.device import (
    cpu_has_native_bfloat16,
    is_packed,
    pack_linear_weights,
    resolve_device,
    resolve_dtype,
)
from medusa_forge.generation.generator import ContextLengthError, check_context
from medusa_forge.generation.text import StreamedText, decode_text, eos_token_ids


def test_streamed_text_never_sends_half_a_character(tiny_tokenizer):
    ids = tiny_tokenizer("é€😀 ok", add_special_tokens=False)["input_ids"]
    assert any(decode_text(tiny_tokenizer, ids[:n]).endswith("\ufffd") for n in range(1, len(ids)))  # bytes split
    streamed = StreamedText(tiny_tokenizer)
    pieces = [streamed.update(ids[:n]) for n in range(1, len(ids) + 1)]
    pieces.append(streamed.update(ids, final=True))
    assert "".join(pieces) == "é€😀 ok" == streamed.sent
    assert all("\ufffd" not in piece for piece in pieces)


def test_streamed_text_final_update_sends_what_is_held_back(tiny_tokenizer):
    ids = tiny_tokenizer("é€", add_special_tokens=False)["input_ids"]
    cut = next(n for n in range(1, len(ids)) if decode_text(tiny_tokenizer, ids[:n]).endswith("\ufffd"))
    streamed = StreamedText(tiny_tokenizer)
    held = streamed.update(ids[:cut])
    assert "\ufffd" not in held
    assert held + streamed.update(ids[:cut], final=True) == decode_text(tiny_tokenizer, ids[:cut])


def test_check_context_names_the_limit():
    check_context(10, 6, 16)
    with pytest.raises(ContextLengthError, match="this model's maximum context length is 16 tokens"):
        check_context(10, 7, 16)
    with pytest.raises(ContextLengthError, match="^with Medusa heads"):
        check_context(10, 7, 16, "with Medusa heads this model's maximum context length")


def test_eos_token_ids_joins_generation_config_and_tokenizer(tiny_tokenizer):
    class Model:
        generation_config = type("Config", (), {"eos_token_id": [0, 5]})()

    assert eos_token_ids(Model(), tiny_tokenizer) == {0, 5, tiny_tokenizer.eos_token_id}


def test_dtype_and_device_names():
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("auto") is torch.float32  # with no measured choice to go by (no draft folder): exact
    with pytest.raises(UserError, match="choose one of auto, float32, bfloat16, float16"):
        resolve_dtype("fp8")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="--device 'gpu0'"):
        resolve_device("gpu0")


@pytest.mark.skipif(not cpu_has_native_bfloat16(), reason="packing applies only on a CPU with native bfloat16")
def test_packed_bfloat16_weights_give_the_same_logits_and_greedy_tokens(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    reference = copy.deepcopy(model)
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert pack_linear_weights(model) == linears > 0
    assert pack_linear_weights(model) == 0  # packed once
    ids = torch.tensor([[1, 5, 9, 14, 3, 7, 2, 11]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)  # the same products, in oneDNN's layout
    assert greedy_generate(model, ids[0], 12) == greedy_generate(reference, ids[0], 12)
    # Under autograd a packed layer falls back to its own forward (the packed product has no gradient).
    model.lm_head.weight.requires_grad_(True)
    model(ids).logits.float().sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


def test_float32_weights_are_never_packed(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert pack_linear_weights(model) == 0
    assert not any(is_packed(m) for m in model.modules())


@pytest.mark.skipif(not cpu_has_native_bfloat16(), reason="packing applies only on a CPU with native bfloat16")
def test_weights_are_not_packed_when_the_copies_would_not_fit(tiny_model_dir, monkeypatch, caplog):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    weights = sum(m.weight.numel() * 2 for m in model.modules() if isinstance(m, torch.nn.Linear))
    # A machine with less than twice the copies' size free (what a 7B model meets on a 32 GB laptop); psutil's
    # figure is the one thing faked: this machine has the memory.
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=2 * weights - 1))
    assert pack_linear_weights(model) == 0
    assert "bfloat16 weights not packed" in caplog.text and not any(is_packed(m) for m in model.modules())
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=2 * weights))
    assert pack_linear_weights(model) > 0
