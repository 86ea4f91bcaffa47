"""EAGLE-3 decoding: exact greedy output whatever the draft proposes, and the drafter's own correctness made
observable: the tree's rank-0 chain equals the engines' step-by-step chain (docs/eagle3-reference.md §2.2), the
draft cache after `advance` equals a first pass over the accepted sequence from scratch, and a draft built to
predict a target's continuation gets its whole rank-0 path accepted at every step."""

from __future__ import annotations

import functools

import pytest
import torch
import transformers
from conftest import TINY_CONFIGS, plain_sample

from medusa_forge.decode.generation import SpeculativeDecoder, greedy_generate
from medusa_forge.drafts.drafter import TreeBuffers
from medusa_forge.drafts.eagle3_config import target_features, target_layers
from medusa_forge.drafts.eagle3_drafter import Eagle3Drafter, tree_levels
from medusa_forge.drafts.eagle3_model import CachedAttention, Eagle3Draft, causal_bias
from medusa_forge.errors import UserError
from medusa_forge.formats.tree_file import build_tree, default_choices

ARCHS = ["llama", "qwen2", "mistral"]
TREES = {
    "chain": [[0], [0, 0], [0, 0, 0]],
    "branching": [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 1], [0, 0, 0, 0]],
    "default-16": default_choices(16, 3),
    # deeper than any Medusa model here, wide at depth 1 only: per-level top-k
    "built": build_tree([[0.6, 0.1, 0.05, 0.04], [0.5, 0.1], [0.4], [0.4], [0.4]], 12),
}
PROMPT = [5, 17, 42, 99, 123, 7, 64]
VOCAB = 400
NEW = 24


def eagle3_decoder(target, draft, choices, check: bool = True, dtype: torch.dtype | None = None) -> SpeculativeDecoder:
    """A decoder whose drafter is an EAGLE-3 draft of `target`: a module or a draft folder, in `dtype` if given."""
    module = draft if isinstance(draft, Eagle3Draft) else Eagle3Draft.load(draft)
    drafter = Eagle3Drafter(target, module if dtype is None else module.to(dtype))
    return SpeculativeDecoder(target, drafter, choices, check)


def chaotic_target(arch: str, layers: int = 2, seed: int = 0) -> transformers.PreTrainedModel:
    """Large random weights, so greedy output does not collapse into one repeated token (as test_decode)."""
    torch.manual_seed(seed)
    config = TINY_CONFIGS[arch](VOCAB)
    config.initializer_range = 0.3
    config.num_hidden_layers = layers
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def random_draft(
    target: transformers.PreTrainedModel, vocab_ids: torch.Tensor | None, seed: int = 1, **switches: bool
) -> Eagle3Draft:
    """for_target's start (lm_head = the target's rows, so some proposals are accepted), other weights random;
    `switches`: EAGLE 3.1's (fc_norm, norm_output)."""
    draft = Eagle3Draft.for_target(target, vocab_ids, "tiny", **switches)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in draft.named_parameters():
            if name != "lm_head.weight":
                param.normal_(0.0 if param.ndim > 1 else 1.0, 0.3)
    return draft.eval()


@functools.cache
def case(arch: str):
    """A target, its greedy reference and a random draft over a draft vocabulary (d2t offsets non-zero) that
    holds the reference's tokens, so that some proposals are accepted."""
    target = chaotic_target(arch)
    ref = greedy_generate(target, PROMPT, NEW)
    assert len(set(ref)) > 10
    draft_ids = torch.cat([torch.arange(0, VOCAB, 3), torch.tensor(sorted(set(ref) - set(range(0, VOCAB, 3))))])
    return target, ref, random_draft(target, draft_ids.sort().values)


@pytest.fixture(scope="module", params=ARCHS)
def arch_case(request):
    return case(request.param)


def test_feature_layers_are_hf_hidden_state_indices():
    """The verifier reads `feature_layers` from the backbone's hidden_states; target_layers indexes the causal
    LM's output_hidden_states: the same ints must select the same states (8 layers: the engines' defaults)."""
    target = chaotic_target("llama", layers=8)
    drafter = Eagle3Drafter(target, Eagle3Draft.for_target(target, None, "tiny"))
    assert drafter.feature_layers == target_layers(8) == (2, 4, 5)
    decoder = SpeculativeDecoder(target, drafter, TREES["chain"])
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        _, features = decoder.verifier.prefill(ids, transformers.DynamicCache())
        expected = target_features(target(ids[None], output_hidden_states=True).hidden_states)[0]
    torch.testing.assert_close(features, expected)


