"""The JSON results commands leave for later stages to read: `training_metrics.json` (TrainingMetrics, written by
`train`) and `eval.json` (EvalReport, written by `eval`). Each is written by its `save` and read by its `load`,
nowhere else.

A leaf module (no torch, no decode): the model card, written by `train`, reads the eval report too.

Reading tolerates what may be missing: `tree_search` is null when the tree was given, `accuracy_own_answers` is
empty without calibration prompts, `prompt_lookup` is absent from the speed tables when it was skipped, and a
report trimmed by hand (or holding only `mean_accepted_length` and `speedup` at the top level) shows what it has.
A value of the wrong type is a broken file: UserError naming it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medusa_forge.errors import UserError

EVAL_REPORT_FILE = "eval.json"
TRAINING_METRICS_FILE = "training_metrics.json"


class _Broken(ValueError):
    """A value of the wrong type at `where`; turned into a UserError naming the file."""


def _read(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None
    except ValueError as err:
        raise UserError(f"{path} is not valid JSON ({err})") from None


def _check(value: Any, kind: str, where: str) -> Any:
    """`value` if it is a `kind` (number, integer, text, flag, list, object), else _Broken."""
    ok = {
        "number": isinstance(value, int | float) and not isinstance(value, bool),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "text": isinstance(value, str),
        "flag": isinstance(value, bool),
        "list": isinstance(value, list),
        "object": isinstance(value, dict),
    }[kind]
    if not ok:
        expected = {"integer": "an integer", "text": "a string", "flag": "true or false", "object": "an object"}
        raise _Broken(f"{where} should be {expected.get(kind, 'a ' + kind)}, not {json.dumps(value)[:60]}")
    return value


def _get(data: dict, key: str, kind: str, where: str, default: Any = None) -> Any:
    """data[key] checked as a `kind`; `default` when the key is missing or null."""
    value = data.get(key)
    return default if value is None else _check(value, kind, f"{where}{key}")


def _list_of(data: dict, key: str, kind: str, where: str) -> list:
    return [_check(item, kind, f"{where}{key}[{i}]") for i, item in enumerate(_get(data, key, "list", where, []))]


def _mapping(value: Any, kind: str, where: str) -> dict[str, Any]:
    """A {name: value} object whose values are all `kind`s."""
    return {name: _check(item, kind, f"{where}.{name}") for name, item in _check(value, "object", where).items()}


def _table(data: dict, key: str, kind: str, where: str) -> dict[str, Any]:
    """data[key] as a {name: value} object, e.g. tokens per second per decoder; {} when missing."""
    return _mapping(_get(data, key, "object", where, {}), kind, f"{where}{key}")


def _parse(cls, data: Any, source: Path, writer: str):
    try:
        return cls._from_json(_check(data, "object", "the top level"))
    except _Broken as err:
        raise UserError(f"{source} is broken: {err}; `{writer}` writes it, run it again") from None


# --- eval.json ----------------------------------------------------------------------------------------------------


@dataclass
class PredictorAccuracy:
    """Teacher-forced accuracy of the base lm_head ("base") or one head ("head i") on held-out tokens."""

    name: str
    tokens: int | None = None
    top1: float | None = None
    top5: float | None = None
    rank_accuracy: list[float] = field(default_factory=list)  # fraction of tokens that were the rank-k guess

    @classmethod
    def _from_json(cls, data: dict, where: str) -> PredictorAccuracy:
        return cls(
            _check(data.get("name"), "text", f"{where}name"),
            _get(data, "tokens", "integer", where),
            _get(data, "top1", "number", where),
            _get(data, "top5", "number", where),
            _list_of(data, "rank_accuracy", "number", where),
        )


@dataclass
class TreeSearch:
    """The tree chosen by measured latency: per node budget, the best tree's expected accepted tokens per step and
    its step time on this machine; the budget with the most expected tokens per second wins."""

    sizes: list[int]
    expected_accept_length: list[float]
    step_seconds: list[float]
    plain_step_seconds: float  # one plain greedy step, for comparison
    chosen_size: int
    choices: list[list[int]]

    @property
    def expected_tokens_per_second(self) -> list[float]:
        return [a / s for a, s in zip(self.expected_accept_length, self.step_seconds, strict=True)]

    @property
    def chosen_step_seconds(self) -> float:
        """The chosen tree's measured step time."""
        return self.step_seconds[self.sizes.index(self.chosen_size)]

    @property
    def chosen_tokens_per_second(self) -> float:
        """The chosen tree's expected tokens per second."""
        return self.expected_tokens_per_second[self.sizes.index(self.chosen_size)]

    def to_json(self) -> dict:
        return asdict(self) | {"expected_tokens_per_second": self.expected_tokens_per_second}

    @classmethod
    def _from_json(cls, data: dict, where: str) -> TreeSearch:
        def required(key: str, kind: str):
            if key not in data:
                raise _Broken(f"{where}{key} is missing")
            return _get(data, key, kind, where)

        search = cls(
            [_check(n, "integer", f"{where}sizes") for n in required("sizes", "list")],
            [_check(n, "number", f"{where}expected_accept_length") for n in required("expected_accept_length", "list")],
            [_check(n, "number", f"{where}step_seconds") for n in required("step_seconds", "list")],
            required("plain_step_seconds", "number"),
            required("chosen_size", "integer"),
            [_check(p, "list", f"{where}choices") for p in required("choices", "list")],
        )
        if not len(search.sizes) == len(search.expected_accept_length) == len(search.step_seconds):
            raise _Broken(f"{where}sizes, expected_accept_length and step_seconds differ in length")
        return search


