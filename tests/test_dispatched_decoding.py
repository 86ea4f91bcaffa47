"""generate, eval and serve with a target larger than one device (issue 24, part 3): the --target_* flags dispatch
the base over memory and disk as train's do, for every kind. On the CPU: with layers read from disk at every
forward, a draft decodes token for token (and acceptance for acceptance) as with the target in one piece."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_eagle3_decode import random_draft
from test_target_dispatch import split_budget

from medusa_forge.cli import main
from medusa_forge.decode.generation import greedy_generate
from medusa_forge.decode.loading import encode_prompt, load_draft
from medusa_forge.decode.serving import DraftServeGenerator
from medusa_forge.decode.tree import resolve_tree
from medusa_forge.drafts.medusa_heads import MedusaHeads
from medusa_forge.errors import UserError
from medusa_forge.evaluate.cli import EvalConfig
from medusa_forge.generation.text import eos_token_ids
from medusa_forge.modeling import TargetPlacement, load_base_model
from medusa_forge.serve import ServeConfig

PROMPTS = ["Hello there!", "The quick brown fox", "def add(a, b):"]


@pytest.fixture(scope="module")
def drafts(tiny_model_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """A draft folder of each kind for the tiny target, with weights that propose some accepted tokens."""
    folder = tmp_path_factory.mktemp("dispatched-drafts")
    base = load_base_model(str(tiny_model_dir))
    torch.manual_seed(0)
    heads = MedusaHeads.for_base_model(base, 3, 1, str(tiny_model_dir))
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    heads.save(folder / "medusa")
    eagle3 = random_draft(base, torch.arange(base.config.vocab_size - 50), seed=3)
    eagle3.config.base_model_name_or_path = str(tiny_model_dir)
    eagle3.save(folder / "eagle3")
    return {"medusa": folder / "medusa", "eagle3": folder / "eagle3"}


def split_flags(model_dir: Path, offload: Path) -> list[str]:
    return ["--target_device_map", "auto", "--target_max_memory", f"cpu={split_budget(model_dir)}",
            "--target_offload_folder", str(offload)]  # fmt: skip


@pytest.mark.parametrize("kind", ["medusa", "eagle3"])
def test_a_draft_decodes_with_a_disk_split_target_as_with_the_whole_one(drafts, tiny_model_dir, tmp_path, kind):
    placement = TargetPlacement(torch.device("cpu"), {"cpu": split_budget(tiny_model_dir)}, str(tmp_path))
    whole = load_draft(drafts[kind], device="cpu")
    split = load_draft(drafts[kind], device="cpu", placement=placement)
    assert split.base.hf_device_map["model.layers.1"] == "disk"  # read from the offload folder at every forward
    assert any(p.device.type == "meta" for p in split.base.parameters())
    eos = eos_token_ids(whole.base, whole.tokenizer)
    choices = resolve_tree("default-32", drafts[kind], whole.max_depth)
    accepted = 0
    for text in PROMPTS:
        ids = encode_prompt(whole.tokenizer, text)
        expected = whole.decoder(choices).generate(ids, 24, eos_token_ids=eos)
        got = split.decoder(choices).generate(ids, 24, eos_token_ids=eos)
        assert got.tokens == expected.tokens == greedy_generate(whole.base, ids, 24, eos)
        assert got.accepted_drafts == expected.accepted_drafts  # the draft read the same features
        accepted += sum(got.accepted_drafts)
    assert accepted > 0  # the draft's proposals were verified, not only the base's own token


def test_generate_and_serve_take_the_target_flags(drafts, tiny_model_dir, tmp_path, capsys):
    argv = ["generate", "--draft", str(drafts["medusa"]), "--prompt", "Hello there!", "--max-new-tokens", "16",
            "--device", "cpu", "--tree", "default-8", "--dtype", "float32"]  # fmt: skip
    assert main(argv) == 0
    whole = capsys.readouterr().out
    assert main([*argv, *split_flags(tiny_model_dir, tmp_path / "offload")]) == 0
    assert capsys.readouterr().out == whole
    config = ServeConfig(draft=str(drafts["eagle3"]), target_device_map="auto", target_offload_folder="x")
    placement = TargetPlacement(torch.device("cpu"), {"cpu": split_budget(tiny_model_dir)}, str(tmp_path / "serve"))
    served = DraftServeGenerator.load(config.draft, device="cpu", tree="default-8", placement=placement)
    assert served.decoder.base.hf_device_map["model.layers.1"] == "disk"
    ids = served.encode_chat([{"role": "user", "content": "Hello there!"}])
    plain = greedy_generate(load_base_model(str(tiny_model_dir)), ids, 16, served.eos_ids)
    assert served.decoder.generate(ids, 16, eos_token_ids=served.eos_ids).tokens == plain


def test_eval_with_a_disk_split_target(drafts, tiny_model_dir, tmp_path):
    from conftest import write_conversations

    data = write_conversations(tmp_path / "data.json", 6)
    out = tmp_path / "eval"
    argv = ["eval", "--draft", str(drafts["eagle3"]), "--data", str(data), "--max-prompts", "2",
            "--max-new-tokens", "12", "--max-conversations", "3", "--max-length", "96", "--calibration-prompts", "0",
            "--tree", "default-8", "--prompt-lookup-tokens", "0", "--device", "cpu", "--dtype", "float32",
            "--speculative-tokens", "2", "--output-dir", str(out), "--no-save-tree",
            *split_flags(tiny_model_dir, tmp_path / "offload")]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["speed"]["mismatched_prompts"] == []  # the draft's output is the dispatched target's greedy
    assert list(report["speed"]["tokens"]) == ["greedy_float32", "draft"]  # loaded once, timed in its dtype
    assert report["accuracy"][0]["tokens"] > 0


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: EvalConfig(draft="d", data="x", target_device_map="auto"), "pass --dtype bfloat16 or"),
        (lambda: EvalConfig(draft="d", data="x", target_max_memory="cpu=1GiB"), "applies only with --target_device"),
        (lambda: ServeConfig(target_device_map="auto"), "applies to serving with a draft"),
        (lambda: ServeConfig(draft="d", target_device_map="balanced"), "the only value is 'auto'"),
    ],
)
def test_bad_target_flags_of_the_decoding_commands(make, message):
    with pytest.raises(UserError, match=message):
        make()
