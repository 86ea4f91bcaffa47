"""The runner: runs the stages in order in one work folder, skipping, resuming or starting each over.

A stage is skipped when its fingerprint (a hash of its config section and of the content of its input files)
matches the last finished run and its recorded outputs still hash to what was written. A stage that was started
and not finished, or whose only change is a larger budget (more conversations, steps or epochs), is resumed
natively (distill skips conversations already written, train restarts from its last checkpoint-*); any other
change starts that stage over. State: WORKDIR/pipeline-state.json; every stage event: WORKDIR/pipeline-log.jsonl.
"""

from __future__ import annotations

import datetime
import json
import sys
import time
import traceback
from pathlib import Path

import yaml

from medusa_forge.errors import UserError
from medusa_forge.outputs import OutputLock, check_writable_folder, removed_if_failed_empty
from medusa_forge.pipeline.configuration import PipelineConfig, config_to_dict
from medusa_forge.pipeline.context import Context
from medusa_forge.pipeline.eta import estimate_seconds, eta_text, format_seconds, stage_plan
from medusa_forge.pipeline.fingerprints import StageFingerprint, outputs_digest, outputs_verify
from medusa_forge.pipeline.stages import PIPELINE, STAGES, Stage, StageFailed

STATE_FILE = "pipeline-state.json"
LOG_FILE = "pipeline-log.jsonl"
CONFIG_COPY = "pipeline.yaml"


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _log(workdir: Path, stage: str, event: str, /, **details: object) -> None:
    """One line of the log; positional-only names leave every key free for `details` (the start logs workdir)."""
    entry = {"time": _now(), "stage": stage, "event": event, **details}
    with (workdir / LOG_FILE).open("a") as handle:
        handle.write(json.dumps(entry) + "\n")


def _save_state(workdir: Path, state: dict) -> None:
    """Written whole or not at all (a temporary file renamed over it): a run killed while saving leaves the last
    state."""
    path = workdir / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(path)


def _grows(old: dict, new: dict) -> bool:
    """Budget keys may only stay or grow for a resume (None = the command's default, treated as unlimited)."""
    for key in set(old) | set(new):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if a is None or b is None:  # unlimited on one side only: cannot compare budgets
            return b is None and key != "max_steps"
        try:
            if float(b) < float(a):
                return False
        except (TypeError, ValueError):
            return False
    return True


def run_pipeline(
    config: PipelineConfig,
    workdir: str | Path,
    resume_command: str,
    force_from: str | None = None,
    kind_note: str | None = None,
) -> Context:
    """Run every stage in order (skipping finished ones); returns the context with the final state.
    kind_note: why the draft is of its kind (the quickstart's choice), for the report.

    The work folder is checked and locked before any stage looks at it: a second run on the same folder (another
    setting would make it clear the first one's draft and checkpoints) is refused, naming the run that holds it."""
    workdir = Path(workdir)
    with removed_if_failed_empty(workdir):
        check_writable_folder(workdir, f"--workdir {workdir}")
        with OutputLock(workdir, "pipeline", "--workdir", inside=True, holder=resume_command):
            return _run_stages(config, workdir, resume_command, force_from, kind_note)


def _load_state(workdir: Path) -> dict:
    """pipeline-state.json as the last run left it ({} for a new work folder); a damaged one (a hand edit: the file
    itself is replaced whole) is an error that says how to start over."""
    path = workdir / STATE_FILE
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        state = err
    if not isinstance(state, dict) or not isinstance(state.get("stages", {}), dict):
        why = f" ({state})" if isinstance(state, Exception) else ""
        raise UserError(
            f"{path} is damaged{why}, so which stages finished is unknown: delete it to start over (every stage "
            "then runs again from the start), or pass another --workdir"
        )
    return state


def _rerun(stage: Stage, record: dict | None, fingerprint: StageFingerprint, forced: set[str], workdir: Path,
           header: str) -> tuple[bool, str | None] | None:  # fmt: skip
    """Whether `stage` runs again: None when its last run is up to date (said and logged here), else (whether it
    resumes its last run, the reason it reruns when not just its inputs changed)."""
    problem = None
    if record and record.get("status") == "done" and record.get("fingerprint") == fingerprint.digest:
        problem = outputs_verify(record.get("outputs", {}), workdir)
        if problem is None and stage.name not in forced:
            _log(workdir, stage.name, "skip", fingerprint=fingerprint.digest)
            print(f"pipeline {header}: up to date, skipped ({format_seconds(record['seconds'])} "
                  "when it ran)", file=sys.stderr)  # fmt: skip
            return None
    resumable = (
        record is not None
        and record.get("resume_key") == fingerprint.resume_key
        and _grows(record.get("extend", {}), fingerprint.extend)
        and problem is None
        and stage.name not in forced
    )
    return resumable, problem or ("forced by --from" if stage.name in forced else None)


