"""`train --draft_kind eagle3`: flags, the training-time-test loss against a step-by-step recomputation,
assistant-only targets, cached and per-batch features, a loadable draft folder with the data's draft
vocabulary, resume."""

import json
from collections import namedtuple
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import kind_train_flags, make_tiny_model, write_conversations
from safetensors.torch import load_file

from medusa_forge.data.conversations import load_conversations
from medusa_forge.data.tokenize import IGNORE_INDEX
from medusa_forge.drafts import get_kind, kind_names
from medusa_forge.drafts.eagle3_config import draft_vocab_ids, draft_vocabulary
from medusa_forge.drafts.eagle3_model import CachedAttention, Eagle3Draft, causal_bias
from medusa_forge.drafts.eagle3_training import Eagle3ForTraining, assistant_token_counts, step_weights, target_argmax
from medusa_forge.errors import UserError
from medusa_forge.generation.device import cpu_has_native_bfloat16
from medusa_forge.modeling import load_base_model, load_tokenizer
from medusa_forge.train import hidden_cache
from medusa_forge.train.args import parse_args
from medusa_forge.train.dataset import ConversationDataset, PadCollator
from medusa_forge.train.hidden_cache import CachedHiddenDataset, build_hidden_cache, cache_key
from medusa_forge.train.run import train as run_train
from medusa_forge.train.target_files import TargetFiles

STEPS = 3


def sharp_target(arch: str, folder: Path, tokenizer) -> Path:
    """A tiny random target whose next-token distributions are peaked (final norm x20), as a trained model's
    are: against a near-uniform target the soft loss sits at its entropy floor and cannot show learning."""
    make_tiny_model(arch, folder, tokenizer)
    model = load_base_model(str(folder))
    with torch.no_grad():
        model.base_model.norm.weight.mul_(20.0)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    return sharp_target("llama", tmp_path_factory.mktemp("sharp-llama"), tiny_tokenizer)


@pytest.fixture(scope="module")
def target(target_dir):
    return load_base_model(str(target_dir))


def eagle3_flags(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(model_dir), "--data_path", str(data), "--output_dir", str(out),
        "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--model_max_length", "96",
        "--logging_steps", "1", "--seed", "0", "--disable_tqdm", "True", "--draft_kind", "eagle3",
        "--eagle3_ttt_steps", str(STEPS), "--eagle3_draft_vocab_size", "64",
        "--medusa_hidden_cache_dir", str(out.parent / "cache"), *extra,
    ]  # fmt: skip


def tokenised(tokenizer, data: Path) -> list[dict[str, list[int]]]:
    return ConversationDataset(load_conversations(str(data)), tokenizer, 96).all_items()


def training_model(target, items, size=64, seed=0, **switches: bool) -> Eagle3ForTraining:
    vocab = target.config.vocab_size
    d2t, _ = draft_vocabulary(assistant_token_counts(items, vocab), size)
    torch.manual_seed(seed)
    draft = Eagle3Draft.for_target(target, draft_vocab_ids(d2t), "x", **switches)
    if switches.get("fc_norm"):  # norms away from 1, so that skipping them would show
        with torch.no_grad():
            for norm in draft.fc_norm:
                norm.weight.uniform_(0.5, 2.0)
    return Eagle3ForTraining(target, draft, step_weights(STEPS, 0.8))


# ----- flags -----


def test_flags_default_to_medusa_and_validate_eagle3_knobs():
    config = parse_args([])
    assert config.draft_kind == "medusa"
    assert (config.eagle3_ttt_steps, config.eagle3_step_decay, config.eagle3_draft_vocab_size) == (7, 0.8, 8192)
    assert parse_args(["--draft_kind", "eagle3", "--eagle3_ttt_steps", "2"]).eagle3_ttt_steps == 2
    for flags, message in (
        (["--eagle3_ttt_steps", "0"], "--eagle3_ttt_steps"),
        (["--eagle3_step_decay", "0"], "--eagle3_step_decay"),
        (["--eagle3_draft_vocab_size", "3"], "--eagle3_draft_vocab_size"),
    ):
        with pytest.raises(UserError, match=message):
            parse_args(["--draft_kind", "eagle3", *flags])
    with pytest.raises(SystemExit):  # argparse lists the choices
        parse_args(["--draft_kind", "hydra"])


