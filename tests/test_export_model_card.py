"""The model card end to end: `train` writes it, `eval` measures, `push --dry-run` shows it would be refreshed and
the refreshed card carries the measured numbers; eval.json is read defensively."""

from __future__ import annotations

import json

import pytest
from conftest import make_tiny_model, write_conversations

from medusa_forge.cli import main
from medusa_forge.drafts.card import CARD_MARKER, evaluation_summary, load_eval
from medusa_forge.drafts.medusa_heads import MedusaConfig
from medusa_forge.model_card import refreshed_model_card, render_model_card


@pytest.fixture(scope="module")
def trained_and_evaluated(tmp_path_factory, tiny_tokenizer):
    folder = tmp_path_factory.mktemp("card")
    make_tiny_model("llama", folder / "base", tiny_tokenizer)
    data = write_conversations(folder / "data.json", 12)
    argv = [
        "train", "--model_name_or_path", str(folder / "base"), "--data_path", str(data),
        "--output_dir", str(folder / "heads"), "--num_train_epochs", "1", "--per_device_train_batch_size", "4",
        "--model_max_length", "128", "--save_strategy", "no", "--eval_strategy", "epoch",
        "--eval_data_path", str(data), "--report_to", "none", "--disable_tqdm", "True",
    ]  # fmt: skip
    assert main(argv) == 0
    argv = ["eval", "--heads", str(folder / "heads"), "--data", str(data), "--max-prompts", "2"]
    argv += ["--max-new-tokens", "12", "--calibration-prompts", "1", "--max-conversations", "3"]
    argv += ["--tree-sizes", "2,4", "--device", "cpu"]
    assert main(argv) == 0
    return folder / "heads"


def test_card_after_train_and_eval_shows_what_was_measured(trained_and_evaluated, capsys):
    heads = trained_and_evaluated
    train_card = (heads / "README.md").read_text()
    assert CARD_MARKER in train_card and "--speculate 3" in train_card and "(12 conversations)" in train_card
    report = load_eval(heads)  # eval writes heads/eval/eval.json by default
    assert report is not None
    summary = evaluation_summary(report)
    card = refreshed_model_card(heads, MedusaConfig.load(heads), "alice/tiny-medusa", "acme/tiny-llama")
    assert f"**{summary['mean_accepted_length']:.2f}**" in card
    assert f"**{summary['speedup']:.2f}x**" in card
    assert "(12 conversations)" in card  # training facts survive the refresh
    assert "| 0 | t+2 |" in card  # held-out accuracy from training
    assert "| head 2 |" in card  # accuracy measured by eval
    assert "base_model: acme/tiny-llama" in card and "--model-id alice/tiny-medusa --speculate 3" in card
    assert main(["push", "--folder", str(heads), "--repo", "alice/tiny-medusa", "--dry-run",
                 "--base-model-id", "acme/tiny-llama"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "model card: refreshed" in out and "eval/eval.json" in out and "medusa_lm_head.safetensors" in out


@pytest.mark.parametrize(
    "content",
    ["not json", "[1, 2]", '{"acceptance": "n/a", "speed": {"speedup": "fast"}, "accuracy": [1, {"name": 3}]}'],
)
def test_unreadable_or_odd_eval_json_is_ignored_not_fatal(tmp_path, content):
    (tmp_path / "eval.json").write_text(content)
    summary = evaluation_summary(load_eval(tmp_path))
    assert "mean_accepted_length" not in summary and "speedup" not in summary
    card = render_model_card(MedusaConfig(2, 1, 32, 400, "acme/x"), "acme/x", evaluation=load_eval(tmp_path))
    assert "## Serve" in card


def test_flat_eval_keys_are_read_too(tmp_path):
    (tmp_path / "eval.json").write_text(json.dumps({"mean_accepted_length": 2.5, "speedup": 1.9}))
    card = render_model_card(MedusaConfig(2, 1, 32, 400, "acme/x"), "acme/x", evaluation=load_eval(tmp_path))
    assert "| Mean accepted tokens per step | 2.50 (plain decoding: 1.00) |" in card
    assert "| Measured speed-up over greedy | 1.90x |" in card
