"""`medusa-forge export` of an EAGLE-3 draft: the folder vLLM 0.33 and SGLang 0.5.23 load (checked with the
loader mirrors in test_eagle3_draft.py), bit-identical to the trained draft, with pinned serve commands; drafts no
engine can serve, and formats that do not take EAGLE-3, are refused."""

from __future__ import annotations

import json

import pytest
from conftest import make_tiny_model
from test_eagle3_draft import DRAFT_IDS, SglangEagle3, VllmEagle3, trained_like

from medusa_forge.cli import main
from medusa_forge.drafts.eagle3_model import Eagle3Draft
from medusa_forge.export import export_draft
from medusa_forge.formats.files import same_tensors
from medusa_forge.modeling import load_base_model


def target_folder(tmp_path, tiny_tokenizer, layers: int):
    import transformers
    from conftest import TINY_CONFIGS

    folder = make_tiny_model("llama", tmp_path / f"target-{layers}", tiny_tokenizer)
    config = TINY_CONFIGS["llama"](len(tiny_tokenizer))
    config.num_hidden_layers = layers
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


@pytest.fixture
def draft_folder(tmp_path, tiny_tokenizer):
    target = target_folder(tmp_path, tiny_tokenizer, 8)
    draft = trained_like(Eagle3Draft.for_target(load_base_model(str(target)), DRAFT_IDS, str(target)))
    tiny_tokenizer.save_pretrained(tmp_path / "draft")
    return draft.save(tmp_path / "draft")


@pytest.mark.parametrize("fmt", ["vllm", "sglang"])
def test_export_writes_what_the_engines_load_and_prints_pinned_commands(tmp_path, draft_folder, fmt):
    result = export_draft(draft_folder, fmt, tmp_path / fmt, base_model_id="acme/tiny-llama")
    out = tmp_path / fmt
    vocab = json.loads((out / "config.json").read_text())["vocab_size"]
    vllm, sglang = VllmEagle3(out, vocab), SglangEagle3(out, vocab)
    assert vllm.missing() == [] and sglang.missing() == [] and sglang.dropped == []
    written, source = Eagle3Draft.load(out), Eagle3Draft.load(draft_folder)
    assert same_tensors(written.state_dict(), source.state_dict())
    assert written.config.base_model_name_or_path == "acme/tiny-llama"
    assert (out / "tokenizer.json").is_file()
    command = result.serve_commands[0]
    if fmt == "vllm":
        assert command.startswith("pip install vllm==0.33.0 && vllm serve acme/tiny-llama --speculative-config ")
        spec = json.loads(command.split("--speculative-config ")[1].strip("'"))
        assert spec == {"method": "eagle3", "model": str(out), "num_speculative_tokens": 3}
    else:
        assert command.startswith("pip install sglang==0.5.23 && python -m sglang.launch_server --model-path acme/")
        assert f"--speculative-algorithm EAGLE3 --speculative-draft-model-path {out}" in command


def test_drafts_no_engine_serves_and_wrong_formats_are_refused(tmp_path, tiny_tokenizer, draft_folder, capsys):
    shallow = target_folder(tmp_path, tiny_tokenizer, 2)  # the engines read hidden states 2, L//2, L-3
    Eagle3Draft.for_target(load_base_model(str(shallow)), None, str(shallow)).save(tmp_path / "shallow")
    assert main(["export", "--draft", str(tmp_path / "shallow"), "--format", "vllm", "--output-dir", "x"]) == 2
    assert "has 2 layers" in capsys.readouterr().err
    assert main(["export", "--draft", str(draft_folder), "--format", "tgi", "--output-dir", str(tmp_path / "t")]) == 2
    assert "is an EAGLE-3 draft, which tgi does not load" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_medusa_heads_are_not_exported_for_sglang(tmp_path, tiny_model_dir, capsys):
    from medusa_forge.drafts.medusa_heads import MedusaHeads

    MedusaHeads.for_base_model(load_base_model(str(tiny_model_dir)), 2, 1, str(tiny_model_dir)).save(tmp_path / "h")
    assert main(["export", "--heads", str(tmp_path / "h"), "--format", "sglang", "--output-dir", "x"]) == 2
    assert "SGLang never served Medusa heads" in capsys.readouterr().err
