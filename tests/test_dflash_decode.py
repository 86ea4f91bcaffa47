"""DFlash decoding: exact greedy output whatever the draft proposes (a chain as the engines draft it, and a tree of
each position's top-k), the drafter's context after `advance` equals one built from scratch, a draft built to know
its target gets whole blocks accepted (docs/dflash-reference.md §7.1's construction), and `eval` reports the
per-position accuracy that the drafter's own proposals give."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from conftest import TINY_CONFIGS, make_tiny_model, plain_sample, write_conversations

from medusa_forge.cli import main
from medusa_forge.data.conversations import load_conversations
from medusa_forge.data.tokenize import IGNORE_INDEX
from medusa_forge.decode.generation import SpeculativeDecoder, greedy_generate
from medusa_forge.decode.loading import load_draft
from medusa_forge.drafts.dflash_drafter import DFlashDrafter, score_dflash_samples
from medusa_forge.drafts.dflash_model import DFlashDraft
from medusa_forge.drafts.drafter import TreeBuffers
from medusa_forge.errors import UserError
from medusa_forge.evaluate.accuracy import conversation_samples
from medusa_forge.formats.tree_file import default_choices
from medusa_forge.results import EvalReport

VOCAB, BLOCK, NEW = 400, 5, 24
PROMPT = [5, 17, 42, 99, 123, 7, 64]
CHAIN = [[0] * d for d in range(1, BLOCK)]  # what vLLM drafts: B-1 tokens, each position's argmax


def chaotic_target(layers: int = 4, seed: int = 0) -> transformers.PreTrainedModel:
    """Large random weights, so greedy output does not collapse into one repeated token."""
    torch.manual_seed(seed)
    config = TINY_CONFIGS["llama"](VOCAB)
    config.initializer_range = 0.3
    config.num_hidden_layers = layers
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def random_draft(target, seed: int = 1) -> DFlashDraft:
    torch.manual_seed(seed)
    draft = DFlashDraft.for_target(target, "tiny", mask_token_id=3, block_size=BLOCK)
    with torch.no_grad():
        for param in draft.parameters():
            param.normal_(0.0 if param.ndim > 1 else 1.0, 0.3)
    return draft.eval()


@pytest.mark.parametrize("choices", [CHAIN, default_choices(12, BLOCK - 1)], ids=["chain", "tree-12"])
def test_greedy_equals_plain_greedy(choices):
    target = chaotic_target()
    result = SpeculativeDecoder(target, DFlashDrafter(target, random_draft(target)), choices).generate(PROMPT, NEW)
    assert result.tokens == greedy_generate(target, PROMPT, NEW)
    assert max(result.accept_lengths) <= BLOCK


def test_sampling_draws_the_tokens_of_plain_sampling_and_cold_sampling_is_greedy():
    """Verification is the target's alone: with the draft, sampling draws what plain sampling draws."""
    target = chaotic_target()
    decoder = SpeculativeDecoder(target, DFlashDrafter(target, random_draft(target)), default_choices(12, BLOCK - 1))
    assert decoder.generate(PROMPT, NEW, temperature=1e-4, seed=1).tokens == greedy_generate(target, PROMPT, NEW)
    hot = [decoder.generate(PROMPT, 16, temperature=1.0, top_p=0.9, seed=seed) for seed in (7, 8)]
    assert [r.tokens for r in hot] == [plain_sample(target, PROMPT, 16, 1.0, seed, 0.9) for seed in (7, 8)]
    assert hot[0].tokens != hot[1].tokens