# ----- the loss -----


def step_by_step_sums(model: Eagle3ForTraining, ids: torch.Tensor, labels: torch.Tensor) -> list[tuple[float, int]]:
    """(summed soft cross-entropy, positions) per step for ONE unpadded sequence, drafting as inference does:
    for each start index t, the draft runs step 0 over the prefix, then one token per step with a key/value
    cache (CachedAttention), reading the target's logits (not its hidden states) for targets and masks."""
    draft, target = model.draft, model.base
    length = len(ids)
    vocab_ids = draft_vocab_ids(draft.d2t)
    in_draft = torch.zeros(target.config.vocab_size, dtype=torch.bool)
    in_draft[vocab_ids] = True
    sums = [[0.0, 0] for _ in range(len(model.loss_weights))]
    with torch.no_grad():
        out = target(input_ids=ids[None], output_hidden_states=True)
        logits = out.logits[0].float()
        layers = [out.hidden_states[i] for i in (0, 1, 2)]  # a 2-layer target: target_layers(2)
        embeds = target.get_input_embeddings()(ids)[None]
        # step 0 over indices 0..T-2 (index t reads token t+1)
        first = draft.layer(
            embeds[:, 1:],
            draft.combine(torch.cat(layers, dim=-1)[:, :-1]),
            torch.arange(length - 1)[None],
            CachedAttention(None, None, causal_bias(torch.ones(1, length - 1))),
        )
        for t in range(length - 2):
            keys, values, state = first.keys[:, :, : t + 1], first.values[:, :, : t + 1], first.state[:, t : t + 1]
            for j in range(len(model.loss_weights)):
                if j:
                    if t + 2 + j > length - 1:
                        break
                    step = draft.layer(
                        embeds[:, t + 1 + j : t + 2 + j],
                        draft.norm(state) if draft.config.norm_output else state,  # EAGLE 3.1's norm_output
                        torch.tensor([[t + j]]),
                        CachedAttention(keys, values, torch.zeros(1, 1, 1, keys.shape[2] + 1)),
                    )
                    keys, values = torch.cat([keys, step.keys], 2), torch.cat([values, step.values], 2)
                    state = step.state
                goal = logits[t + 1 + j]  # the target's distribution for token t+2+j
                if labels[t + 2 + j] == IGNORE_INDEX or not in_draft[goal.argmax()]:
                    continue
                soft = F.softmax(goal[vocab_ids], dim=-1)
                sums[j][0] -= float((soft * F.log_softmax(draft.logits(state)[0, 0].float(), dim=-1)).sum())
                sums[j][1] += 1
    return [(s, n) for s, n in sums]


def test_target_argmax_is_argmax_with_first_index_ties_across_chunks():
    """target_argmax uses max(-1).indices (faster than argmax on bfloat16 CPU): same ids, ties to the first."""
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(37, 16, generator=gen).to(torch.bfloat16)
    weight = torch.randn(300, 16, generator=gen).to(torch.bfloat16)
    weight[40] = weight[150] = rows[0] * 4  # row 0's best ids tie exactly: the lower one must win
    expected = (rows @ weight.T).argmax(-1)
    assert expected[0] == 40
    assert torch.equal(target_argmax(rows, weight, chunk_size=8), expected)


@pytest.mark.parametrize("eagle31", [False, True], ids=["eagle3", "eagle3.1"])
def test_ttt_loss_equals_a_step_by_step_recomputation(target, tiny_tokenizer, tmp_path, eagle31):
    items = tokenised(tiny_tokenizer, write_conversations(tmp_path / "data.json", n=3))
    items = [{k: v[:length] for k, v in item.items()} for item, length in zip(items, (40, 27, 33), strict=True)]
    model = training_model(target, items, size=48, fc_norm=eagle31, norm_output=eagle31)
    batch = PadCollator(tiny_tokenizer.pad_token_id)(items)  # padded: the rows differ in length
    with torch.no_grad():
        result = model(**batch)
    expected = [[0.0, 0] for _ in range(STEPS)]
    for item in items:
        for j, (total, count) in enumerate(step_by_step_sums(model, torch.tensor(item["input_ids"]), item["labels"])):
            expected[j][0] += total
            expected[j][1] += count
    stats = result["head_stats"]
    loss = 0.0
    for j, (total, count) in enumerate(expected):
        assert count > 0 and int(stats[j, 1]) == count, j
        assert float(stats[j, 0]) == pytest.approx(total, rel=1e-4), j
        loss += 0.8**j * total / count
    assert float(result["loss"]) == pytest.approx(loss, rel=1e-4)
    assert stats[:, 1].sum() < stats[:, 2].sum()  # some targets' argmax lie outside the 48-token vocabulary


