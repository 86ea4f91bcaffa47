"""Medusa decoding must equal plain greedy decoding token for token, on every architecture and tree.

Tiny random models are initialised with large weights so that their greedy outputs do not collapse into
one repeated token (which would make any head look right). "Oracle" heads know the reference greedy
continuation and put its tokens at chosen ranks, so acceptance paths of every length, EOS inside an
accepted path and the max-length cut are all exercised; random heads (acceptance ~1) and heads trained by
the `train` command are covered too.
"""

from __future__ import annotations

import random

import pytest
import torch
import transformers
from conftest import TINY_CONFIGS, medusa_decoder, plain_sample
from torch import nn

from medusa_forge.decode.acceptance import greedy_accept
from medusa_forge.decode.generation import SpeculativeDecoder, greedy_generate
from medusa_forge.decode.tree_support import check_tree_support
from medusa_forge.decode.verification import causal_bias, keep_cache_entries
from medusa_forge.drafts.drafter import TreeBuffers
from medusa_forge.drafts.medusa_heads import MedusaHeads, MedusaModel
from medusa_forge.errors import UserError
from medusa_forge.formats.tree_file import default_choices
from medusa_forge.modeling import backbone, cache_kwarg

INIT_SCALE = {"llama": 0.3, "qwen2": 0.3, "mistral": 0.3, "gemma": 1.0, "gpt2": 0.5}
ARCHS = ["llama", "qwen2", "mistral", "gemma"]
TREES = {
    "chain": [[0], [0, 0], [0, 0, 0]],
    "wide": [[0], [1], [2], [0, 0], [1, 0], [0, 0, 0]],
    "default-16": default_choices(16, 3),
    "default-64": default_choices(64, 3),
}
PROMPT = [5, 17, 42, 99, 123, 7, 64]
NUM_HEADS = 3


def chaotic_model(arch: str, vocab: int = 400, seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    config = TINY_CONFIGS[arch](vocab)
    config.initializer_range = INIT_SCALE[arch]
    return transformers.AutoModelForCausalLM.from_config(config).eval()


class OracleHeads(nn.Module):
    """Heads that look the reference continuation up by nearest hidden state and rank its tokens:
    head i's true token t+2+i is at rank 0 with probability p0, rank 1 or 2 sometimes, else absent."""

    def __init__(self, base, sequence: list[int], num_heads: int = NUM_HEADS, p0: float = 0.6, seed: int = 0):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1), requires_grad=False)
        with torch.no_grad():
            self.reference = backbone(base)(input_ids=torch.tensor([sequence])).last_hidden_state[0]
        self.sequence, self.num_heads, self.vocab = sequence, num_heads, base.get_output_embeddings().weight.shape[0]
        self.p0, self.seed = p0, seed

    def __len__(self) -> int:
        return self.num_heads

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        t = int(torch.cdist(hidden[None], self.reference).argmin())
        logits = torch.zeros(self.num_heads, self.vocab)
        for i in range(self.num_heads):
            rng = random.Random(self.seed * 100003 + t * 31 + i)
            noise = torch.tensor([rng.random() for _ in range(self.vocab)])
            draw = rng.random()
            rank = 0 if draw < self.p0 else 1 if draw < self.p0 + 0.15 else 2 if draw < self.p0 + 0.25 else None
            if rank is not None and t + 2 + i < len(self.sequence):
                true = self.sequence[t + 2 + i]
                noise[true] = -1.0
                top = noise.sort(descending=True).values
                noise[true] = top[0] + 1.0 if rank == 0 else (top[rank - 1] + top[rank]) / 2
            logits[i] = noise
        return logits


def reference(base, max_new: int = 48, eos=None) -> list[int]:
    tokens = greedy_generate(base, PROMPT, max_new, eos)
    hf = base.generate(
        torch.tensor([PROMPT]), max_new_tokens=max_new, do_sample=False, eos_token_id=eos, pad_token_id=0
    )[0, len(PROMPT) :].tolist()
    assert tokens == hf, "our plain greedy loop must equal transformers' generate"
    return tokens


@pytest.fixture(scope="module", params=ARCHS)
def arch_case(request):
    base = chaotic_model(request.param)
    ref = reference(base)
    assert len(set(ref)) > 10, "the tiny model must not collapse into repeating one token"
    return request.param, base, ref