@dataclass
class Acceptance:
    """Accepted tokens per decoding step (the base model's own token included) over the timed prompts."""

    mean_accept_length: float | None = None
    expected_accept_length: float | None = None  # the tree's value from the heads' rank accuracies
    steps: int = 0
    histogram: dict[int, int] = field(default_factory=dict)  # accepted length -> steps

    def to_json(self) -> dict:
        return asdict(self) | {"histogram": {str(k): n for k, n in sorted(self.histogram.items())}}

    @classmethod
    def _from_json(cls, data: dict, where: str) -> Acceptance:
        histogram = {}
        for length, steps in _table(data, "histogram", "integer", where).items():
            if not length.isdigit():
                raise _Broken(f"{where}histogram has key {length!r}, expected an accepted length")
            histogram[int(length)] = steps
        return cls(
            _get(data, "mean_accept_length", "number", where),
            _get(data, "expected_accept_length", "number", where),
            _get(data, "steps", "integer", where, 0),
            histogram,
        )


@dataclass
class ChainAcceptance:
    """Greedy acceptance of a chain of `draft_tokens` per step, as the engines draft (vLLM's
    num_speculative_tokens; SGLang with topk 1): verification steps that had drafts, and the draft tokens accepted
    at each position, counted as vLLM counts them (a step's whole accepted chain, even past max_tokens or an end
    of sequence)."""

    measured_by: str  # "medusa-forge" (our decoder, the same chain) or the engine, e.g. "vLLM 0.32.0"
    draft_tokens: int
    steps: int
    accepted_per_position: list[int]
    outputs_equal: bool | None = None  # an engine's replies equal to our decoder's, token for token

    @property
    def mean_accept_length(self) -> float:
        """Tokens per verification step, the base model's own included (what the engine's users get)."""
        return 1 + sum(self.accepted_per_position) / self.steps if self.steps else 1.0

    @property
    def acceptance_rates(self) -> list[float]:
        """Per position, the share of steps whose draft was accepted up to it (vLLM's per-position rate)."""
        return [n / self.steps if self.steps else 0.0 for n in self.accepted_per_position]

    def to_json(self) -> dict:
        return asdict(self) | {
            "mean_accept_length": self.mean_accept_length,
            "acceptance_rates": self.acceptance_rates,
        }

    @classmethod
    def _from_json(cls, data: dict, where: str) -> ChainAcceptance:
        return cls(
            _check(data.get("measured_by"), "text", f"{where}measured_by"),
            _check(data.get("draft_tokens"), "integer", f"{where}draft_tokens"),
            _check(data.get("steps"), "integer", f"{where}steps"),
            _list_of(data, "accepted_per_position", "integer", where),
            _get(data, "outputs_equal", "flag", where),
        )


DRAFT_RUN = "draft"  # the speculative decoder's run in SpeedComparison's tables, whatever the draft's kind
# Names in reports written before the decoding dtype was chosen by measurement (all float32); "medusa" here is the
# old run name in those files (data being read), not a switch on the draft's kind.
_OLD_RUN_NAMES = {"medusa": DRAFT_RUN, "greedy": "greedy_float32"}


def greedy_run(dtype: str) -> str:
    """The name of plain greedy decoding's run in `dtype` in SpeedComparison's tables."""
    return f"greedy_{dtype}"


