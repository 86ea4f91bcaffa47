"""Medusa heads when decoding: their drafter (head i's top-k fill depth i + 1 of the tree) and the heads loaded
next to their base model (`MEDUSA.load`)."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from medusa_forge.data.tokenize import IGNORE_INDEX
from medusa_forge.drafts.accuracy import RANKS, HeadAccuracy
from medusa_forge.drafts.drafter import Drafter, TreeBuffers
from medusa_forge.drafts.kind import DecodingDraft, DraftKind
from medusa_forge.drafts.medusa_heads import MedusaModel
from medusa_forge.drafts.medusa_read import read_heads
from medusa_forge.drafts.medusa_vllm import write_vllm
from medusa_forge.engine_commands import vllm_speculative_config
from medusa_forge.errors import UserError
from medusa_forge.generation.device import pack_linear_weights, place_for_decoding, resolve_device
from medusa_forge.modeling import TargetPlacement, input_device


def trained_draft_vocab(model: MedusaModel) -> int | None:
    """The draft vocabulary the heads were trained on (config draft_vocab_size), None for the whole vocabulary."""
    return getattr(getattr(model.heads, "config", None), "draft_vocab_size", None)


class MedusaDrafter:
    """Medusa heads: head i's top-k at the last accepted hidden state fill the tree's depth i + 1 (a tree choice
    is a path of head ranks). The state is the heads' logits [K, V'] at that hidden state."""

    feature_layers: tuple[int, ...] = ()

    def __init__(self, model: MedusaModel, draft_vocab: int | None = None) -> None:
        """`draft_vocab=N`: the heads propose only token ids < N (vLLM's `truncated_vocab_size`). Their vocabulary
        projections, as large as the base lm_head each, then cost N/V as much; verification stays exact.
        Default: the heads' own `draft_vocab_size` (training with a draft vocabulary), else the whole vocabulary."""
        self.heads = model.heads
        self.max_depth = len(model.heads)
        self.dtype = next(model.heads.parameters()).dtype
        self.device = next(model.heads.parameters()).device
        self.draft_projections = None
        if draft_vocab is None:  # heads trained on a draft vocabulary propose from it unless told otherwise
            draft_vocab = trained_draft_vocab(model)
        vocab = model.base.get_output_embeddings().weight.shape[0]
        self.proposable = vocab  # the ids a head proposes from: a tree asking for a rank beyond them is refused
        if draft_vocab is not None:
            if not 0 < draft_vocab <= vocab:
                raise UserError(f"--draft-vocab {draft_vocab}: expected 1..{vocab} (the vocabulary size)")
            self.draft_projections = [head[-1].weight[:draft_vocab] for head in model.heads]
            self.proposable = draft_vocab

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[K, V'] every head's logits at one hidden state [H], over the draft vocabulary if one is set."""
        hidden = hidden.to(device=self.device, dtype=self.dtype)  # a dispatched base's last layer may be elsewhere
        if self.draft_projections is None:
            return self.heads(hidden)
        return torch.stack(
            [head[:-1](hidden) @ weight.T for head, weight in zip(self.heads, self.draft_projections, strict=True)]
        )

    def check_tree(self, tree: TreeBuffers) -> None:
        """A tree deeper than the heads is refused by TreeBuffers.from_choices (max_depth); one wider than the
        tokens the heads propose from is refused here, at load, not by every request's top-k."""
        vocab = self.proposable
        if tree.topk > vocab:
            raise UserError(
                f"the tree (--tree, else the draft folder's medusa_choices.json) asks for a head token of rank "
                f"{tree.topk - 1}; the heads propose from {vocab} tokens: pass another --tree, or run "
                "`medusa-forge eval` to choose one"
            )

    def start(self, tokens: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return self.head_logits(hidden[-1])

    def propose(self, head_logits: torch.Tensor, root: int, tree: TreeBuffers) -> torch.Tensor:
        top = torch.topk(head_logits[: tree.depth], tree.topk, dim=-1).indices  # [D, topk]
        flat = torch.cat([top.new_tensor([root]), top.flatten()])
        return flat[tree.candidate_index]

    def advance(
        self, head_logits: torch.Tensor, nodes: torch.Tensor, tokens: torch.Tensor, hidden: torch.Tensor
    ) -> torch.Tensor:
        return self.head_logits(hidden[-1])


@torch.no_grad()
def score_samples(
    model, samples, progress: bool = True, draft_vocab: int | None = None, desc: str = "head accuracy"
) -> list[HeadAccuracy]:
    """Rank of the true token under the base lm_head (predicts t+1) and each head i (predicts t+2+i), at every
    position whose target is labelled (not IGNORE_INDEX). `samples`: (input_ids, labels) pairs. With
    `draft_vocab` the heads rank only ids below it (a target outside is a miss), as the decoder then proposes."""
    num_heads = len(model.heads)
    names = ["base"] + [f"head {i}" for i in range(num_heads)]
    counts = [[0] * RANKS for _ in names]
    totals = [0] * len(names)
    device = next(model.base.parameters()).device
    lm_head = model.base.get_output_embeddings()
    heads_dtype = next(model.heads.parameters()).dtype
    for input_ids, label_ids in tqdm(samples, desc=desc, disable=not progress, leave=False):
        ids = torch.tensor(input_ids, device=device)
        labels = torch.tensor(label_ids, device=device)
        if len(ids) < 2 or (labels != IGNORE_INDEX).sum() == 0:
            continue
        hidden = model.hidden_states(ids[None])[0].to(device)  # a dispatched base's last layer may be elsewhere
        for which in range(len(names)):
            shift = which + 1  # base: t+1, head i: t+2+i
            if len(ids) <= shift:
                continue
            mask = labels[shift:] != IGNORE_INDEX
            if not mask.any():
                continue
            rows, targets = hidden[: len(ids) - shift][mask], ids[shift:][mask]
            logits = lm_head(rows) if which == 0 else model.heads[which - 1](rows.to(heads_dtype))
            target_logit = logits.gather(1, targets[:, None])
            if which and draft_vocab is not None:
                logits = logits[:, :draft_vocab]
            ranks = (logits > target_logit).sum(dim=1)
            if which and draft_vocab is not None:
                ranks[targets >= draft_vocab] = RANKS  # the decoder could not propose it
            totals[which] += len(targets)
            for rank, n in zip(*torch.unique(ranks[ranks < RANKS], return_counts=True), strict=True):
                counts[which][int(rank)] += int(n)
    if totals[0] == 0:
        raise UserError("no sample had a labelled token to score; check --data")
    return [HeadAccuracy(name, total, count) for name, total, count in zip(names, totals, counts, strict=True)]


class MedusaForDecoding(DecodingDraft):
    """Heads and their base model (a MedusaModel) loaded from a heads folder."""

    def __init__(
        self, kind: DraftKind, model: MedusaModel, folder: Path, base_name: str, draft_vocab: int | None
    ) -> None:
        self.kind, self.model, self.base, self.folder, self.base_name = kind, model, model.base, folder, base_name
        # None: the heads' own, when trained on a draft vocabulary (else the whole vocabulary)
        self.draft_vocab = trained_draft_vocab(model) if draft_vocab is None else draft_vocab

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
    ) -> MedusaForDecoding:
        # The heads are read (and checked) before the base model, which takes far longer to load.
        model = MedusaModel.from_pretrained(folder, base_model=base_model, dtype=dtype, placement=placement)
        model.base = place_for_decoding(model.base, resolve_device(device), dispatched=placement is not None)
        model.heads = model.heads.to(input_device(model.base))
        pack_linear_weights(model.heads)  # on a CPU: faster products (see there)
        return cls(kind, model, folder, base_model or model.heads.config.base_model_name_or_path, draft_vocab)

    @property
    def max_depth(self) -> int:
        return len(self.model.heads)  # a head per depth

    def scored_depth(self, requested: int) -> int:
        return self.max_depth  # one depth per head, all scored

    def accuracy(
        self,
        samples: list[tuple[list[int], list[int]]],
        depth: int,
        progress: bool = True,
        desc: str = "draft accuracy",
    ) -> list[HeadAccuracy]:
        return score_samples(self.model, samples, progress, self.draft_vocab, desc)

    def drafter(self) -> MedusaDrafter:
        return MedusaDrafter(self.model, self.draft_vocab)

    def engine_drafter(self) -> Drafter:
        # No engine that serves heads keeps a draft vocabulary (README "Export"): they propose from the whole one.
        return MedusaDrafter(self.model, self.base.config.vocab_size)

    def vllm_speculative_config(self, scratch: Path, num_speculative_tokens: int) -> dict:
        # The heads are written in vLLM's layout into `scratch`, as `export --format vllm` writes them.
        write_vllm(read_heads(self.folder, check_base=False), scratch)
        return vllm_speculative_config("medusa", scratch, num_speculative_tokens)