@pytest.mark.parametrize("tree_name", list(TREES))
def test_greedy_equals_plain_greedy(arch_case, tree_name):
    target, ref, draft = arch_case
    result = eagle3_decoder(target, draft, TREES[tree_name]).generate(PROMPT, NEW)
    assert result.tokens == ref
    assert sum(result.accept_lengths) + 1 == NEW


def test_bfloat16_draft_from_a_folder_next_to_a_float32_target(tmp_path):
    target, ref, draft = case("qwen2")
    folder = draft.save(tmp_path / "draft")
    decoder = eagle3_decoder(target, folder, TREES["branching"], dtype=torch.bfloat16)
    assert decoder.drafter.dtype == torch.bfloat16
    assert decoder.generate(PROMPT, NEW).tokens == ref


def test_sampling_draws_the_tokens_of_plain_sampling_and_cold_sampling_is_greedy():
    target, ref, draft = case("llama")
    decoder = eagle3_decoder(target, draft, TREES["default-16"])
    assert decoder.generate(PROMPT, NEW, temperature=1e-4, seed=1).tokens == ref
    hot = [decoder.generate(PROMPT, 16, temperature=1.0, top_p=0.9, seed=seed) for seed in (7, 8)]
    assert [r.tokens for r in hot] == [plain_sample(target, PROMPT, 16, 1.0, seed, 0.9) for seed in (7, 8)]
    assert hot[0].tokens != hot[1].tokens


def engine_chain(target, draft: Eagle3Draft, accepted: list[int], root: int, steps: int):
    """What vLLM does from scratch (§2.2, §3): a first pass over the accepted tokens (ids shifted left by one, the
    root last, positions unchanged), then single-token steps, each feeding the previous pre-norm state (post-norm
    with EAGLE 3.1's norm_output: vLLM 0.32.0 llama_eagle3.py LlamaModel.forward's aux_output) and the drafted
    token (argmax over the draft vocabulary, mapped to target ids) at position + 1, with a growing cache.
    Returns the drafted tokens and the first pass (its keys/values are the draft cache over `accepted`)."""
    embed = target.get_input_embeddings()
    ids = torch.tensor(accepted)
    with torch.no_grad():
        features = target_features(target(ids[None], output_hidden_states=True).hidden_states)
        first = draft.layer(
            embed(torch.tensor([accepted[1:] + [root]])),
            draft.combine(features),
            torch.arange(len(ids))[None],
            CachedAttention(None, None, causal_bias(torch.ones(1, len(ids)))),
        )
        keys, values, state, tokens = first.keys, first.values, first.state[:, -1:], []
        for step in range(steps):
            tokens.append(int(draft.to_target_ids(draft.logits(state[0, -1]).argmax())))
            out = draft.layer(
                embed(torch.tensor([tokens[-1:]])),
                draft.norm(state) if draft.config.norm_output else state,
                torch.tensor([[len(ids) + step]]),
                CachedAttention(keys, values, torch.zeros(1, 1, 1, keys.shape[2] + 1)),
            )
            keys, values = torch.cat([keys, out.keys], 2), torch.cat([values, out.values], 2)
            state = out.state
    return tokens, first


