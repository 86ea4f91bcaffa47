"""Medusa generation: one forward pass of the base model per step verifies a whole candidate tree.

Per step: the root token (the base model's own choice) plus each head's top-k are arranged as a sparse
tree; the base model runs over the tree with a 4D additive float mask (each node sees the prefix and its
ancestors) and explicit position ids (prefix length + depth), reading and extending the KV cache. The
longest acceptable path is kept (greedy: token-identical to plain greedy decoding), the cache keeps only
that path's entries, and the same pass gives the next root token and the next heads' logits.
No model code is copied: any transformers model whose backbone takes a 4D float mask, position ids and a
DynamicCache works; `check_tree_support` proves it on the model itself before decoding.
Batch size 1 only: each sequence accepts a different number of tokens per step.
"""

from __future__ import annotations

import inspect
import statistics
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel

from medusa_forge.decode.acceptance import greedy_accept, typical_accept
from medusa_forge.decode.tree import TreeBuffers
from medusa_forge.errors import UserError
from medusa_forge.formats.tree_file import Choices
from medusa_forge.heads import MedusaModel, backbone


@dataclass
class GenerationResult:
    """Generated tokens (prompt excluded) and how they were produced."""

    tokens: list[int]
    accept_lengths: list[int] = field(default_factory=list)  # tokens added by each verification pass
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def steps(self) -> int:
        return len(self.accept_lengths)

    @property
    def mean_accept_length(self) -> float:
        """Tokens per verification pass, the base token included (plain decoding = 1.0)."""
        return sum(self.accept_lengths) / len(self.accept_lengths) if self.accept_lengths else 0.0