@pytest.mark.parametrize("every_node_logits", [False, True])
@pytest.mark.parametrize("tree_name", list(TREES))
def test_greedy_equals_plain_greedy_with_oracle_heads(arch_case, tree_name, every_node_logits):
    _, base, ref = arch_case
    model = MedusaModel(base, OracleHeads(base, PROMPT + ref))
    decoder = medusa_decoder(model, TREES[tree_name])
    # Both ways of finding the base model's argmax (every node at once, as on GPUs and with packed bfloat16; or
    # only nodes with children, plus a leaf that ends the path) must accept the same tokens.
    decoder.verifier.every_node_logits = every_node_logits
    result = decoder.generate(PROMPT, len(ref))
    assert result.tokens == ref
    assert sum(result.accept_lengths) + 1 == len(ref)  # the prefill gives the first token
    assert max(result.accept_lengths) >= 3, "oracle heads must get multi-token steps accepted"
    assert result.mean_accept_length > 1.5


@pytest.mark.parametrize("arch", ARCHS + ["gpt2"])
def test_greedy_equals_plain_greedy_with_random_heads(arch):
    base = chaotic_model(arch, seed=1)
    ref = reference(base, 24)
    torch.manual_seed(3)
    heads = MedusaHeads.for_base_model(base, NUM_HEADS, 1, "tiny")
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, 0.5)
    for choices in (TREES["wide"], TREES["default-16"]):
        result = medusa_decoder(MedusaModel(base, heads), choices).generate(PROMPT, 24)
        assert result.tokens == ref


def test_eos_inside_an_accepted_path_and_length_limits(arch_case):
    _, base, ref = arch_case
    model = MedusaModel(base, OracleHeads(base, PROMPT + ref, p0=1.0))
    decoder = medusa_decoder(model, TREES["chain"])  # perfect heads: every step adds 3 candidates + 1 base token
    positions = [p for p in range(1, 20) if ref[p] not in ref[:p]]
    assert any((p - 1) % 4 < 3 for p in positions), "need an EOS that lands on a head candidate"
    for n, position in enumerate(positions):
        eos = ref[position]
        result = decoder.generate(PROMPT, len(ref), eos_token_ids=eos)
        assert result.tokens == ref[: position + 1]
        if n < 3:  # plain greedy with that EOS stops there too
            assert result.tokens == reference(base, len(ref), eos)
        assert result.accept_lengths[:-1] == [4] * (len(result.accept_lengths) - 1)
        assert result.accept_lengths[-1] == (position - 1) % 4 + 1  # the step was cut right after the EOS
    for limit in range(1, 14):
        result = decoder.generate(PROMPT, limit)
        assert result.tokens == ref[:limit]
        assert sum(result.accept_lengths) + 1 == limit