@dataclass
class SpeedComparison:
    """Plain greedy in each dtype measured ("greedy_float32", "greedy_bfloat16"), the draft ("draft", in `dtype`)
    and prompt lookup ("prompt_lookup", in `dtype`), run back to back per prompt. Speed-ups are over `reference`,
    the fastest plain greedy run; exactness is the draft's output against plain greedy in its own dtype."""

    prompts: int | None = None
    max_new_tokens: int | None = None
    tokens: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    tokens_per_second: dict[str, float] = field(default_factory=dict)
    speedup: dict[str, float] = field(default_factory=dict)  # tokens/s over the reference's
    median_per_prompt_speedup: float | None = None  # the draft's, over the reference
    outputs_equal: bool | None = None  # the draft's output equal to plain greedy's in its dtype on every prompt
    mismatched_prompts: list[int] = field(default_factory=list)
    reference: str = greedy_run("float32")
    dtype: str = "float32"  # the draft's (and prompt lookup's) decoding dtype
    # Per mismatched prompt (same order): the index of the first new token that differs from greedy in `dtype`.
    first_divergence: list[int] = field(default_factory=list)
    # Share of greedy's tokens (in `dtype`; in float32) that the draft reproduced before its first divergence.
    agreement: float | None = None
    agreement_float32: float | None = None

    @property
    def draft_speedup(self) -> float | None:
        return self.speedup.get(DRAFT_RUN)

    @classmethod
    def _from_json(cls, data: dict, where: str) -> SpeedComparison:
        def table(key: str, kind: str) -> dict:
            return {_OLD_RUN_NAMES.get(k, k): v for k, v in _table(data, key, kind, where).items()}

        return cls(
            _get(data, "prompts", "integer", where),
            _get(data, "max_new_tokens", "integer", where),
            table("tokens", "integer"),
            table("seconds", "number"),
            table("tokens_per_second", "number"),
            table("speedup", "number"),
            _get(data, "median_per_prompt_speedup", "number", where),
            _get(data, "outputs_equal", "flag", where),
            _list_of(data, "mismatched_prompts", "integer", where),
            _get(data, "reference", "text", where, greedy_run("float32")),
            _get(data, "dtype", "text", where, "float32"),
            _list_of(data, "first_divergence", "integer", where),
            _get(data, "agreement", "number", where),
            _get(data, "agreement_float32", "number", where),
        )


