"""`medusa-forge eval --draft DIR` for an EAGLE-3 draft trained by `train --draft_kind eagle3`: the per-step rank
accuracy against the engines' step-by-step chain, and the report, tree and speed run end to end."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import make_tiny_model, write_conversations

from medusa_forge.cli import main
from medusa_forge.data.conversations import load_conversations
from medusa_forge.data.tokenize import IGNORE_INDEX
from medusa_forge.decode.loading import load_draft
from medusa_forge.drafts.accuracy import RANKS
from medusa_forge.drafts.eagle3_config import target_features
from medusa_forge.drafts.eagle3_drafter import Eagle3Drafter, score_eagle3_samples
from medusa_forge.drafts.eagle3_model import CachedAttention
from medusa_forge.evaluate.accuracy import conversation_samples
from medusa_forge.formats.tree_file import load_tree, load_tree_dtype
from medusa_forge.results import EvalReport


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory, tiny_tokenizer):
    folder = tmp_path_factory.mktemp("eval-eagle3")
    make_tiny_model("llama", folder / "base", tiny_tokenizer)
    data = write_conversations(folder / "data.json", 12)
    argv = [
        "train", "--model_name_or_path", str(folder / "base"), "--data_path", str(data),
        "--output_dir", str(folder / "draft"), "--max_steps", "12", "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-2", "--model_max_length", "96", "--save_strategy", "no", "--eval_strategy", "no",
        "--report_to", "none", "--disable_tqdm", "True", "--draft_kind", "eagle3", "--eagle3_ttt_steps", "2",
        "--eagle3_draft_vocab_size", "64", "--medusa_hidden_cache_dir", str(folder / "cache"),
    ]  # fmt: skip
    assert main(argv) == 0
    return folder / "draft", data


def chain_logits(base, drafter: Eagle3Drafter, ids: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The draft's logits for tokens t+2 and t+3 as the engines run it: a cached first pass over
    (features 0..t, tokens 1..t+1), then one chain node with the true token t+2 at position t+1."""
    with torch.no_grad():
        features = target_features(base(ids[None], output_hidden_states=True).hidden_states)[0]
        state = drafter.start(ids[1 : t + 2], features[: t + 1])
        draft = drafter.draft
        bias = torch.zeros(1, 1, 1, state.length + 1)
        out = draft.layer(
            drafter.embed(ids[t + 2 : t + 3])[None],
            state.root_state[None, None],
            torch.tensor([[t + 1]]),
            CachedAttention(state.keys, state.values, bias),
        )
        return draft.logits(state.root_state), draft.logits(out.state[0, 0])


def rank(draft, logits: torch.Tensor, token: int) -> int:
    """Rank of target id `token` among the draft's logits; RANKS (a miss) outside the draft vocabulary."""
    where = (draft.to_target_ids(torch.arange(len(logits))) == token).nonzero()
    return int((logits > logits[where[0, 0]]).sum()) if len(where) else RANKS


def test_step_accuracy_matches_the_engines_chain(draft_dir):
    folder, data = draft_dir
    loaded = load_draft(folder, device="cpu")
    base, draft, tokenizer = loaded.base, loaded.draft.draft, loaded.tokenizer
    samples = conversation_samples(tokenizer, load_conversations(str(data), 2), 96)
    rows = score_eagle3_samples(base, draft, samples, depth=3, progress=False)
    assert [r.name for r in rows] == ["base", "step 1", "step 2", "step 3"]
    drafter = Eagle3Drafter(base, draft)
    tokens, counts = [0, 0], [[0] * RANKS, [0] * RANKS]
    for input_ids, labels in samples:
        ids = torch.tensor(input_ids)
        for t in range(len(ids) - 2):
            targets = [(step, t + 2 + step) for step in (0, 1) if t + 2 + step < len(ids)]
            targets = [(step, i) for step, i in targets if labels[i] != IGNORE_INDEX]
            if not targets:
                continue
            logits = chain_logits(base, drafter, ids, t)
            for step, i in targets:
                tokens[step] += 1
                k = rank(draft, logits[step], input_ids[i])
                if k < RANKS:
                    counts[step][k] += 1
    for row, n, count in zip(rows[1:3], tokens, counts, strict=True):
        assert row.tokens == n > 0
        assert row.rank_counts == count
    assert sum(rows[1].rank_counts) + sum(rows[2].rank_counts) > 0  # not a vacuous comparison


def test_eval_an_eagle3_draft_end_to_end(draft_dir, tmp_path, capsys):
    folder, data = draft_dir
    folder = shutil.copytree(folder, tmp_path / "draft")  # eval stores its tree there: not in the shared fixture
    out = tmp_path / "report"
    argv = ["eval", "--draft", str(folder), "--data", str(data), "--max-prompts", "2", "--max-new-tokens", "16"]
    argv += ["--calibration-prompts", "1", "--max-conversations", "3", "--tree-sizes", "2,4,8", "--depth", "3"]
    argv += ["--latency-prefix", "32", "--output-dir", str(out), "--device", "cpu", "--dtype", "float32"]
    assert main(argv) == 0
    report = json.loads((out / "eval.json").read_text())
    assert EvalReport.load(out / "eval.json").to_json() == report
    assert report["draft_kind"] == "eagle3" and report["draft_vocab"] is None
    assert [row["name"] for row in report["accuracy"]] == ["base", "step 1", "step 2", "step 3"]
    assert [row["name"] for row in report["accuracy_own_answers"]] == ["base", "step 1", "step 2", "step 3"]
    assert report["tree_accuracy_source"] == "own greedy answers"
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
    assert 1.0 <= acceptance["mean_accept_length"] <= 4.0  # at most depth 3 + the base token
    assert report["tree_search"]["sizes"] == [2, 4, 8]
    stored = load_tree(folder)
    assert stored == report["tree"] and len(stored) == report["tree_search"]["chosen_size"]
    assert load_tree_dtype(folder) == "float32"
    assert max(len(path) for path in stored) <= 3
    assert "# EAGLE-3 evaluation" in (out / "eval.md").read_text()
    capsys.readouterr()
    # the generate command decodes with the stored tree; --draft-vocab is Medusa's only
    assert main(["generate", "--draft", str(folder), "--prompt", "Hello", "--max-new-tokens", "4"]) == 0
    assert main([*argv, "--draft-vocab", "8"]) == 2
    assert "--draft-vocab applies to Medusa heads" in capsys.readouterr().err