# Accepted paths of the "wide" tree: in place (the root; through node 1), partly in place, moved entirely.
@pytest.mark.parametrize("path", [[0], [0, 1], [0, 1, 4], [0, 1, 4, 6], [0, 2], [0, 2, 5], [0, 3]])
def test_kv_pruning_equals_recomputation(path):
    base = chaotic_model("llama")
    inner = backbone(base)
    tree = TreeBuffers.from_choices(TREES["wide"])
    tokens = torch.tensor([11, 22, 33, 44, 55, 66, 77])
    prompt = torch.tensor(PROMPT)
    p = len(prompt)
    name = cache_kwarg(inner)
    with torch.no_grad():
        cache = transformers.DynamicCache()
        inner(input_ids=prompt[None], attention_mask=causal_bias(p, torch.float32), use_cache=True, **{name: cache})
        inner(
            input_ids=tokens[None],
            attention_mask=tree.attention_bias(p, torch.float32),
            position_ids=(p + tree.depths)[None],
            use_cache=True,
            **{name: cache},
        )
        assert cache.get_seq_length() == p + tree.size
        path = torch.tensor(path)
        keep_cache_entries(cache, p, path)
        fresh = transformers.DynamicCache()
        inner(input_ids=torch.cat([prompt, tokens[path]])[None], use_cache=True, **{name: fresh})
    assert cache.get_seq_length() == fresh.get_seq_length() == p + len(path)
    for kept, recomputed in zip(cache.layers, fresh.layers, strict=True):
        torch.testing.assert_close(kept.keys, recomputed.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(kept.values, recomputed.values, atol=1e-5, rtol=1e-5)


def test_greedy_acceptance_takes_the_longest_path_of_argmax_tokens():
    gen = torch.Generator().manual_seed(0)
    for choices in TREES.values():
        tree = TreeBuffers.from_choices(choices)
        parent = {child: node for node, children in enumerate(tree.children) for child in children}
        ranks = [0] + [c[-1] for c in tree.choices]
        for _ in range(30):
            logits = torch.randn(tree.size, 50, generator=gen) * 3
            argmax = logits.argmax(-1)
            tree_tokens = torch.zeros(tree.size, dtype=torch.long)
            for i in range(1, tree.size):
                best = int(argmax[parent[i]])
                # Like real top-k candidates: only one sibling can be the argmax (here rank 0, often).
                hit = ranks[i] == 0 and float(torch.rand(1, generator=gen)) < 0.7
                tree_tokens[i] = best if hit else (best + 1 + ranks[i]) % 50
            nodes, length = greedy_accept(tree_tokens, argmax, tree.paths)
            assert len(nodes) == length + 1 and int(nodes[0]) == 0
            for j in range(1, len(nodes)):  # each accepted candidate is the argmax at its parent ...
                assert parent[int(nodes[j])] == int(nodes[j - 1])
                assert int(tree_tokens[nodes[j]]) == int(argmax[nodes[j - 1]])
            last = int(nodes[-1])  # ... and the path cannot be extended
            assert all(int(tree_tokens[c]) != int(argmax[last]) for c in tree.children[last])


@pytest.mark.parametrize("top_p", [1.0, 0.3])
def test_sampling_draws_the_tokens_of_plain_sampling(arch_case, top_p):
    """Sampling keeps the base model's distribution exactly: with a seed, a tree gives the very tokens plain
    sampling draws from the same random stream (both ways of computing the tree's logits). The oracle heads
    guess that sample's tokens, so steps accept several of them: the walk down the tree is exercised."""
    _, base, ref = arch_case
    samples, accepted = [], []
    for seed in (1, 2):
        want = plain_sample(base, PROMPT, 24, 0.7, seed, top_p)
        samples.append(want)
        model = MedusaModel(base, OracleHeads(base, PROMPT + want))
        for tree_name in ("default-16", "wide"):
            decoder = medusa_decoder(model, TREES[tree_name])
            for every_node_logits in (False, True):
                decoder.verifier.every_node_logits = every_node_logits
                result = decoder.generate(PROMPT, 24, temperature=0.7, top_p=top_p, seed=seed)
                assert result.tokens == want
                accepted += result.accept_lengths
    assert max(accepted) >= 3, "multi-token steps must be accepted while sampling"
    if top_p == 1.0:  # it does sample (a top-p of 0.3 may leave one token wherever the model is sure)
        assert len({tuple(s) for s in samples}) > 1 and any(s != ref[:24] for s in samples)
    for cold in (1e-4, 1e-9):  # cold sampling is greedy; below GREEDY_BELOW it is greedy outright (no overflow)
        assert decoder.generate(PROMPT, len(ref), temperature=cold, seed=1).tokens == ref


def test_trained_heads_decode_exactly(trained_heads):
    base, heads_dir, ref = trained_heads
    model = MedusaModel.from_pretrained(heads_dir, base_model=base)
    for choices in (TREES["chain"], TREES["default-64"]):
        result = medusa_decoder(model, choices).generate(PROMPT, len(ref))
        assert result.tokens == ref


@pytest.fixture(scope="module")
def trained_heads(tmp_path_factory, tiny_tokenizer):
    """Heads trained with the `train` command on the tiny model's own greedy continuations."""
    import json

    from medusa_forge.cli import main

    folder = tmp_path_factory.mktemp("self-distilled")
    base = chaotic_model("llama")
    base.config.eos_token_id = tiny_tokenizer.eos_token_id
    base.save_pretrained(folder / "base")
    tiny_tokenizer.save_pretrained(folder / "base")
    records = []
    for i in range(24):
        question = f"Question {i}: tell me about {i * 7}"
        text = tiny_tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        prompt = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
        answer = greedy_generate(base, prompt, 40)
        records.append(
            [{"role": "user", "content": question}, {"role": "assistant", "content": tiny_tokenizer.decode(answer)}]
        )
    (folder / "data.json").write_text(json.dumps(records))
    argv = [
        "train", "--model_name_or_path", str(folder / "base"), "--data_path", str(folder / "data.json"),
        "--output_dir", str(folder / "heads"), "--num_train_epochs", "3", "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-2", "--model_max_length", "128", "--save_strategy", "no", "--eval_strategy", "no",
        "--report_to", "none",
    ]  # fmt: skip
    assert main(argv) == 0
    return base, folder / "heads", reference(base, 32)


def test_architecture_without_4d_masks_is_a_clear_error():
    config = transformers.MambaConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2, state_size=4)
    base = transformers.AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(UserError, match="MambaForCausalLM"):
        check_tree_support(base)


