"""`medusa-forge eval` and `medusa-forge generate` end to end on a tiny model with heads trained by `train`."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import make_tiny_model, write_conversations

from medusa_forge.cli import main
from medusa_forge.decode.loading import load_draft
from medusa_forge.drafts.medusa_heads import MedusaModel
from medusa_forge.evaluate.accuracy import measure_accuracy
from medusa_forge.formats.tree_file import TREE_FILE, load_tree, load_tree_dtype
from medusa_forge.results import EvalReport


@pytest.fixture(scope="module")
def heads_dir(tmp_path_factory, tiny_tokenizer):
    folder = tmp_path_factory.mktemp("eval")
    make_tiny_model("llama", folder / "base", tiny_tokenizer)
    data = write_conversations(folder / "data.json", 16)
    argv = [
        "train", "--model_name_or_path", str(folder / "base"), "--data_path", str(data),
        "--output_dir", str(folder / "heads"), "--num_train_epochs", "2", "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-2", "--model_max_length", "128", "--save_strategy", "no", "--eval_strategy", "no",
        "--report_to", "none",
    ]  # fmt: skip
    assert main(argv) == 0
    return folder / "heads", data


def test_accuracy_counts_ranks_by_brute_force(heads_dir):
    from medusa_forge.data.conversations import load_conversations
    from medusa_forge.data.tokenize import IGNORE_INDEX, tokenize_conversation

    heads, data = heads_dir
    loaded = load_draft(heads, device="cpu")
    model, tokenizer = loaded.draft.model, loaded.tokenizer
    conversations = load_conversations(str(data), 3)
    rows = measure_accuracy(loaded.draft, tokenizer, conversations, 128, progress=False)
    assert [r.name for r in rows] == ["base", "head 0", "head 1", "head 2"]
    # Brute force: every position t whose target t+1+shift is an assistant token.
    for which, row in enumerate(rows):
        tokens = top1 = top5 = 0
        for conversation in conversations:
            sample = tokenize_conversation(tokenizer, conversation.messages, 128)
            ids = torch.tensor(sample["input_ids"])
            logits = model.base(ids[None]).logits[0] if which == 0 else model.head_logits(ids[None])[which - 1, 0]
            for t in range(len(ids) - which - 1):
                if sample["labels"][t + which + 1] != IGNORE_INDEX:
                    tokens += 1
                    top1 += int(logits[t].argmax() == ids[t + which + 1])
                    top5 += int(ids[t + which + 1] in logits[t].topk(5).indices)
        assert row.tokens == tokens > 0
        assert row.rank_counts[0] == top1 and row.top(1) == top1 / tokens
        assert sum(row.rank_counts[:5]) == top5 and row.top(5) == top5 / tokens


def test_eval_writes_report_and_stores_tree(heads_dir, tmp_path, capsys):
    heads, data = heads_dir
    heads = shutil.copytree(heads, tmp_path / "heads")  # eval stores its tree there: not in the shared fixture
    out = tmp_path / "report"
    argv = ["eval", "--heads", str(heads), "--data", str(data), "--max-prompts", "3", "--max-new-tokens", "24"]
    argv += ["--calibration-prompts", "2"]
    argv += ["--max-conversations", "4", "--tree-sizes", "2,4,8", "--output-dir", str(out), "--device", "cpu"]
    assert main(argv) == 0
    report = json.loads((out / "eval.json").read_text())
    assert EvalReport.load(out / "eval.json").to_json() == report  # read back as written
    speed = report["speed"]
    assert speed["prompts"] == 3
    assert set(speed["tokens_per_second"]) == {"greedy_float32", "greedy_bfloat16", "draft", "prompt_lookup"}
    # --dtype auto: the tree search ran in both dtypes and the one with more expected tokens/s decodes
    chosen, (other,) = report["dtype"], report["other_dtype_searches"]
    assert {chosen, other} == {"float32", "bfloat16"} and speed["dtype"] == chosen
    expected = {chosen: report["tree_search"], other: report["other_dtype_searches"][other]}
    best = {d: max(search["expected_tokens_per_second"]) for d, search in expected.items()}
    assert best[chosen] >= best[other]
    # generate and serve (--dtype auto) decode in the dtype eval chose
    assert load_tree_dtype(heads) == chosen and load_draft(heads, dtype="auto", device="cpu").dtype == chosen
    # speed-ups are over the faster plain greedy; exactness is against greedy in the draft's dtype
    greedy = {name: tps for name, tps in speed["tokens_per_second"].items() if name.startswith("greedy_")}
    assert speed["reference"] == max(greedy, key=greedy.get) and speed["speedup"][speed["reference"]] == 1.0
    assert speed["outputs_equal"] is (not speed["mismatched_prompts"])
    assert len(speed["first_divergence"]) == len(speed["mismatched_prompts"])
    if chosen == "float32":
        assert speed["outputs_equal"] is True and speed["agreement"] == 1.0 and speed["agreement_float32"] is None
        assert speed["tokens"]["draft"] == speed["tokens"]["greedy_float32"]
    else:
        assert 0.0 <= speed["agreement_float32"] <= 1.0
        assert (speed["agreement"] == 1.0) is speed["outputs_equal"]
    acceptance = report["acceptance"]
    assert acceptance["steps"] == sum(acceptance["histogram"].values()) > 0
    assert 1.0 <= acceptance["mean_accept_length"] <= 4.0
    assert report["tree_search"]["sizes"] == [2, 4, 8]
    assert report["calibration_prompts"] == 2 and report["tree_accuracy_source"] == "own greedy answers"
    own = report["accuracy_own_answers"]
    assert own[0]["name"] == "base" and own[0]["top1"] == 1.0  # greedy answers: the base's own argmax, always
    assert len(report["tree"]) == report["tree_search"]["chosen_size"]
    assert load_tree(heads) == report["tree"]  # stored for generate / serve
    config = json.loads((heads / "config.json").read_text())
    assert "architectures" not in config and "medusa_choices" not in config  # TGI layout untouched
    for name in ("eval.md", "acceptance.png", "tokens_per_second.png", "tree_size.png"):
        assert (out / name).stat().st_size > 0
    assert "## Decoding dtype chosen from measured latency" in (out / "eval.md").read_text()
    assert "Mean accepted tokens per step" in capsys.readouterr().out
    MedusaModel.from_pretrained(heads)  # the folder still loads as heads
    assert not (heads_dir[0] / TREE_FILE).exists()  # the shared fixture's folder was left alone


def test_generate_streams_and_reports(heads_dir, capsys):
    heads, _ = heads_dir
    argv = ["generate", "--heads", str(heads), "--prompt", "Hello there!", "--max-new-tokens", "12", "--device", "cpu"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "tokens/s" in captured.err and "mean accepted tokens per step" in captured.err
    assert captured.out.strip()
    argv += ["--temperature", "0.7", "--seed", "3", "--raw", "--tree", "default-8"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first  # same seed, same text


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tree", "default-zz"], "default-N"),
        (["--max-new-tokens", "0"], "at least 1"),
        (["--dtype", "float8"], "float32"),
    ],
)
def test_generate_bad_flags(heads_dir, capsys, extra, message):
    heads, _ = heads_dir
    assert main(["generate", "--heads", str(heads), "--prompt", "hi", "--device", "cpu", *extra]) == 2
    assert message in capsys.readouterr().err


def test_missing_heads_folder(tmp_path, capsys):
    assert main(["eval", "--heads", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["generate", "--heads", str(tmp_path), "--prompt", "x"]) == 2
    assert "config.json is missing" in capsys.readouterr().err


def test_speed_comparison_is_over_the_fastest_greedy_and_measures_agreement():
    from medusa_forge.evaluate.speed import SpeedRun, speed_comparison

    def run(name: str, *per_prompt: tuple[int, float]) -> SpeedRun:
        timed = SpeedRun(name)
        for tokens, seconds in per_prompt:
            timed.add(tokens, seconds)
        return timed

    runs = {
        "greedy_float32": run("greedy_float32", (4, 1.0), (5, 1.0)),  # 4.5 tokens/s
        "greedy_bfloat16": run("greedy_bfloat16", (4, 0.5), (5, 1.0)),  # 6 tokens/s: the reference
        "draft": run("draft", (4, 0.5), (6, 0.5)),
    }
    outputs = {
        "greedy_float32": [[1, 2, 3, 4], [5, 6, 7, 8, 9]],
        "greedy_bfloat16": [[1, 2, 3, 4], [5, 6, 0, 0, 0]],
        "draft": [[1, 2, 3, 4], [5, 6, 0, 1, 1, 1]],
    }
    speed = speed_comparison(runs, outputs, "bfloat16", 6)
    assert speed.reference == "greedy_bfloat16" and speed.speedup["greedy_float32"] == 0.75
    assert speed.draft_speedup == (10 / 1.0) / (9 / 1.5)
    assert speed.median_per_prompt_speedup == (8 / 8 + 12 / 5) / 2
    assert speed.outputs_equal is False and speed.mismatched_prompts == [1] and speed.first_divergence == [3]
    assert speed.agreement == (4 + 3) / 9  # bfloat16 greedy's tokens reproduced before the first divergence
    assert speed.agreement_float32 == (4 + 2) / 9
    # float32 decoding: exact, compared with float32 greedy only
    outputs["draft"] = [[1, 2, 3, 4], [5, 6, 7, 8, 9]]
    speed = speed_comparison(runs, outputs, "float32", 6)
    assert speed.outputs_equal and speed.agreement == 1.0 and speed.agreement_float32 is None



def test_eval_on_prompts_only_scores_the_draft_on_the_models_own_answers(heads_dir, tmp_path, capsys):
    heads, _ = heads_dir
    heads = shutil.copytree(heads, tmp_path / "heads")
    prompts = tmp_path / "prompts.json"  # a plain list of strings: no reference answers
    prompts.write_text(json.dumps([f"Question {i}: tell me about the capital of France." for i in range(5)]))
    out = tmp_path / "report"
    argv = ["eval", "--heads", str(heads), "--data", str(prompts), "--max-prompts", "2", "--max-new-tokens", "16"]
    argv += ["--tree-sizes", "2,4", "--output-dir", str(out), "--device", "cpu", "--dtype", "float32"]
    assert main([*argv, "--calibration-prompts", "0"]) == 2  # nothing left to score on: said before loading
    assert "has no assistant replies" in capsys.readouterr().err
    assert main([*argv, "--calibration-prompts", "2"]) == 0
    report = EvalReport.load(out / "eval.json")
    assert report.accuracy == [] and report.calibration_prompts == 2
    assert [r.name for r in report.accuracy_own_answers] == ["base", "head 0", "head 1", "head 2"]
    assert report.accuracy_own_answers[0].tokens > 0 and report.tree_accuracy_source == "own greedy answers"
    assert report.speed.prompts == 2 and report.speed.outputs_equal and report.acceptance.steps > 0
    markdown = (out / "eval.md").read_text()
    assert "## Accuracy on the model's own greedy answers" in markdown and "without assistant replies" in markdown
    assert "Teacher-forced accuracy (held-out" not in markdown


def test_step_timing_is_round_robin_over_every_tree_and_dtype(heads_dir):
    """eval chooses the dtype from timings taken in turn, so a machine drifting between measurements cannot decide."""
    from medusa_forge.decode.step_latency import time_step_parts

    heads, _ = heads_dir
    order = []

    def factory(dtype: str):
        loaded = load_draft(heads, dtype=dtype, device="cpu")

        def make(choices):
            decoder = loaded.decoder(choices, check=False)
            step = decoder.step
            decoder.step = lambda state, mark=None: order.append(dtype) or step(state, mark=mark)
            return decoder

        return make

    float32, bfloat16 = factory("float32"), factory("bfloat16")
    cases = [(float32, [[0]]), (bfloat16, [[0], [1]]), (float32, [[0], [0, 0]]), (bfloat16, None)]
    timings = time_step_parts(cases, prefix_length=8, repeats=2)
    assert order == ["float32", "bfloat16", "float32"] * 3  # a warm-up round, then 2 rounds; None: a plain step
    assert [len(steps) for steps in timings] == [2, 2, 2, 2]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_plain_step_is_transformers_own_greedy_step(heads_dir, dtype):
    """The reference every tree's step time is set against (eval's tree choice, bench/gpu_check.py): one greedy step
    after the cached prefix, the KV cache one entry longer; no mask of ours, so transformers runs the forward that
    plain greedy decoding runs (an explicit mask would put a GPU's SDPA on a slower kernel)."""
    from medusa_forge.decode.generation import greedy_generate
    from medusa_forge.decode.step_latency import plain_step

    loaded = load_draft(heads_dir[0], dtype=dtype, device="cpu")
    decoder = loaded.decoder([[0]], check=False)
    prompt = torch.tensor([5, 17, 42, 99, 7, 64, 11])
    expected = greedy_generate(loaded.base, prompt, 2)
    state = decoder.prefill(prompt)
    assert state.root == expected[0]
    seen = []
    forward = decoder.verifier.backbone.forward

    def spy(*args, **kwargs):
        out = forward(*args, **kwargs)
        seen.append(kwargs["attention_mask"])
        return out

    decoder.verifier.backbone.forward = spy
    marks = []
    assert plain_step(decoder, state, marks.append) == expected[1]
    assert marks == ["verify", "accept"] and state.cache.get_seq_length() == len(prompt) + 1
    assert seen == [None]
