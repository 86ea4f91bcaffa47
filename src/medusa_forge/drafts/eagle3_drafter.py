"""An EAGLE-3 draft when decoding: its drafter, an `Eagle3Draft` behind the `Drafter` interface, drafting as the
engines do (docs/eagle3-reference.md §2.2, §3) and expanding the decoder's static tree level by level as EAGLE-2
does; and the draft loaded next to its base model (`EAGLE3.load`).

Notation: the base model has accepted x_0 .. x_{n-1} (in its KV cache) and chosen the root x_n. The draft's
*first pass* pairs the base features f_p (hidden states at `target_layers`) with the next token x_{p+1} at rotary
position p, for every p < n: ids shifted left by one, positions unchanged. Its KV entries form the draft cache,
and its pre-norm output state at p = n - 1 is the root's state: its logits rank the root's children. A tree node
at depth d >= 1 runs with its own token's embedding, its parent's state as feature and position n - 1 + d; its
output state ranks its children and is their feature.

Only first passes are ever kept: the tree's draft keys (computed from draft features) are dropped after each
`propose`, and `advance` runs the first pass over the accepted nodes with the base model's features at those
nodes, so the draft cache always equals a first pass over the accepted sequence (what vLLM/SGLang keep).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import PreTrainedModel

from medusa_forge.data.tokenize import IGNORE_INDEX
from medusa_forge.drafts.accuracy import RANKS, HeadAccuracy, count_ranks
from medusa_forge.drafts.drafter import TreeBuffers
from medusa_forge.drafts.eagle3_config import CONFIG_NAME, draft_vocab_ids, target_features, target_layers
from medusa_forge.drafts.eagle3_model import CachedAttention, Eagle3Draft, UnrolledAttention, causal_bias
from medusa_forge.drafts.kind import DecodingDraft, DraftKind, base_for_draft
from medusa_forge.engine_commands import EAGLE3_SPECULATIVE_TOKENS, vllm_speculative_config
from medusa_forge.errors import UserError
from medusa_forge.formats.tree_file import PRIOR_ACCURACIES
from medusa_forge.modeling import TargetPlacement
from medusa_forge.pairing import check_fits, model_shape

# An EAGLE-3 draft can fill a tree of any depth; without a stored tree, trees are built this deep at most.
EAGLE3_TREE_DEPTH = len(PRIOR_ACCURACIES)

# Hidden entries of a draft attention bias: finite, so a fully masked row would stay finite (none is).
HIDDEN = torch.finfo(torch.float32).min


@dataclass
class Eagle3State:
    """The draft's side of a generation: its cache over the accepted positions 0..n-1 (first passes only)
    and the pre-norm state the first pass produced at n - 1, the root's state."""

    keys: torch.Tensor  # [1, nkv, n, hd]
    values: torch.Tensor  # [1, nkv, n, hd]
    root_state: torch.Tensor  # [H], in the draft's dtype

    @property
    def length(self) -> int:
        return self.keys.shape[2]


@dataclass
class TreeLevel:
    """One draft call of `propose`: the nodes at depth - 1 that have children run (depth 1: the root, whose
    state the first pass gave), and their top-k fill the nodes at `depth`."""

    depth: int
    runs: torch.Tensor  # [R] node ids at depth - 1 with children, ascending
    parents: torch.Tensor  # [R] each run node's parent (its feature); unused at depth 1
    bias: torch.Tensor  # [R, T + R] float: which earlier run nodes (T, in run order) and which runs each run sees
    children: torch.Tensor  # [C] node ids at depth
    slot: torch.Tensor  # [C] index into runs of each child's parent
    rank: torch.Tensor  # [C] each child's rank among its parent's top-k
    k: int  # top-k to take at this level: the largest rank + 1

    def to(self, device: torch.device | str) -> TreeLevel:
        moved = (t.to(device) for t in (self.runs, self.parents, self.bias, self.children, self.slot, self.rank))
        return TreeLevel(self.depth, *moved, self.k)


