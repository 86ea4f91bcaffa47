"""import: every layout users hold (original `.pt`, "version 2", vLLM from other tools, full checkpoints with
`medusa_head.` weights) becomes our layout bit-exactly; ambiguous or inconsistent input is refused with a reason.

Source layouts were read from: FasterDecoding/Medusa medusa/model/medusa_model.py (`medusa_lm_head.pt` loaded into
`self.medusa_head`, a ModuleList of Sequential(*([ResBlock(H)] * L), Linear(H, V, bias=False)) -- the same block
object repeated; the full-model class saves it as `medusa_head.*`), TGI server/text_generation_server/layers/medusa.py
(MedusaHeadV2: only `{i}.0.linear.*`, base lm_head reused) and vLLM vllm/model_executor/models/medusa.py
(`blocks.{i}.layers.{j}.*`, `lm_heads.{i}.weight`, `token_map`, `original_lm_head`, prefix `medusa_heads.`)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from medusa_forge.cli import main
from medusa_forge.drafts.medusa_import import import_heads
from medusa_forge.modeling import load_base_model

H, V = 32, 400  # the tiny Llama's sizes


class OriginalResBlock(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        self.act = nn.SiLU()


def original_medusa_head(num_heads: int, num_layers: int, seed: int = 0) -> nn.ModuleList:
    """The original trainer's module, shared block included (its known fault: one block repeated L times)."""
    torch.manual_seed(seed)
    heads = nn.ModuleList(
        nn.Sequential(*([OriginalResBlock(H)] * num_layers), nn.Linear(H, V, bias=False)) for _ in range(num_heads)
    )
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, 0.1)
    return heads


def original_config(tiny_model_dir, num_heads: int, num_layers: int) -> dict:
    """What the original MedusaConfig.save_pretrained writes (a PretrainedConfig: extra keys, no architectures)."""
    return {
        "medusa_num_heads": num_heads,
        "medusa_num_layers": num_layers,
        "base_model_name_or_path": str(tiny_model_dir),
        "transformers_version": "4.34.0",
    }


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return load_base_model(str(tiny_model_dir))


def ours(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "medusa_lm_head.safetensors"))


