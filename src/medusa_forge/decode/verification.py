"""The base model's side of a decoding step: verify a candidate tree in one forward pass, accept a path, keep its
KV entries. Nothing here knows which drafter proposed the tree.

The tree runs with a 4D additive float mask (each node sees the prefix and its ancestors) and explicit position
ids (prefix length + depth), reading and extending the KV cache. No model code is copied: any transformers model
whose backbone takes a 4D float mask, position ids and a DynamicCache works (`tree_support` proves it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from medusa_forge.decode.acceptance import greedy_accept
from medusa_forge.drafts.drafter import TreeBuffers
from medusa_forge.generation.device import is_packed
from medusa_forge.generation.sampling import pick_token
from medusa_forge.modeling import backbone, cache_kwarg


@dataclass
class Sampling:
    """How the base model's tokens are chosen: its argmax at temperature 0, else a draw (from `generator`) from
    its distribution at the temperature, cut to the most likely tokens that cover `top_p` of it: the draws of
    plain sampling, so a tree changes nothing but the speed."""

    temperature: float = 0.0
    top_p: float = 1.0
    generator: torch.Generator | None = None

    def pick(self, logits: torch.Tensor) -> int:
        return pick_token(logits, self.temperature, self.top_p, self.generator)


def causal_bias(length: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """[1, 1, length, length] additive float causal mask for the prompt."""
    bias = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=device)
    return torch.triu(bias, diagonal=1)[None, None]


def keep_cache_entries(cache: DynamicCache, prefix_length: int, nodes: torch.Tensor) -> None:
    """Keep the first prefix_length entries plus the tree nodes `nodes` (ascending, root first) of every layer; drop
    the rest.

    The accepted nodes are copied down to sit right after the prefix, so positions stay contiguous. Nodes already
    in their place are not copied: the root always is, and a path through node 1 (the top guess for the first
    token) starts in place, so most steps only cut the cache, with no copy in any layer (on a GPU, two kernels less per
    layer and step).
    """
    order = nodes.tolist()
    moved = next((i for i, node in enumerate(order) if node != i), len(order))  # the first node out of place
    kept = prefix_length + len(order)
    index = nodes[moved:] + prefix_length if moved < len(order) else None
    for layer in cache.layers:
        for name in ("keys", "values"):
            states = getattr(layer, name)
            if index is not None:
                states[..., prefix_length + moved : kept, :] = states.index_select(-2, index)
            setattr(layer, name, states[..., :kept, :])


class TreeVerifier:
    """Runs the base model over a prompt or a candidate tree and accepts the path it agrees with.

    `feature_layers`: which of the base model's hidden states the drafter reads (indices into the backbone's
    `hidden_states`, 0 the embeddings); empty: the final hidden state, the one the lm_head reads.
    """

    def __init__(self, base: PreTrainedModel, tree: TreeBuffers, feature_layers: tuple[int, ...] = ()) -> None:
        self.base = base
        self.backbone = backbone(base)
        self.lm_head = base.get_output_embeddings()
        param = next(base.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.tree = tree.to(self.device)
        self.feature_layers = feature_layers
        self.cache_kwarg = cache_kwarg(self.backbone)
        # Greedy acceptance needs the argmax only at nodes with children, and at a leaf when the path ends there.
        # Where the vocabulary projection costs about the same for one row as for a tree's (reading its weight
        # dominates: packed weights on a CPU, a GPU), one product over every node beats a second one for that
        # leaf; where its cost grows with the rows (unpacked weights on a CPU), only the nodes that need it.
        self.every_node_logits = self.device.type != "cpu" or is_packed(self.lm_head)

    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, bias: torch.Tensor | None, cache: DynamicCache
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The final hidden states [n, H] of `tokens` and the drafter's features [n, F] (the same final states
        unless `feature_layers` asks for others), extending `cache`. `bias` None: transformers' causal mask."""
        extra = {"output_hidden_states": True} if self.feature_layers else {}
        out = self.backbone(
            input_ids=tokens[None],
            attention_mask=bias,
            position_ids=positions[None],
            use_cache=True,
            **{self.cache_kwarg: cache},
            **extra,
        )
        hidden = out.last_hidden_state[0]
        if not self.feature_layers:
            return hidden, hidden
        return hidden, torch.cat([out.hidden_states[i][0] for i in self.feature_layers], dim=-1)

    def prefill(self, ids: torch.Tensor, cache: DynamicCache) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` over the prompt `ids` [P] into an empty cache."""
        positions = torch.arange(len(ids), device=self.device)
        return self.forward(ids, positions, causal_bias(len(ids), self.dtype, self.device), cache)

    def verify(
        self, tree_tokens: torch.Tensor, cache: DynamicCache, prefix_length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` over the tree's tokens [N] after the `prefix_length` cached ones, each node seeing only the
        prefix and its ancestors."""
        tree = self.tree
        bias = tree.attention_bias(prefix_length, self.dtype, self.device)
        return self.forward(tree_tokens, prefix_length + tree.depths, bias, cache)

    def accept(self, tree_tokens: torch.Tensor, hidden: torch.Tensor, sampling: Sampling) -> tuple[torch.Tensor, int]:
        """The accepted nodes (root first) and the next root token, from the tree's final hidden states [N, H].

        Greedy runs the lm_head over every node, or (`every_node_logits` False) only over nodes with children,
        plus the last accepted node if it is a leaf. Sampling: `_sample_path`."""
        tree = self.tree
        if sampling.temperature > 0:
            return self._sample_path(tree_tokens, hidden, sampling)
        # max().indices is argmax (ties to the first id) at a fraction of its cost on bfloat16 CPU logits.
        if self.every_node_logits:
            predictions = self.lm_head(hidden).max(dim=-1).indices
        else:
            predictions = torch.full((tree.size,), -1, dtype=torch.long, device=hidden.device)
            predictions[tree.internal] = self.lm_head(hidden[tree.internal]).max(dim=-1).indices
        nodes, _ = greedy_accept(tree_tokens, predictions, tree.paths)
        root = int(predictions[int(nodes[-1])])
        if root < 0:  # the path ended on a leaf
            root = int(self.lm_head(hidden[int(nodes[-1])]).argmax())
        return nodes, root

    def _sample_path(
        self, tree_tokens: torch.Tensor, hidden: torch.Tensor, sampling: Sampling
    ) -> tuple[torch.Tensor, int]:
        """Sampling that keeps the base model's distribution exactly: from the root, draw the base model's token
        at the node; if a child holds that token, accept the child and draw again there; else the draw is the
        next root. The same acceptance as SGLang's `tree_speculative_sampling_target_only` (sgl-kernel, default
        thresholds 1.0: a child is taken with its probability, the bonus token drawn from what the rejected
        children leave), with one draw per node instead of a coin and a residual. Each draw is the one plain
        sampling would make after the same tokens, from the same random stream, so a given seed gives plain
        sampling's tokens; the tree only saves forward passes."""
        tokens = tree_tokens.tolist()
        logits = self.lm_head(hidden) if self.every_node_logits else None
        node, nodes = 0, [0]
        while True:
            token = sampling.pick(logits[node] if logits is not None else self.lm_head(hidden[node]))
            child = next((c for c in self.tree.children[node] if tokens[c] == token), None)
            if child is None:
                return torch.tensor(nodes, device=hidden.device), token
            node = child
            nodes.append(node)