def test_context_after_advance_equals_a_fresh_start():
    target = chaotic_target()
    drafter = DFlashDrafter(target, random_draft(target))
    ids = torch.tensor(PROMPT + [11, 250, 31])
    with torch.no_grad():
        out = target(ids[None], output_hidden_states=True)
    hidden = torch.cat([out.hidden_states[i][0] for i in drafter.feature_layers], dim=-1)
    tree = TreeBuffers.from_choices(CHAIN)
    stepwise = drafter.advance(drafter.start(ids[1:7], hidden[:6]), torch.arange(4), ids[7:], hidden[6:])
    fresh = drafter.start(ids[1:], hidden)
    for a, b in zip(stepwise.keys + stepwise.values, fresh.keys + fresh.values, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert torch.equal(drafter.propose(stepwise, 77, tree), drafter.propose(fresh, 77, tree))
    assert drafter.feature_layers == (2,)  # a 4-layer target: 1 .. L-3 is layer 1 alone, HF hidden_states[2]


def test_a_chain_of_k_is_drafted_by_a_block_of_k_plus_one_as_vllm_drafts_it():
    """vLLM 0.32.0 sends 1 + num_speculative_tokens queries per request whatever the trained block size
    (`vllm/v1/spec_decode/dflash.py`, `set_inputs_first_pass`: num_query_per_req = 1 + num_speculative_tokens), and
    the block's attention is bidirectional, so a chain of K < B-1 is the argmax of a block of K+1, not the first K
    slots of the whole block: ours drafts what vLLM drafts when export serves eval's shorter chain."""
    target = chaotic_target()
    draft = random_draft(target)
    drafter = DFlashDrafter(target, draft)
    ids = torch.tensor(PROMPT + [11, 250, 31])
    with torch.no_grad():
        out = target(ids[None], output_hidden_states=True)
    hidden = torch.cat([out.hidden_states[i][0] for i in drafter.feature_layers], dim=-1)

    def block_argmax(state, root: int, size: int) -> list[int]:  # the block [root, m, ...] of `size` at its positions
        block = torch.full((size,), draft.config.mask_token_id)
        block[0] = root
        positions = torch.arange(state.length, state.length + size)[None, None]
        kv = list(zip(state.keys, state.values, strict=True))
        with torch.no_grad():
            states = draft.block(drafter.embedding(block)[None, None], positions, kv)[0, 0]
            return drafter.head(states[1:]).argmax(-1).tolist()

    differs = False
    for cut in range(3, len(ids)):
        state, root = drafter.start(ids[1 : cut + 1], hidden[:cut]), int(ids[cut])
        for k in range(1, BLOCK):
            chain = drafter.propose(state, root, TreeBuffers.from_choices(CHAIN[:k]))
            assert chain.tolist() == [root, *block_argmax(state, root, k + 1)]
            differs |= chain[1:].tolist() != block_argmax(state, root, BLOCK)[:k]
    assert differs  # the whole block's first slots would have drafted other tokens: the block length matters


def check_context_grows_by_the_accepted(target, drafter: DFlashDrafter, choices, prompt: list[int]) -> list[int]:
    """Decode step by step: after each step the drafter's context holds exactly the base model's cached positions
    (it grew by the accepted count, nothing of the rejected drafts), and at the end it equals a fresh start over
    the whole accepted sequence: each position's keys/values computed once and appended, never recomputed."""
    decoder = SpeculativeDecoder(target, drafter, choices)
    state = decoder.prefill(torch.tensor(prompt))
    assert state.draft.length == len(prompt)
    accepted = []
    for _ in range(6):
        before = state.draft.length
        new = decoder.step(state)
        accepted.append(len(new))  # the accepted drafts and the next root: the nodes now cached
        assert state.draft.length == before + len(new) == state.prefix_length
    ids = torch.tensor(prompt + greedy_generate(target, prompt, sum(accepted)))[: state.prefix_length]
    with torch.no_grad():
        out = target(ids[None], output_hidden_states=True)
    fresh = drafter.start(ids, torch.cat([out.hidden_states[i][0] for i in drafter.feature_layers], dim=-1))
    for a, b in zip(state.draft.keys + state.draft.values, fresh.keys + fresh.values, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    return accepted


def test_context_grows_by_the_accepted_count_per_step():
    target = chaotic_target()
    tree = default_choices(12, BLOCK - 1)
    check_context_grows_by_the_accepted(target, DFlashDrafter(target, random_draft(target)), tree, PROMPT)
    repeating = repeating_target()
    drafter = DFlashDrafter(repeating, repeating_draft(repeating))
    assert check_context_grows_by_the_accepted(repeating, drafter, CHAIN, [1, 5, 9, 12]) == [BLOCK] * 6


HALF = 16  # the repeating target's real tokens: ids 0 .. 2*HALF-1, and one more, the mask, with a zero embedding


def repeating_target() -> transformers.PreTrainedModel:
    """A Llama whose layers add nothing and whose lm_head maps token v to 2 (v // 2): an even token repeats."""
    torch.manual_seed(0)
    config = TINY_CONFIGS["llama"](2 * HALF + 1)
    config.num_key_value_heads = 4  # v_proj square, for the draft below
    config.num_hidden_layers = 4
    target = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        embedding = torch.zeros(2 * HALF + 1, 32)
        embedding[: 2 * HALF] = torch.eye(HALF, 32).repeat_interleave(2, dim=0)
        target.get_input_embeddings().weight.copy_(embedding)
        for layer in target.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        head = torch.zeros(2 * HALF + 1, 32)
        head[torch.arange(0, 2 * HALF, 2), torch.arange(HALF)] = 1.0
        target.lm_head.weight.copy_(head)
    return target


def repeating_draft(target) -> DFlashDraft:
    """§7.1: q = k = 0 (uniform attention), fc = 0 (context values 0), v_proj = o_proj = identity, MLP 0, the mask
    embedding zero: every mask slot's output is a multiple of the bonus token's embedding, so each slot drafts the
    target's successor of the bonus token. Only a block laid out [bonus, mask ...] with the target's embedding and
    lm_head, drafting from the mask slots, gets anything accepted."""
    draft = DFlashDraft.for_target(target, "repeat", mask_token_id=2 * HALF, block_size=BLOCK)
    with torch.no_grad():
        for param in draft.parameters():
            if param.ndim > 1:
                param.zero_()
        attention = draft.layers[0].self_attn
        attention.v_proj.weight.copy_(torch.eye(32))
        attention.o_proj.weight.copy_(torch.eye(32))
    return draft.eval()


def test_a_draft_that_knows_the_target_gets_whole_blocks_accepted():
    target = repeating_target()
    prompt = [1, 5, 9, 12]  # ends in 12: the target repeats it
    reference = greedy_generate(target, prompt, NEW)
    assert set(reference) == {12}
    result = SpeculativeDecoder(target, DFlashDrafter(target, repeating_draft(target)), CHAIN).generate(prompt, NEW)
    assert result.tokens == reference
    assert result.accept_lengths[:-1] == [BLOCK] * (len(result.accept_lengths) - 1)  # B-1 drafts + the bonus
    with pytest.raises(UserError, match="deeper than the 4"):  # B-1 = 4 positions
        SpeculativeDecoder(target, DFlashDrafter(target, repeating_draft(target)), CHAIN + [[0] * BLOCK])


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory, tiny_tokenizer):
    folder = tmp_path_factory.mktemp("eval-dflash")
    make_tiny_model("llama", folder / "base", tiny_tokenizer)
    data = write_conversations(folder / "data.json", 12)
    argv = [
        "train", "--model_name_or_path", str(folder / "base"), "--data_path", str(data),
        "--output_dir", str(folder / "draft"), "--max_steps", "12", "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-2", "--model_max_length", "96", "--save_strategy", "no", "--eval_strategy", "no",
        "--report_to", "none", "--disable_tqdm", "True", "--draft_kind", "dflash", "--dflash_block_size", "5",
        "--medusa_hidden_cache_dir", str(folder / "cache"),
    ]  # fmt: skip
    assert main(argv) == 0
    return folder / "draft", data


def test_position_accuracy_is_what_the_drafter_proposes(draft_dir):
    folder, data = draft_dir
    loaded = load_draft(folder, device="cpu")
    base, draft = loaded.base, loaded.draft.draft
    samples = conversation_samples(loaded.tokenizer, load_conversations(str(data), 2), 96)
    rows = score_dflash_samples(base, draft, samples, depth=3, progress=False)
    assert [r.name for r in rows] == ["base", "position 1", "position 2", "position 3"]
    drafter, tree = DFlashDrafter(base, draft), TreeBuffers.from_choices(CHAIN[:3])
    tokens, hits = [0, 0, 0], [0, 0, 0]
    for input_ids, labels in samples:
        ids = torch.tensor(input_ids)
        with torch.no_grad():
            out = base(ids[None], output_hidden_states=True)
        hidden = torch.cat([out.hidden_states[i][0] for i in drafter.feature_layers], dim=-1)
        for a in range(1, len(ids) - 1):  # decoding after the base chose x_a from position a-1
            chain = drafter.propose(drafter.start(ids[1 : a + 1], hidden[:a]), int(ids[a]), tree)
            for d in range(1, 4):
                if a + d < len(ids) and labels[a + d] != IGNORE_INDEX:
                    tokens[d - 1] += 1
                    hits[d - 1] += int(chain[d] == ids[a + d])
    assert [r.tokens for r in rows[1:]] == tokens and min(tokens) > 0
    assert [r.rank_counts[0] for r in rows[1:]] == hits


def test_eval_a_dflash_draft_end_to_end(draft_dir, tmp_path):
    folder, data = draft_dir
    folder = shutil.copytree(folder, tmp_path / "draft")  # eval stores its tree there: not in the shared fixture
    out = tmp_path / "report"
    argv = ["eval", "--draft", str(folder), "--data", str(data), "--max-prompts", "2", "--max-new-tokens", "16"]
    argv += ["--calibration-prompts", "1", "--max-conversations", "3", "--tree-sizes", "2,4", "--depth", "3"]
    argv += ["--latency-prefix", "32", "--output-dir", str(out), "--device", "cpu", "--dtype", "float32"]
    assert main(argv) == 0
    report = json.loads((out / "eval.json").read_text())
    assert EvalReport.load(out / "eval.json").to_json() == report
    assert report["draft_kind"] == "dflash"
    assert [row["name"] for row in report["accuracy"]] == ["base", "position 1", "position 2", "position 3"]
    assert report["speed"]["outputs_equal"] is True
    assert 1.0 <= report["acceptance"]["mean_accept_length"] <= 4.0
    # The engines' chain, chosen as the tree is: each length up to the scored depth timed here, the one with the
    # most expected tokens/s stored with the tree; export serves it and eval measured it.
    search = report["chain_search"]
    assert search["sizes"] == [1, 2, 3] and len(search["step_seconds"]) == 3
    rates = search["expected_tokens_per_second"]
    assert search["chosen_size"] == search["sizes"][rates.index(max(rates))]
    chosen = search["chosen_size"]
    assert [chain["draft_tokens"] for chain in report["chains"]] == [chosen]
    assert json.loads((folder / "medusa_choices.json").read_text())["speculative_tokens"] == chosen
    assert load_draft(folder, device="cpu").draft.served_chain() == chosen  # export's commands ask this (see there)
    assert "The chain's length was chosen as the tree's is" in (out / "eval.md").read_text()
    # Another eval with a given tree measures the stored chain; --speculative-tokens measures the one given.
    for extra, measured in ((["--tree", "default-4"], chosen), (["--speculative-tokens", "4"], 4)):
        assert main([*argv, "--no-save-tree", *extra]) == 0
        again = json.loads((out / "eval.json").read_text())
        assert again["chain_search"] is None and [c["draft_tokens"] for c in again["chains"]] == [measured]
