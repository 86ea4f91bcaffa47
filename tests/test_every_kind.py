"""What holds for every kind of draft, tested over the registry (`drafts.kinds()`): a kind registered in drafts/ is
trained by `train --draft_kind`, recognised in its folder, decoded by `generate` exactly as plain greedy, evaluated
by `eval` (report, stored tree), exported for each of its engines (and refused for the others) and checked by
`push --dry-run` by these tests the day it is registered. What one kind alone does stays in that kind's own files
(test_eval.py, test_eval_eagle3.py, test_export.py ...)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import test_push
import torch
from conftest import kind_train_flags, write_conversations
from safetensors.torch import load_file
from test_export_eagle3 import target_folder

from medusa_forge.cli import main
from medusa_forge.decode.generation import greedy_generate
from medusa_forge.decode.loading import encode_prompt, load_draft
from medusa_forge.drafts import format_choices, get_kind, kind_names, kind_of
from medusa_forge.drafts.card import CARD_MARKER
from medusa_forge.errors import UserError
from medusa_forge.export import export_draft
from medusa_forge.formats.tree_file import load_tree, load_tree_dtype
from medusa_forge.generation.text import decode_text, eos_token_ids
from medusa_forge.modeling import load_base_model, load_tokenizer
from medusa_forge.pipeline import load_config
from medusa_forge.pipeline.configuration import config_from_dict, train_config
from medusa_forge.pipeline.context import Context
from medusa_forge.pipeline.stages import launcher_argv
from medusa_forge.results import EvalReport
from medusa_forge.train.args import parse_args
from medusa_forge.train.run import train

hub = test_push.hub  # the stand-in Hub fixture
DEPTH = 3  # eval's --depth (a kind with a predictor per depth keeps its own)


@pytest.fixture(scope="module", params=kind_names())
def trained(request, tmp_path_factory, tiny_tokenizer):
    """(kind, its draft folder as `train --draft_kind` leaves it, the training data) for an 8-layer target, the
    depth the engines need for every kind's feature layers."""
    kind = get_kind(request.param)
    root = tmp_path_factory.mktemp(f"every-kind-{kind.name}")
    target = target_folder(root, tiny_tokenizer, 8)
    data = write_conversations(root / "data.json", 12)
    argv = [
        "train", "--model_name_or_path", str(target), "--data_path", str(data), "--output_dir", str(root / "draft"),
        "--max_steps", "12", "--per_device_train_batch_size", "4", "--learning_rate",
        "1e-2", "--model_max_length", "96", "--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none",
        "--disable_tqdm", "True", "--medusa_hidden_cache_dir", str(root / "cache"), *kind_train_flags(kind.name),
    ]  # fmt: skip
    assert main(argv) == 0
    return kind, root / "draft", data


def plain_greedy_text(base_path: str, prompt: str, new_tokens: int) -> str:
    base, tokenizer = load_base_model(base_path), load_tokenizer(base_path)
    eos = eos_token_ids(base, tokenizer)
    plain = greedy_generate(base, encode_prompt(tokenizer, prompt), new_tokens, eos)
    return decode_text(tokenizer, [t for t in plain if t not in eos]).strip()


def test_train_writes_a_folder_of_its_kind_with_its_card(trained):
    kind, folder, _ = trained
    assert kind_of(folder) is kind
    assert (folder / kind.config_name).is_file() and (folder / kind.weights_name).is_file()
    assert CARD_MARKER in (folder / "README.md").read_text()
    config = kind.read_config(folder)
    assert isinstance(config, kind.config_type)
    assert json.loads((folder / "training_metrics.json").read_text())["train"]