def _run_one(stage: Stage, ctx: Context, state: dict, workdir: Path, resumable: bool, previous_seconds: float) -> float:
    """Run `stage` and record its outcome in the state file (time so far on an interrupt, failed, or done with
    its outputs' digests); the seconds it ran now. Any failure becomes a StageFailed naming the stage."""
    stage_start = time.perf_counter()
    try:
        result = stage.run(ctx, not resumable)
    except KeyboardInterrupt:
        state["stages"][stage.name]["seconds"] = previous_seconds + time.perf_counter() - stage_start
        _save_state(workdir, state)
        _log(workdir, stage.name, "interrupted")
        raise
    except (StageFailed, UserError, Exception) as err:
        state["stages"][stage.name].update(
            status="failed", seconds=previous_seconds + time.perf_counter() - stage_start
        )
        _save_state(workdir, state)
        reason = err.reason if isinstance(err, StageFailed) else str(err) or type(err).__name__
        _log(workdir, stage.name, "fail", reason=reason)
        if not isinstance(err, StageFailed | UserError):
            traceback.print_exc()
        raise StageFailed(stage.name, reason) from err
    seconds = time.perf_counter() - stage_start
    state["stages"][stage.name].update(
        status="done",
        seconds=previous_seconds + seconds,
        finished=_now(),
        outputs=outputs_digest(result.outputs, workdir),
        details=result.details,
    )
    # The report's fingerprint holds the other stages' times: recorded here, they are final by its turn.
    _save_state(workdir, state)
    _log(workdir, stage.name, "done", seconds=round(seconds, 2))
    return seconds


def _run_stages(
    config: PipelineConfig, workdir: Path, resume_command: str, force_from: str | None, kind_note: str | None
) -> Context:
    state = _load_state(workdir)
    state.setdefault("stages", {})
    ctx = Context(config, workdir, resume_command, state, kind_note)
    (workdir / CONFIG_COPY).write_text(
        "# the effective configuration of the last run (file + --set overrides)\n"
        + yaml.safe_dump(config_to_dict(config), sort_keys=False)
    )
    if force_from is not None and force_from not in STAGES:
        raise UserError(f"--from {force_from}: choose one of {', '.join(STAGES)}")
    forced = set(STAGES[STAGES.index(force_from) :]) if force_from else set()
    started = time.perf_counter()
    speed: list[tuple[float, float]] = []  # (estimated, actual) of stages run now: corrects later estimates
    total = len(PIPELINE)
    _log(workdir, "pipeline", "start", workdir=str(workdir))
    for index, stage in enumerate(PIPELINE, 1):
        header = f"[{index}/{total}] {stage.name}"
        try:
            fingerprint = stage.fingerprint(ctx)
        except UserError as err:
            raise StageFailed(stage.name, str(err)) from None
        record = state["stages"].get(stage.name)
        if fingerprint is None:
            state["stages"].pop(stage.name, None)
            _log(workdir, stage.name, "not-configured")
            print(f"pipeline {header}: not configured, nothing to do", file=sys.stderr)
            continue
        rerun = _rerun(stage, record, fingerprint, forced, workdir, header)
        if rerun is None:
            continue
        resumable, reason = rerun
        previous_seconds = record.get("seconds", 0.0) if resumable and record else 0.0
        event = "resume" if resumable else "start"
        _log(workdir, stage.name, event, fingerprint=fingerprint.digest, **({"reason": reason} if reason else {}))
        state["stages"][stage.name] = {
            "status": "running",
            "fingerprint": fingerprint.digest,
            "resume_key": fingerprint.resume_key,
            "extend": fingerprint.extend,
            "seconds": previous_seconds,
            "started": _now(),
        }
        _save_state(workdir, state)
        verb = "resuming" if resumable else "running"
        eta = eta_text(config, [later.name for later in PIPELINE[index - 1 :]], speed)
        elapsed = format_seconds(time.perf_counter() - started)
        print(f"\npipeline {header}: {verb}: {stage.title}; elapsed {elapsed}; {eta}", file=sys.stderr)
        plan = stage_plan(config, stage.name)
        if plan:
            print(f"pipeline {header}: {plan} (estimated from the data's size)", file=sys.stderr)
        seconds = _run_one(stage, ctx, state, workdir, resumable, previous_seconds)
        estimate = estimate_seconds(config, stage.name)
        if estimate:
            speed.append((estimate, seconds))
        print(f"pipeline {header}: done in {format_seconds(seconds)}", file=sys.stderr)
    _log(workdir, "pipeline", "done", seconds=round(time.perf_counter() - started, 2))
    return ctx
