"""A DFlash draft when decoding: its drafter, a `DFlashDraft` behind the `Drafter` interface, drafting a whole block
in one forward pass as the engines do (docs/dflash-reference.md §2.2, §3); and the draft loaded next to its base
model (`DFLASH.load`).

The base model has accepted x_0 .. x_{n-1} and chosen the root x_n. The drafter's state holds every draft layer's
context keys/values of the accepted positions 0 .. n-1 (projected from the base's hidden states there, at their
absolute positions), as vLLM keeps them in the draft's KV cache; `advance` appends the newly accepted positions
only. `propose` runs the block [x_n, m, ..., m] of 1 + depth tokens at positions n .. n+depth against that context
and reads the base's lm_head at slots 1 .. depth: slot d ranks the candidates for depth d. The block is as long as
the tree is deep, not the trained block size B, because that is what vLLM computes: with num_speculative_tokens K it
sends 1 + K queries, the bonus token and K masks (docs/dflash-reference.md §3), so a chain of K < B-1 is drafted by a
block of K+1 and a shallow tree costs a short block. The engines take the argmax of each slot; a tree takes each
slot's top-k under every node of the depth before (the block's drafts do not depend on the path, so a node's
children are its depth's top-k whatever its own token).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import PreTrainedModel

from medusa_forge.data.tokenize import IGNORE_INDEX
from medusa_forge.drafts.accuracy import RANKS, HeadAccuracy, count_ranks
from medusa_forge.drafts.dflash_config import CONFIG_NAME, hidden_state_indices, served_chain
from medusa_forge.drafts.dflash_model import DFlashDraft
from medusa_forge.drafts.drafter import TreeBuffers
from medusa_forge.drafts.kind import DecodingDraft, DraftKind, base_for_draft
from medusa_forge.engine_commands import vllm_speculative_config
from medusa_forge.errors import UserError
from medusa_forge.modeling import TargetPlacement
from medusa_forge.pairing import check_fits, model_shape

ANCHORS_PER_PASS = 64  # blocks scored per draft forward in `score_dflash_samples` (bounds its memory)


@dataclass
class DFlashState:
    """Every draft layer's rotated context keys and values [1, nkv, n, hd] over the accepted positions 0 .. n-1."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]


