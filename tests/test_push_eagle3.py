"""`push` of an EAGLE-3 draft, and its model card: `train --draft_kind eagle3` writes the card; push checks the
folder (loadable, servable by the engines), uploads exactly what an engine and the card need to the stand-in Hub
of test_push.py (only the Hub is replaced), rewrites the base in the uploaded config.json only, and the card's
vLLM and SGLang commands name the repository, the base and the pinned engine releases."""

from __future__ import annotations

import json
import shlex

import pytest
import test_push
import yaml
from conftest import write_conversations
from test_eagle3_train import eagle3_flags
from test_export_eagle3 import target_folder

from medusa_forge.cli import main
from medusa_forge.drafts.card import CARD_MARKER
from medusa_forge.drafts.eagle3_model import Eagle3Draft
from medusa_forge.formats.tree_file import save_tree
from medusa_forge.model_card import render_model_card
from medusa_forge.modeling import load_base_model
from medusa_forge.results import Acceptance, EvalReport, PredictorAccuracy, SpeedComparison

hub = test_push.hub  # the stand-in Hub fixture
REPO = "alice/tiny-eagle3"
BASE = "acme/tiny-llama"
# What push sends from the trained folder below: the engines' files, the tokenizer, the card and its sources, the
# tree; not the Trainer's checkpoints, training_args.bin, the plots, eval.md or a stray weights file.
EXPECTED_FILES = [
    "README.md", "chat_template.jinja", "config.json", "eval/eval.json", "medusa_choices.json", "model.safetensors",
    "model_card.json", "tokenizer.json", "tokenizer_config.json", "training_metrics.json",
]  # fmt: skip


def eval_report() -> EvalReport:
    """What `medusa-forge eval` writes for an EAGLE-3 draft (numbers made up, fields as eval fills them)."""
    return EvalReport(
        draft="draft",
        data="sharegpt-heldout",
        machine="2-core CPU",
        accuracy=[PredictorAccuracy("base", 100, 0.7, 0.9), PredictorAccuracy("step 1", 100, 0.52, 0.81),
                  PredictorAccuracy("step 2", 100, 0.33, 0.6)],  # fmt: skip
        tree=[[0], [0, 0]],
        acceptance=Acceptance(mean_accept_length=2.41, steps=10, histogram={1: 3, 2: 2, 3: 5}),
        speed=SpeedComparison(prompts=2, speedup={"greedy": 1.0, "medusa": 1.57},
                              tokens_per_second={"greedy": 9.0, "medusa": 14.1}, outputs_equal=True),  # fmt: skip
        draft_kind="eagle3",
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_tokenizer):
    """An EAGLE-3 draft as `train --draft_kind eagle3` leaves it for an 8-layer target (one the engines serve),
    then evaluated (eval.json, eval.md, the tree), plus a stray weights file push must not send."""
    root = tmp_path_factory.mktemp("push-eagle3")
    target = target_folder(root, tiny_tokenizer, 8)
    data = write_conversations(root / "data.json", 12)
    flags = ["--num_train_epochs", "1", "--save_steps", "2", "--eval_strategy", "epoch", "--eval_data_path", str(data)]
    assert main(["train", *eagle3_flags(target, data, root / "draft", *flags)]) == 0
    folder = root / "draft"
    (folder / "eval").mkdir()
    eval_report().save(folder / "eval")
    (folder / "eval" / "eval.md").write_text("# eval\n")
    save_tree(folder, [[0], [0, 0]], chosen_by="medusa-forge eval")
    (folder / "old-draft.safetensors").write_bytes(b"not for the Hub")
    return folder


def card_commands(card: str) -> tuple[dict, str, list[str]]:
    """(YAML metadata, the vLLM command line, the SGLang command as shell words) of a card."""
    _, header, _ = card.split("---\n", 2)
    lines = card.splitlines()
    (vllm,) = [line for line in lines if line.startswith("pip install vllm==")]
    (sglang,) = [line for line in lines if line.startswith("pip install sglang==")]
    return yaml.safe_load(header), vllm, shlex.split(sglang)


