"""Conversation loading: formats, speaker mapping, skips that are counted, errors that name the record."""

import json
import logging

import pytest
from conftest import PROMPTS, write_prompt_files

from medusa_forge.cli import main
from medusa_forge.data.conversations import load_conversations, split_of
from medusa_forge.errors import UserError


def test_sharegpt_json_and_roles(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(
        json.dumps(
            [
                {
                    "id": "a_0",
                    "conversations": [
                        {"from": "system", "value": "Be brief."},
                        {"from": "human", "value": "hi"},
                        {"from": "chatgpt", "value": "hello"},
                    ],
                }
            ]
        )
    )
    [conv] = load_conversations(str(path))
    assert conv.id == "a_0"
    assert [m["role"] for m in conv.messages] == ["system", "user", "assistant"]
    assert conv.messages[2]["content"] == "hello"


def test_role_content_lists_jsonl_and_messages_key(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [
        [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}],
        {"id": "x", "messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    convs = load_conversations(str(path))
    assert [c.messages[1]["content"] for c in convs] == ["a1", "a2"]
    assert convs[1].id == "x"


def test_unknown_speakers_and_empty_conversations_are_skipped_and_counted(tmp_path, caplog):
    path = tmp_path / "d.json"
    good = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    path.write_text(
        json.dumps(
            [
                good,
                {"conversations": [{"from": "tool", "value": "x"}, {"from": "gpt", "value": "a"}]},
                {"conversations": []},
                {"conversations": [{"from": "human", "value": "only a question"}]},
            ]
        )
    )
    with caplog.at_level(logging.WARNING):
        convs = load_conversations(str(path))
    assert len(convs) == 1
    assert "skipped 3 records" in caplog.text and "'tool'" in caplog.text


@pytest.mark.parametrize(
    "record, fragment",
    [
        ({"conversations": [{"from": "human", "value": 3}]}, "record 1, message 0"),
        ({"conversations": "hello"}, "record 1: the conversation is a str"),
        ({"text": "hello"}, "record 1 has neither"),
        (3, "record 1 is a int"),  # a string is a prompt (a user turn)
    ],
)
def test_bad_records_name_file_and_index(tmp_path, record, fragment):
    path = tmp_path / "bad.json"
    good = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    path.write_text(json.dumps([good, record]))
    with pytest.raises(UserError) as err:
        load_conversations(str(path))
    assert str(path) in str(err.value) and fragment in str(err.value)


def test_truncated_list_recovers_complete_records_when_asked(tmp_path, caplog):
    good = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    text = json.dumps([good, good, good], indent=2)
    path = tmp_path / "cut.json"
    path.write_text(text[: text.rindex('"value": "a"') + 5])  # cut inside the last record's string
    with pytest.raises(UserError, match="ends in the middle of record 2"):
        load_conversations(str(path))
    with caplog.at_level(logging.WARNING):
        convs = load_conversations(str(path), recover_truncated=True)
    assert len(convs) == 2
    assert "ends in the middle of record 2: recovered 2 complete records" in caplog.text


def test_broken_json_in_the_middle_is_an_error_not_a_silent_cut(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"conversations": []} {"conversations": []}, {"conversations": []}]')
    with pytest.raises(UserError, match="invalid JSON at line 1"):
        load_conversations(str(path))


def test_jsonl_error_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n{oops\n')
    with pytest.raises(UserError, match="line 2"):
        load_conversations(str(path))


def test_missing_file_suggests_aliases(tmp_path):
    with pytest.raises(UserError, match="sharegpt"):
        load_conversations(str(tmp_path / "nope.json"))


def test_split_is_stable_and_keeps_chunks_together():
    assert split_of("abc_0") == split_of("abc_1") == split_of("abc")
    ids = [f"conv{i}_0" for i in range(2000)]
    heldout = [i for i in ids if split_of(i) == "heldout"]
    assert 10 < len(heldout) < 90  # ~2%
    assert split_of("QWJhYvA_0") == "train"


def test_sharegpt_alias_train_and_heldout_are_disjoint(caplog):
    with caplog.at_level(logging.WARNING):
        train = load_conversations("sharegpt")
        heldout = load_conversations("sharegpt-heldout")
    assert "recovered" not in caplog.text and "middle of record" not in caplog.text  # shipped cut short: silent
    assert len(train) > 16000 and 200 < len(heldout) < 600
    train_ids = {c.id for c in train}
    assert not train_ids & {c.id for c in heldout}
    assert all(split_of(c.id) == "heldout" for c in heldout)


def test_prompt_only_files_load_where_no_reply_is_needed_and_train_says_distill_first(tmp_path, tiny_model_dir, capsys):
    prompts, files = PROMPTS, write_prompt_files(tmp_path)
    for path in files:
        conversations = load_conversations(str(path), need_reply=False)
        assert [c.messages for c in conversations] == [[{"role": "user", "content": p}] for p in prompts]
        no_reply = r"no record has an assistant reply \(3 prompts only\).*medusa-forge distill"
        with pytest.raises(UserError, match=no_reply):
            load_conversations(str(path))
        argv = ["--model_name_or_path", str(tiny_model_dir), "--data_path", str(path), "--output_dir", str(tmp_path)]
        assert main(["train", *argv]) == 2
        err = capsys.readouterr().err
        assert "training needs replies" in err and f"--input-filename {path}" in err and "Traceback" not in err
    assert [c.id for c in load_conversations(str(files[2]), need_reply=False)] == ["q0", "q1", "q2"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": ["not", "text"]}\n')
    with pytest.raises(UserError, match="record 0: 'prompt' is a list"):
        load_conversations(str(bad), need_reply=False)
