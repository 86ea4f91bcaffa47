"""export: each engine's folder holds exactly the names and config keys that engine's loader reads, round trips
through every format are bit-exact, exported-then-imported heads decode identically, and bad folders are refused.

The expected names below were read from the engines' own loaders (paths cited next to each constant)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from medusa_forge.decode.generation import MedusaDecoder
from medusa_forge.decode.tree import default_choices
from medusa_forge.export import cli_main, export_heads
from medusa_forge.formats import same_tensors
from medusa_forge.heads import MedusaConfig, MedusaHeads, MedusaModel
from medusa_forge.import_heads import import_heads
from medusa_forge.modeling import load_base_model

K, L = 3, 2

# TGI server/text_generation_server/models/__init__.py: a Medusa folder is recognised by
# config_dict["medusa_num_heads"]; the base is loaded from config_dict["base_model_name_or_path"].
# layers/medusa.py reads config["medusa_num_layers"]; layers/speculative.py takes another code path when
# config["architectures"] exists (so it must not).
TGI_CONFIG_KEYS = {"medusa_num_heads", "medusa_num_layers", "base_model_name_or_path"}
TGI_FORBIDDEN_KEYS = {"architectures"}
# layers/medusa.py MedusaHeadV2 / models/__init__.py download "medusa_lm_head.safetensors".
TGI_WEIGHTS_FILE = "medusa_lm_head.safetensors"
# TensorRT-LLM tensorrt_llm/models/medusa/weight.py load_medusa_hf: medusa_lm_head.pt, else
# medusa_lm_head.safetensors; examples/medusa/convert_checkpoint.py reads medusa_num_heads / medusa_num_layers.
TRT_WEIGHTS_FILES = ("medusa_lm_head.pt", "medusa_lm_head.safetensors")
TRT_CONFIG_KEYS = {"medusa_num_heads", "medusa_num_layers"}
# vLLM vllm/transformers_utils/configs/medusa.py (MedusaConfig: model_type "medusa", hidden_size, vocab_size,
# num_heads, num_hidden_layers, truncated_vocab_size, architectures ["MedusaModel"]) and
# vllm/model_executor/models/medusa.py (ResidualBlock bias=getattr(config, "medusa_fc_bias", False)).
VLLM_CONFIG = {"model_type": "medusa", "architectures": ["MedusaModel"], "medusa_fc_bias": True}
VLLM_CONFIG_KEYS = {"hidden_size", "vocab_size", "num_heads", "num_hidden_layers", "truncated_vocab_size"}


def tgi_names(k: int, n_layers: int) -> set[str]:
    """TGI layers/medusa.py: ResBlock prefix f"{i}.{j}.linear" (bias=True), out prefix f"{i}.{n_layers}"."""
    names = {f"{i}.{n_layers}.weight" for i in range(k)}
    for i in range(k):
        for j in range(n_layers):
            names |= {f"{i}.{j}.linear.weight", f"{i}.{j}.linear.bias"}
    return names


def vllm_names(k: int, n_layers: int) -> set[str]:
    """vLLM models/medusa.py: self.blocks[i].layers[j] (nn.Linear) and self.lm_heads[i] (ParallelLMHead)."""
    names = {f"lm_heads.{i}.weight" for i in range(k)}
    for i in range(k):
        for j in range(n_layers):
            names |= {f"blocks.{i}.layers.{j}.weight", f"blocks.{i}.layers.{j}.bias"}
    return names


class VllmStyleMedusa(nn.Module):
    """The module structure vLLM builds (names and forward), to load an exported folder the way vLLM does."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        hidden, bias = config["hidden_size"], config.get("medusa_fc_bias", False)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"layers": nn.ModuleList(nn.Linear(hidden, hidden, bias=bias) for _ in range(n))})
            for n in [config["num_hidden_layers"]] * config["num_heads"]
        )
        self.lm_heads = nn.ModuleList(
            nn.Linear(hidden, config["truncated_vocab_size"], bias=False) for _ in range(config["num_heads"])
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        for block, lm_head in zip(self.blocks, self.lm_heads, strict=True):
            h = x
            for layer in block["layers"]:
                h = h + torch.nn.functional.silu(layer(h))
            out.append(lm_head(h))
        return torch.stack(out)


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return load_base_model(str(tiny_model_dir))


def trained_like_heads(base, base_dir, folder, dtype=torch.float32, seed=0):
    """Heads with every tensor non-trivial (biases too), as if trained; saved in our layout."""
    torch.manual_seed(seed)
    heads = MedusaHeads.for_base_model(base, K, L, str(base_dir))
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    heads.to(dtype).save(folder)
    return folder


@pytest.fixture(scope="module")
def heads_dir(tmp_path_factory, base, tiny_model_dir):
    return trained_like_heads(base, tiny_model_dir, tmp_path_factory.mktemp("heads"))


def test_tgi_folder_has_exactly_what_tgi_reads(tmp_path, heads_dir, tiny_model_dir):
    result = export_heads(heads_dir, "tgi", tmp_path / "tgi")
    config = json.loads((tmp_path / "tgi" / "config.json").read_text())
    assert TGI_CONFIG_KEYS <= config.keys() and not TGI_FORBIDDEN_KEYS & config.keys()
    assert config["medusa_num_heads"] == K and config["medusa_num_layers"] == L
    assert config["base_model_name_or_path"] == str(tiny_model_dir)
    assert set(load_file(str(tmp_path / "tgi" / TGI_WEIGHTS_FILE))) == tgi_names(K, L)
    # TGI's router reads the tokenizer from --model-id when config.json has no model_type.
    assert (tmp_path / "tgi" / "tokenizer.json").is_file() and (tmp_path / "tgi" / "tokenizer_config.json").is_file()
    assert f"--model-id {tmp_path / 'tgi'} --speculate {K}" in result.serve_commands[0]


def test_tensorrt_llm_folder_has_what_its_converter_reads(tmp_path, heads_dir):
    result = export_heads(heads_dir, "tensorrt-llm", tmp_path / "trt")
    config = json.loads((tmp_path / "trt" / "config.json").read_text())
    assert TRT_CONFIG_KEYS <= config.keys()
    files = [name for name in TRT_WEIGHTS_FILES if (tmp_path / "trt" / name).is_file()]
    assert files == ["medusa_lm_head.safetensors"]  # no stale .pt that the converter would read first
    state = load_file(str(tmp_path / "trt" / files[0]))
    for h in range(config["medusa_num_heads"]):  # exactly the keys load_medusa_hf indexes
        for layer in range(config["medusa_num_layers"]):
            assert state[f"{h}.{layer}.linear.weight"].shape == (32, 32)
            assert state[f"{h}.{layer}.linear.bias"].shape == (32,)
        assert f"{h}.{config['medusa_num_layers']}.weight" in state
    assert f"--medusa_model_dir {tmp_path / 'trt'}" in result.serve_commands[0]
    assert f"--num_medusa_heads {K}" in result.serve_commands[0]


def test_vllm_folder_loads_into_vllms_module_and_computes_the_same_logits(tmp_path, heads_dir):
    result = export_heads(heads_dir, "vllm", tmp_path / "vllm")
    config = json.loads((tmp_path / "vllm" / "config.json").read_text())
    assert VLLM_CONFIG.items() <= config.items() and VLLM_CONFIG_KEYS <= config.keys()
    assert (config["num_heads"], config["num_hidden_layers"]) == (K, L)
    assert config["truncated_vocab_size"] == config["vocab_size"] == 400 and config["hidden_size"] == 32
    weights = {}
    for path in (tmp_path / "vllm").glob("*.safetensors"):  # vLLM reads every *.safetensors in the folder
        weights |= load_file(str(path))
    assert set(weights) == vllm_names(K, L)
    module = VllmStyleMedusa(config)
    assert set(dict(module.named_parameters())) == set(weights)  # vLLM skips unknown names silently
    module.load_state_dict(weights, strict=True)
    ours = MedusaHeads.load(heads_dir)
    x = torch.randn(5, 32)
    assert torch.equal(module(x), ours(x))
    spec = json.loads(result.serve_commands[0].split("--speculative-config ")[1].strip("'"))
    assert spec == {"method": "medusa", "model": str(tmp_path / "vllm"), "num_speculative_tokens": K}


@pytest.mark.parametrize("fmt", ["tgi", "vllm", "tensorrt-llm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_then_import_is_bit_exact(tmp_path, base, tiny_model_dir, fmt, dtype):
    source = trained_like_heads(base, tiny_model_dir, tmp_path / "ours", dtype=dtype, seed=1)
    export_heads(source, fmt, tmp_path / fmt)
    loaded, _ = import_heads(tmp_path / fmt, tmp_path / "back")
    assert loaded.layout == ("vllm" if fmt == "vllm" else "medusa")
    before, after = (
        load_file(str(source / "medusa_lm_head.safetensors")),
        load_file(str(tmp_path / "back" / "medusa_lm_head.safetensors")),
    )
    assert same_tensors(before, after) and next(iter(after.values())).dtype == dtype
    assert MedusaConfig.load(tmp_path / "back") == MedusaConfig.load(source)


def test_exported_then_imported_heads_decode_identically(tmp_path, base, heads_dir):
    export_heads(heads_dir, "vllm", tmp_path / "vllm")
    import_heads(tmp_path / "vllm", tmp_path / "back")
    original = MedusaModel.from_pretrained(heads_dir, base)
    back = MedusaModel.from_pretrained(tmp_path / "back", base)
    prompt = torch.tensor([[1, 5, 9, 33, 71, 120, 7]])
    assert torch.equal(original.head_logits(prompt), back.head_logits(prompt))
    choices = default_choices(8, K)
    first = MedusaDecoder(original, choices).generate(prompt[0], max_new_tokens=24)
    second = MedusaDecoder(back, choices).generate(prompt[0], max_new_tokens=24)
    assert first.tokens == second.tokens and first.accept_lengths == second.accept_lengths


def test_cli_prints_the_serve_command(tmp_path, heads_dir, capsys):
    assert cli_main(["--heads", str(heads_dir), "--format", "vllm", "--output-dir", str(tmp_path / "v")]) == 0
    out = capsys.readouterr().out
    assert "--speculative-config" in out and f'"num_speculative_tokens": {K}' in out and "model.safetensors" in out
    assert cli_main(["--heads", str(heads_dir), "--format", "tgi", "--output-dir", str(tmp_path / "t"),
                     "--base-model-id", "acme/base-7b"]) == 0  # fmt: skip
    assert f"--speculate {K}" in capsys.readouterr().out
    assert json.loads((tmp_path / "t" / "config.json").read_text())["base_model_name_or_path"] == "acme/base-7b"


def _corrupt(heads_dir, tmp_path, edit_config=None, edit_state=None):
    folder = tmp_path / "bad"
    folder.mkdir()
    config = json.loads((heads_dir / "config.json").read_text())
    state = load_file(str(heads_dir / "medusa_lm_head.safetensors"))
    if edit_config:
        edit_config(config)
    if edit_state:
        edit_state(state)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(state, str(folder / "medusa_lm_head.safetensors"))
    return folder


@pytest.mark.parametrize(
    ("edit_config", "edit_state", "reason"),
    [
        (lambda c: c.update(medusa_num_heads=4), None, "medusa_num_heads is 4 but the weights hold 3 heads"),
        (lambda c: c.update(medusa_num_layers=1), None, "medusa_num_layers is 1 but the weights hold 2 block(s)"),
        (None, lambda s: s.pop("1.1.linear.bias"), "tensor 1.1.linear.bias is missing"),
        (None, lambda s: s.pop("2.2.weight"), "only heads [0, 1] have a vocabulary projection"),
        (None, lambda s: s.update({"0.0.linear.weight": torch.zeros(32, 16)}), "0.0.linear.weight has shape (32, 16)"),
        (None, lambda s: s.update({"lm_head.weight": torch.zeros(1)}), "unexpected tensor names ['lm_head.weight']"),
    ],
)
def test_corrupted_folder_is_refused_with_the_reason(tmp_path, heads_dir, capsys, edit_config, edit_state, reason):
    bad = _corrupt(heads_dir, tmp_path, edit_config, edit_state)
    assert cli_main(["--heads", str(bad), "--format", "tgi", "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and reason in err
    assert not (tmp_path / "out" / "medusa_lm_head.safetensors").exists()


def test_heads_for_another_model_are_refused(tmp_path, tiny_model_dir, capsys):
    wrong = MedusaHeads(MedusaConfig(2, 1, 16, 400, str(tiny_model_dir)))  # base has hidden size 32
    wrong.save(tmp_path / "wrong")
    assert cli_main(["--heads", str(tmp_path / "wrong"), "--format", "vllm", "--output-dir", str(tmp_path / "o")]) == 2
    assert "heads have hidden size 16, but base model" in capsys.readouterr().err


def test_output_folder_with_other_weights_is_refused(tmp_path, heads_dir, capsys):
    """A stale medusa_lm_head.pt would be read by TensorRT-LLM's converter before our safetensors."""
    (tmp_path / "out").mkdir()
    torch.save({}, tmp_path / "out" / "medusa_lm_head.pt")
    assert cli_main(["--heads", str(heads_dir), "--format", "tensorrt-llm", "--output-dir", str(tmp_path / "out")]) == 2
    assert "already holds other weights (medusa_lm_head.pt)" in capsys.readouterr().err
    export_heads(heads_dir, "tgi", tmp_path / "again")
    export_heads(heads_dir, "tgi", tmp_path / "again")  # rewriting the same export is fine


def test_draft_vocabulary_becomes_vllms_truncated_vocab_and_comes_back(tmp_path, heads_dir):
    """Heads trained with --medusa_draft_vocab_size N propose ids < N only; vLLM expresses that as
    truncated_vocab_size N + a token_map (models/medusa.py: lm_heads rows sliced by token_map, other ids -inf)."""
    source = tmp_path / "draft"
    source.mkdir()
    config = json.loads((heads_dir / "config.json").read_text()) | {"draft_vocab_size": 100}
    (source / "config.json").write_text(json.dumps(config))
    (source / "medusa_lm_head.safetensors").write_bytes((heads_dir / "medusa_lm_head.safetensors").read_bytes())
    result = export_heads(source, "vllm", tmp_path / "vllm")
    vconfig = json.loads((tmp_path / "vllm" / "config.json").read_text())
    assert (vconfig["truncated_vocab_size"], vconfig["vocab_size"]) == (100, 400)
    weights = load_file(str(tmp_path / "vllm" / "model.safetensors"))
    assert torch.equal(weights.pop("token_map"), torch.arange(100)) and set(weights) == vllm_names(K, L)
    # What vLLM computes: the first 100 rows of each head, every other id at -inf.
    module = VllmStyleMedusa(vconfig)
    module.load_state_dict({k: v[:100] if k.startswith("lm_heads") else v for k, v in weights.items()})
    x = torch.randn(4, 32)
    ours = MedusaHeads.load(source)(x)
    assert torch.equal(module(x), ours[..., :100])
    assert not any("draft vocabulary" in note for note in result.notes)
    loaded, _ = import_heads(tmp_path / "vllm", tmp_path / "back")
    assert MedusaConfig.load(tmp_path / "back").draft_vocab_size == 100
    assert same_tensors(load_file(str(tmp_path / "back" / "medusa_lm_head.safetensors")),
                        load_file(str(source / "medusa_lm_head.safetensors")))  # fmt: skip
    tgi = export_heads(source, "tgi", tmp_path / "tgi")
    assert any("tgi has no draft vocabulary" in note for note in tgi.notes)
