"""push: against a stand-in Hub (a real HTTP server on 127.0.0.1 implementing the endpoints huggingface_hub 2.x
calls for whoami, create_repo, create_branch and upload_folder, read from huggingface_hub/hf_api.py,
_commit_api.py and lfs.py), check the request sequence, the uploaded files and their bytes, the model card, and
the failure paths (no token, rejected token, unreachable Hub, dry run).

Only the Hub is replaced: huggingface_hub itself runs unmodified over HTTP. Xet storage is turned off
(HF_HUB_DISABLE_XET), so large files take the plain LFS path (batch + PUT) this server implements."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import pytest
import torch
from safetensors.torch import load_file

from medusa_forge.cli import main
from medusa_forge.drafts.card import CARD_MARKER
from medusa_forge.drafts.medusa_heads import MedusaHeads
from medusa_forge.model_card import write_model_card
from medusa_forge.modeling import load_base_model

TOKEN = "hf_standin_token"


class StandInHub:
    """Records every request; stores committed files per repo and revision."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self.bodies: list[object] = []
        self.repos: dict[str, dict] = {}  # repo -> {"private": bool, "branches": {name: {path: bytes}}}
        self.lfs: dict[str, bytes] = {}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def _reply(self, status: int, payload: object = None) -> None:
                body = json.dumps(payload if payload is not None else {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_GET(self) -> None:  # noqa: N802
                hub.handle(self, "GET", b"")

            def do_POST(self) -> None:  # noqa: N802
                hub.handle(self, "POST", self._body())

            def do_PUT(self) -> None:  # noqa: N802
                hub.handle(self, "PUT", self._body())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def handle(self, request: BaseHTTPRequestHandler, method: str, body: bytes) -> None:
        path = unquote(urlparse(request.path).path)
        self.requests.append((method, path))
        if request.headers.get("Authorization") != f"Bearer {TOKEN}" and not path.startswith("/lfs-upload/"):
            return request._reply(401, {"error": "Invalid credentials in Authorization header"})
        parts = path.strip("/").split("/")
        if (method, path) == ("GET", "/api/whoami-v2"):
            return request._reply(200, {"type": "user", "name": "alice", "auth": {"accessToken": {"role": "write"}}})
        if (method, path) == ("POST", "/api/repos/create"):
            payload = json.loads(body)
            self.bodies.append(payload)
            repo = f"{payload['organization']}/{payload['name']}"
            if payload["organization"] != "alice":
                return request._reply(
                    403, {"error": "You don't have the rights to create a model under this namespace"}
                )
            if repo in self.repos:
                return request._reply(
                    409, {"error": "You already created this model repo", "url": f"{self.url}/{repo}"}
                )
            self.repos[repo] = {"private": payload.get("visibility") == "private", "branches": {"main": {}}}
            return request._reply(200, {"url": f"{self.url}/{repo}"})
        if method == "POST" and path == "/api/validate-yaml":
            self.bodies.append(json.loads(body))
            return request._reply(200, {"errors": [], "warnings": []})
        if method == "POST" and parts[:2] == ["api", "models"] and parts[4] == "branch":
            repo = "/".join(parts[2:4])
            self.repos[repo]["branches"].setdefault(parts[5], dict(self.repos[repo]["branches"]["main"]))
            return request._reply(200, {})
        if method == "POST" and parts[:2] == ["api", "models"] and parts[4] == "preupload":
            files = json.loads(body)["files"]
            self.bodies.append(files)
            modes = [
                {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular",
                 "shouldIgnore": False, "oid": None}
                for f in files
            ]  # fmt: skip
            return request._reply(200, {"files": modes})
        if method == "POST" and path.endswith(".git/info/lfs/objects/batch"):
            objects = json.loads(body)["objects"]
            actions = [
                {
                    "oid": o["oid"],
                    "size": o["size"],
                    "actions": {"upload": {"href": f"{self.url}/lfs-upload/{o['oid']}"}},
                }
                for o in objects
            ]
            return request._reply(200, {"transfer": "basic", "objects": actions})
        if method == "PUT" and parts[0] == "lfs-upload":
            if hashlib.sha256(body).hexdigest() != parts[1]:
                return request._reply(400, {"error": "sha256 mismatch"})
            self.lfs[parts[1]] = body
            return request._reply(200, {})
        if method == "POST" and parts[:2] == ["api", "models"] and parts[4] == "commit":
            repo, revision = "/".join(parts[2:4]), parts[5]
            branch = self.repos[repo]["branches"][revision]
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            self.bodies.append(lines)
            for line in lines:
                if line["key"] == "file":
                    branch[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
                elif line["key"] == "lfsFile":
                    branch[line["value"]["path"]] = self.lfs[line["value"]["oid"]]
            return request._reply(200, {"commitUrl": f"{self.url}/{repo}/commit/{'a' * 40}", "commitOid": "a" * 40})
        return request._reply(404, {"error": f"stand-in Hub does not know {method} {path}"})

    def __enter__(self) -> StandInHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub(monkeypatch, tmp_path):
    import huggingface_hub.constants as constants

    with StandInHub() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
        yield server


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory, tiny_model_dir):
    """A heads folder as `medusa-forge train` leaves it: heads, tokenizer, card + inputs, metrics, eval report,
    and things that must not be uploaded (a Trainer checkpoint, the pickled TrainingArguments)."""
    folder = tmp_path_factory.mktemp("trained")
    base = load_base_model(str(tiny_model_dir))
    heads = MedusaHeads.for_base_model(base, 3, 1, str(tiny_model_dir))
    heads.save(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder / name).write_bytes((tiny_model_dir / name).read_bytes())
    metrics = {"medusa0_top1": 0.61, "medusa0_top5": 0.83, "medusa1_top1": 0.42, "medusa2_top1": 0.30}
    facts = {"Training data": "`sharegpt` (64 conversations)"}
    write_model_card(folder, heads.config, "acme/tiny-llama", facts, metrics)
    (folder / "eval").mkdir()
    accuracy = [{"name": "base", "top1": 0.7, "top5": 0.9}, {"name": "head 0", "top1": 0.6, "top5": 0.8}]
    speed = {"speedup": {"greedy": 1.0, "medusa": 1.84}, "tokens_per_second": {"greedy": 8.6, "medusa": 15.8}}
    report = {"acceptance": {"mean_accept_length": 2.37}, "speed": speed | {"outputs_equal": True},
              "machine": "2-core CPU", "accuracy": accuracy}  # fmt: skip
    (folder / "eval" / "eval.json").write_text(json.dumps(report))
    (folder / "checkpoint-10").mkdir()
    (folder / "checkpoint-10" / "optimizer.pt").write_bytes(b"x" * 10)
    (folder / "training_args.bin").write_bytes(b"pickle")
    return folder


EXPECTED_FILES = {
    "README.md", "config.json", "medusa_lm_head.safetensors", "model_card.json", "tokenizer.json",
    "tokenizer_config.json", "chat_template.jinja", "eval/eval.json",
}  # fmt: skip


def test_push_uploads_the_folder_in_the_hubs_request_sequence(hub, trained_folder, tiny_model_dir, capsys):
    assert main(["push", "--folder", str(trained_folder), "--repo", "alice/tiny-medusa", "--private"]) == 0
    out = capsys.readouterr().out
    assert "uploaded 8 files to alice/tiny-medusa" in out and "commit: " in out
    sequence = [(m, p) for m, p in hub.requests if not p.startswith("/lfs-upload/")]
    assert sequence == [
        ("GET", "/api/whoami-v2"),
        ("POST", "/api/repos/create"),
        ("POST", "/api/validate-yaml"),  # upload_folder checks the card's YAML header, then create_commit again
        ("POST", "/api/validate-yaml"),
        ("POST", "/api/models/alice/tiny-medusa/preupload/main"),
        ("POST", "/alice/tiny-medusa.git/info/lfs/objects/batch"),
        ("POST", "/api/models/alice/tiny-medusa/commit/main"),
    ]
    assert [m for m, p in hub.requests if p.startswith("/lfs-upload/")] == ["PUT"]  # the one .safetensors
    assert hub.repos["alice/tiny-medusa"]["private"] is True
    stored = hub.repos["alice/tiny-medusa"]["branches"]["main"]
    assert set(stored) == EXPECTED_FILES
    for name in EXPECTED_FILES - {"README.md", "config.json", "tokenizer_config.json"}:
        assert stored[name] == (trained_folder / name).read_bytes(), name
    # The folder's tokenizer_config.json was written by transformers 5 alone (as before this project wrote it for
    # both): the Hub copy is the one TGI's transformers 4.x reads, the local file is left as it was.
    local_tokenizer = json.loads((trained_folder / "tokenizer_config.json").read_text())
    assert local_tokenizer["tokenizer_class"] == "TokenizersBackend" and "chat_template" not in local_tokenizer
    assert json.loads(stored["tokenizer_config.json"]) == local_tokenizer | {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": (tiny_model_dir / "chat_template.jinja").read_text(),
    }
    # config.json names the base by the Hub id training recorded; the local copy keeps the local folder.
    local = json.loads((trained_folder / "config.json").read_text())
    assert json.loads(stored["config.json"]) == local | {"base_model_name_or_path": "acme/tiny-llama"}
    card = stored["README.md"].decode()
    assert card == (trained_folder / "README.md").read_text() and CARD_MARKER in card
    assert "base_model: acme/tiny-llama" in card and "library_name: medusa-forge" in card
    assert "2.37" in card and "1.84x" in card and "0.610" in card and "`sharegpt` (64 conversations)" in card
    assert "--model-id alice/tiny-medusa --speculate 3" in card and '"method": "medusa"' in card


def test_push_to_a_revision_creates_the_branch_and_commits_there(hub, trained_folder):
    assert main(["push", "--folder", str(trained_folder), "--repo", "alice/rev"]) == 0
    # Second push: the repo exists (409 from create), the branch is created from main.
    assert main(["push", "--folder", str(trained_folder), "--repo", "alice/rev", "--revision", "v1"]) == 0
    paths = [p for _, p in hub.requests]
    assert "/api/models/alice/rev/branch/v1" in paths and "/api/models/alice/rev/commit/v1" in paths
    assert set(hub.repos["alice/rev"]["branches"]["v1"]) == EXPECTED_FILES
    assert hub.repos["alice/rev"]["private"] is False


def test_dry_run_lists_the_files_and_sends_nothing(hub, trained_folder, capsys):
    readme = (trained_folder / "README.md").read_text()
    assert main(["push", "--folder", str(trained_folder), "--repo", "alice/x", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run: would upload 8 files to alice/x" in out and "note: token found" in out
    for name in EXPECTED_FILES:
        assert f"  {name}  (" in out
    assert "checkpoint-10" not in out and "training_args.bin" not in out
    assert hub.requests == [] and (trained_folder / "README.md").read_text() == readme


def test_missing_token_is_a_clear_error(hub, trained_folder, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN")
    assert main(["push", "--folder", str(trained_folder), "--repo", "alice/x"]) == 2
    err = capsys.readouterr().err
    assert "no Hugging Face token" in err and "HF_TOKEN" in err and "hf auth login" in err
    assert hub.requests == []


def test_rejected_token_is_a_clear_error(hub, trained_folder, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    assert main(["push", "--folder", str(trained_folder), "--repo", "alice/x"]) == 2
    assert "rejected the token (401)" in capsys.readouterr().err
    assert hub.requests == [("GET", "/api/whoami-v2")]


def test_namespace_without_write_access_is_a_clear_error(hub, trained_folder, capsys):
    assert main(["push", "--folder", str(trained_folder), "--repo", "bob/x"]) == 2
    assert "the token may not write to bob/x (403)" in capsys.readouterr().err


def test_unreachable_hub_is_a_clear_error(trained_folder, monkeypatch, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert main(["push", "--folder", str(trained_folder), "--repo", "alice/x"]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach the Hub at http://127.0.0.1:{port}" in err


def test_invalid_folder_is_refused_before_any_request(hub, trained_folder, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((trained_folder / "config.json").read_text())
    state = load_file(str(trained_folder / "medusa_lm_head.safetensors"))
    del state["2.1.weight"]
    from safetensors.torch import save_file

    save_file(state, str(bad / "medusa_lm_head.safetensors"))
    assert main(["push", "--folder", str(bad), "--repo", "alice/x"]) == 2
    assert "only heads [0, 1] have a vocabulary projection" in capsys.readouterr().err
    assert hub.requests == []


# A local base needs its Hub id: test_every_kind.py, for every kind.


def test_hand_edited_card_is_kept(hub, trained_folder, tmp_path):
    folder = tmp_path / "edited"
    folder.mkdir()
    for name in ("config.json", "medusa_lm_head.safetensors"):
        (folder / name).write_bytes((trained_folder / name).read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["base_model_name_or_path"] = "acme/tiny-llama"
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# My own words\n")
    assert main(["push", "--folder", str(folder), "--repo", "alice/edited"]) == 0
    assert hub.repos["alice/edited"]["branches"]["main"]["README.md"] == b"---\nlicense: mit\n---\n# My own words\n"


def test_env_endpoint_in_a_fresh_process(hub, trained_folder, tmp_path):
    """The user's path: HF_ENDPOINT / HF_TOKEN / HF_HUB_DISABLE_XET read by huggingface_hub at import."""
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1",
           "HF_HOME": str(tmp_path / "hf-home")}  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-m", "medusa_forge.cli", "push", "--folder", str(trained_folder), "--repo", "alice/cli"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert set(hub.repos["alice/cli"]["branches"]["main"]) == EXPECTED_FILES
    weights = hub.repos["alice/cli"]["branches"]["main"]["medusa_lm_head.safetensors"]
    assert (
        hashlib.sha256(weights).hexdigest()
        == hashlib.sha256((trained_folder / "medusa_lm_head.safetensors").read_bytes()).hexdigest()
    )


def test_vllm_export_is_pushed_with_a_vllm_card(hub, trained_folder, tmp_path):
    from medusa_forge.export import export_draft

    export_draft(trained_folder, "vllm", tmp_path / "vllm", base_model_id="acme/tiny-llama")
    assert main(["push", "--folder", str(tmp_path / "vllm"), "--repo", "alice/v"]) == 0
    stored = hub.repos["alice/v"]["branches"]["main"]
    assert set(stored) == {"README.md", "config.json", "model.safetensors", "model_card.json"}
    assert json.loads(stored["config.json"])["model_type"] == "medusa"
    card = stored["README.md"].decode()
    assert '"model": "alice/v"' in card and "vllm serve acme/tiny-llama" in card and "(vLLM layout)" in card
    assert "`sharegpt` (64 conversations)" in card  # export carried the training facts along


def test_other_layouts_are_sent_to_import_first(hub, trained_folder, tmp_path, capsys):
    folder = tmp_path / "orig"
    folder.mkdir()
    (folder / "config.json").write_text((trained_folder / "config.json").read_text())
    torch.save(load_file(str(trained_folder / "medusa_lm_head.safetensors")), folder / "medusa_lm_head.pt")
    assert main(["push", "--folder", str(folder), "--repo", "alice/x"]) == 2
    assert f"Convert first: medusa-forge import --from {folder}" in capsys.readouterr().err
    assert hub.requests == []