@dataclass
class EvalReport:
    """What `medusa-forge eval` measured: eval.json."""

    draft: str | None = None  # the draft folder (eval.json before drafts of other kinds: `heads`)
    base_model: str | None = None
    data: str | None = None
    machine: str | None = None
    accuracy: list[PredictorAccuracy] = field(default_factory=list)  # on the held-out reference answers
    accuracy_own_answers: list[PredictorAccuracy] = field(default_factory=list)  # on the base's greedy answers
    tree_accuracy_source: str | None = None  # which of the two the tree was built from
    calibration_prompts: int = 0
    tree: list[list[int]] = field(default_factory=list)  # the choices decoded with
    draft_vocab: int | None = None
    tree_search: TreeSearch | None = None  # None when the tree was given (--tree FILE or default-N)
    acceptance: Acceptance | None = None
    speed: SpeedComparison | None = None
    draft_kind: str = "medusa"  # the registry name of the draft's kind
    dtype: str = "float32"  # the decoding dtype of the tree search and the draft's speed run
    # With --dtype auto: the tree search in each other dtype measured (the chosen one is `tree_search`).
    other_dtype_searches: dict[str, TreeSearch] = field(default_factory=dict)
    # The chain the engines' printed commands draft, measured by our decoder and (eval --engine) by the engine.
    chains: list[ChainAcceptance] = field(default_factory=list)
    # For a kind whose engines may draft chains of several lengths: each length (a chain of n nodes) timed in
    # `dtype` and the one chosen, as `tree_search` for trees; None when the chain is fixed or was given.
    chain_search: TreeSearch | None = None

    def to_json(self) -> dict:
        data = asdict(self)
        data["chains"] = [chain.to_json() for chain in self.chains]
        data["chain_search"] = self.chain_search.to_json() if self.chain_search else None
        data["tree_search"] = self.tree_search.to_json() if self.tree_search else None
        data["acceptance"] = self.acceptance.to_json() if self.acceptance else None
        data["other_dtype_searches"] = {d: search.to_json() for d, search in self.other_dtype_searches.items()}
        return data

    def save(self, folder: Path) -> Path:
        path = Path(folder) / EVAL_REPORT_FILE
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: Path) -> EvalReport:
        """The report at `path`; UserError naming the file when it cannot be read or is broken."""
        return cls.from_json(_read(path), path)

    @classmethod
    def from_json(cls, data: Any, source: Path) -> EvalReport:
        return _parse(cls, data, source, "medusa-forge eval")

    @classmethod
    def _from_json(cls, data: dict) -> EvalReport:
        def section(key: str, section_cls):
            value = _get(data, key, "object", "")
            return None if value is None else section_cls._from_json(value, f"{key}.")

        def rows(key: str) -> list[PredictorAccuracy]:
            return [
                PredictorAccuracy._from_json(row, f"{key}[{i}].")
                for i, row in enumerate(_list_of(data, key, "object", ""))
            ]

        acceptance, speed = section("acceptance", Acceptance), section("speed", SpeedComparison)
        # A report holding only the headline numbers at the top level.
        flat_accept = _get(data, "mean_accepted_length", "number", "", _get(data, "mean_accept_length", "number", ""))
        if acceptance is None and flat_accept is not None:
            acceptance = Acceptance(mean_accept_length=flat_accept)
        if speed is None and data.get("speedup") is not None:
            speed = SpeedComparison(speedup={DRAFT_RUN: _get(data, "speedup", "number", "")})
        return cls(
            _get(data, "draft", "text", "", _get(data, "heads", "text", "")),  # `heads`: reports before drafts
            _get(data, "base_model", "text", ""),
            _get(data, "data", "text", ""),
            _get(data, "machine", "text", ""),
            rows("accuracy"),
            rows("accuracy_own_answers"),
            _get(data, "tree_accuracy_source", "text", ""),
            _get(data, "calibration_prompts", "integer", "", 0),
            [_check(path, "list", f"tree[{i}]") for i, path in enumerate(_list_of(data, "tree", "list", ""))],
            _get(data, "draft_vocab", "integer", ""),
            section("tree_search", TreeSearch),
            acceptance,
            speed,
            # Reports from before EAGLE-3 drafts hold Medusa heads: what the field would have said (read, no switch).
            _get(data, "draft_kind", "text", "", "medusa"),
            _get(data, "dtype", "text", "", "float32"),
            {
                dtype: TreeSearch._from_json(_check(search, "object", f"other_dtype_searches.{dtype}"), f"{dtype}.")
                for dtype, search in _get(data, "other_dtype_searches", "object", "", {}).items()
            },
            [
                ChainAcceptance._from_json(chain, f"chains[{i}].")
                for i, chain in enumerate(_list_of(data, "chains", "object", ""))
            ],
            section("chain_search", TreeSearch),
        )


# --- training_metrics.json ----------------------------------------------------------------------------------------


@dataclass
class TrainingMetrics:
    """What `medusa-forge train` logged: training_metrics.json."""

    final: dict[str, float] = field(default_factory=dict)  # the Trainer's last train (+ held-out eval_*) metrics
    epoch_seconds: list[float] = field(default_factory=list)
    train: dict[int, list[dict[str, float]]] = field(default_factory=dict)  # head -> [{step, loss, top1, ...}]
    eval: dict[int, list[dict[str, float]]] = field(default_factory=dict)  # the same on held-out data

    def held_out_draft_metrics(self, name: str) -> dict[str, float]:
        """The final held-out metrics of the draft (`name`: its kind's metric name) without their prefix:
        {"medusa0_top1": ..., ...}."""
        return {k.removeprefix("eval_"): v for k, v in self.final.items() if k.startswith(f"eval_{name}")}

    def to_json(self) -> dict:
        history = {key: {str(head): rows for head, rows in getattr(self, key).items()} for key in ("train", "eval")}
        return asdict(self) | history

    def save(self, folder: Path) -> Path:
        path = Path(folder) / TRAINING_METRICS_FILE
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: Path) -> TrainingMetrics:
        """The metrics at `path`; UserError naming the file when it cannot be read or is broken."""
        return cls.from_json(_read(path), path)

    @classmethod
    def from_json(cls, data: Any, source: Path) -> TrainingMetrics:
        return _parse(cls, data, source, "medusa-forge train")

    @classmethod
    def _from_json(cls, data: dict) -> TrainingMetrics:
        def history(key: str) -> dict[int, list[dict[str, float]]]:
            heads = {}
            for head, rows in _table(data, key, "list", "").items():
                if not head.isdigit():
                    raise _Broken(f"{key} has key {head!r}, expected a head index")
                heads[int(head)] = [_mapping(row, "number", f"{key}.{head}[{i}]") for i, row in enumerate(rows)]
            return heads

        return cls(
            _table(data, "final", "number", ""),
            _list_of(data, "epoch_seconds", "number", ""),
            history("train"),
            history("eval"),
        )