def sglang_words(base: str, draft: str) -> list[str]:
    """SGLang 0.5.23's launch (docs/eagle3-reference.md §5): steps, topk and draft tokens given together."""
    return [
        "pip", "install", "sglang==0.5.23", "&&", "python", "-m", "sglang.launch_server", "--model-path", base,
        "--speculative-algorithm", "EAGLE3", "--speculative-draft-model-path", draft, "--speculative-num-steps", "3",
        "--speculative-eagle-topk", "1", "--speculative-num-draft-tokens", "4",
    ]  # fmt: skip


def test_train_writes_a_card_naming_the_feature_layers_and_draft_vocabulary(trained):
    card = (trained / "README.md").read_text()
    assert CARD_MARKER in card and "# EAGLE-3 draft for " in card
    metadata, vllm, sglang = card_commands(card)
    # A local target has no Hub id: no base_model, which the Hub would reject.
    assert metadata == {"library_name": "medusa-forge", "tags": ["eagle3", "speculative-decoding", "medusa-forge"]}
    # 8 target layers: the engines' hs[2], hs[L//2], hs[L-3]; the data's 64 most frequent answer tokens of 400.
    assert "over the target's hidden states 2, 4 and 5 of 8 layers" in card
    assert "| Draft vocabulary | 64 of the target's 400 tokens" in card and "`d2t`" in card and "`t2d`" in card
    assert "(12 conversations)" in card and "| Training-time test | 3 steps, step j's loss weighted 0.8**j |" in card
    assert "| Learning rate | 0.01 |" in card and "| Epochs / max length | 1 / 96 |" in card
    assert "| 3 | t+4 |" in card  # held-out accuracy of the third unrolled step, from training
    target = json.loads((trained / "config.json").read_text())["base_model_name_or_path"]
    assert json.loads(vllm.split("--speculative-config ")[1].strip("'"))["method"] == "eagle3"
    assert sglang == sglang_words(target, "<this-repo-or-folder>")


def test_push_uploads_what_engines_read_with_a_card_that_serves_the_repo(hub, trained, capsys):
    local_config = (trained / "config.json").read_bytes()
    assert main(["push", "--folder", str(trained), "--repo", REPO, "--base-model-id", BASE]) == 0
    out = capsys.readouterr().out
    assert f"uploaded {len(EXPECTED_FILES)} files to {REPO} (model card: refreshed)" in out
    stored = hub.repos[REPO]["branches"]["main"]
    assert sorted(stored) == EXPECTED_FILES
    for name in set(EXPECTED_FILES) - {"README.md", "config.json", "tokenizer_config.json"}:
        assert stored[name] == (trained / name).read_bytes(), name
    # The Hub's config.json names the base by its Hub id and is otherwise the local one, which is left alone.
    assert (trained / "config.json").read_bytes() == local_config
    local = json.loads(local_config)
    assert json.loads(stored["config.json"]) == local | {"base_model_name_or_path": BASE}
    assert json.loads(stored["tokenizer_config.json"])["tokenizer_class"] == "PreTrainedTokenizerFast"
    (commit,) = [body for body in hub.bodies if isinstance(body, list) and body and body[0].get("key") == "header"]
    assert commit[0]["value"]["summary"] == "Upload EAGLE-3 draft with medusa-forge"

    card = stored["README.md"].decode()
    assert card == (trained / "README.md").read_text()  # the refreshed card is kept locally too
    metadata, vllm, sglang = card_commands(card)
    assert metadata["base_model"] == BASE and metadata["library_name"] == "medusa-forge"
    assert {"eagle3", "speculative-decoding"} <= set(metadata["tags"])
    prefix = f"pip install vllm==0.33.0 && vllm serve {BASE} --speculative-config "
    assert vllm.startswith(prefix)
    spec = json.loads(shlex.split(vllm.removeprefix(prefix))[0])
    assert spec == {"method": "eagle3", "model": REPO, "num_speculative_tokens": 3}
    assert sglang == sglang_words(BASE, REPO)
    assert f"hf download {REPO} --local-dir draft" in card and f"serve --draft draft --model {BASE}" in card
    # What training and eval measured.
    assert "| Mean accepted tokens per step | 2.41 (plain decoding: 1.00) |" in card
    assert "Speed-up over the fastest plain greedy decoding: **1.57x** (14.1 vs 9.0 tokens/s)" in card
    assert "| step 1 | 0.520 | 0.810 |" in card and "| 3 | t+4 |" in card
    assert "over the target's hidden states 2, 4 and 5 of 8 layers" in card