def tree_levels(tree: TreeBuffers) -> list[TreeLevel]:
    """The level-by-level plan of a tree: parents from `tree.children`, and node i >= 1 is `tree.choices[i - 1]`
    (TreeBuffers' order), whose last entry is its rank. Each level has its own top-k, so a tree from `build_tree` that
    is wide at depth 1 and narrow below costs only what it uses."""
    depth_of = tree.depths.tolist()
    parent_of = {child: node for node, children in enumerate(tree.children) for child in children}
    levels, earlier = [], []  # earlier: run nodes of previous levels, in the order their keys are stored
    for depth in range(1, tree.depth + 1):
        runs = [i for i in range(tree.size) if depth_of[i] == depth - 1 and tree.children[i]]
        children = [i for i in range(tree.size) if depth_of[i] == depth]
        slot = [runs.index(parent_of[i]) for i in children]
        rank = [tree.choices[i - 1][-1] for i in children]
        # tree.attention[i, j]: j is i itself or an ancestor; the root's entry is the cache's last one
        visible = tree.attention.cpu()[runs][:, earlier + runs] if depth > 1 else torch.ones(1, 0, dtype=torch.bool)
        bias = torch.zeros(visible.shape).masked_fill(~visible, HIDDEN)
        parents = [parent_of.get(i, 0) for i in runs]
        runs_, parents_, children_, slot_, rank_ = (
            torch.tensor(x, dtype=torch.long) for x in (runs, parents, children, slot, rank)
        )
        levels.append(TreeLevel(depth, runs_, parents_, bias, children_, slot_, rank_, max(rank) + 1))
        if depth > 1:
            earlier += runs
    return levels


def chain_bias(cached: int, new: int) -> torch.Tensor:
    """[1, 1, new, cached + new]: every new token sees the cache and the new tokens up to itself."""
    bias = torch.full((new, new), HIDDEN).triu(1)
    return torch.cat([torch.zeros(new, cached), bias], dim=1)[None, None]


