"""`medusa-forge eval --draft DIR` for an EAGLE-3 draft trained by `train --draft_kind eagle3`: the per-step rank
accuracy against the engines' step-by-step chain, and what eval refuses for it. The report, tree and speed run end to
end, for every kind: test_every_kind.py."""

from __future__ import annotations

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


def test_draft_vocab_is_refused_for_an_eagle3_draft(draft_dir, tmp_path, capsys):
    """--draft-vocab cuts Medusa heads' projections; an EAGLE-3 draft has its own draft vocabulary: eval and generate
    refuse the flag. (Eval end to end for every kind, EAGLE-3 included: test_every_kind.py.)"""
    folder, data = draft_dir
    argv = ["eval", "--draft", str(folder), "--data", str(data), "--max-prompts", "2", "--max-new-tokens", "16"]
    argv += ["--output-dir", str(tmp_path / "report"), "--device", "cpu", "--dtype", "float32"]
    assert main([*argv, "--draft-vocab", "8"]) == 2
    assert "--draft-vocab applies to Medusa heads" in capsys.readouterr().err
    assert main(["generate", "--draft", str(folder), "--prompt", "Hello", "--draft-vocab", "8"]) == 2
    assert "--draft-vocab applies to Medusa heads" in capsys.readouterr().err
