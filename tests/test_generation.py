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
    packable_dtypes,
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


PACKED_DTYPES = [
    torch.float32,
    pytest.param(
        torch.bfloat16,
        marks=pytest.mark.skipif(not cpu_has_native_bfloat16(), reason="bfloat16 is packed only where it is native"),
    ),
]


@pytest.mark.parametrize("dtype", PACKED_DTYPES)
def test_packed_weights_give_the_same_logits_and_greedy_tokens(tiny_model_dir, dtype):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype).eval()
    reference = copy.deepcopy(model)
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert dtype in packable_dtypes()
    assert pack_linear_weights(model) == linears > 0
    assert pack_linear_weights(model) == 0  # packed once
    ids = torch.tensor([[1, 5, 9, 14, 3, 7, 2, 11]])
    with torch.no_grad():
        packed, plain = model(ids).logits, reference(ids).logits
    if dtype == torch.bfloat16:
        assert torch.equal(packed, plain)  # the same oneDNN product, in its layout
    else:  # oneDNN's product against MKL's: the same sums in another order
        torch.testing.assert_close(packed, plain, rtol=0, atol=1e-5)
    assert greedy_generate(model, ids[0], 12) == greedy_generate(reference, ids[0], 12)
    # Under autograd a packed layer falls back to its own forward (the packed product has no gradient).
    model.lm_head.weight.requires_grad_(True)
    model(ids).logits.float().sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", PACKED_DTYPES)
def test_a_packed_product_gives_each_row_what_that_row_alone_gives(smollm2_dir, dtype):
    """What makes verifying a tree compute what one-token steps compute: each row of a packed product of a tree's
    rows equals that row multiplied alone, bit for bit (MKL's unpacked float32 product does not promise it). On
    SmolLM2's own shapes (an MLP projection and the vocabulary projection), 1 to 16 rows."""
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=dtype)
    layers = [model.model.layers[0].mlp.down_proj, model.lm_head]
    pack_linear_weights(torch.nn.ModuleList(layers))
    for layer in layers:
        assert is_packed(layer)
        rows = torch.randn(16, layer.in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
        with torch.no_grad():
            alone = torch.cat([layer(row[None]) for row in rows])
            for count in (2, 5, 16):
                assert torch.equal(layer(rows[:count]), alone[:count])
            torch.testing.assert_close(alone, torch.nn.functional.linear(rows, layer.weight), rtol=1e-2, atol=1e-3)


def test_weights_oneDNN_cannot_multiply_packed_are_left_alone(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float16)
    assert pack_linear_weights(model) == 0  # float16: no packed oneDNN product on a CPU
    assert not any(is_packed(m) for m in model.modules())
    if not cpu_has_native_bfloat16():  # emulated bfloat16: oneDNN refuses to pack it
        assert pack_linear_weights(model.to(torch.bfloat16)) == 0


def test_weights_are_not_packed_when_the_copies_would_not_fit(tiny_model_dir, monkeypatch, caplog):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    weights = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear))
    # A machine with less than twice the copies' size free (what a 7B model meets on a 32 GB laptop); psutil's
    # figure is the one thing faked: this machine has the memory.
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=2 * weights - 1))
    assert pack_linear_weights(model) == 0
    assert "weights not packed" in caplog.text and not any(is_packed(m) for m in model.modules())
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=2 * weights))
    assert pack_linear_weights(model) > 0