def _cache_kwarg(module: torch.nn.Module) -> str:
    params = inspect.signature(module.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise UserError(f"{type(module).__name__}.forward takes no KV cache argument; Medusa decoding needs one")


def causal_bias(length: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """[1, 1, length, length] additive float causal mask for the prompt."""
    bias = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=device)
    return torch.triu(bias, diagonal=1)[None, None]


def keep_cache_entries(cache: DynamicCache, prefix_length: int, nodes: torch.Tensor) -> None:
    """Keep the first prefix_length entries plus the tree nodes `nodes` (in order) of every layer; drop the rest.

    The accepted nodes are copied down to sit right after the prefix, so positions stay contiguous.
    """
    index = nodes + prefix_length
    for layer in cache.layers:
        for name in ("keys", "values"):
            states = getattr(layer, name)
            states[..., prefix_length : prefix_length + len(nodes), :] = states.index_select(-2, index)
            setattr(layer, name, states[..., : prefix_length + len(nodes), :])


def trained_draft_vocab(model: MedusaModel) -> int | None:
    """The draft vocabulary the heads were trained on (config draft_vocab_size), None for the whole vocabulary."""
    return getattr(getattr(model.heads, "config", None), "draft_vocab_size", None)


class MedusaDecoder:
    """Generates with a MedusaModel and one tree; reusable across prompts (the tree buffers are built once)."""

    def __init__(
        self, model: MedusaModel, choices: Choices, check: bool = True, draft_vocab: int | None = None
    ) -> None:
        """`draft_vocab=N`: the heads propose only token ids < N (vLLM's `truncated_vocab_size`). Their vocabulary
        projections, as large as the base lm_head each, then cost N/V as much; verification stays exact.
        Default: the heads' own `draft_vocab_size` (training with a draft vocabulary), else the whole vocabulary."""
        self.model = model
        self.base: PreTrainedModel = model.base
        self.backbone = backbone(model.base)
        self.lm_head = model.base.get_output_embeddings()
        self.num_heads = len(model.heads)
        param = next(self.base.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.heads_dtype = next(model.heads.parameters()).dtype
        self.draft_projections = None
        if draft_vocab is None:  # heads trained on a draft vocabulary propose from it unless told otherwise
            draft_vocab = trained_draft_vocab(model)
        if draft_vocab is not None:
            vocab = self.lm_head.weight.shape[0]
            if not 0 < draft_vocab <= vocab:
                raise UserError(f"--draft-vocab {draft_vocab}: expected 1..{vocab} (the vocabulary size)")
            self.draft_projections = [head[-1].weight[:draft_vocab] for head in model.heads]
        self.tree = TreeBuffers.from_choices(choices, self.num_heads).to(self.device)
        self.cache_kwarg = _cache_kwarg(self.backbone)
        if check:
            check_tree_support(self.base)

    # -- one forward pass ---------------------------------------------------------------------------------
    def _forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, bias: torch.Tensor, cache: DynamicCache
    ) -> torch.Tensor:
        out = self.backbone(
            input_ids=tokens[None],
            attention_mask=bias,
            position_ids=positions[None],
            use_cache=True,
            **{self.cache_kwarg: cache},
        )
        return out.last_hidden_state[0]

    def _heads(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.to(self.heads_dtype)
        if self.draft_projections is None:
            return self.model.heads(hidden)
        return torch.stack(
            [
                head[:-1](hidden) @ weight.T
                for head, weight in zip(self.model.heads, self.draft_projections, strict=True)
            ]
        )

    def _pick(self, logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
        if temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        return int(torch.multinomial(probs, 1, generator=generator))

    def _accept(
        self,
        tree_tokens: torch.Tensor,
        hidden: torch.Tensor,
        temperature: float = 0.0,
        posterior_threshold: float = 0.09,
        posterior_alpha: float = 0.3,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, int]:
        """The accepted nodes (root first) and the next root token, from the tree's hidden states [N, H].

        Greedy runs the lm_head only over nodes with children, plus the last accepted node if it is a leaf:
        on a CPU the vocabulary projection of every tree node is a visible share of the step."""
        tree = self.tree
        if temperature > 0:
            logits = self.lm_head(hidden)
            nodes, _ = typical_accept(
                tree_tokens, logits, tree.paths, temperature, posterior_threshold, posterior_alpha
            )
            return nodes, self._pick(logits[int(nodes[-1])], temperature, generator)
        predictions = torch.full((tree.size,), -1, dtype=torch.long, device=hidden.device)
        predictions[tree.internal] = self.lm_head(hidden[tree.internal]).argmax(dim=-1)
        nodes, _ = greedy_accept(tree_tokens, predictions, tree.paths)
        root = int(predictions[int(nodes[-1])])
        if root < 0:  # the path ended on a leaf
            root = int(self.lm_head(hidden[int(nodes[-1])]).argmax())
        return nodes, root

    def _check_length(self, prompt_length: int, max_new_tokens: int) -> None:
        config = self.base.config.get_text_config(decoder=True)
        total = prompt_length + max_new_tokens + self.tree.depth
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None) or []
        if window and (not layer_types or any(t != "full_attention" for t in layer_types)) and total > window:
            raise UserError(
                f"{type(self.base).__name__} uses sliding-window attention ({window} tokens); Medusa decoding here "
                f"attends to the full prefix, so prompt + max new tokens must stay within {window - self.tree.depth}"
            )
        limit = getattr(config, "max_position_embeddings", None)
        if limit and total > limit:
            raise UserError(f"prompt ({prompt_length}) + max new tokens exceeds the model's {limit} positions")

    # -- generation ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def stream(
        self,
        input_ids: list[int] | torch.Tensor,
        max_new_tokens: int,
        eos_token_ids: set[int] | list[int] | int | None = None,
        temperature: float = 0.0,
        posterior_threshold: float = 0.09,
        posterior_alpha: float = 0.3,
        seed: int | None = None,
        result: GenerationResult | None = None,
    ) -> Iterator[list[int]]:
        """Yield the new tokens of each step (the first yield is the prefill's token). Stops after an EOS token
        (which is yielded) or max_new_tokens. Pass `result` to collect accept lengths and timings."""
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device).flatten()
        if ids.numel() == 0:
            raise UserError("the prompt is empty: Medusa decoding needs at least one prompt token")
        if max_new_tokens < 1:
            return
        eos = {eos_token_ids} if isinstance(eos_token_ids, int) else set(eos_token_ids or ())
        self._check_length(ids.numel(), max_new_tokens)
        result = result if result is not None else GenerationResult([])
        generator = None
        if temperature > 0:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed if seed is not None else torch.seed())
        tree = self.tree

        start = time.perf_counter()
        cache = DynamicCache()
        prefix = ids.numel()
        positions = torch.arange(prefix, device=self.device)
        hidden = self._forward(ids, positions, causal_bias(prefix, self.dtype, self.device), cache)[-1]
        root = self._pick(self.lm_head(hidden), temperature, generator)
        head_logits = self._heads(hidden)
        result.prefill_seconds += time.perf_counter() - start
        result.tokens.append(root)
        yield [root]
        produced = 1
        if root in eos or produced >= max_new_tokens:
            return

        while True:
            start = time.perf_counter()
            top = torch.topk(head_logits[: tree.depth], tree.topk, dim=-1).indices  # [D, topk]
            flat = torch.cat([torch.tensor([root], device=self.device), top.flatten()])
            tree_tokens = flat[tree.candidate_index]
            bias = tree.attention_bias(prefix, self.dtype, self.device)
            hidden = self._forward(tree_tokens, prefix + tree.depths, bias, cache)  # [N, H]
            nodes, root = self._accept(
                tree_tokens, hidden, temperature, posterior_threshold, posterior_alpha, generator
            )
            last = int(nodes[-1])
            new = tree_tokens[nodes[1:]].tolist() + [root]
            stop = produced + len(new) >= max_new_tokens
            new = new[: max_new_tokens - produced]
            for i, token in enumerate(new):
                if token in eos:
                    new, stop = new[: i + 1], True
                    break
            if not stop:
                keep_cache_entries(cache, prefix, nodes)
                prefix += len(nodes)
                head_logits = self._heads(hidden[last])
            produced += len(new)
            result.tokens.extend(new)
            result.accept_lengths.append(len(new))
            result.decode_seconds += time.perf_counter() - start
            yield new
            if stop:
                return

    def generate(self, input_ids: list[int] | torch.Tensor, max_new_tokens: int, **kwargs) -> GenerationResult:
        """Run `stream` to the end; see it for the arguments."""
        result = GenerationResult([])
        for _ in self.stream(input_ids, max_new_tokens, result=result, **kwargs):
            pass
        return result