def test_generate_and_eval_decode_exactly_what_plain_greedy_does(trained, tmp_path, capsys):
    kind, folder, data = trained
    folder = shutil.copytree(folder, tmp_path / "draft")  # eval stores its tree there: not in the shared fixture
    base = kind.read_config(folder).base_model_name_or_path
    argv = ["generate", "--draft", str(folder), "--prompt", "Hello there!", "--max-new-tokens", "12"]
    assert main([*argv, "--device", "cpu", "--tree", "default-8"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == plain_greedy_text(base, "Hello there!", 12)
    assert "mean accepted tokens per step" in err and "tree of 8 nodes" in err

    out_dir = tmp_path / "report"
    argv = ["eval", "--draft", str(folder), "--data", str(data), "--max-prompts", "2", "--max-new-tokens", "16"]
    argv += ["--calibration-prompts", "1", "--max-conversations", "3", "--tree-sizes", "2,4,8", "--depth", str(DEPTH)]
    argv += ["--latency-prefix", "32", "--output-dir", str(out_dir), "--device", "cpu", "--dtype", "float32"]
    assert main(argv) == 0
    report = json.loads((out_dir / "eval.json").read_text())
    assert EvalReport.load(out_dir / "eval.json").to_json() == report
    assert report["draft_kind"] == kind.name and report["draft"] == str(folder)
    depth = load_draft(folder, device="cpu").draft.scored_depth(DEPTH)
    predictors = [f"{kind.metric_label} {kind.first_predictor + i}" for i in range(depth)]
    assert [row["name"] for row in report["accuracy"]] == ["base", *predictors]
    assert [row["name"] for row in report["accuracy_own_answers"]] == ["base", *predictors]
    assert report["draft_vocab"] is None and report["tree_accuracy_source"] == "own greedy answers"
    speed = report["speed"]
    assert speed["outputs_equal"] is True and speed["tokens"]["draft"] == speed["tokens"]["greedy_float32"]
    assert speed["agreement"] == 1.0 and speed["first_divergence"] == [] and speed["agreement_float32"] is None
    # greedy is timed in both dtypes whatever the draft decodes in: the speed-up is over the faster
    assert set(speed["tokens_per_second"]) == {"greedy_float32", "greedy_bfloat16", "draft", "prompt_lookup"}
    greedy = {name: speed["tokens_per_second"][name] for name in ("greedy_float32", "greedy_bfloat16")}
    assert speed["reference"] == max(greedy, key=greedy.get)
    assert report["dtype"] == speed["dtype"] == "float32" and report["other_dtype_searches"] == {}
    acceptance = report["acceptance"]
    assert acceptance["steps"] == sum(acceptance["histogram"].values()) > 0
    assert 1.0 <= acceptance["mean_accept_length"] <= 1 + depth
    assert report["tree_search"]["sizes"] == [2, 4, 8]
    stored = load_tree(folder)
    assert stored == report["tree"] and len(stored) == report["tree_search"]["chosen_size"]
    assert load_tree_dtype(folder) == "float32" and max(len(path) for path in stored) <= depth
    assert f"# {kind.title} evaluation" in (out_dir / "eval.md").read_text()

    # generate now decodes with the tree eval stored, still exactly
    capsys.readouterr()
    assert main(["generate", "--draft", str(folder), "--prompt", "Hello there!", "--max-new-tokens", "12"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == plain_greedy_text(base, "Hello there!", 12)
    assert f"tree of {len(stored)} nodes" in err


def test_export_writes_each_of_its_engines_and_refuses_the_others(trained, tmp_path):
    kind, folder, _ = trained
    for fmt in kind.formats:
        result = export_draft(folder, fmt, tmp_path / fmt, base_model_id="acme/tiny-llama")
        assert result.output_dir == tmp_path / fmt and result.files
        assert all(path.is_file() and path.is_relative_to(tmp_path / fmt) for path in result.files)
        assert any(str(tmp_path / fmt) in command for command in result.serve_commands)  # how to serve it
    for fmt in [fmt for fmt in format_choices() if fmt not in kind.formats]:
        with pytest.raises(UserError, match=f"--format {fmt}"):
            export_draft(folder, fmt, tmp_path / f"not-{fmt}")
        assert not (tmp_path / f"not-{fmt}").exists()  # nothing left behind


def test_push_dry_run_checks_the_folder_and_sends_nothing(hub, trained, capsys):
    kind, folder, _ = trained
    argv = ["push", "--draft", str(folder), "--repo", "alice/tiny-draft", "--base-model-id", "acme/tiny-llama"]
    assert main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run: would upload" in out and "alice/tiny-draft" in out
    assert f"  {kind.config_name}  (" in out and f"  {kind.weights_name}  (" in out and "  README.md  (" in out
    assert hub.requests == []


def test_push_names_a_local_bases_hub_id_in_what_it_uploads_only(hub, trained, tmp_path, capsys):
    """A draft trained from a local base: push refuses until it has the base's Hub id, then uploads a config.json
    and card naming it, and the local folder keeps its local base (local commands keep working offline)."""
    kind, folder, _ = trained
    folder = shutil.copytree(folder, tmp_path / "draft")  # push refreshes the folder's card
    local_base = json.loads((folder / kind.config_name).read_text())["base_model_name_or_path"]
    argv = ["push", "--draft", str(folder), "--repo", "alice/x"]
    assert main([*argv, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "base_model_name_or_path is the local path" in err and "--base-model-id" in err
    assert hub.requests == []
    assert main([*argv, "--base-model-id", "acme/tiny-llama"]) == 0
    stored = hub.repos["alice/x"]["branches"]["main"]
    assert json.loads(stored[kind.config_name])["base_model_name_or_path"] == "acme/tiny-llama"
    assert json.loads((folder / kind.config_name).read_text())["base_model_name_or_path"] == local_base
    assert "base_model: acme/tiny-llama" in stored["README.md"].decode()


# --- training ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", kind_names())
def test_resume_from_checkpoint_matches_uninterrupted_run(name, tmp_path, tiny_model_dir):
    kind = get_kind(name)
    data = write_conversations(tmp_path / "data.json", n=8)

    def run(out: str, *extra: str) -> Path:
        flags = ["--model_name_or_path", str(tiny_model_dir), "--data_path", str(data), "--output_dir",
                 str(tmp_path / out), "--max_steps", "4", "--save_steps", "2", "--per_device_train_batch_size", "2",
                 "--learning_rate", "1e-2", "--model_max_length", "96", "--seed", "0", "--disable_tqdm", "True",
                 "--medusa_hidden_cache_dir", str(tmp_path / "cache"), *kind_train_flags(name), *extra]  # fmt: skip
        return train(parse_args(flags))

    full = run("full", "--save_total_limit", "2", "--keep_checkpoints", "True")  # checkpoint-2 is copied below
    assert kind_of(full / "checkpoint-2") is kind  # a checkpoint is a draft folder
    assert {p.name for p in (full / "checkpoint-2").iterdir()} >= {"optimizer.pt", "trainer_state.json"}
    # "crash" after step 2: a fresh output dir holding only checkpoint-2, then the same command again
    (tmp_path / "resumed").mkdir()
    shutil.copytree(full / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    # ... and a checkpoint-3 whose save was cut off before trainer_state.json (written last): skipped
    shutil.copytree(full / "checkpoint-2", tmp_path / "resumed" / "checkpoint-3")
    (tmp_path / "resumed" / "checkpoint-3" / "trainer_state.json").unlink()
    resumed = run("resumed")
    a, b = load_file(str(full / kind.weights_name)), load_file(str(resumed / kind.weights_name))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    halfway = load_file(str(full / "checkpoint-2" / kind.weights_name))
    assert any(not torch.equal(halfway[key], a[key]) for key in a)  # steps 3-4 did change the draft


# --- the pipeline's configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", kind_names())
def test_each_kind_is_a_pipeline_key_that_reaches_the_train_stage_in_process_and_under_a_launcher(name, tmp_path):
    kind = get_kind(name)
    assert config_from_dict({"draft_kind": name}, "p.yaml").export.formats == list(kind.default_formats)
    config = load_config(None, [f"draft_kind={name}"])
    assert train_config(config, "data.json", tmp_path / "heads").draft_kind == name
    argv = launcher_argv(Context(config, tmp_path, "cmd"))
    assert argv[argv.index("--draft_kind") + 1] == name


@pytest.mark.parametrize("name", kind_names())
def test_a_format_the_kind_cannot_take_stops_the_pipeline_before_any_stage(name, tmp_path, capsys):
    kind = get_kind(name)
    for fmt in [fmt for fmt in format_choices() if fmt not in kind.formats]:
        workdir = tmp_path / f"work-{fmt}"
        settings = ["--set", f"draft_kind={name}", "--set", f"export.formats=[{fmt}]"]
        assert main(["pipeline", "--workdir", str(workdir), *settings]) == 2
        err = capsys.readouterr().err
        assert f"export.formats ['{fmt}']: with draft_kind {name} ({kind.label}) choose from" in err
        assert not workdir.exists()
