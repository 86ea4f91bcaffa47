"""The target's weights are loaded once per machine on a CPU under torchrun (issue 24, 2 ranks at the 8B shape): a
target loaded from safetensors is the file's pages mapped into memory, shared by the ranks; moving it to the
training device, or the Trainer's own move of the module that holds it, must not copy it (accelerate names the
device `cpu:0`, and `Tensor.to(cpu:0)` copies a tensor on `cpu`: every rank held a copy of its own)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

RANK_SCRIPT = """
import json, os, sys
from pathlib import Path
import torch
from transformers import Trainer
from medusa_forge.modeling import load_base_model
from medusa_forge.train.args import parse_args

model_dir, out = sys.argv[1], sys.argv[2]
config = parse_args(["--model_name_or_path", model_dir, "--output_dir", out, "--report_to", "none"])
base = load_base_model(model_dir)
before = {name: p.data_ptr() for name, p in base.named_parameters()}
base = base.to(config.device)  # as train's _target does
trainer = Trainer(model=base, args=config)  # the Trainer moves the module it trains to its device
moved = trainer.accelerator.prepare_model(trainer.model, evaluation_mode=True)  # and so does its accelerator
after = {name: p.data_ptr() for name, p in moved.named_parameters()}
row = {"device": str(config.device), "accelerator": str(trainer.accelerator.device),
       "world": torch.distributed.get_world_size(), "copied": sorted(n for n in before if after[n] != before[n])}
Path(out, f"rank{os.environ['RANK']}.json").write_text(json.dumps(row))
"""


def test_under_torchrun_on_a_cpu_the_target_is_not_copied(tmp_path: Path, tiny_model_dir: Path) -> None:
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(script),
               str(tiny_model_dir), str(tmp_path)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        row = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert row["world"] == 2 and row["device"] == row["accelerator"] == "cpu"
        assert row["copied"] == []  # every weight where from_pretrained put it (the file's mapped pages)