@torch.no_grad()
def greedy_generate(
    base: PreTrainedModel,
    input_ids: list[int] | torch.Tensor,
    max_new_tokens: int,
    eos_token_ids: set[int] | list[int] | int | None = None,
) -> list[int]:
    """Plain greedy decoding with a KV cache, one token per forward pass: the reference Medusa must equal."""
    device = next(base.parameters()).device
    eos = {eos_token_ids} if isinstance(eos_token_ids, int) else set(eos_token_ids or ())
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device).flatten()[None]
    cache = DynamicCache()
    tokens: list[int] = []
    kwarg = _cache_kwarg(base)
    while len(tokens) < max_new_tokens:
        out = base(input_ids=ids, use_cache=True, **{kwarg: cache})  # extends `cache` in place
        token = int(out.logits[0, -1].argmax())
        tokens.append(token)
        if token in eos:
            break
        ids = torch.tensor([[token]], device=device)
    return tokens


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
        inner = backbone(base)
        kwarg = _cache_kwarg(inner)
        lm_head = base.get_output_embeddings()

        def run(tokens: torch.Tensor, positions: torch.Tensor, bias: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
            out = inner(
                input_ids=tokens[None],
                attention_mask=bias,
                position_ids=positions[None],
                use_cache=True,
                **{kwarg: cache},
            )
            return lm_head(out.last_hidden_state[0])

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
    except UserError:
        raise
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


@torch.no_grad()
def measure_step_seconds(
    model: MedusaModel,
    trees: list[Choices | None],
    prefix_length: int = 256,
    repeats: int = 5,
    draft_vocab: int | None = None,
) -> list[float]:
    """Median wall time of one decoding step per tree, after `prefix_length` cached tokens: the tree forward,
    lm_head, acceptance, cache pruning and the heads. A `None` tree times one plain greedy step instead (one
    token through the base model and its lm_head). Trees are timed round-robin, so a burst of load from other
    processes hits every size alike. The tree's size is what matters, not its tokens."""
    decoders = [MedusaDecoder(model, t or [[0]], check=False, draft_vocab=draft_vocab) for t in trees]
    first = decoders[0]
    device, dtype = first.device, first.dtype
    vocab = first.lm_head.weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, vocab, (prefix_length,), generator=gen).to(device)
    positions = torch.arange(prefix_length, device=device)
    caches = []
    for decoder in decoders:
        caches.append(DynamicCache())
        decoder._forward(prefix, positions, causal_bias(prefix_length, dtype, device), caches[-1])
    times: list[list[float]] = [[] for _ in trees]
    for _ in range(repeats + 1):  # the first round warms up and is dropped
        for choices, decoder, cache, seconds in zip(trees, decoders, caches, times, strict=True):
            tree = decoder.tree
            tokens = torch.randint(0, vocab, (tree.size if choices else 1,), generator=gen).to(device)
            start = time.perf_counter()
            if choices:
                bias = tree.attention_bias(prefix_length, dtype, device)
                hidden = decoder._forward(tokens, prefix_length + tree.depths, bias, cache)
                nodes, _ = decoder._accept(tokens, hidden)
                keep_cache_entries(cache, prefix_length, nodes)
                decoder._heads(hidden[int(nodes[-1])])
                kept = len(nodes)
            else:
                bias = torch.zeros(1, 1, 1, prefix_length + 1, dtype=dtype, device=device)
                hidden = decoder._forward(tokens, positions[-1:] + 1, bias, cache)
                int(decoder.lm_head(hidden[-1]).argmax())
                kept = 1
            seconds.append(time.perf_counter() - start)
            cache.crop(-kept)
    return [statistics.median(t[1:]) for t in times]
