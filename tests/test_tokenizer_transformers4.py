"""Every tokenizer folder we write loads under the transformers that TGI's last release pins (4.51.3) and gives
the same chat text, token ids and special tokens as under transformers 5.

TGI's router loads the tokenizer of `--model-id` with Python `AutoTokenizer.from_pretrained` under that
transformers (router/src/server.rs, py_resolve_tokenizer; a failure falls back to the base model's tokenizer,
then stops with "We cannot load a tokenizer"), and reads the chat template from tokenizer_config.json
(HubTokenizerConfig). So the check is run with that very package, in a side environment (tokenizers only, no
torch) made once under .venv-transformers4 and reused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
from conftest import CHATML, build_tokenizer, install_once, write_conversations
from tokenizer_probe import probe

from medusa_forge.drafts.medusa_heads import MedusaHeads
from medusa_forge.drafts.medusa_import import import_heads
from medusa_forge.export import export_draft
from medusa_forge.modeling import load_base_model
from medusa_forge.tokenizer_files import save_tokenizer
from medusa_forge.train.args import parse_args
from medusa_forge.train.run import train

TGI_TRANSFORMERS = "transformers==4.51.3"  # what TGI's last release pins
SIDE_PACKAGES = [TGI_TRANSFORMERS, "jinja2>=3.1"]  # jinja2: apply_chat_template
SIDE_ENV = Path(__file__).resolve().parents[1] / ".venv-transformers4"
PROBE = Path(__file__).with_name("tokenizer_probe.py")


@pytest.fixture(scope="session")
def transformers4_python() -> Path:
    """The side environment's interpreter, made on first use (~20 s) and reused while its packages match."""
    python = SIDE_ENV / "bin" / "python"
    steps = [[sys.executable, "-m", "venv", str(SIDE_ENV)], [str(python), "-m", "pip", "install", "-q", *SIDE_PACKAGES]]
    install_once(SIDE_ENV, SIDE_PACKAGES, steps, "the transformers 4.x side environment")
    return python


def probe_under_transformers4(python: Path, folders: list[Path]) -> list[dict]:
    done = subprocess.run(
        [str(python), str(PROBE), *map(str, folders)], capture_output=True, text=True, timeout=300, check=True
    )
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def slow_and_fast_variants(folder: Path) -> dict[str, Path]:
    """Tokenizers of model-specific classes and with extra special tokens, written by transformers 5 through
    save_tokenizer: what a user's base model (Llama, Qwen2, ...) gives the heads folder."""
    base = build_tokenizer()
    vocab = base.get_vocab()
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in json.loads(
        base.backend_tokenizer.to_str())["model"]["merges"]]  # fmt: skip
    out = {}
    for name in ("LlamaTokenizer", "Qwen2Tokenizer"):
        tokenizer = getattr(transformers, name)(
            vocab=vocab, merges=merges, bos_token="<|im_start|>", eos_token="<|im_end|>",
            pad_token="<|endoftext|>", unk_token="<|endoftext|>",
        )  # fmt: skip
        tokenizer.chat_template = CHATML
        save_tokenizer(tokenizer, folder / name)
        out[name] = folder / name
    extra = build_tokenizer()
    extra.add_special_tokens({"additional_special_tokens": ["<tool_call>", "</tool_call>"]})
    save_tokenizer(extra, folder / "extra-special-tokens")
    out["extra special tokens"] = folder / "extra-special-tokens"
    return out


def test_every_tokenizer_we_write_reads_the_same_under_tgis_transformers(
    tmp_path, transformers4_python, tiny_model_dir, smollm2_dir
):
    # A heads folder from `medusa-forge train`, its TGI export, and a TGI export of heads without a tokenizer
    # (written from the base model).
    data = write_conversations(tmp_path / "data.json", n=4)
    trained = train(parse_args(
        ["--model_name_or_path", str(tiny_model_dir), "--data_path", str(data), "--output_dir",
         str(tmp_path / "trained"), "--max_steps", "1", "--per_device_train_batch_size", "2",
         "--model_max_length", "64", "--save_strategy", "no", "--disable_tqdm", "True", "--report_to", "none"]
    ))  # fmt: skip
    export_draft(trained, "tgi", tmp_path / "export-tgi")
    bare = tmp_path / "bare-heads"
    MedusaHeads.for_base_model(load_base_model(str(tiny_model_dir)), 2, 1, str(tiny_model_dir)).save(bare)
    export_draft(bare, "tgi", tmp_path / "export-tgi-from-base")
    # An import of heads whose folder holds a tokenizer written by transformers 5 alone.
    shutil.copytree(trained, tmp_path / "older", ignore=shutil.ignore_patterns("checkpoint-*"))
    build_tokenizer().save_pretrained(tmp_path / "older")
    import_heads(tmp_path / "older", tmp_path / "imported")
    folders = {
        "trained heads": trained,
        "tgi export": tmp_path / "export-tgi",
        "tgi export, tokenizer from the base": tmp_path / "export-tgi-from-base",
        "import": tmp_path / "imported",
        "converted smollm2": smollm2_dir,
        **slow_and_fast_variants(tmp_path),
    }
    under_4 = probe_under_transformers4(transformers4_python, list(folders.values()))
    assert len(under_4) == len(folders)
    for (what, folder), old in zip(folders.items(), under_4, strict=True):
        new = probe(str(folder))
        assert "error" not in old, f"{what}: transformers 4.51.3 cannot load {folder}: {old['error']}"
        assert old == new, f"{what}: transformers 4.51.3 and {transformers.__version__} disagree on {folder}"
        # TGI's router takes the chat template from tokenizer_config.json, not from chat_template.jinja.
        config = json.loads((folder / "tokenizer_config.json").read_text())
        assert config["chat_template"] == (folder / "chat_template.jinja").read_text(), what


def test_transformers_5s_own_files_do_not_load_there(tmp_path, transformers4_python):
    """The failure TGI users met, reproduced: what save_pretrained writes alone stops transformers 4.51.3."""
    build_tokenizer().save_pretrained(tmp_path / "plain")
    (result,) = probe_under_transformers4(transformers4_python, [tmp_path / "plain"])
    assert "TokenizersBackend does not exist" in result["error"]