def test_bad_inputs_are_user_errors():
    base = chaotic_model("llama")
    model = MedusaModel(base, MedusaHeads.for_base_model(base, 2, 1, "tiny"))
    with pytest.raises(UserError, match="deeper"):
        medusa_decoder(model, TREES["chain"])  # depth 3 > 2 heads
    decoder = medusa_decoder(model, [[0], [0, 0]])
    with pytest.raises(UserError, match="empty"):
        decoder.generate([], 5)
    with pytest.raises(UserError, match="positions"):
        decoder.generate(PROMPT, 600)
    assert decoder.generate(PROMPT, 0).tokens == []


def test_draft_vocabulary_keeps_output_exact_and_proposes_only_its_ids():
    base = chaotic_model("llama", seed=1)
    ref = reference(base, 24)
    torch.manual_seed(3)
    heads = MedusaHeads.for_base_model(base, NUM_HEADS, 1, "tiny")
    model = MedusaModel(base, heads)
    decoder = medusa_decoder(model, TREES["default-16"], draft_vocab=50)
    hidden = torch.randn(32)
    draft = decoder.drafter.head_logits(hidden)
    assert draft.shape == (NUM_HEADS, 50)
    torch.testing.assert_close(draft, heads(hidden)[:, :50])  # the same logits, restricted to ids < 50
    assert decoder.generate(PROMPT, 24).tokens == ref
    with pytest.raises(UserError, match="draft-vocab"):
        medusa_decoder(model, TREES["chain"], draft_vocab=10**6)
    # Heads trained on a draft vocabulary (config.draft_vocab_size) propose from it by default
    assert medusa_decoder(model, TREES["chain"]).drafter.draft_projections is None
    heads.config.draft_vocab_size = 50
    assert medusa_decoder(model, TREES["chain"]).drafter.head_logits(hidden).shape == (NUM_HEADS, 50)
    vocab = base.get_output_embeddings().weight.shape[0]
    whole = medusa_decoder(model, TREES["chain"], draft_vocab=vocab).drafter
    assert whole.head_logits(hidden).shape == (NUM_HEADS, vocab)


class ReferenceDrafter:
    """A drafter that is not Medusa heads, shaped like EAGLE-3: it reads two layers of the base model and keeps
    the accepted tokens as its own state. It proposes the reference continuation along the rank-0 path of the
    tree and wrong tokens elsewhere, so it gets whole paths accepted only if its state follows the accepted tokens."""

    max_depth = None
    feature_layers = (1, 2)

    def __init__(self, sequence: list[int], hidden_size: int, vocab: int) -> None:
        self.sequence, self.width, self.vocab = sequence, 2 * hidden_size, vocab

    def start(self, tokens: torch.Tensor, hidden: torch.Tensor) -> list[int]:
        assert hidden.shape == (len(tokens), self.width)
        return tokens.tolist()  # the prompt after its first token, then the root: the root is at index len(state)

    def check_tree(self, tree: TreeBuffers) -> None:
        pass  # it fills any tree

    def propose(self, state: list[int], root: int, tree: TreeBuffers) -> torch.Tensor:
        assert state[-1] == root
        tokens = [root]
        for path in tree.choices:
            right = self.sequence[min(len(state) + len(path), len(self.sequence) - 1)]
            tokens.append((right + 1 + path[-1]) % self.vocab if any(path) else right)
        return torch.tensor(tokens)

    def advance(self, state: list[int], nodes: torch.Tensor, tokens: torch.Tensor, hidden: torch.Tensor) -> list[int]:
        assert len(nodes) == len(tokens) and hidden.shape == (len(tokens), self.width)
        return state + tokens.tolist()


def test_a_drafter_other_than_medusa_plugs_into_verification():
    base = chaotic_model("llama")
    ref = reference(base, 24)
    drafter = ReferenceDrafter(PROMPT + ref, base.config.hidden_size, base.config.vocab_size)
    for choices in (TREES["chain"], TREES["wide"]):
        result = SpeculativeDecoder(base, drafter, choices).generate(PROMPT, len(ref))
        assert result.tokens == ref
        assert result.accept_lengths[:-1] == [4] * (len(result.accept_lengths) - 1)  # the whole rank-0 path
