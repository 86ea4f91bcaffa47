"""A third kind of draft, registered by this test alone: one module (this file) is all a new kind needs. It is
trained for a step by `train`, decodes exactly what plain greedy decoding gives, is exported by `export`, and gets
its model card and the pipeline report, with no edit to the package (issue 23)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import write_conversations
from safetensors.torch import load_file, save_file
from torch import nn

from medusa_forge.cli import main
from medusa_forge.data.tokenize import IGNORE_INDEX
from medusa_forge.decode.generation import greedy_generate
from medusa_forge.decode.loading import load_draft
from medusa_forge.drafts import kind_of, register, unregister
from medusa_forge.drafts.accuracy import RANKS, HeadAccuracy, count_ranks
from medusa_forge.drafts.drafter import TreeBuffers
from medusa_forge.drafts.fused_ce import linear_cross_entropy
from medusa_forge.drafts.kind import DecodingDraft, DraftKind, ExportResult, PushCheck
from medusa_forge.errors import UserError
from medusa_forge.export import export_draft
from medusa_forge.formats.tree_file import default_choices
from medusa_forge.modeling import backbone, load_base_model
from medusa_forge.pipeline.configuration import config_from_dict
from medusa_forge.pipeline.context import Context
from medusa_forge.pipeline.report import write_pipeline_report
from medusa_forge.results import EvalReport

CONFIG, WEIGHTS, ENGINE = "config.json", "toy.safetensors", "toy-engine"


@dataclass
class ToyConfig:
    base_model_name_or_path: str
    hidden_size: int
    vocab_size: int
    toy_draft: bool = True  # how its folder is recognised


class ToyDraft(nn.Module):
    """One projection from the base model's final hidden state at t to token t+2: a lone head without blocks."""

    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.config = config
        self.proj = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden.to(self.proj.weight.dtype))

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG).write_text(json.dumps(asdict(self.config)))
        save_file({name: t.contiguous() for name, t in self.state_dict().items()}, str(folder / WEIGHTS))

    @classmethod
    def load(cls, folder: Path) -> ToyDraft:
        draft = cls(ToyConfig(**json.loads((folder / CONFIG).read_text())))
        draft.load_state_dict(load_file(str(folder / WEIGHTS)))
        return draft


