"""`medusa-forge eval`: is the draft (Medusa heads or an EAGLE-3 draft) worth deploying? Per-head (per draft step)
accuracy, accepted tokens per step, and the real speed-up over plain greedy decoding on this machine, with
transformers' prompt-lookup decoding as a peer.

Steps: (1) teacher-forced top-k accuracy of each head / draft step on held-out conversations (assistant tokens
only); (2) the tree: from those rank accuracies, the best tree for each node budget, each budget's step latency
measured here, the budget with the most expected tokens/s wins and is stored in the draft folder; with `--dtype
auto` this is done in float32 and in bfloat16 and the faster dtype is stored with the tree; (3) for each prompt,
back to back: plain greedy (`generate(do_sample=False)`) in float32 and bfloat16, the draft, prompt lookup, each
timed after a warm-up; speed-ups are over the faster plain greedy, and the draft's output is compared with plain
greedy in its own dtype (and with float32's); (4) eval.json, eval.md and PNG plots.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from medusa_forge.data.conversations import has_reply, load_conversations
from medusa_forge.decode.loading import base_model_field, draft_folder_field, draft_vocab_field
from medusa_forge.drafts import kind_of
from medusa_forge.errors import UserError
from medusa_forge.evaluate.accuracy import conversation_samples, own_answer_samples
from medusa_forge.evaluate.engines import ENGINES, our_chain, same_replies, vllm_chain
from medusa_forge.evaluate.report import render_markdown, write_eval_report
from medusa_forge.evaluate.speed import (
    acceptance,
    choose_chain,
    choose_tree,
    first_prompts,
    machine_description,
    run_speed,
    speed_comparison,
)
from medusa_forge.generation.device import device_field, dtype_field, resolve_device
from medusa_forge.modeling import (
    check_target_flags,
    target_device_map_field,
    target_max_memory_field,
    target_offload_folder_field,
    target_placement,
)
from medusa_forge.outputs import check_writable_folder, removed_if_failed_empty
from medusa_forge.results import ChainAcceptance, EvalReport, SpeedComparison, TreeSearch

logger = logging.getLogger("medusa_forge.eval")


@dataclass
class EvalConfig:
    """Per-head accuracy, accepted tokens per step, and the real speed-up of Medusa or EAGLE-3 decoding here."""

    UNDERSCORE_ALIASES: ClassVar[bool] = True

    draft: str = draft_folder_field()
    model: str | None = base_model_field()
    data: str = field(
        default="sharegpt-heldout",
        metadata={
            "help": "Held-out conversations (file or sharegpt-heldout). A self-distilled held-out file measures the "
            "draft on the model's own answers, which is what decoding accepts. Prompts alone (a JSON list of "
            "strings, {\"prompt\": ...} JSONL, conversations without replies) work too: the draft is then scored "
            "on the model's own answers to the calibration prompts only."
        },
    )
    max_prompts: int = field(default=10, metadata={"help": "Prompts timed."})
    max_new_tokens: int = 128
    max_conversations: int = field(default=50, metadata={"help": "For accuracy."})
    max_length: int = field(default=1024, metadata={"help": "Tokens per scored conversation."})
    max_prompt_tokens: int = 512
    calibration_prompts: int = field(
        default=4,
        metadata={
            "help": "Further held-out prompts (not timed) whose greedy answers measure the draft on the model's own "
            "text; the tree is built from that. 0 = build it from the reference answers' accuracy."
        },
    )
    tree: str = field(
        default="auto",
        metadata={
            "help": "auto: build from the measured accuracies and latency and store it in the draft folder; "
            "or a JSON file of choices, or default-N."
        },
    )
    tree_sizes: str = field(default="4,8,16,24,32,48,64", metadata={"help": "Node budgets tried."})
    latency_prefix: int = field(default=256, metadata={"help": "Cached tokens when timing."})
    no_save_tree: bool = field(default=False, metadata={"help": "Do not write the tree file."})
    prompt_lookup_tokens: int = field(default=10, metadata={"help": "0 = skip."})
    output_dir: str | None = field(default=None, metadata={"help": "Report folder (default: DRAFT/eval)."})
    draft_vocab: int | None = draft_vocab_field()
    depth: int = field(
        default=5,
        metadata={
            "help": "EAGLE-3: draft steps scored (step j predicts the token j after the base's), so the deepest "
            "tree tried. Medusa heads: unused (one depth per head)."
        },
    )
    dtype: str = dtype_field()
    device: str = device_field()
    target_device_map: str | None = target_device_map_field()
    target_max_memory: str | None = target_max_memory_field()
    target_offload_folder: str | None = target_offload_folder_field()
    speculative_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Draft tokens per step of the chain the engines draft (vLLM's num_speculative_tokens; SGLang "
            "with topk 1): the acceptance they will give is measured on the timed prompts with this chain. "
            "Default: the chain `export`'s serve commands give them (EAGLE-3: 3; Medusa: one per head; DFlash: "
            "with --tree auto the length with the most expected tokens/s here, stored with the tree for export, "
            "else the stored one or the block size - 1)."
        },
    )
    engine: str = field(
        default="none",
        metadata={
            "help": "vllm: also serve the draft in vLLM itself (float32) and put its measured acceptance next to "
            "ours (from --engine-url, --engine-python, this Python's vLLM, else vLLM's CPU build installed once "
            "under the cache).",
            "choices": list(ENGINES),
        },
    )
    engine_url: str | None = field(
        default=None, metadata={"help": "A vLLM server already serving this base with this draft's chain."}
    )
    engine_python: str | None = field(default=None, metadata={"help": "A Python that has vLLM, to start it with."})

    def __post_init__(self) -> None:
        check_target_flags(self)
        if self.target_device_map is not None and self.dtype == "auto":
            raise UserError(
                "--target_device_map auto loads the target once, so eval cannot time it in both float32 and "
                "bfloat16 (--dtype auto): pass --dtype bfloat16 or --dtype float32"
            )
        if self.max_prompts < 1 or self.max_new_tokens < 1:
            raise UserError("--max-prompts and --max-new-tokens must be at least 1")
        if self.speculative_tokens is not None and self.speculative_tokens < 1:
            raise UserError("--speculative-tokens must be at least 1")
        if self.engine not in ENGINES:
            raise UserError(f"--engine {self.engine}: choose one of {', '.join(ENGINES)}")
        if (self.engine_url or self.engine_python) and self.engine == "none":
            raise UserError("--engine-url and --engine-python need --engine vllm")
        if self.depth < 1:
            raise UserError("--depth must be at least 1")
        _parse_sizes(self.tree_sizes)

    @property
    def sizes(self) -> list[int]:
        """The node budgets of --tree-sizes, ascending."""
        return _parse_sizes(self.tree_sizes)


@dataclass
class _TreeChoice:
    """The tree eval decodes with, the dtype it is fastest in, and what was measured to choose them."""

    choices: list[list[int]]
    dtype: str
    step_seconds: float
    expected_tokens_per_second: float
    plain_step_seconds: dict[str, float]  # per candidate dtype
    searches: dict = field(default_factory=dict)  # per dtype, with --tree auto


def _accuracy(config: EvalConfig, first, conversations, references) -> tuple[list, list | None, list, list]:
    """Teacher-forced accuracy on the reference answers and (with calibration prompts) on the model's own answers;
    and the timed prompts and the calibration prompts."""
    from medusa_forge.generation.text import eos_token_ids

    base, tokenizer, draft = first.base, first.tokenizer, first.draft
    depth = draft.scored_depth(config.depth)
    accuracy = []
    if references:
        samples = conversation_samples(tokenizer, references, config.max_length)
        accuracy = draft.accuracy(samples, depth, desc="draft accuracy")
    else:
        logger.warning("%s has no assistant replies: scoring the draft on the model's own answers", config.data)
    for row in accuracy:
        logger.warning("%s: top-1 %.3f top-5 %.3f over %d tokens", row.name, row.top(1), row.top(5), row.tokens)
    prompts = first_prompts(
        tokenizer, conversations, config.max_prompts + config.calibration_prompts, config.max_prompt_tokens
    )
    prompts, calibration = prompts[: config.max_prompts], prompts[config.max_prompts :]
    if not references and not calibration:
        raise _no_calibration(config, len(prompts))
    self_accuracy = None
    if calibration:
        samples = own_answer_samples(base, calibration, config.max_new_tokens, eos_token_ids(base, tokenizer))
        self_accuracy = draft.accuracy(samples, depth, desc="draft accuracy (own answers)")
        for row in self_accuracy:
            logger.warning("%s on its own answers: top-1 %.3f top-5 %.3f", row.name, row.top(1), row.top(5))
    return accuracy, self_accuracy, prompts, calibration


def _choose_tree(config: EvalConfig, loaded: dict, candidates: list[str], rank_accuracy: list) -> _TreeChoice:
    """--tree auto: the tree and dtype with the most expected tokens/s on this machine (stored with the draft unless
    --no-save-tree); else the given tree, in the dtype whose step is fastest."""
    from medusa_forge.decode.step_latency import measure_plain_and_trees
    from medusa_forge.decode.tree import expected_accept_length, resolve_tree

    factories = {dtype: functools.partial(loaded[dtype].decoder, check=False) for dtype in candidates}
    if config.tree == "auto":
        searches = choose_tree(factories, rank_accuracy, config.sizes, prefix_length=config.latency_prefix)
        dtype = max(candidates, key=lambda d: searches[d].chosen_tokens_per_second)
        best = searches[dtype]
        plain = {d: search.plain_step_seconds for d, search in searches.items()}
        chosen = _TreeChoice(
            best.choices, dtype, best.chosen_step_seconds, best.chosen_tokens_per_second, plain, searches
        )
    else:
        choices = resolve_tree(config.tree, config.draft, loaded[candidates[0]].draft.scored_depth(config.depth))
        timings = measure_plain_and_trees(factories, [choices], config.latency_prefix)
        dtype = min(candidates, key=lambda d: timings[d][1][0])
        step_seconds = timings[dtype][1][0]
        expected = expected_accept_length(choices, rank_accuracy) / step_seconds
        chosen = _TreeChoice(choices, dtype, step_seconds, expected, {d: p for d, (p, _) in timings.items()})
    for d in candidates:
        logger.warning("%s: plain step %.1f ms", d, 1000 * chosen.plain_step_seconds[d])
    fastest_plain = min(chosen.plain_step_seconds.values())
    logger.warning(
        "decoding in %s: %d-node tree, %.1f ms per step, expected %.2f tokens/s (fastest plain greedy: %.2f)",
        dtype,
        len(chosen.choices),
        1000 * chosen.step_seconds,
        chosen.expected_tokens_per_second,
        1 / fastest_plain,
    )
    if chosen.expected_tokens_per_second <= 1 / fastest_plain:
        logger.warning(
            "no tree is expected to beat plain greedy here: the draft's accuracy is too low for this machine's cost "
            "of drafting and verifying a tree"
        )
    return chosen


def _choose_chain(config: EvalConfig, loaded, rank_accuracy: list) -> TreeSearch | None:
    """With --tree auto, for a kind whose engines may draft chains of several lengths (and no --speculative-tokens):
    the length with the most expected tokens/s here, timed in the tree's dtype, chosen and stored as the tree is;
    None when there is nothing to choose (the stored or the kind's own chain is measured)."""
    lengths = [n for n in loaded.draft.chain_lengths() if n <= len(rank_accuracy)]
    if config.tree != "auto" or config.speculative_tokens is not None or len(lengths) < 2:
        return None
    search = choose_chain(
        functools.partial(loaded.decoder, check=False), rank_accuracy, lengths, prefix_length=config.latency_prefix
    )
    logger.warning(
        "the engines' chain: %d draft tokens per step, expected %.2f tokens/s here (lengths %s: %s)",
        search.chosen_size,
        search.chosen_tokens_per_second,
        search.sizes,
        ", ".join(f"{rate:.2f}" for rate in search.expected_tokens_per_second),
    )
    return search


def _save_tree(
    config: EvalConfig, chosen: _TreeChoice, expected_accept_length: float, chain: TreeSearch | None
) -> None:
    from medusa_forge.formats.tree_file import save_tree

    served = {} if chain is None else {"speculative_tokens": chain.chosen_size}  # export serves this chain
    path = save_tree(
        config.draft,
        chosen.choices,
        chosen_by="medusa-forge eval",
        expected_accept_length=expected_accept_length,
        step_seconds=chosen.step_seconds,
        dtype=chosen.dtype,
        machine=machine_description(),
        **served,
    )
    logger.warning("tree of %d nodes and dtype %s stored in %s", len(chosen.choices), chosen.dtype, path)


def evaluate(config: EvalConfig) -> EvalReport:
    # Prompt-only records are fine: the draft is then scored on the model's own answers to held-out prompts.
    conversations = load_conversations(config.data, None, need_reply=False)
    references = [c for c in conversations if has_reply(c)][: config.max_conversations]
    if not references and (config.calibration_prompts < 1 or len(conversations) <= config.max_prompts):
        raise _no_calibration(config, len(conversations))
    # Where eval writes, checked before the measurements (minutes) rather than after them.
    kind_of(config.draft)  # a draft folder that is not one is said first, and DRAFT/eval is never created in it
    folder = report_folder(config)
    with removed_if_failed_empty(folder):
        check_writable_folder(folder, f"--output-dir {folder}" if config.output_dir else f"--draft {config.draft}")
        if config.tree == "auto" and not config.no_save_tree:  # the chosen tree is stored in the draft folder
            label = f"--draft {config.draft} (eval stores the chosen tree there; --no-save-tree does not)"
            check_writable_folder(config.draft, label, create=False)
        return _evaluate(config, conversations, references, folder)


def report_folder(config: EvalConfig) -> Path:
    """Where eval.json, eval.md and the plots go: --output-dir, else DRAFT/eval."""
    return Path(config.output_dir) if config.output_dir else Path(config.draft) / "eval"


def _evaluate(config: EvalConfig, conversations: list, references: list, folder: Path) -> EvalReport:
    from medusa_forge.decode.loading import load_draft
    from medusa_forge.decode.tree import expected_accept_length
    from medusa_forge.generation.text import eos_token_ids

    # Plain greedy is timed in float32 and bfloat16 whatever the draft decodes in: speed-ups are over the faster.
    # A dispatched target (larger than one device) is loaded once, in --dtype, and timed in that alone.
    candidates = ["float32", "bfloat16"] if config.dtype == "auto" else [config.dtype]
    placement = target_placement(config, resolve_device(config.device))
    loaded = {
        dtype: load_draft(config.draft, config.model, dtype, config.device, config.draft_vocab, placement)
        for dtype in dict.fromkeys([*candidates, *([] if placement else ["float32", "bfloat16"])])
    }
    first = loaded[candidates[0]]  # accuracy is scored in float32 (or the dtype given)
    accuracy, self_accuracy, prompts, calibration = _accuracy(config, first, conversations, references)
    rank_accuracy = [row.rank_accuracy for row in (self_accuracy or accuracy)[1:]]
    tree = _choose_tree(config, loaded, candidates, rank_accuracy)
    choices, dtype = tree.choices, tree.dtype
    chain_search = _choose_chain(config, loaded[dtype], rank_accuracy)
    if config.tree == "auto" and not config.no_save_tree:
        _save_tree(config, tree, expected_accept_length(choices, rank_accuracy), chain_search)
    chain = config.speculative_tokens or (chain_search.chosen_size if chain_search else first.draft.served_chain())

    base, tokenizer = first.base, first.tokenizer
    eos = eos_token_ids(base, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    lookup = None if config.prompt_lookup_tokens <= 0 else config.prompt_lookup_tokens
    bases = {d: draft.base for d, draft in loaded.items()}
    decoder = loaded[dtype].decoder(choices)
    runs, outputs, accept_lengths = run_speed(
        bases, decoder, dtype, prompts, config.max_new_tokens, eos, pad_id, lookup
    )
    speed = speed_comparison(runs, outputs, dtype, config.max_new_tokens)
    report = EvalReport(
        draft=str(config.draft),
        base_model=base.config.name_or_path,
        data=config.data,
        machine=machine_description(),
        accuracy=[row.to_result() for row in accuracy],
        accuracy_own_answers=[row.to_result() for row in self_accuracy or []],
        tree_accuracy_source="own greedy answers" if self_accuracy else "reference answers",
        calibration_prompts=len(calibration),
        tree=choices,
        draft_vocab=first.draft.draft_vocab,
        tree_search=tree.searches.get(dtype),
        acceptance=acceptance(accept_lengths, expected_accept_length(choices, rank_accuracy)),
        speed=speed,
        draft_kind=first.kind.name,
        dtype=dtype,
        other_dtype_searches={d: search for d, search in tree.searches.items() if d != dtype},
        chains=_engine_chains(config, loaded.get("float32", first), prompts, eos, chain),
        chain_search=chain_search,
    )
    for path in write_eval_report(report, folder):
        logger.warning("wrote %s", path)
    _warn_mismatches(speed, dtype)
    return report


def _warn_mismatches(speed: SpeedComparison, dtype: str) -> None:
    if speed.mismatched_prompts and dtype == "float32":
        logger.error(
            "the draft's output differed from plain greedy on prompts %s: please report this", speed.mismatched_prompts
        )
    elif speed.mismatched_prompts:
        logger.warning(
            "in %s the draft's output differed from plain %s greedy on prompts %s (near-ties that batched and "
            "single-token kernels round differently); %.1f%% of greedy's tokens agree before the first divergence",
            dtype,
            dtype,
            speed.mismatched_prompts,
            100 * speed.agreement,
        )


def _engine_chains(
    config: EvalConfig, loaded, prompts: list[list[int]], eos: set[int], k: int
) -> list[ChainAcceptance]:
    """The engines' chain of `k` on the timed prompts: our decoder (float32), and vLLM itself with --engine vllm."""
    n = config.max_new_tokens
    ours, our_outputs = our_chain(loaded, prompts, k, n, eos)
    logger.warning("the engines' chain of %d (medusa-forge): %.2f accepted per step", k, ours.mean_accept_length)
    if config.engine == "none":
        return [ours]
    folder = report_folder(config)
    engine, engine_outputs = vllm_chain(
        loaded, prompts, k, n, config.engine_url, config.engine_python, folder / "vllm-server.log"
    )
    engine.outputs_equal = same_replies(engine_outputs, our_outputs, eos)
    logger.warning(
        "%s: %.2f accepted per step (per position %s), outputs %s ours",
        engine.measured_by,
        engine.mean_accept_length,
        engine.accepted_per_position,
        "equal to" if engine.outputs_equal else "differ from",
    )
    return [ours, engine]


def _no_calibration(config: EvalConfig, prompts: int) -> UserError:
    return UserError(
        f"--data {config.data} has no assistant replies, so the draft is scored on the model's own answers to "
        f"prompts beyond the {config.max_prompts} timed ones (--max-prompts), but it has {prompts} usable prompts: "
        f"pass a lower --max-prompts and --calibration-prompts 1 or more"
    )


def _parse_sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise UserError(f"--tree-sizes {text!r}: expected comma-separated node counts, e.g. 4,8,16,32") from None
    if not sizes or sizes[0] < 1:
        raise UserError(f"--tree-sizes {text!r}: node counts must be >= 1")
    return sizes


def run_eval(config: EvalConfig) -> int:
    print(render_markdown(evaluate(config)))
    return 0