class Eagle3Drafter:
    """Proposes a tree's tokens with an EAGLE-3 draft of `target` (the base model it verifies with).

    The draft runs in its own dtype and on its own device; features and embeddings are cast to it, proposed
    tokens come back on the target's device. The target's input embedding is used, frozen, as the engines do."""

    max_depth: int | None = None  # the draft is autoregressive: any depth

    def __init__(self, target: PreTrainedModel, draft: Eagle3Draft) -> None:
        text = target.config.get_text_config(decoder=True)
        shape, name = model_shape(target), target.config.name_or_path
        check_fits("EAGLE-3 draft", draft.config.hidden_size, draft.config.vocab_size, shape, name, "the drafter")
        # In HF hidden_states indexing (0 = embeddings), the verifier's too: the same ints select the same states.
        self.feature_layers = target_layers(text.num_hidden_layers)
        self.draft = draft.eval()
        self.embedding = target.get_input_embeddings()
        param = next(draft.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.target_device = next(target.parameters()).device
        self._levels: list[TreeLevel] = []
        self._levels_for: TreeBuffers | None = None

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """[T, H] the target's embedding of `tokens`, in the draft's dtype and on its device."""
        ids = tokens.to(self.embedding.weight.device)
        return self.embedding(ids).to(device=self.device, dtype=self.dtype)

    def first_pass(self, state: Eagle3State | None, tokens: torch.Tensor, hidden: torch.Tensor) -> Eagle3State:
        """Append the first pass of (hidden[i], tokens[i]) at positions n + i to the draft cache."""
        cached = 0 if state is None else state.length
        feature = self.draft.combine(hidden.to(device=self.device, dtype=self.dtype))
        positions = torch.arange(cached, cached + len(tokens), device=self.device)
        bias = chain_bias(cached, len(tokens)).to(self.device)
        keys, values = (None, None) if state is None else (state.keys, state.values)
        out = self.draft.layer(
            self.embed(tokens)[None], feature[None], positions[None], CachedAttention(keys, values, bias)
        )
        if state is None:
            return Eagle3State(out.keys, out.values, out.state[0, -1])
        keys, values = torch.cat([state.keys, out.keys], dim=2), torch.cat([state.values, out.values], dim=2)
        return Eagle3State(keys, values, out.state[0, -1])

    @torch.no_grad()
    def start(self, tokens: torch.Tensor, hidden: torch.Tensor) -> Eagle3State:
        return self.first_pass(None, tokens, hidden)

    @torch.no_grad()
    def advance(
        self, state: Eagle3State, nodes: torch.Tensor, tokens: torch.Tensor, hidden: torch.Tensor
    ) -> Eagle3State:
        # The tree's own draft keys were never stored in `state`, so nothing of a rejected branch remains.
        return self.first_pass(state, tokens, hidden)

    def check_tree(self, tree: TreeBuffers) -> None:
        self.levels(tree)  # a tree the draft vocabulary cannot fill fails here

    def levels(self, tree: TreeBuffers) -> list[TreeLevel]:
        """`tree_levels(tree)`, computed once per tree and checked against the draft vocabulary."""
        if self._levels_for is not tree:
            levels = tree_levels(tree)
            vocab = self.draft.config.draft_vocab_size
            widest = max(level.k for level in levels)
            if widest > vocab:
                raise UserError(f"the tree asks for a draft token of rank {widest - 1}; the draft has {vocab} tokens")
            self._levels = [level.to(self.device) for level in levels]
            self._levels_for = tree
        return self._levels

    @torch.no_grad()
    def propose(self, state: Eagle3State, root: int, tree: TreeBuffers) -> torch.Tensor:
        draft = self.draft
        tokens = torch.empty(tree.size, dtype=torch.long, device=self.device)
        tokens[0] = root
        states = state.root_state.new_empty(tree.size, state.root_state.shape[-1])
        states[0] = state.root_state
        keys = values = None  # the tree's draft keys, in run order; dropped when propose returns
        for level in self.levels(tree):
            runs = level.runs
            if level.depth > 1:
                count = len(runs)
                position = state.length - 1 + level.depth - 1
                bias = torch.cat([torch.zeros(count, state.length, device=self.device), level.bias], dim=1)
                cached_keys = state.keys if keys is None else torch.cat([state.keys, keys], dim=2)
                cached_values = state.values if values is None else torch.cat([state.values, values], dim=2)
                out = draft.layer(
                    self.embed(tokens[runs])[None],
                    draft.next_feature(states[level.parents])[None],
                    torch.full((1, count), position, device=self.device),
                    CachedAttention(cached_keys, cached_values, bias[None, None]),
                )
                states[runs] = out.state[0]
                keys = out.keys if keys is None else torch.cat([keys, out.keys], dim=2)
                values = out.values if values is None else torch.cat([values, out.values], dim=2)
            top = torch.topk(draft.logits(states[runs]), level.k, dim=-1).indices  # [R, k] draft ids
            tokens[level.children] = draft.to_target_ids(top[level.slot, level.rank])
        return tokens.to(self.target_device)


@torch.no_grad()
def score_eagle3_samples(
    base, draft: Eagle3Draft, samples, depth: int, progress: bool = True, desc: str = "draft accuracy"
) -> list[HeadAccuracy]:
    """Rank of the true token under the base lm_head (predicts t+1) and under each EAGLE-3 draft step j = 1..depth
    (predicts t+1+j), at every position whose target is labelled. Step j sees the true tokens up to t+j and its own
    earlier states, as a tree path whose tokens were all right does in decoding: the training-time-test unroll
    (first step: target features at t with token t+1 at position t; step j: step j-1's state with token t+j at
    position t+j-1, attending to the first step's keys up to t and its own chain's). The draft ranks its own
    vocabulary; a target outside it is a miss, as the decoder cannot propose it."""
    names = ["base"] + [f"step {j}" for j in range(1, depth + 1)]
    counts = [[0] * RANKS for _ in names]
    totals = [0] * len(names)
    device = next(base.parameters()).device
    draft_device = next(draft.parameters()).device
    dtype = draft.fc.weight.dtype
    ids_in_draft = draft_vocab_ids(draft.d2t).to(draft_device)
    to_draft = torch.full((draft.config.vocab_size,), -1, dtype=torch.long, device=draft_device)
    to_draft[ids_in_draft] = torch.arange(len(ids_in_draft), device=draft_device)
    embedding = base.get_input_embeddings()
    for input_ids, label_ids in tqdm(samples, desc=desc, disable=not progress, leave=False):
        ids = torch.tensor(input_ids, device=device)
        labels = torch.tensor(label_ids, device=draft_device)
        length = len(ids)
        if length < 2 or (labels != IGNORE_INDEX).sum() == 0:
            continue
        out = base(ids[None], output_hidden_states=True)
        mask = labels[1:] != IGNORE_INDEX
        if mask.any():
            totals[0] += int(mask.sum())
            count_ranks(out.logits[0, :-1][mask.to(device)], ids[1:][mask.to(device)], counts[0])
        ids = ids.to(draft_device)
        embeds = embedding(ids.to(embedding.weight.device)).to(device=draft_device, dtype=dtype)[None]
        feature = draft.combine(target_features(out.hidden_states).to(device=draft_device, dtype=dtype))
        attention = UnrolledAttention(causal_bias(torch.ones(1, length, device=draft_device), dtype))
        positions = torch.arange(length, device=draft_device)[None]
        for j in range(1, depth + 1):
            # index t reads token t+j (padding past the end: those indices are never scored) and predicts t+1+j
            tokens = torch.cat([embeds[:, j:], embeds.new_zeros(1, min(j, length), embeds.shape[-1])], dim=1)
            step = draft.layer(tokens[:, :length], feature, positions + j - 1, attention)
            attention = attention.after(step.keys, step.values)
            feature = draft.next_feature(step.state)
            scored = length - 1 - j  # indices t with t+1+j inside the sequence
            if scored <= 0:
                break
            mask = labels[1 + j :] != IGNORE_INDEX
            if not mask.any():
                continue
            targets = to_draft[ids[1 + j :][mask]]
            totals[j] += len(targets)
            inside = targets >= 0  # a target outside the draft vocabulary is a miss
            logits = draft.logits(feature[0, :scored][mask][inside]).float()
            count_ranks(logits, targets[inside], counts[j])
    if totals[0] == 0:
        raise UserError("no sample had a labelled token to score; check --data")
    return [HeadAccuracy(name, total, count) for name, total, count in zip(names, totals, counts, strict=True)]


class Eagle3ForDecoding(DecodingDraft):
    """An EAGLE-3 draft and its base model, loaded from a draft folder (the draft in the base's dtype and device)."""

    def __init__(
        self, kind: DraftKind, base: PreTrainedModel, draft: Eagle3Draft, folder: Path, base_name: str
    ) -> None:
        self.kind, self.base, self.draft, self.folder, self.base_name = kind, base, draft, folder, base_name

    @classmethod
    def load(
        cls,
        kind: DraftKind,
        folder: Path,
        base_model: str | None,
        dtype: torch.dtype,
        device: str,
        draft_vocab: int | None,
        placement: TargetPlacement | None = None,
    ) -> Eagle3ForDecoding:
        if draft_vocab is not None:
            raise UserError("--draft-vocab applies to Medusa heads; an EAGLE-3 draft has its own draft vocabulary")
        draft = Eagle3Draft.load(folder)
        base, base_name = base_for_draft(kind, draft, folder / CONFIG_NAME, base_model, dtype, device, placement)
        return cls(kind, base, draft, folder, base_name)

    @property
    def max_depth(self) -> int:
        return EAGLE3_TREE_DEPTH  # the draft is autoregressive: the bound is the default trees'

    def served_chain(self) -> int:
        return EAGLE3_SPECULATIVE_TOKENS  # what export's vLLM and SGLang commands draft

    def accuracy(
        self,
        samples: list[tuple[list[int], list[int]]],
        depth: int,
        progress: bool = True,
        desc: str = "draft accuracy",
    ) -> list[HeadAccuracy]:
        return score_eagle3_samples(self.base, self.draft, samples, depth, progress, desc)

    def drafter(self) -> Eagle3Drafter:
        return Eagle3Drafter(self.base, self.draft)

    def engine_drafter(self) -> Eagle3Drafter:
        return self.drafter()  # through its d2t, as vLLM and SGLang draft

    def vllm_speculative_config(self, scratch: Path, num_speculative_tokens: int) -> dict:
        # The folder is vLLM's layout as it is.
        return vllm_speculative_config("eagle3", self.folder, num_speculative_tokens)