def final_hidden(base, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    return backbone(base)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


class ToyForTraining(nn.Module):
    draft_attribute = "draft"

    def __init__(self, base, draft: ToyDraft) -> None:
        super().__init__()
        self.base = base.eval().requires_grad_(False)
        self.draft = draft

    def forward(self, labels, input_ids=None, attention_mask=None, hidden_states=None) -> dict[str, torch.Tensor]:
        if hidden_states is None:
            with torch.no_grad():
                hidden_states = final_hidden(self.base, input_ids, attention_mask)
        targets = labels[:, 2:]
        valid = targets != IGNORE_INDEX
        rows = hidden_states[:, :-2][valid].to(self.draft.proj.weight.dtype)
        ce_sum, hits = linear_cross_entropy(rows, self.draft.proj.weight, targets[valid])
        count = int(valid.sum())
        stats = torch.tensor([[ce_sum.item(), count, count, *hits.tolist()]])  # fused_ce.summarise_head_stats
        return {"loss": ce_sum / max(count, 1), "head_stats": stats}


class ToyDrafter:
    """Depth 1 of the tree: the draft's top-k at the last accepted hidden state."""

    max_depth = 1
    feature_layers: tuple[int, ...] = ()

    def __init__(self, draft: ToyDraft) -> None:
        self.draft = draft

    def check_tree(self, tree: TreeBuffers) -> None:
        pass

    def start(self, tokens: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return self.draft(hidden[-1])

    def propose(self, logits: torch.Tensor, root: int, tree: TreeBuffers) -> torch.Tensor:
        top = torch.topk(logits, tree.topk).indices
        return torch.cat([top.new_tensor([root]), top])[tree.candidate_index]

    def advance(self, logits, nodes, tokens, hidden) -> torch.Tensor:
        return self.draft(hidden[-1])


class ToyForDecoding(DecodingDraft):
    max_depth = 1

    def __init__(self, kind: DraftKind, folder: Path, base_model: str | None, dtype: torch.dtype, placement) -> None:
        self.kind, self.folder = kind, folder
        draft = ToyDraft.load(folder)
        self.base_name = base_model or draft.config.base_model_name_or_path
        self.base = load_base_model(self.base_name, dtype=dtype, placement=placement)
        self.draft = draft.to(dtype)

    def accuracy(self, samples, depth: int, progress: bool = True, desc: str = "") -> list[HeadAccuracy]:
        counts, totals = [[0] * RANKS, [0] * RANKS], [0, 0]
        for input_ids, label_ids in samples:
            ids, labels = torch.tensor(input_ids), torch.tensor(label_ids)
            hidden = final_hidden(self.base, ids[None])[0]
            for row, logits in enumerate((self.base.get_output_embeddings()(hidden), self.draft(hidden))):
                shift = row + 1
                mask = labels[shift:] != IGNORE_INDEX
                totals[row] += int(mask.sum())
                count_ranks(logits[: len(ids) - shift][mask], ids[shift:][mask], counts[row])
        return [HeadAccuracy(name, n, c) for name, n, c in zip(("base", "head 0"), totals, counts, strict=True)]

    def drafter(self) -> ToyDrafter:
        return ToyDrafter(self.draft)

    def engine_drafter(self) -> ToyDrafter:
        return self.drafter()

    def vllm_speculative_config(self, scratch: Path, num_speculative_tokens: int) -> dict:
        raise UserError("vLLM does not serve toy drafts")


class ToyKind(DraftKind):
    name, label, title = "toy", "toy draft", "Toy"
    config_name, weights_name, config_type = CONFIG, WEIGHTS, ToyConfig
    metric_name, metric_label, predictor, first_predictor = "toy", "head", "head", 0
    formats = default_formats = (ENGINE,)
    expected_files = f"{CONFIG} with toy_draft + {WEIGHTS}"
    records_need_token_ids, trains_without_cache, training_tokens_per_s = False, False, 1000.0

    def recognises(self, folder: Path) -> bool:
        try:
            return json.loads((folder / CONFIG).read_text()).get("toy_draft") is True
        except (OSError, ValueError):
            return False

    def record_layers(self, base) -> list[int | str]:
        return ["final"]

    def records(self, base, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return final_hidden(base, input_ids, attention_mask)

    def training_module(self, base, config, base_path: str, token_items) -> ToyForTraining:
        draft = ToyDraft(ToyConfig(base_path, base.config.hidden_size, base.config.vocab_size))
        draft.proj.weight.data.copy_(base.get_output_embeddings().weight.data)
        return ToyForTraining(base, draft)

    def checkpoint_state(self, folder: Path) -> dict[str, torch.Tensor]:
        return load_file(str(folder / WEIGHTS))

    def read_config(self, folder: Path) -> ToyConfig:
        return ToyDraft.load(folder).config

    def load(self, folder, base_model, dtype, device, draft_vocab, placement=None) -> ToyForDecoding:
        return ToyForDecoding(self, folder, base_model, dtype, placement)

    def render_card(self, config, base_model_id, facts, metrics, evaluation, repo_id, options: dict[str, Any]) -> str:
        rows = "\n".join(f"| {key} | {value} |" for key, value in facts.items())
        return f"# Toy draft for `{base_model_id}`\n\n{rows}\n"

    def export(self, source, fmt, output_dir, base_model_id=None, tokenizer=None, layout=None) -> ExportResult:
        if fmt not in self.formats:
            raise UserError(f"--format {fmt}: a toy draft goes to {ENGINE} only")
        ToyDraft.load(source).save(output_dir)
        written = ToyDraft.load(output_dir)
        assert all(torch.equal(t, ToyDraft.load(source).state_dict()[k]) for k, t in written.state_dict().items())
        return ExportResult(output_dir, [output_dir / CONFIG, output_dir / WEIGHTS], [f"{ENGINE} {output_dir}"])

    def check_for_push(self, folder: Path) -> PushCheck:
        return PushCheck(self.read_config(folder), [], "toy engines", {}, (CONFIG, WEIGHTS), "Upload a toy draft")


@pytest.fixture
def toy_kind():
    kind = register(ToyKind())
    yield kind
    unregister(kind.name)


def test_a_kind_registered_in_one_module_trains_decodes_exports_and_reports(toy_kind, tiny_model_dir, tmp_path):
    data = write_conversations(tmp_path / "data.json", 8)
    workdir = tmp_path / "work"
    draft = workdir / "heads"  # where the pipeline keeps the draft
    argv = [
        "train", "--model_name_or_path", str(tiny_model_dir), "--data_path", str(data), "--output_dir", str(draft),
        "--draft_kind", "toy", "--per_device_train_batch_size", "4", "--max_steps", "1", "--model_max_length", "96",
        "--logging_steps", "1", "--disable_tqdm", "True", "--medusa_hidden_cache_dir", str(tmp_path / "cache"),
    ]  # fmt: skip
    assert main(argv) == 0
    assert kind_of(draft) is toy_kind
    assert json.loads((draft / "training_metrics.json").read_text())["train"]  # its metric, logged per step
    assert (draft / "README.md").read_text().startswith(f"# Toy draft for `{tiny_model_dir}`")

    # Decoded exactly: a tree over the toy drafter gives plain greedy's tokens.
    loaded = load_draft(draft, device="cpu")
    assert loaded.kind is toy_kind and loaded.max_depth == 1
    prompt = loaded.tokenizer("hello there, how are you", add_special_tokens=False)["input_ids"]
    result = loaded.decoder(default_choices(4, loaded.max_depth)).generate(prompt, 16)
    assert result.tokens == greedy_generate(loaded.base, prompt, 16)
    rows = loaded.draft.accuracy([(prompt, prompt)], 1)
    assert [row.name for row in rows] == ["base", "head 0"] and rows[1].tokens == len(prompt) - 2

    # Exported through `export`, which knows nothing of toy drafts.
    assert main(["export", "--draft", str(draft), "--format", ENGINE, "--output-dir", str(workdir / "export")]) == 0
    assert ToyDraft.load(workdir / "export").config == ToyDraft.load(draft).config
    with pytest.raises(UserError, match="toy-engine only"):
        export_draft(draft, "vllm", tmp_path / "wrong")

    # Reported: the pipeline report describes it with the kind's own words.
    config = config_from_dict({"model": str(tiny_model_dir), "data": "sharegpt", "draft_kind": "toy"}, "test")
    (workdir / "export" / "serve_commands.json").write_text(json.dumps({ENGINE: [f"{ENGINE} export"]}))
    (draft / "eval").mkdir()
    EvalReport(draft=str(draft), tree=[[0], [1]], draft_kind="toy").save(draft / "eval")
    write_pipeline_report(Context(config, workdir, "cmd"))
    report = (workdir / "report.md").read_text()
    assert report.startswith(f"# toy draft for `{tiny_model_dir}`")
    assert "| Draft | toy draft: `draft_kind: toy` in the configuration |" in report
    assert "| head | predicts |" in report and "- head 0, guess #2" in report
    assert f"{ENGINE} (folder `export/{ENGINE}`):" in report
