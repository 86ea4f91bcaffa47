"""eval.json and training_metrics.json: what `save` writes `load` reads back; a broken file is a UserError naming it."""

from __future__ import annotations

import json

import pytest

from medusa_forge.errors import UserError
from medusa_forge.results import Acceptance, EvalReport, PredictorAccuracy, SpeedComparison, TrainingMetrics, TreeSearch


def test_eval_report_round_trip(tmp_path):
    report = EvalReport(
        draft="h", base_model="b", data="d", machine="m",
        accuracy=[PredictorAccuracy("base", 10, 0.5, 0.9, [0.5, 0.2])], tree=[[0], [0, 0]], draft_vocab=None,
        tree_search=TreeSearch([2, 4], [1.5, 1.8], [0.1, 0.2], 0.05, 2, [[0], [0, 0]]),
        acceptance=Acceptance(1.6, 1.5, 5, {1: 2, 2: 3}),
        speed=SpeedComparison(
            3, 8, {"greedy_bfloat16": 24, "draft": 26}, {"greedy_bfloat16": 2.0, "draft": 1.6},
            {"greedy_bfloat16": 12.0, "draft": 16.25}, {"greedy_bfloat16": 1.0, "draft": 1.35}, 1.3, False, [1],
            reference="greedy_bfloat16", dtype="bfloat16", first_divergence=[5], agreement=0.9, agreement_float32=0.8,
        ),
        dtype="bfloat16",
        other_dtype_searches={"float32": TreeSearch([2, 4], [1.5, 1.8], [0.2, 0.3], 0.07, 2, [[0], [0, 0]])},
    )  # fmt: skip
    path = report.save(tmp_path)
    data = json.loads(path.read_text())
    assert data["acceptance"]["histogram"] == {"1": 2, "2": 3}
    assert data["tree_search"]["expected_tokens_per_second"] == pytest.approx([15.0, 9.0])
    assert EvalReport.load(path) == report


def test_reports_from_before_the_dtype_choice_still_read(tmp_path):
    old = {
        "speed": {
            "tokens_per_second": {"greedy": 10.0, "medusa": 12.0, "prompt_lookup": 9.0},
            "speedup": {"greedy": 1.0, "medusa": 1.2, "prompt_lookup": 0.9},
            "outputs_equal": True,
        }
    }
    (tmp_path / "eval.json").write_text(json.dumps(old))
    report = EvalReport.load(tmp_path / "eval.json")
    assert report.dtype == "float32" and report.speed.reference == "greedy_float32"
    assert report.speed.draft_speedup == 1.2 and report.speed.tokens_per_second["greedy_float32"] == 10.0


def test_reports_from_before_drafts_of_other_kinds_read_their_heads_folder(tmp_path):
    """eval.json written when the draft folder was `heads` (Medusa only): its folder is the report's draft, the kind
    Medusa; a new report writes `draft` and reads back the same."""
    (tmp_path / "eval.json").write_text(json.dumps({"heads": "runs/heads", "base_model": "b", "tree": [[0]]}))
    report = EvalReport.load(tmp_path / "eval.json")
    assert report.draft == "runs/heads" and report.draft_kind == "medusa" and report.tree == [[0]]
    data = json.loads(report.save(tmp_path).read_text())
    assert data["draft"] == "runs/heads" and "heads" not in data
    assert EvalReport.load(tmp_path / "eval.json") == report


def test_training_metrics_round_trip(tmp_path):
    metrics = TrainingMetrics({"train_runtime": 3.0, "eval_medusa0_top1": 0.4}, [1.5], {0: [{"step": 1, "loss": 2.0}]})
    path = metrics.save(tmp_path)
    assert json.loads(path.read_text())["train"] == {"0": [{"step": 1, "loss": 2.0}]}
    assert TrainingMetrics.load(path) == metrics
    assert metrics.held_out_draft_metrics("medusa") == {"medusa0_top1": 0.4}


@pytest.mark.parametrize(
    "cls, content, message",
    [
        (EvalReport, "not json", "is not valid JSON"),
        (EvalReport, "[1, 2]", "the top level should be an object"),
        (EvalReport, '{"speed": {"speedup": {"medusa": "fast"}}}', "speed.speedup.medusa should be a number"),
        (EvalReport, '{"tree_search": {"sizes": [2]}}', "tree_search.expected_accept_length is missing"),
        (TrainingMetrics, '{"train": {"0": [{"step": "one"}]}}', "train.0[0].step should be a number"),
    ],
)
def test_broken_file_names_itself(tmp_path, cls, content, message):
    path = tmp_path / "results.json"
    path.write_text(content)
    with pytest.raises(UserError, match=str(path)) as caught:
        cls.load(path)
    assert message in str(caught.value)