def test_original_pt_becomes_ours_bit_exact_with_its_dtype(tmp_path, tiny_model_dir, capsys):
    heads = original_medusa_head(3, 2).half()
    src = tmp_path / "medusa-vicuna"
    src.mkdir()
    torch.save(heads.state_dict(), src / "medusa_lm_head.pt")
    (src / "config.json").write_text(json.dumps(original_config(tiny_model_dir, 3, 2)))
    assert main(["import", "--from", str(src), "--output-dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "found: original Medusa torch pickle" in out and "heads: 3, blocks per head: 2" in out
    got = ours(tmp_path / "out")
    expected = heads.state_dict()
    assert got.keys() == expected.keys()
    assert all(got[k].dtype == torch.float16 and torch.equal(got[k], expected[k]) for k in got)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["medusa_num_heads"], config["medusa_num_layers"], config["hidden_size"]) == (3, 2, H)
    assert "architectures" not in config and config["base_model_name_or_path"] == str(tiny_model_dir)


def test_bare_pt_file_without_config_needs_the_base_model(tmp_path, tiny_model_dir, capsys):
    heads = original_medusa_head(2, 1)
    torch.save(heads.state_dict(), tmp_path / "medusa_lm_head.pt")
    args = ["--from", str(tmp_path / "medusa_lm_head.pt"), "--output-dir", str(tmp_path / "out")]
    assert main(["import", *args]) == 2
    assert "config.json is missing, so the base model is unknown; pass --base-model" in capsys.readouterr().err
    assert main(["import", *args, "--base-model", str(tiny_model_dir)]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["medusa_num_heads"], config["medusa_num_layers"]) == (2, 1)
    assert all(torch.equal(ours(tmp_path / "out")[k], v) for k, v in heads.state_dict().items())


def test_pickle_that_is_not_a_state_dict_is_refused_without_running_it(tmp_path, tiny_model_dir, capsys):
    src = tmp_path / "evil"
    src.mkdir()
    torch.save(original_medusa_head(1, 1), src / "medusa_lm_head.pt")  # a whole module: needs unpickling code
    (src / "config.json").write_text(json.dumps(original_config(tiny_model_dir, 1, 1)))
    assert main(["import", "--from", str(src), "--output-dir", str(tmp_path / "out")]) == 2
    assert "cannot be loaded safely as a dict of tensors" in capsys.readouterr().err


def test_version_2_gets_projections_from_the_base_lm_head(tmp_path, tiny_model_dir, base):
    state = {k: v for k, v in original_medusa_head(3, 1).state_dict().items() if not k.endswith(".1.weight")}
    src = tmp_path / "v2"
    src.mkdir()
    save_file(state, str(src / "medusa_lm_head.safetensors"))
    (src / "config.json").write_text(json.dumps(original_config(tiny_model_dir, 3, 1)))
    loaded, _ = import_heads(src, tmp_path / "out")
    assert any("version 2" in note for note in loaded.notes)
    got = ours(tmp_path / "out")
    lm_head = base.get_output_embeddings().weight
    for i in range(3):
        assert torch.equal(got[f"{i}.1.weight"], lm_head)
        assert torch.equal(got[f"{i}.0.linear.weight"], state[f"{i}.0.linear.weight"])


@pytest.mark.parametrize("weights_file", ["model.safetensors", "pytorch_model.bin"])
def test_full_checkpoint_with_medusa_head_prefix(tmp_path, tiny_model_dir, base, capsys, weights_file):
    heads = original_medusa_head(2, 1, seed=3)
    src = tmp_path / "medusa2-full"
    base.save_pretrained(src)
    weights = load_file(str(src / "model.safetensors"))
    weights |= {f"medusa_head.{k}": v.contiguous() for k, v in heads.state_dict().items()}
    if weights_file == "model.safetensors":
        save_file(weights, str(src / weights_file), metadata={"format": "pt"})
    else:  # the original trainer's era: a torch pickle
        (src / "model.safetensors").unlink()
        torch.save(weights, src / weights_file)
    config = json.loads((src / "config.json").read_text())
    config |= {"medusa_num_heads": 2, "medusa_num_layers": 1}
    (src / "config.json").write_text(json.dumps(config))
    assert main(["import", "--from", str(src), "--output-dir", str(tmp_path / "out")]) == 0
    assert "found: full model checkpoint whose weights carry a `medusa_head.` prefix" in capsys.readouterr().out
    got = ours(tmp_path / "out")
    assert got.keys() == heads.state_dict().keys()
    assert all(torch.equal(got[k], v) for k, v in heads.state_dict().items())
    # Medusa-2 fine-tunes the base too: the heads belong to the checkpoint's own weights.
    out_config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out_config["base_model_name_or_path"] == str(src.resolve())


def vllm_folder(folder, tiny_model_dir, bias=True, extra_config=None, prefix=""):
    """A vLLM Medusa folder as another tool writes it (names from vllm/model_executor/models/medusa.py)."""
    torch.manual_seed(5)
    folder.mkdir()
    weights = {}
    for i in range(2):
        weights[f"{prefix}blocks.{i}.layers.0.weight"] = torch.randn(H, H)
        if bias:
            weights[f"{prefix}blocks.{i}.layers.0.bias"] = torch.randn(H)
        weights[f"{prefix}lm_heads.{i}.weight"] = torch.randn(V, H)
    config = {"model_type": "medusa", "architectures": ["MedusaModel"], "hidden_size": H, "vocab_size": V,
              "num_heads": 2, "num_hidden_layers": 1, "medusa_fc_bias": bias, "truncated_vocab_size": V,
              "base_model_name_or_path": str(tiny_model_dir), **(extra_config or {})}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    save_file(weights, str(folder / "medusa-heads.safetensors"))
    return weights


def test_vllm_without_biases_gets_zero_biases(tmp_path, tiny_model_dir):
    weights = vllm_folder(tmp_path / "v", tiny_model_dir, bias=False, prefix="medusa_heads.")
    loaded, _ = import_heads(tmp_path / "v", tmp_path / "out")
    got = ours(tmp_path / "out")
    assert torch.equal(got["1.0.linear.weight"], weights["medusa_heads.blocks.1.layers.0.weight"])
    assert torch.equal(got["1.0.linear.bias"], torch.zeros(H)) and torch.equal(
        got["1.1.weight"], weights["medusa_heads.lm_heads.1.weight"]
    )
    assert any("zero biases" in note for note in loaded.notes)


def test_vllm_truncated_vocabulary_is_refused_with_the_reason(tmp_path, tiny_model_dir, capsys):
    folder = tmp_path / "v"
    vllm_folder(folder, tiny_model_dir, extra_config={"truncated_vocab_size": 100})
    weights = load_file(str(folder / "medusa-heads.safetensors"))
    weights |= {f"lm_heads.{i}.weight": torch.randn(100, H) for i in range(2)} | {"token_map": torch.arange(100)}
    save_file(weights, str(folder / "medusa-heads.safetensors"))
    assert main(["import", "--from", str(folder), "--output-dir", str(tmp_path / "out")]) == 2
    assert "truncated vocabulary (100 of 400 tokens, token_map)" in capsys.readouterr().err


def test_vllm_without_a_base_model_name_asks_for_one(tmp_path, tiny_model_dir, capsys):
    vllm_folder(tmp_path / "v", tiny_model_dir)
    config = json.loads((tmp_path / "v" / "config.json").read_text())
    del config["base_model_name_or_path"]
    (tmp_path / "v" / "config.json").write_text(json.dumps(config))
    assert main(["import", "--from", str(tmp_path / "v"), "--output-dir", str(tmp_path / "out")]) == 2
    assert "pass --base-model" in capsys.readouterr().err
    args = ["--from", str(tmp_path / "v"), "--output-dir", str(tmp_path / "out"), "--base-model", str(tiny_model_dir)]
    assert main(["import", *args]) == 0


def test_two_different_sets_of_heads_are_ambiguous(tmp_path, tiny_model_dir, capsys):
    src = tmp_path / "both"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(original_config(tiny_model_dir, 2, 1)))
    torch.save(original_medusa_head(2, 1, seed=1).state_dict(), src / "medusa_lm_head.pt")
    state = {k: v.contiguous() for k, v in original_medusa_head(2, 1, seed=2).state_dict().items()}
    save_file(state, str(src / "medusa_lm_head.safetensors"))
    assert main(["import", "--from", str(src), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "ambiguous" in err and "--layout {medusa,medusa-pt}" in err
    assert main(["import", "--from", str(src), "--output-dir", str(tmp_path / "out"), "--layout", "medusa-pt"]) == 0
    assert torch.equal(
        ours(tmp_path / "out")["0.0.linear.weight"],
        torch.load(src / "medusa_lm_head.pt", weights_only=True)["0.0.linear.weight"],
    )


def test_the_same_heads_saved_twice_are_not_ambiguous(tmp_path, tiny_model_dir):
    src = tmp_path / "both"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(original_config(tiny_model_dir, 2, 1)))
    state = {k: v.contiguous() for k, v in original_medusa_head(2, 1).state_dict().items()}
    torch.save(state, src / "medusa_lm_head.pt")
    save_file(state, str(src / "medusa_lm_head.safetensors"))
    loaded, _ = import_heads(src, tmp_path / "out")
    assert loaded.layout == "medusa"


@pytest.mark.parametrize(
    ("num_heads", "num_layers", "hidden", "reason"),
    [
        (5, 1, H, "medusa_num_heads is 5 but the weights hold 2 heads"),  # the original's famous mislabelled config
        (2, 3, H, "medusa_num_layers is 3 but the weights hold 1 block(s) per head"),
        (2, 1, 64, "hidden_size is 64 but the weights have 32"),
    ],
)
def test_config_that_contradicts_the_tensors_is_refused(
    tmp_path, tiny_model_dir, capsys, num_heads, num_layers, hidden, reason
):
    src = tmp_path / "bad"
    src.mkdir()
    config = original_config(tiny_model_dir, num_heads, num_layers) | {"hidden_size": hidden}
    (src / "config.json").write_text(json.dumps(config))
    torch.save(original_medusa_head(2, 1).state_dict(), src / "medusa_lm_head.pt")
    assert main(["import", "--from", str(src), "--output-dir", str(tmp_path / "out")]) == 2
    assert reason in capsys.readouterr().err


def test_mislabelled_head_count_can_be_overridden(tmp_path, tiny_model_dir, capsys):
    """FasterDecoding/medusa-vicuna-7b-v1.3 ships medusa_num_heads 2 for 4 heads (TensorRT-LLM's README works
    around it with --fixed_num_medusa_heads 4)."""
    src = tmp_path / "vicuna-like"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(original_config(tiny_model_dir, 2, 1)))
    heads = original_medusa_head(4, 1)
    torch.save(heads.state_dict(), src / "medusa_lm_head.pt")
    assert main(["import", "--from", str(src), "--output-dir", str(tmp_path / "out")]) == 2
    assert "medusa_num_heads is 2 but the weights hold 4 heads (if the weights are right, pass --num-heads 4)" in (
        capsys.readouterr().err
    )
    assert main(["import", "--from", str(src), "--output-dir", str(tmp_path / "out"), "--num-heads", "4"]) == 0
    assert "overridden by --num-heads 4" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "config.json").read_text())["medusa_num_heads"] == 4
    assert main(["import", "--from", str(src), "--output-dir", str(tmp_path / "three"), "--num-heads", "3"]) == 0
    got = ours(tmp_path / "three")
    assert {k.split(".")[0] for k in got} == {"0", "1", "2"}
    assert torch.equal(got["2.1.weight"], heads.state_dict()["2.1.weight"])


def test_heads_for_a_different_base_are_refused(tmp_path, tiny_model_dir, tiny_tokenizer, capsys):
    from conftest import TINY_CONFIGS
    from transformers import AutoModelForCausalLM

    other = TINY_CONFIGS["llama"](len(tiny_tokenizer))
    other.hidden_size, other.intermediate_size = 48, 96
    AutoModelForCausalLM.from_config(other).save_pretrained(tmp_path / "other-base")
    src = tmp_path / "heads"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(original_config(tiny_model_dir, 2, 1)))
    torch.save(original_medusa_head(2, 1).state_dict(), src / "medusa_lm_head.pt")
    args = ["--from", str(src), "--output-dir", str(tmp_path / "out"), "--base-model", str(tmp_path / "other-base")]
    assert main(["import", *args]) == 2
    assert "Medusa heads trained for hidden size 32 and vocabulary" in capsys.readouterr().err


def test_folder_without_heads_lists_what_it_expected(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    assert main(["import", "--from", str(tmp_path / "empty"), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no Medusa heads found" in err and "notes.txt" in err