def test_user_turn_targets_do_not_reach_the_loss(target, tiny_tokenizer, tmp_path):
    """The target's distribution at positions whose next token is a user-turn token (or padding) is replaced
    by garbage: same loss. The same change at an assistant token changes it."""
    items = tokenised(tiny_tokenizer, write_conversations(tmp_path / "data.json", n=4))
    model = training_model(target, items)
    batch = PadCollator(tiny_tokenizer.pad_token_id)(items)
    records = hidden_cache.frozen_pass(target, batch["input_ids"], batch["attention_mask"], "eagle3")
    hidden = target.config.hidden_size
    user = torch.zeros(batch["labels"].shape, dtype=torch.bool)
    user[:, :-1] = batch["labels"][:, 1:] == IGNORE_INDEX  # the state at s gives the target for token s+1
    assert user.any() and (~user).any()
    noisy = records.clone()
    noisy[..., 3 * hidden :][user] = torch.randn_like(noisy[..., 3 * hidden :][user]) * 50
    with torch.no_grad():
        plain = model(**batch, hidden_states=records)
        changed = model(**batch, hidden_states=noisy)
    torch.testing.assert_close(changed["loss"], plain["loss"])
    torch.testing.assert_close(changed["head_stats"], plain["head_stats"])
    assistant = noisy.clone()
    assistant[..., 3 * hidden :][~user] += 1.0
    with torch.no_grad():
        assert not torch.allclose(model(**batch, hidden_states=assistant)["loss"], plain["loss"])


def test_cached_and_per_batch_features_give_the_same_loss(target, target_dir, tiny_tokenizer, tmp_path):
    items = tokenised(tiny_tokenizer, write_conversations(tmp_path / "data.json", n=5))
    files = TargetFiles(target_dir, torch.float32)
    cache = build_hidden_cache(target, files, items, tmp_path / "cache", max_tokens_per_batch=128, kind="eagle3")
    model = training_model(target, items)
    collate = PadCollator(tiny_tokenizer.pad_token_id)
    per_batch = model(**collate(items))
    cached_batch = collate(list(CachedHiddenDataset(items, cache)))
    assert cached_batch["hidden_states"].shape[-1] == 4 * target.config.hidden_size
    cached = model(**cached_batch)
    torch.testing.assert_close(cached["loss"], per_batch["loss"], rtol=2e-3, atol=2e-3)  # float16 storage
    torch.testing.assert_close(cached["head_stats"][:, 1:3], per_batch["head_stats"][:, 1:3])  # same positions
    # The kinds never share a folder (the default kind's key is Medusa's)
    assert cache_key(files, items, "medusa") == cache_key(files, items) != cache_key(files, items, "eagle3")
    meta = json.loads((tmp_path / "cache" / cache_key(files, items, "eagle3") / "meta.json").read_text())
    assert (meta["kind"], meta["layers"], meta["hidden"]) == ("eagle3", [0, 1, 2, "final"], 4 * 32)