def test_dry_run_lists_the_files_and_sends_nothing(hub, trained, capsys):
    readme = (trained / "README.md").read_text()
    assert main(["push", "--folder", str(trained), "--repo", REPO, "--base-model-id", BASE, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"dry run: would upload {len(EXPECTED_FILES)} files to {REPO}" in out
    listed = [line.split("  (")[0].strip() for line in out.splitlines() if line.startswith("  ")]
    assert listed == EXPECTED_FILES
    assert hub.requests == [] and (trained / "README.md").read_text() == readme


def draft_copy(trained, folder):
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((trained / name).read_bytes())
    return folder


def test_a_broken_or_missing_weights_file_is_a_clear_error(hub, trained, tmp_path, capsys):
    folder = draft_copy(trained, tmp_path / "corrupt")
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken")
    assert main(["push", "--folder", str(folder), "--repo", REPO, "--base-model-id", BASE]) == 2
    err = capsys.readouterr().err
    assert f"{folder / 'model.safetensors'}: not a readable safetensors file" in err and "Traceback" not in err
    (folder / "model.safetensors").unlink()
    assert main(["push", "--folder", str(folder), "--repo", REPO, "--base-model-id", BASE]) == 2
    assert "model.safetensors is missing" in capsys.readouterr().err
    assert hub.requests == []


def test_a_local_base_needs_a_hub_id(hub, trained, tmp_path, capsys):
    folder = draft_copy(trained, tmp_path / "plain")
    assert main(["push", "--folder", str(folder), "--repo", REPO, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "base_model_name_or_path is the local path" in err and "--base-model-id" in err
    assert main(["push", "--folder", str(folder), "--repo", REPO, "--base-model-id", BASE]) == 0
    # No card yet (a draft saved outside `train`): push writes one; only the files present go up.
    assert "model card: written" in capsys.readouterr().out
    assert sorted(hub.repos[REPO]["branches"]["main"]) == ["README.md", "config.json", "model.safetensors"]


def test_a_draft_no_engine_can_serve_is_refused(hub, tmp_path, tiny_tokenizer, capsys):
    shallow = target_folder(tmp_path, tiny_tokenizer, 2)  # the engines read hidden states 2, L//2 and L-3
    Eagle3Draft.for_target(load_base_model(str(shallow)), None, str(shallow)).save(tmp_path / "shallow")
    assert main(["push", "--folder", str(tmp_path / "shallow"), "--repo", REPO, "--base-model-id", BASE]) == 2
    err = capsys.readouterr().err
    assert "the target" in err and "has 2 layers" in err and "at least 7 layers" in err
    assert hub.requests == []


def test_the_card_shows_the_decoding_dtype_eval_records(trained):
    report = eval_report()
    report.dtype = "bfloat16"  # eval records the dtype it decoded in (reports from before it did: float32)
    config = Eagle3Draft.load(trained).config
    card = render_model_card(config, BASE, evaluation=report, repo_id=REPO, target_num_layers=8)
    assert "- Decoding dtype: bfloat16 (chosen by measured latency)" in card
    assert "- Decoding dtype: float32" in render_model_card(config, BASE, evaluation=eval_report(), repo_id=REPO)