class DFlashDrafter:
    """Proposes a tree's tokens with a DFlash draft of `target` (the base model it verifies with), in the draft's
    dtype and on its device; the target's embedding and lm_head are used, frozen, as the engines do."""

    def __init__(self, target: PreTrainedModel, draft: DFlashDraft) -> None:
        shape, name = model_shape(target), target.config.name_or_path
        check_fits("DFlash draft", draft.config.hidden_size, draft.config.vocab_size, shape, name, "the drafter")
        self.feature_layers = hidden_state_indices(draft.config.target_layer_ids)  # HF indices: t + 1 (§2.1)
        self.max_depth: int | None = draft.config.block_size - 1  # one block: B-1 drafted tokens
        self.draft = draft.eval()
        self.embedding = target.get_input_embeddings()
        self.head = target.get_output_embeddings()
        param = next(draft.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.target_device = next(target.parameters()).device

    def _append(self, state: DFlashState | None, hidden: torch.Tensor) -> DFlashState:
        """Add the context keys/values of `hidden` [A, F] (base states at positions n .. n+A-1)."""
        start = 0 if state is None else state.length
        context = self.draft.context(hidden.to(device=self.device, dtype=self.dtype))[None]
        positions = torch.arange(start, start + len(hidden), device=self.device)[None]
        kv = self.draft.context_kv(context, positions)
        if state is None:
            return DFlashState([k for k, _ in kv], [v for _, v in kv])
        keys = [torch.cat([old, k], dim=2) for old, (k, _) in zip(state.keys, kv, strict=True)]
        values = [torch.cat([old, v], dim=2) for old, (_, v) in zip(state.values, kv, strict=True)]
        return DFlashState(keys, values)

    @torch.no_grad()
    def start(self, tokens: torch.Tensor, hidden: torch.Tensor) -> DFlashState:
        return self._append(None, hidden)

    @torch.no_grad()
    def advance(
        self, state: DFlashState, nodes: torch.Tensor, tokens: torch.Tensor, hidden: torch.Tensor
    ) -> DFlashState:
        # The block's own keys are never stored, so nothing of a rejected draft remains (vLLM overwrites them, §2.2).
        return self._append(state, hidden)

    def check_tree(self, tree: TreeBuffers) -> None:
        if tree.depth > self.max_depth:
            raise UserError(
                f"the tree is {tree.depth} deep; a DFlash block of {self.max_depth + 1} drafts {self.max_depth} "
                "tokens (use a tree of that depth or less)"
            )

    @torch.no_grad()
    def propose(self, state: DFlashState, root: int, tree: TreeBuffers) -> torch.Tensor:
        config = self.draft.config
        n, size = state.length, tree.depth + 1  # the bonus token and one mask per depth, as vLLM's queries
        ids = torch.full((size,), config.mask_token_id, dtype=torch.long, device=self.embedding.weight.device)
        ids[0] = root
        embeds = self.embedding(ids).to(device=self.device, dtype=self.dtype)[None, None]
        positions = torch.arange(n, n + size, device=self.device)[None, None]
        out = self.draft.block(embeds, positions, list(zip(state.keys, state.values, strict=True)))[0, 0]
        rows = out[1:].to(device=self.head.weight.device, dtype=self.head.weight.dtype)
        top = torch.topk(self.head(rows), tree.topk, dim=-1).indices  # [depth, k]: slot d's candidates
        candidates = torch.cat([top.new_tensor([root]), top.flatten()])
        return candidates[tree.candidate_index.to(candidates.device)].to(self.target_device)


@torch.no_grad()
def score_dflash_samples(
    base, draft: DFlashDraft, samples, depth: int, progress: bool = True, desc: str = "draft accuracy"
) -> list[HeadAccuracy]:
    """Rank of the true token under the base lm_head (predicts t+1) and under each block slot d = 1..depth: for
    every anchor a (the token the base chose from position a-1), slot d of the block [x_a, m, ...] of 1 + depth
    tokens at a predicts x[a+d], seeing the base's states before a, as decoding a `depth`-deep tree drafts after an
    accepted x_a (`DFlashDrafter.propose`). Scored where x[a+d] is labelled."""
    names = ["base"] + [f"position {d}" for d in range(1, depth + 1)]
    counts = [[0] * RANKS for _ in names]
    totals = [0] * len(names)
    device = next(base.parameters()).device
    drafter = DFlashDrafter(base, draft)
    for input_ids, label_ids in tqdm(samples, desc=desc, disable=not progress, leave=False):
        ids = torch.tensor(input_ids, device=device)
        labels = torch.tensor(label_ids, device=device)
        length = len(ids)
        if length < 2 or (labels != IGNORE_INDEX).sum() == 0:
            continue
        out = base(ids[None], output_hidden_states=True)
        mask = labels[1:] != IGNORE_INDEX
        totals[0] += int(mask.sum())
        count_ranks(out.logits[0, :-1][mask], ids[1:][mask], counts[0])
        hidden = torch.cat([out.hidden_states[i][0] for i in drafter.feature_layers], dim=-1)
        state = drafter.start(ids, hidden)
        kv = list(zip(state.keys, state.values, strict=True))
        for first in range(1, length - 1, ANCHORS_PER_PASS):
            anchors = torch.arange(first, min(first + ANCHORS_PER_PASS, length - 1), device=drafter.device)
            positions = anchors[:, None] + torch.arange(depth + 1, device=drafter.device)
            block = torch.full(positions.shape, draft.config.mask_token_id, device=device)
            block[:, 0] = ids[anchors.to(device)]
            embeds = drafter.embedding(block).to(device=drafter.device, dtype=drafter.dtype)
            # No anchor of this pass sees its last anchor's position or later: the context is cut there, so the
            # passes cost a triangle of the [L, L] attention, not the square of it.
            width = int(anchors[-1])
            context = [(k[:, :, :width], v[:, :, :width]) for k, v in kv]
            visible = torch.arange(width, device=drafter.device)[None] < anchors[:, None]
            states = draft.block(embeds[None], positions[None], context, visible[None])[0]
            for d in range(1, depth + 1):
                at = anchors + d
                inside = at < length
                scored = inside.clone()
                scored[inside] = labels[at[inside].to(device)].to(drafter.device) != IGNORE_INDEX
                if not scored.any():
                    continue
                rows = states[scored, d].to(drafter.head.weight.dtype)
                totals[d] += int(scored.sum())
                count_ranks(drafter.head(rows.to(drafter.head.weight.device)).float(), ids[at[scored]], counts[d])
    if totals[0] == 0:
        raise UserError("no sample had a labelled token to score; check --data")
    return [HeadAccuracy(name, total, count) for name, total, count in zip(names, totals, counts, strict=True)]


class DFlashForDecoding(DecodingDraft):
    """A DFlash draft and its base model, loaded from a draft folder (the draft in the base's dtype and device)."""

    def __init__(self, kind: DraftKind, base: PreTrainedModel, draft: DFlashDraft, folder: Path, base_name: str):
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
    ) -> DFlashForDecoding:
        if draft_vocab is not None:
            raise UserError("--draft-vocab applies to Medusa heads; a DFlash draft ranks the target's whole vocabulary")
        draft = DFlashDraft.load(folder)
        config = draft.config
        base, base_name = base_for_draft(kind, draft, folder / CONFIG_NAME, base_model, dtype, device, placement)
        layers = base.config.get_text_config().num_hidden_layers
        if layers != config.num_target_layers:
            raise UserError(f"{folder}: the draft reads layers of a {config.num_target_layers}-layer target; "
                            f"{base_name} has {layers}")  # fmt: skip
        return cls(kind, base, draft, folder, base_name)

    @property
    def max_depth(self) -> int:
        return self.draft.config.block_size - 1

    def served_chain(self) -> int:
        return served_chain(self.folder, self.draft.config)

    def chain_lengths(self) -> list[int]:
        return list(range(1, self.max_depth + 1))  # vLLM drafts any K: a block of K+1 (the module's docstring)

    def scored_depth(self, requested: int) -> int:
        return min(requested, self.max_depth)

    def accuracy(
        self,
        samples: list[tuple[list[int], list[int]]],
        depth: int,
        progress: bool = True,
        desc: str = "draft accuracy",
    ) -> list[HeadAccuracy]:
        return score_dflash_samples(self.base, self.draft, samples, min(depth, self.max_depth), progress, desc)

    def drafter(self) -> DFlashDrafter:
        return DFlashDrafter(self.base, self.draft)

    def engine_drafter(self) -> DFlashDrafter:
        return self.drafter()  # the engines take each slot's argmax: the same drafter over a chain

    def vllm_speculative_config(self, scratch: Path, num_speculative_tokens: int) -> dict:
        # The folder is vLLM's layout as it is; "method" must be given (vLLM guesses dflash only from the path, §1.1).
        return vllm_speculative_config("dflash", self.folder, num_speculative_tokens)