# ----- the command -----


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_train_writes_a_loadable_draft_that_learns(tmp_path, tiny_tokenizer, arch):
    model_dir = sharp_target(arch, tmp_path / "model", tiny_tokenizer)
    data = write_conversations(tmp_path / "data.json", n=8)
    out = run_train(parse_args(eagle3_flags(model_dir, data, tmp_path / "out", "--num_train_epochs", "10",
                                            "--save_strategy", "no")))  # fmt: skip
    draft = Eagle3Draft.load(out)
    assert {"config.json", "model.safetensors", "tokenizer.json", "training_metrics.json"} <= {
        p.name for p in out.iterdir()
    }
    items = tokenised(load_tokenizer(str(model_dir)), data)  # as the command tokenises: the folder's tokenizer
    d2t, _ = draft_vocabulary(assistant_token_counts(items, draft.config.vocab_size), 64)
    assert torch.equal(draft.d2t, d2t)  # the 64 most frequent assistant tokens
    user_only = {t for item in items for t, lab in zip(item["input_ids"], item["labels"], strict=True)
                 if lab == IGNORE_INDEX} - {t for item in items for t in item["labels"]}  # fmt: skip
    assert user_only and not user_only & set(draft_vocab_ids(draft.d2t).tolist())
    metrics = json.loads((out / "training_metrics.json").read_text())
    assert set(metrics["train"]) == {str(j) for j in range(STEPS)}
    for j in range(STEPS):
        losses = [row["loss"] for row in metrics["train"][str(j)]]
        assert losses[-1] < losses[0] * 0.9, (arch, j, losses)
    assert "train_loss" in metrics["final"]


def test_train_writes_eagle31_switches_the_engines_read(tmp_path, target_dir):
    data = write_conversations(tmp_path / "data.json", n=8)
    flags = eagle3_flags(target_dir, data, tmp_path / "out", "--num_train_epochs", "3", "--save_strategy", "no",
                         "--eagle3_fc_norm", "True", "--eagle3_norm_output", "True")  # fmt: skip
    out = run_train(parse_args(flags))
    raw = json.loads((out / "config.json").read_text())
    assert raw["fc_norm"] is True and raw["norm_output"] is True
    draft = Eagle3Draft.load(out)
    assert draft.config.fc_norm and draft.config.norm_output
    assert all(not torch.equal(norm.weight, torch.ones_like(norm.weight)) for norm in draft.fc_norm)  # trained
    assert "EAGLE 3.1" in (out / "README.md").read_text()


def test_falls_back_to_per_batch_features_when_the_cache_does_not_fit(tmp_path, target_dir, monkeypatch, caplog):
    usage = namedtuple("usage", "total used free")
    real = hidden_cache.shutil.disk_usage  # the cache's folder is full; --output_dir's disk has room
    full = usage(10**6, 10**6, 1000)
    monkeypatch.setattr(hidden_cache.shutil, "disk_usage", lambda path: full if "cache" in str(path) else real(path))
    data = write_conversations(tmp_path / "data.json", n=4)
    out = run_train(parse_args(eagle3_flags(target_dir, data, tmp_path / "out", "--max_steps", "2",
                                            "--save_strategy", "no")))  # fmt: skip
    assert "features per batch" in caplog.text
    assert not any((tmp_path / "cache").glob("*/meta.json"))
    Eagle3Draft.load(out)


# Resume from a checkpoint, for every kind: test_every_kind.py.


@pytest.mark.skipif(
    not (torch.cuda.is_available() or cpu_has_native_bfloat16()), reason="needs native bfloat16 (GPU, AVX512-BF16/AMX)"
)
@pytest.mark.parametrize("kind", kind_names())
def test_bf16_trains_float32_weights_that_learn(tmp_path, target_dir, kind):
    """--bf16 (the tutorial's flag): the frozen target runs in bfloat16 and every kind's draft trains under autocast
    with float32 weights, on a GPU or a CPU with native bfloat16."""
    data = write_conversations(tmp_path / "data.json", n=8)
    flags = [
        "--model_name_or_path", str(target_dir), "--data_path", str(data), "--output_dir", str(tmp_path / "out"),
        "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--model_max_length", "96",
        "--logging_steps", "1", "--seed", "0", "--disable_tqdm", "True", "--medusa_hidden_cache_dir",
        str(tmp_path / "cache"), "--num_train_epochs", "10", "--save_strategy", "no", "--bf16", "True",
        *kind_train_flags(kind),  # each kind only its own flags: train refuses another kind's
    ]  # fmt: skip
    config = parse_args(flags)
    assert config.bf16 is True
    out = run_train(config)
    weights = load_file(out / get_kind(kind).weights_name)
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float32}
    metrics = json.loads((out / "training_metrics.json").read_text())
    for rows in metrics["train"].values():
        losses = [row["loss"] for row in rows]
        assert losses[-1] < losses[0] * 0.9, (kind, losses)
