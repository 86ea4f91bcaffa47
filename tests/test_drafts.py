"""The registry of draft kinds: one list of kinds, looked up by name or recognised from a folder, and never a
default kind for a folder that no kind recognises."""

from __future__ import annotations

import json

import pytest

from medusa_forge.drafts import default_kind, get_kind, kind_names, kind_of, kinds
from medusa_forge.errors import UserError


def test_one_list_of_kinds_medusa_first():
    assert kind_names() == ("medusa", "eagle3", "dflash")  # the tutorial's heads stay the default
    assert default_kind() is get_kind("medusa")
    assert [kind.name for kind in kinds()] == list(kind_names())
    assert len({kind.metric_name for kind in kinds()}) == len(kinds())  # log lines tell the kinds apart
    with pytest.raises(UserError, match=r"draft kind 'hydra': expected one of medusa, eagle3, dflash"):
        get_kind("hydra")


def test_a_folder_of_no_known_kind_is_an_error_that_names_it_and_what_was_expected(tmp_path):
    folder = tmp_path / "damaged"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (folder / "notes.txt").write_text("")
    with pytest.raises(UserError) as caught:
        kind_of(folder)
    message = str(caught.value)
    assert str(folder) in message and "no draft of a known kind" in message and "notes.txt" in message
    for kind in kinds():
        assert f"{kind.label}: {kind.expected_files}" in message
    (folder / "config.json").unlink()
    with pytest.raises(UserError, match="config.json is missing"):  # the usual mistake: another folder
        kind_of(folder)
    with pytest.raises(UserError, match="no such folder"):
        kind_of(tmp_path / "missing")