@pytest.mark.parametrize("switches", ["eagle3", "eagle3.1"])
@pytest.mark.parametrize("arch", ARCHS)
def test_rank0_chain_and_draft_cache_match_the_engines_from_scratch(arch, switches):
    """After prefill and after several steps of accepting and rejecting: (1) the tokens `propose` puts along the
    tree's rank-0 chain are the engines' chain, (2) the draft cache and root state equal a first pass over the
    accepted sequence from scratch, so no rejected branch and no drift remains. Also for an EAGLE 3.1 draft
    (fc_norm and norm_output on)."""
    target = chaotic_target(arch, seed=2)
    eagle31 = switches == "eagle3.1"
    draft = random_draft(target, None, seed=3, fc_norm=eagle31, norm_output=eagle31)
    tree_name = "branching"
    decoder = eagle3_decoder(target, draft, TREES[tree_name])
    tree = decoder.tree
    chain = [tree.choices.index([0] * d) + 1 for d in range(1, tree.depth + 1)]  # node ids of the rank-0 chain
    state = decoder.prefill(torch.tensor(PROMPT))
    accepted, lengths = list(PROMPT), []
    for _ in range(4):
        proposed = decoder.drafter.propose(state.draft, state.root, tree)
        reference, first = engine_chain(target, draft, accepted, state.root, tree.depth)
        assert proposed[chain].tolist() == reference
        assert state.draft.length == len(accepted)
        torch.testing.assert_close(state.draft.keys, first.keys, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(state.draft.values, first.values, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(state.draft.root_state, first.state[0, -1], atol=1e-4, rtol=1e-4)
        root = state.root
        new = decoder.step(state)
        accepted += [root] + new[:-1]
        lengths.append(len(new))
    assert accepted[len(PROMPT) :] + [state.root] == greedy_generate(target, PROMPT, len(accepted) - len(PROMPT) + 1)


# ----- a draft that knows its target: whole paths accepted -----

HALF = 16  # the cycle target's tokens come in pairs 2h, 2h + 1 that share embedding h


def rho(h: int) -> int:
    return (h + 5) % HALF  # one cycle through all 16 values


def cycle_target() -> transformers.PreTrainedModel:
    """A 32-token Llama whose layers add nothing (o_proj = down_proj = 0), so its next token depends on the last
    token only: greedy continues v -> 2 rho(v // 2), a cycle over the even ids."""
    torch.manual_seed(0)
    target = transformers.AutoModelForCausalLM.from_config(TINY_CONFIGS["llama"](2 * HALF)).eval()
    with torch.no_grad():
        target.get_input_embeddings().weight.copy_(torch.eye(HALF, 32).repeat_interleave(2, dim=0))
        for layer in target.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        head = torch.zeros(2 * HALF, 32)
        for h in range(HALF):
            head[2 * rho(h), h] = 1.0
        target.lm_head.weight.copy_(head)
    return target


def cycle_draft(target) -> Eagle3Draft:
    """An EAGLE-3 draft over the even ids (d2t offsets i) that predicts the cycle target exactly at any depth, if
    and only if it is run as the engines run it. fc = 0 and the MLP adds nothing, so a state is the sum of the
    attention outputs along its chain; attention looks at the query's own position only (q = k = a large
    constant on the fastest rotary pair: score ~ cos(position difference)) and its value is the input token's
    embedding. The state at depth d is thus the sum of one-hot(h) over the chain's tokens root .. t_d, and
    lm_head row i = one-hot(rho^-1(i)) - 2 one-hot(i) picks rho of the one chain token whose successor is not in
    the chain: the newest. A cache entry at a query's position (a stale branch), a wrong position or parent
    feature, or a misplaced rank breaks it."""
    draft = Eagle3Draft.for_target(target, torch.arange(0, 2 * HALF, 2), "cycle")
    layer, heads, kv_heads, hd = draft.midlayer, 4, 2, 8
    beta = 300.0  # q0 k0 / sqrt(hd) ~ 1e6: even 44 positions apart (cos 44 = 0.99984) the weight is e^-150
    with torch.no_grad():
        for param in draft.parameters():
            if param.ndim > 1:
                param.zero_()
        attention = layer.self_attn
        for j in range(heads):
            attention.q_proj.weight[j * hd, :HALF] = beta
        for j in range(kv_heads):
            attention.k_proj.weight[j * hd, :HALF] = beta
        attention.v_proj.weight[:, :HALF] = torch.eye(HALF)  # kv head j carries embedding dims 8j .. 8j + 7
        for j in range(kv_heads):  # query head 2j reads kv head j (GQA groups of 2)
            attention.o_proj.weight[j * hd : (j + 1) * hd, 2 * j * hd : (2 * j + 1) * hd] = torch.eye(hd)
        for i in range(HALF):
            draft.lm_head.weight[i, (i - 5) % HALF] = 1.0
            draft.lm_head.weight[i, i] -= 2.0
    return draft.eval()


@pytest.mark.parametrize(
    "choices",
    [[[0]], TREES["chain"], TREES["branching"], [[0] * d for d in range(1, 7)], TREES["built"]],
    ids=["one", "chain", "branching", "chain-6", "built"],
)
def test_a_draft_that_knows_the_target_gets_whole_paths_accepted(choices):
    target = cycle_target()
    prompt = [3, 8, 21, 14, 30, 1]
    ref = greedy_generate(target, prompt, 24)
    assert len(set(ref)) == HALF
    depth = TreeBuffers.from_choices(choices).depth
    result = eagle3_decoder(target, cycle_draft(target), choices, check=False).generate(prompt, 24)
    assert result.tokens == ref
    assert result.accept_lengths[:-1] == [depth + 1] * (len(result.accept_lengths) - 1)
    if choices == TREES["branching"]:  # the same target with a draft that knows nothing: ~1 token per step
        guess = eagle3_decoder(target, random_draft(target, None), choices, check=False).generate(prompt, 24)
        assert guess.tokens == ref
        assert guess.mean_accept_length < 1.5 < 4 < result.mean_accept_length


# ----- the tree plan and refusals -----


def test_tree_levels_fill_each_depth_from_the_parents_top_k():
    tree = TreeBuffers.from_choices(TREES["built"])
    levels = tree_levels(tree)
    assert [level.depth for level in levels] == list(range(1, tree.depth + 1))
    for level in levels:
        paths = [tree.choices[i - 1] for i in level.children.tolist()]
        assert all(len(p) == level.depth for p in paths)
        assert level.k == max(p[-1] for p in paths) + 1  # per level: deep levels of this tree need only top-1
        for path, slot, rank in zip(paths, level.slot.tolist(), level.rank.tolist(), strict=True):
            parent = level.runs[slot]
            assert (tree.choices[parent - 1] if parent else []) == path[:-1] and rank == path[-1]
    assert [level.k for level in levels][-1] == 1 and levels[0].k == 4


def test_refusals():
    target = chaotic_target("llama")
    small = Eagle3Draft.for_target(target, torch.tensor([1, 2, 3]), "tiny")
    with pytest.raises(UserError, match="rank 3"):
        eagle3_decoder(target, small, [[0], [1], [2], [3]])
    other = chaotic_target("qwen2")
    other.config.vocab_size = 500
    with pytest.raises(UserError, match="vocabulary"):
        Eagle3Drafter(other, small)


def test_generate_command_decodes_an_eagle3_draft_folder_as_plain_greedy(tmp_path, tiny_model_dir, capsys):
    """`medusa-forge generate --draft DIR` detects an EAGLE-3 folder; its reply is the base model's greedy reply."""
    from medusa_forge.cli import main
    from medusa_forge.decode.loading import encode_prompt
    from medusa_forge.generation.text import decode_text, eos_token_ids
    from medusa_forge.modeling import load_base_model, load_tokenizer

    base = load_base_model(str(tiny_model_dir))
    draft = random_draft(base, torch.arange(VOCAB - 50), seed=3)
    draft.config.base_model_name_or_path = str(tiny_model_dir)
    draft.save(tmp_path / "draft")  # no tokenizer in the folder: the base's is used
    argv = ["generate", "--draft", str(tmp_path / "draft"), "--prompt", "Hello there!", "--max-new-tokens", "12"]
    assert main([*argv, "--device", "cpu", "--tree", "default-8"]) == 0
    out, err = capsys.readouterr()
    tokenizer = load_tokenizer(str(tiny_model_dir))
    eos = eos_token_ids(base, tokenizer)
    plain = greedy_generate(base, encode_prompt(tokenizer, "Hello there!"), 12, eos)
    assert out.strip() == decode_text(tokenizer, [t for t in plain if t not in eos]).strip()
    assert "mean accepted tokens per step" in err and "tree of 8 nodes" in err
    assert main([*argv, "--draft-vocab", "100"]) == 2
    assert "--draft-vocab applies to Medusa heads" in capsys.readouterr().err
