"""Each command's parser and config agree: every field is a flag, every flag a field, defaults only in the config."""

import dataclasses
import importlib
import typing

import pytest

from medusa_forge.cli import COMMANDS, main, parse_command
from medusa_forge.flags import build_parser, flag_names

ARGPARSE_COMMANDS = [name for name, command in COMMANDS.items() if command.parse is None]


def config_type(name: str) -> type:
    return getattr(importlib.import_module(COMMANDS[name].module), COMMANDS[name].config)


def required_argv(kind: type) -> tuple[list[str], dict]:
    argv, values = [], {}
    for field in dataclasses.fields(kind):
        if field.init and field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            value = field.metadata["choices"][0] if "choices" in field.metadata else "x"
            argv += [flag_names(kind, field)[0], value]
            values[field.name] = value
    return argv, values


def sample_value(kind: type, field: dataclasses.Field) -> list[str]:
    annotation = typing.get_type_hints(kind)[field.name]
    if annotation is bool:
        return []
    if "choices" in field.metadata:
        return [str(field.metadata["choices"][-1])]
    return ["3"]


@pytest.mark.parametrize("name", ARGPARSE_COMMANDS)
def test_defaults_come_from_the_config(name):
    kind = config_type(name)
    argv, values = required_argv(kind)
    assert parse_command(name, argv) == kind(**values)


@pytest.mark.parametrize("name", ARGPARSE_COMMANDS)
def test_every_field_is_a_flag_and_every_flag_a_field(name):
    kind = config_type(name)
    parser = build_parser(kind, f"medusa-forge {name}")
    argv, values = required_argv(kind)
    assert set(vars(parser.parse_args(argv))) == set(values)  # nothing else: the parser holds no defaults
    for field in dataclasses.fields(kind):
        if not field.init or field.name in values:
            continue
        for spelling in flag_names(kind, field):
            parsed = vars(parser.parse_args([*argv, spelling, *sample_value(kind, field)]))
            assert set(parsed) == {*values, field.name}, spelling
    # and the help lists every flag
    help_text = parser.format_help()
    assert all(flag_names(kind, f)[0] in help_text for f in dataclasses.fields(kind) if f.init)


def test_train_defaults_come_from_the_config():
    from medusa_forge.train.args import TrainConfig

    assert parse_command("train", []) == TrainConfig()


def test_a_bad_value_exits_2_naming_the_flag(capsys):
    assert main(["eval", "--heads", "x", "--max-prompts", "0"]) == 2
    assert "error: --max-prompts and --max-new-tokens must be at least 1" in capsys.readouterr().err
    assert main(["distill", "--input-filename", "a", "--output-filename", "b", "--resume", "--overwrite"]) == 2
    assert "--resume and --overwrite" in capsys.readouterr().err
    assert main(["serve", "--port", "70000"]) == 2
    assert "error: --port 70000: expected 0-65535" in capsys.readouterr().err


def test_quickstart_draft_kind_selects_that_kinds_quickstart_settings(capsys):
    """`quickstart --draft-kind eagle3` runs the pipeline with QUICKSTART's EAGLE-3 section (the config is checked
    here, not run); without the flag, QUICKSTART's default kind; the kind is not a --set key there."""
    from medusa_forge.pipeline import QUICKSTART, load_config
    from medusa_forge.pipeline.quickstart import quickstart_config

    options = parse_command("quickstart", ["--draft-kind", "eagle3", "--set", "eval.max_prompts=2"])
    assert options.draft_kind == "eagle3"
    assert options.command_line == "medusa-forge quickstart --draft-kind eagle3 --workdir runs/quickstart " \
        "--set eval.max_prompts=2"  # fmt: skip
    config = load_config(None, options.overrides, quickstart_config(options.draft_kind))
    assert config.draft_kind == "eagle3" and config.model == "smollm2" and not config.distill.enabled
    shared = QUICKSTART["shared"]["train"]  # the same data for both kinds, each kind's own settings over it
    assert config.train == {**shared, **QUICKSTART["kinds"]["eagle3"]["train"]}
    assert "medusa_soft_labels" not in config.train
    assert config.eval["depth"] == 4 and config.eval["max_prompts"] == 2 and config.export.formats == ["vllm", "sglang"]
    default = parse_command("quickstart", [])
    assert default.draft_kind is None and "--draft-kind" not in default.command_line
    chosen = load_config(None, [], quickstart_config(default.draft_kind))
    assert chosen.draft_kind == QUICKSTART["default_kind"]
    assert chosen.train == {**shared, **QUICKSTART["kinds"][chosen.draft_kind]["train"]}
    medusa = load_config(None, [], quickstart_config("medusa"))
    assert medusa.train["medusa_soft_labels"] is True and medusa.export.formats == ["tgi", "vllm"]
    assert main(["quickstart", "--set", "draft_kind=eagle3"]) == 2
    assert "--set draft_kind=...: use --draft-kind" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_command("quickstart", ["--draft-kind", "eagle"])
    assert "--draft-kind: invalid choice: 'eagle'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the pipeline's kind is its config key draft_kind, not a flag
        parse_command("pipeline", ["--draft-kind", "eagle3"])


@pytest.mark.parametrize(
    "name, old_spelling",
    [("generate", "--heads"), ("eval", "--heads"), ("serve", "--heads"), ("export", "--heads"), ("push", "--folder")],
)
def test_draft_is_the_draft_folder_flag_and_the_old_spelling_still_reads(name, old_spelling):
    """--draft names the draft folder in every command that reads one (help shows it as the flag, the old spelling
    after it); scripts written with the old spelling parse to the same config."""
    kind = config_type(name)
    field = next(f for f in dataclasses.fields(kind) if f.name == "draft")
    assert flag_names(kind, field)[:2] == ["--draft", old_spelling]
    help_text = build_parser(kind, f"medusa-forge {name}").format_help()
    assert f"--draft DRAFT, {old_spelling} DRAFT" in help_text
    argv, _ = required_argv(kind)
    i = argv.index("--draft") if "--draft" in argv else len(argv)
    argv = argv[:i] + argv[i + 2 :]  # required flags but the draft folder, given both ways below
    assert parse_command(name, [*argv, "--draft", "runs/d"]) == parse_command(name, [*argv, old_spelling, "runs/d"])
    assert parse_command(name, [*argv, old_spelling, "runs/d"]).draft == "runs/d"
