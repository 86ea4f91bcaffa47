"""`medusa-forge push`: check a draft folder (its kind checks it: `DraftKind.check_for_push`), refresh its model
card, and upload it to the Hugging Face Hub (create-repo + upload-folder). `--dry-run` lists what would go up and
sends nothing.

A folder goes up whole, less Trainer checkpoints, logs and caches, unless its kind names its files (an EAGLE-3
draft does): then only those and what the card and medusa-forge read go up, since a Trainer run leaves checkpoints
and plots next to it that would otherwise sit in the repository, and engines read any extra weights file they find.

The token comes from HF_TOKEN or the local login (`hf auth login`); the endpoint from HF_ENDPOINT.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from medusa_forge.drafts import kind_of
from medusa_forge.drafts.card import CARD_INPUTS_NAME, README_NAME, hub_base_id
from medusa_forge.errors import UserError
from medusa_forge.formats.tree_file import TREE_FILE
from medusa_forge.model_card import refreshed_model_card
from medusa_forge.results import EVAL_REPORT_FILE, TRAINING_METRICS_FILE
from medusa_forge.tokenizer_files import TOKENIZER_CONFIG, TOKENIZER_FILES, portable_config

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Not for the Hub: Trainer checkpoints and logs, the pickled TrainingArguments, caches.
EXCLUDED_DIRS = ("checkpoint-", "runs", ".git", ".cache", "__pycache__")
EXCLUDED_FILES = ("training_args.bin", ".DS_Store")
# What a push of a kind that names its files uploads next to them, where present: the tokenizer, the card and what
# it is rendered from (its inputs, training metrics, eval report), and the tree medusa-forge's own decoder reads.
SIDECAR_UPLOADS = (
    *TOKENIZER_FILES,
    README_NAME,
    CARD_INPUTS_NAME,
    TRAINING_METRICS_FILE,
    TREE_FILE,
    EVAL_REPORT_FILE,
    f"eval/{EVAL_REPORT_FILE}",
)


@dataclass
class PushResult:
    files: list[str]
    card: str  # "refreshed", "written", "kept (edited by hand)"
    url: str | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class _Upload:
    """What a checked folder sends: its files, the bytes that replace some of them on the Hub, the new card (None:
    keep the folder's own), the notes for the user and the commit message."""

    files: list[str]
    overrides: dict[str, bytes]
    card: str | None
    notes: list[str]
    message: str


def files_to_upload(folder: Path) -> list[str]:
    """Relative paths of the files push uploads, sorted."""
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or path.is_symlink() and not path.resolve().is_file():
            continue
        if any(part.startswith(EXCLUDED_DIRS) for part in rel.parts[:-1]) or rel.name in EXCLUDED_FILES:
            continue
        files.append(rel.as_posix())
    return files


def _base_for_hub(
    folder: Path, config_name: str, config_base: str, base_model_id: str | None, notes: list[str], readers: str
) -> str | None:
    """The Hub id to write into config.json when it names a local folder (`readers` load the base from it)."""
    if base_model_id:
        return base_model_id
    if hub_base_id(config_base):
        return None
    try:
        recorded = json.loads((folder / CARD_INPUTS_NAME).read_text()).get("base_model_id")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if hub_base_id(recorded):
        notes.append(f"config.json named the local folder {config_base}; training recorded the Hub id {recorded}")
        return recorded
    raise UserError(
        f"{folder / config_name}: base_model_name_or_path is the local path {config_base!r}; {readers} load the base "
        "model from it. Pass --base-model-id HUB_ID (e.g. meta-llama/Llama-3.2-1B-Instruct) to name it on the Hub."
    )


def _is_network_error(err: BaseException) -> bool:
    """Connection refused, DNS failure, timeout: httpx (or the fork huggingface_hub ships) or the OS."""
    names = {cls.__name__ for cls in type(err).__mro__}
    return isinstance(err, OSError) or bool(names & {"TransportError", "NetworkError", "TimeoutException"})


def _hub_error(err: Exception, endpoint: str, repo: str) -> UserError:
    """A message that says what went wrong with the Hub and what to do."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(err, HfHubHTTPError) and err.response is not None:
        status = err.response.status_code
        if status == 401:
            return UserError(
                f"the Hub at {endpoint} rejected the token (401): it is invalid or expired. Create a token with "
                "write access at https://huggingface.co/settings/tokens and set HF_TOKEN or run `hf auth login`"
            )
        if status == 403:
            return UserError(
                f"the token may not write to {repo} (403): use a token with write access to that user or "
                "organisation, or push to your own namespace"
            )
        first = str(err).strip().splitlines()[0]
        return UserError(f"the Hub at {endpoint} answered {status} for {repo}: {first}")
    if _is_network_error(err):
        return UserError(
            f"cannot reach the Hub at {endpoint} ({type(err).__name__}: {err}); check the network or HF_ENDPOINT"
        )
    return UserError(f"upload to {repo} failed: {err}")


def _portable_tokenizer(folder: Path, overrides: dict[str, bytes], notes: list[str]) -> None:
    tokenizer_config = portable_config(folder)
    if tokenizer_config is not None:  # a folder trained before tokenizers were written for both versions
        overrides[TOKENIZER_CONFIG] = tokenizer_config
        notes.append(
            f"uploaded {TOKENIZER_CONFIG} is readable by TGI's transformers 4.x (the local file is left alone)"
        )


def _prepare(folder: Path, repo: str, base_model_id: str | None) -> _Upload:
    """The folder checked by its kind, the Hub id of its base in config.json, a tokenizer TGI's transformers 4.x
    reads, and its card refreshed."""
    kind = kind_of(folder)
    check = kind.check_for_push(folder)
    config, notes = check.config, check.notes
    local_base = config.base_model_name_or_path
    new_base = _base_for_hub(folder, kind.config_name, local_base, base_model_id, notes, check.readers)
    if new_base and new_base != local_base:
        notes.append(f"uploaded config.json names the base {new_base!r} (the local one keeps {local_base!r})")
        config.base_model_name_or_path = new_base
    overrides = {kind.config_name: _config_bytes(folder / kind.config_name, new_base)} if new_base else {}
    _portable_tokenizer(folder, overrides, notes)
    card = refreshed_model_card(folder, config, repo, new_base, **check.card_options)
    if check.uploads is None:
        files = files_to_upload(folder)
    else:
        files = sorted(name for name in (*check.uploads, *SIDECAR_UPLOADS) if (folder / name).is_file())
    return _Upload(files, overrides, card, notes, check.commit_message)


def push(
    folder: str | Path,
    repo: str,
    private: bool = False,
    revision: str | None = None,
    dry_run: bool = False,
    base_model_id: str | None = None,
) -> PushResult:
    """Validate the draft in `folder` (its kind checks it), refresh its card, then create `repo` (if needed) and
    upload the folder to it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--draft {folder}: no such folder (expected a draft folder written by `medusa-forge train`)")
    if not REPO_ID.match(repo):
        raise UserError(f"--repo {repo!r}: expected USER/NAME (or ORG/NAME), e.g. alice/zephyr-7b-medusa")
    # Validation first, before anything is written or sent.
    upload = _prepare(folder, repo, base_model_id)
    notes, card = upload.notes, upload.card
    readme_exists = (folder / README_NAME).is_file()
    card_state = "kept (edited by hand)" if card is None else "refreshed" if readme_exists else "written"
    files = upload.files
    if card is not None and README_NAME not in files:
        files = sorted([*files, README_NAME])
    from huggingface_hub import HfApi, get_token

    token = get_token()
    if dry_run:
        found = "found" if token else "NOT found: set HF_TOKEN or run `hf auth login` before pushing"
        notes.append(f"token {found}")
        return PushResult(files, card_state, None, notes)

    if not token:
        raise UserError(
            "no Hugging Face token: set HF_TOKEN=hf_... (a token with write access, from "
            "https://huggingface.co/settings/tokens) or run `hf auth login`, then push again"
        )
    if card is not None:
        (folder / README_NAME).write_text(card)
    endpoint = os.environ.get("HF_ENDPOINT") or None
    api = HfApi(endpoint=endpoint, token=token)
    # The Hub copy names the base by its Hub id; the local config keeps the local path so that local commands
    # keep working offline. Files are linked into a staging folder, not copied.
    with tempfile.TemporaryDirectory(prefix="medusa-forge-push-") as staging:
        _stage(folder, files, Path(staging), upload.overrides)
        try:
            api.whoami()
            api.create_repo(repo, private=private or None, exist_ok=True, repo_type="model")
            if revision and revision != "main":
                api.create_branch(repo, branch=revision, exist_ok=True)
            info = api.upload_folder(
                folder_path=staging,
                repo_id=repo,
                repo_type="model",
                revision=revision,
                allow_patterns=[glob.escape(f) for f in files],
                commit_message=upload.message,
            )
        except Exception as err:  # noqa: BLE001 - every Hub/network failure becomes one clear message
            from huggingface_hub.errors import HfHubHTTPError

            if isinstance(err, HfHubHTTPError | ValueError) or _is_network_error(err):
                raise _hub_error(err, api.endpoint, repo) from err
            raise
    return PushResult(files, card_state, str(getattr(info, "commit_url", info)), notes)


def _config_bytes(path: Path, base: str) -> bytes:
    raw = json.loads(path.read_text())
    raw["base_model_name_or_path"] = base
    return (json.dumps(raw, indent=2) + "\n").encode()


def _stage(folder: Path, files: list[str], staging: Path, overrides: dict[str, bytes]) -> None:
    """Mirror `files` under `staging`: hard links (symlinks across file systems), `overrides` written out."""
    for name in files:
        target = staging / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if name in overrides:
            target.write_bytes(overrides[name])
            continue
        try:
            os.link(folder / name, target)
        except OSError:
            target.symlink_to((folder / name).resolve())


@dataclass
class PushConfig:
    """Check a draft folder (of any kind), refresh its model card and upload it to the Hub."""

    draft: str = field(
        metadata={
            "help": "Draft folder written by `medusa-forge train` (or `import`), of any kind (detected).",
            "aliases": ["--folder"],  # push's first spelling, still accepted
        }
    )
    repo: str = field(metadata={"help": "Hub repository USER/NAME (created if missing)."})
    private: bool = field(default=False, metadata={"help": "Create the repository as private."})
    revision: str | None = field(
        default=None, metadata={"help": "Branch to push to (created if missing; default main)."}
    )
    dry_run: bool = field(default=False, metadata={"help": "List what would be uploaded; send nothing."})
    base_model_id: str | None = field(
        default=None,
        metadata={
            "help": "Hub id of the base model, for the uploaded config.json and the card's serve commands when the "
            "local config names a folder."
        },
    )


def run_push(config: PushConfig) -> int:
    result = push(config.draft, config.repo, config.private, config.revision, config.dry_run, config.base_model_id)
    for note in result.notes:
        print(f"note: {note}")
    target = f"{config.repo}" + (f"@{config.revision}" if config.revision else "")
    if config.dry_run:
        print(f"dry run: would upload {len(result.files)} files to {target} (model card: {result.card}):")
    else:
        print(f"uploaded {len(result.files)} files to {target} (model card: {result.card}):")
    for name in result.files:
        size = (Path(config.draft) / name).stat().st_size if (Path(config.draft) / name).exists() else 0
        print(f"  {name}  ({size:,} bytes)")
    if result.url:
        print(f"commit: {result.url}")
    return 0
