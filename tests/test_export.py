"""export: each engine's folder holds exactly the names and config keys that engine's loader reads, round trips
through every format are bit-exact, exported-then-imported heads decode identically, and bad folders are refused.

The expected names below were read from the engines' own loaders (paths cited next to each constant)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import medusa_decoder
from safetensors.torch import load_file, save_file
from torch import nn

from medusa_forge.cli import main
from medusa_forge.drafts.medusa_heads import MedusaConfig, MedusaHeads, MedusaModel
from medusa_forge.drafts.medusa_import import import_heads
from medusa_forge.export import export_draft
from medusa_forge.formats.files import same_tensors
from medusa_forge.formats.tree_file import default_choices
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
VLLM_RELEASES = ("0.10.2", "0.32.0")  # the oldest with today's loader, and the last one with Medusa


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


class VllmMedusa(nn.Module):
    """vLLM's Medusa draft model as releases 0.10.2 and 0.32.0 build and load a folder, mirrored from the files
    in their wheels (vllm-0.10.2 and vllm-0.32.0 on PyPI):
    - transformers_utils/configs/medusa.py, MedusaConfig.from_pretrained: a config key holding "num" and "heads"
      becomes num_heads, "num" and "layers" num_hidden_layers; truncated_vocab_size defaults to vocab_size.
    - model_executor/models/medusa.py: blocks[i].layers[j] = Linear(H, H, bias=medusa_fc_bias); lm_heads[i] =
      ParallelLMHead with truncated_vocab_size rows (0.10.2) or vocab_size rows (0.11 to 0.32.0). load_weights
      strips "medusa_heads.", maps the original Medusa names (0.32.0 only), keeps a token_map only when
      truncated_vocab_size < vocab_size, cuts lm_head rows down to the token_map, and finally asserts
      truncated_vocab_size == vocab_size or a token_map was loaded.
    - layers/vocab_parallel_embedding.py, VocabParallelEmbedding.weight_loader: asserts that the checkpoint has
      exactly the rows the layer was built with (org_vocab_size); weight_utils.default_weight_loader: same shape.
    - model_loader/default_loader.py, track_weights_loading: ValueError "Following weights were not initialized
      from checkpoint" for any parameter load_weights did not fill.
    compute_logits: with a token_map, the mapped ids' logits and -inf for every other id."""

    def __init__(self, folder: Path, release: str) -> None:
        super().__init__()
        raw = json.loads((folder / "config.json").read_text())
        for key in list(raw):
            if "num" in key and "heads" in key:
                raw["num_heads"] = raw.pop(key)
            elif "num" in key and "layers" in key:
                raw["num_hidden_layers"] = raw.pop(key)
        hidden, vocab = raw["hidden_size"], raw["vocab_size"]
        self.vocab_size, self.truncated = vocab, raw.get("truncated_vocab_size") or vocab
        bias = raw.get("medusa_fc_bias", False)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"layers": nn.ModuleList(nn.Linear(hidden, hidden, bias=bias) for _ in range(n))})
            for n in [raw["num_hidden_layers"]] * raw["num_heads"]
        )
        rows = self.truncated if release == "0.10.2" else vocab
        self.lm_heads = nn.ModuleList(nn.Linear(hidden, rows, bias=False) for _ in range(raw["num_heads"]))
        self.token_map = None
        weights = {}
        for path in sorted(folder.glob("*.safetensors")):
            weights |= load_file(str(path))
        self._load_weights(weights, release)

    def _load_weights(self, weights: dict[str, torch.Tensor], release: str) -> None:
        params = dict(self.named_parameters())
        loaded, weights_map = set(), {}
        for name, tensor in weights.items():
            name = name.replace("medusa_heads.", "")
            parts = name.split(".")
            if release != "0.10.2" and len(parts) >= 3 and parts[0].isdigit() and parts[1].isdigit():
                rest = parts[2:]
                if "linear" in rest:
                    name = f"blocks.{parts[0]}.layers.{parts[1]}." + ".".join(rest[rest.index("linear") + 1 :])
                else:
                    name = f"lm_heads.{parts[0]}." + ".".join(rest)
            if name == "token_map":
                if self.truncated < self.vocab_size:
                    self.token_map = tensor
            elif name in params:
                weights_map[name] = tensor
        for name, tensor in weights_map.items():
            if "lm_head" in name and self.token_map is not None and tensor.shape[0] > self.token_map.shape[0]:
                tensor = tensor[self.token_map]
            param = params[name]
            assert tensor.shape == param.shape, f"{name}: checkpoint {tuple(tensor.shape)}, layer {tuple(param.shape)}"
            with torch.no_grad():
                param.copy_(tensor)
            loaded.add(name)
        assert self.truncated == self.vocab_size or self.token_map is not None
        if set(params) - loaded:
            raise ValueError(f"Following weights were not initialized from checkpoint: {set(params) - loaded}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        for block, lm_head in zip(self.blocks, self.lm_heads, strict=True):
            h = x
            for layer in block["layers"]:
                h = h + torch.nn.functional.silu(layer(h))
            logits = lm_head(h)
            if self.token_map is not None:
                full = torch.full((*logits.shape[:-1], self.vocab_size), -torch.inf)
                full[..., self.token_map] = logits
                logits = full
            out.append(logits)
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
    result = export_draft(heads_dir, "tgi", tmp_path / "tgi")
    config = json.loads((tmp_path / "tgi" / "config.json").read_text())
    assert TGI_CONFIG_KEYS <= config.keys() and not TGI_FORBIDDEN_KEYS & config.keys()
    assert config["medusa_num_heads"] == K and config["medusa_num_layers"] == L
    assert config["base_model_name_or_path"] == str(tiny_model_dir)
    assert set(load_file(str(tmp_path / "tgi" / TGI_WEIGHTS_FILE))) == tgi_names(K, L)
    # TGI's router reads the tokenizer of --model-id, and the chat template from its tokenizer_config.json
    # (router/src/server.rs); test_tokenizer_transformers4.py loads these files with TGI's transformers.
    tokenizer_config = json.loads((tmp_path / "tgi" / "tokenizer_config.json").read_text())
    assert (tmp_path / "tgi" / "tokenizer.json").is_file() and "<|im_start|>" in tokenizer_config["chat_template"]
    assert f"--model-id {tmp_path / 'tgi'} --speculate {K}" in result.serve_commands[0]
    # docker: the heads, and the local base at the very path config.json names, pinned to TGI's last release
    assert (
        f"-v {tmp_path / 'tgi'}:/data/heads -v {tiny_model_dir}:{tiny_model_dir}:ro "
        f"ghcr.io/huggingface/text-generation-inference:3.3.6 --model-id /data/heads --speculate {K}"
    ) in result.serve_commands[1]


def test_tensorrt_llm_folder_has_what_its_converter_reads(tmp_path, heads_dir):
    result = export_draft(heads_dir, "tensorrt-llm", tmp_path / "trt")
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
    assert f"--num_medusa_heads {K}" in result.serve_commands[0]  # required: the converter's default is 4 heads
    assert "pip install tensorrt_llm==1.2.1" in result.serve_commands[0]


@pytest.mark.parametrize("release", VLLM_RELEASES)
def test_vllm_folder_loads_in_vllm_and_computes_the_same_logits(tmp_path, heads_dir, release):
    result = export_draft(heads_dir, "vllm", tmp_path / "vllm")
    config = json.loads((tmp_path / "vllm" / "config.json").read_text())
    assert VLLM_CONFIG.items() <= config.items() and VLLM_CONFIG_KEYS <= config.keys()
    assert (config["num_heads"], config["num_hidden_layers"]) == (K, L)
    assert config["truncated_vocab_size"] == config["vocab_size"] == 400 and config["hidden_size"] == 32
    weights = {}
    for path in (tmp_path / "vllm").glob("*.safetensors"):  # vLLM reads every *.safetensors in the folder
        weights |= load_file(str(path))
    assert set(weights) == vllm_names(K, L)  # vLLM skips unknown names silently: the set must be exact
    module = VllmMedusa(tmp_path / "vllm", release)
    x = torch.randn(5, 32)
    assert torch.equal(module(x), MedusaHeads.load(heads_dir)(x))
    command = result.serve_commands[0]
    assert command.startswith("pip install vllm==0.32.0 && vllm serve ")
    spec = json.loads(command.split("--speculative-config ")[1].strip("'"))
    assert spec == {"method": "medusa", "model": str(tmp_path / "vllm"), "num_speculative_tokens": K}


@pytest.mark.parametrize("fmt", ["tgi", "vllm", "tensorrt-llm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_then_import_is_bit_exact(tmp_path, base, tiny_model_dir, fmt, dtype):
    source = trained_like_heads(base, tiny_model_dir, tmp_path / "ours", dtype=dtype, seed=1)
    export_draft(source, fmt, tmp_path / fmt)
    loaded, _ = import_heads(tmp_path / fmt, tmp_path / "back")
    assert loaded.layout == ("vllm" if fmt == "vllm" else "medusa")
    before, after = (
        load_file(str(source / "medusa_lm_head.safetensors")),
        load_file(str(tmp_path / "back" / "medusa_lm_head.safetensors")),
    )
    assert same_tensors(before, after) and next(iter(after.values())).dtype == dtype
    assert MedusaConfig.load(tmp_path / "back") == MedusaConfig.load(source)


def test_exported_then_imported_heads_decode_identically(tmp_path, base, heads_dir):
    export_draft(heads_dir, "vllm", tmp_path / "vllm")
    import_heads(tmp_path / "vllm", tmp_path / "back")
    original = MedusaModel.from_pretrained(heads_dir, base)
    back = MedusaModel.from_pretrained(tmp_path / "back", base)
    prompt = torch.tensor([[1, 5, 9, 33, 71, 120, 7]])
    assert torch.equal(original.head_logits(prompt), back.head_logits(prompt))
    choices = default_choices(8, K)
    first = medusa_decoder(original, choices).generate(prompt[0], max_new_tokens=24)
    second = medusa_decoder(back, choices).generate(prompt[0], max_new_tokens=24)
    assert first.tokens == second.tokens and first.accept_lengths == second.accept_lengths


def test_cli_prints_the_serve_command(tmp_path, heads_dir, capsys):
    assert main(["export", "--heads", str(heads_dir), "--format", "vllm", "--output-dir", str(tmp_path / "v")]) == 0
    out = capsys.readouterr().out
    assert "--speculative-config" in out and f'"num_speculative_tokens": {K}' in out and "model.safetensors" in out
    assert main(["export", "--heads", str(heads_dir), "--format", "tgi", "--output-dir", str(tmp_path / "t"),
                     "--base-model-id", "acme/base-7b"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert f"--speculate {K}" in out and ":ro" not in out  # a Hub base: nothing to mount
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
    assert main(["export", "--heads", str(bad), "--format", "tgi", "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and reason in err
    assert not (tmp_path / "out" / "medusa_lm_head.safetensors").exists()


def test_heads_for_another_model_are_refused(tmp_path, tiny_model_dir, capsys):
    wrong = MedusaHeads(MedusaConfig(2, 1, 16, 400, str(tiny_model_dir)))  # base has hidden size 32
    wrong.save(tmp_path / "wrong")
    argv = ["export", "--heads", str(tmp_path / "wrong"), "--format", "vllm", "--output-dir", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "Medusa heads trained for hidden size 16 and vocabulary 400, but base model" in capsys.readouterr().err


def test_output_folder_with_other_weights_is_refused(tmp_path, heads_dir, capsys):
    """A stale medusa_lm_head.pt would be read by TensorRT-LLM's converter before our safetensors."""
    (tmp_path / "out").mkdir()
    torch.save({}, tmp_path / "out" / "medusa_lm_head.pt")
    argv = ["export", "--heads", str(heads_dir), "--format", "tensorrt-llm", "--output-dir", str(tmp_path / "out")]
    assert main(argv) == 2
    assert "already holds other weights (medusa_lm_head.pt)" in capsys.readouterr().err
    export_draft(heads_dir, "tgi", tmp_path / "again")
    export_draft(heads_dir, "tgi", tmp_path / "again")  # rewriting the same export is fine


def _with_draft_vocabulary(heads_dir: Path, folder: Path, draft: int) -> Path:
    """The heads as `medusa-forge train` leaves them by default: trained on ids < draft, all rows stored."""
    folder.mkdir()
    config = json.loads((heads_dir / "config.json").read_text()) | {"draft_vocab_size": draft}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "medusa_lm_head.safetensors").write_bytes((heads_dir / "medusa_lm_head.safetensors").read_bytes())
    return folder


@pytest.mark.parametrize("release", VLLM_RELEASES)
def test_default_trained_heads_load_in_vllm_with_every_row_and_come_back_with_their_draft_vocabulary(
    tmp_path, heads_dir, release
):
    """vLLM 0.11-0.32 cannot take a truncated vocabulary (see VllmMedusa), so heads trained on a draft
    vocabulary go out with all rows and no token_map; our own key brings the draft vocabulary back on import."""
    source = _with_draft_vocabulary(heads_dir, tmp_path / "draft", 100)
    result = export_draft(source, "vllm", tmp_path / "vllm")
    vconfig = json.loads((tmp_path / "vllm" / "config.json").read_text())
    assert (vconfig["truncated_vocab_size"], vconfig["vocab_size"], vconfig["draft_vocab_size"]) == (400, 400, 100)
    assert set(load_file(str(tmp_path / "vllm" / "model.safetensors"))) == vllm_names(K, L)  # no token_map
    x = torch.randn(4, 32)
    assert torch.equal(VllmMedusa(tmp_path / "vllm", release)(x), MedusaHeads.load(source)(x))
    assert any("vllm has no usable draft vocabulary" in note and "propose from all 400 ids" in note
               for note in result.notes)  # fmt: skip
    import_heads(tmp_path / "vllm", tmp_path / "back")
    assert MedusaConfig.load(tmp_path / "back").draft_vocab_size == 100
    assert same_tensors(load_file(str(tmp_path / "back" / "medusa_lm_head.safetensors")),
                        load_file(str(source / "medusa_lm_head.safetensors")))  # fmt: skip
    tgi = export_draft(source, "tgi", tmp_path / "tgi")
    assert any("tgi has no usable draft vocabulary" in note for note in tgi.notes)


def test_a_token_map_export_loads_in_vllm_0_10_only(tmp_path, heads_dir):
    """What our export wrote before (truncated_vocab_size N + token_map 0..N-1): vLLM 0.10.2 loads it and
    gives every id >= N -inf; 0.32.0 cuts the rows to N and its weight loader asserts (the failure users met).
    Such folders (ours or other tools') still import with their draft vocabulary."""
    source = _with_draft_vocabulary(heads_dir, tmp_path / "draft", 100)
    folder = tmp_path / "token-map"
    export_draft(source, "vllm", folder)
    config = json.loads((folder / "config.json").read_text())
    del config["draft_vocab_size"]
    (folder / "config.json").write_text(json.dumps(config | {"truncated_vocab_size": 100}))
    weights = load_file(str(folder / "model.safetensors")) | {"token_map": torch.arange(100)}
    save_file(weights, str(folder / "model.safetensors"))
    x = torch.randn(4, 32)
    logits = VllmMedusa(folder, "0.10.2")(x)
    assert torch.equal(logits[..., :100], MedusaHeads.load(source)(x)[..., :100])
    assert torch.isneginf(logits[..., 100:]).all()
    with pytest.raises(AssertionError, match=r"lm_heads.0.weight: checkpoint \(100, 32\), layer \(400, 32\)"):
        VllmMedusa(folder, "0.32.0")
    loaded, _ = import_heads(folder, tmp_path / "back")
    assert loaded.config.draft_vocab_size == 100
