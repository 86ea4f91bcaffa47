"""The architecture probe: does this model verify a tree correctly? Run once per model before decoding with it."""

from __future__ import annotations

import weakref

import torch
from transformers import DynamicCache, PreTrainedModel

from medusa_forge.decode.verification import TreeVerifier, causal_bias, keep_cache_entries
from medusa_forge.drafts.drafter import TreeBuffers
from medusa_forge.errors import UserError

_SUPPORTED: weakref.WeakSet = weakref.WeakSet()  # models already proven, so the check runs once per model


@torch.no_grad()
def check_tree_support(base: PreTrainedModel) -> None:
    """Prove on the model itself that a tree forward (4D float mask, explicit positions, KV cache, pruning)
    gives the logits of running each path on its own; raise a UserError naming the architecture if not.

    A model that ignores a custom 4D mask would otherwise decode wrong tokens without any error.
    """
    if base in _SUPPORTED:
        return
    name = type(base).__name__
    param = next(base.parameters())
    device, dtype = param.device, param.dtype
    vocab = base.get_output_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (5,), generator=gen).to(device)
    tree = TreeBuffers.from_choices([[0], [1], [0, 0], [1, 0]]).to(device)
    tree_tokens = torch.randint(0, vocab, (tree.size,), generator=gen).to(device)
    extra = torch.randint(0, vocab, (1,), generator=gen).to(device)
    kept = tree.paths[-1]  # root -> [1] -> [1, 0]: kept in the cache, then extended by `extra`
    try:
        verifier = TreeVerifier(base, tree)

        def run(tokens: torch.Tensor, positions: torch.Tensor, bias: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
            return verifier.lm_head(verifier.forward(tokens, positions, bias, cache)[0])

        def fresh(tokens: torch.Tensor) -> torch.Tensor:
            n = len(tokens)
            return run(tokens, torch.arange(n, device=device), causal_bias(n, dtype, device), DynamicCache())

        cache = DynamicCache()
        run(prompt, torch.arange(5, device=device), causal_bias(5, dtype, device), cache)
        tree_logits = run(tree_tokens, 5 + tree.depths, tree.attention_bias(5, dtype, device), cache)
        keep_cache_entries(cache, 5, kept)
        n_kept = 5 + len(kept)
        pruned_logits = run(
            extra,
            torch.tensor([n_kept], device=device),
            torch.zeros(1, 1, 1, n_kept + 1, dtype=dtype, device=device),
            cache,
        )
        pairs = []  # (tree/pruned logits, the same rows computed without a tree)
        for row in tree.paths:
            nodes = row[row >= 0]
            pairs.append((tree_logits[nodes], fresh(torch.cat([prompt, tree_tokens[nodes]]))[5:]))
        pairs.append((pruned_logits, fresh(torch.cat([prompt, tree_tokens[kept], extra]))[-1:]))
    except UserError as err:  # e.g. no KV cache argument
        raise UserError(f"{name} cannot verify a tree: {err}") from err
    except Exception as err:  # the architecture's forward rejects our arguments: report it, do not guess
        first_line = str(err).splitlines()[0] if str(err) else ""
        raise UserError(
            f"{name} cannot verify a Medusa tree: its forward does not take a custom 4D attention mask, "
            f"position ids and a DynamicCache ({type(err).__name__}: {first_line})"
        ) from err
    worst = max(float((got - want).abs().max()) for got, want in pairs)
    scale = 1.0 + max(float(want.abs().max()) for _, want in pairs)
    tolerance = (1e-3 if dtype in (torch.float32, torch.float64) else 5e-2) * scale
    if worst > tolerance:
        raise UserError(
            f"{name} does not honour a custom 4D attention mask (tree logits differ from per-path logits by "
            f"{worst:.3g}); Medusa decoding would produce wrong tokens with this architecture"
        )
    _SUPPORTED.add(base)
