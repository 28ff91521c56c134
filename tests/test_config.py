"""Config: the tutorial's recipe as defaults, YAML under the command line, bad keys and values rejected."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import ROOT
from distmnist.config import TrainConfig, parse_config
from distmnist.errors import EXIT_USAGE, DistmnistError


def write_yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_are_the_tutorials_recipe():
    cfg = parse_config([])
    assert (cfg.epochs, cfg.batch_size, cfg.test_batch_size) == (10, 100, 1000)
    assert (cfg.lr, cfg.momentum) == (0.01, 0.9)
    assert cfg.mixed_precision == "no"
    assert cfg.resume is None and cfg.limit_train is None and cfg.limit_test is None
    assert cfg == TrainConfig()


def test_shipped_default_yaml_is_the_recipe():
    """configs/default.yaml spells out the defaults; loading it must change nothing."""
    assert parse_config(["--config", str(ROOT / "configs" / "default.yaml")]) == TrainConfig()


def test_yaml_sets_values_and_command_line_wins(tmp_path):
    path = write_yaml(tmp_path, "epochs: 3\nlr: 0.05\nbatch_size: 64\nmixed_precision: bf16\nno_download: true\n")
    cfg = parse_config(["--config", path, "--epochs", "7", "--momentum", "0.5"])
    assert cfg.epochs == 7  # command line over YAML
    assert cfg.lr == 0.05 and isinstance(cfg.lr, float)
    assert cfg.batch_size == 64
    assert cfg.mixed_precision == "bf16"
    assert cfg.no_download is True
    assert cfg.momentum == 0.5  # command line over default
    assert cfg.test_batch_size == 1000  # untouched default


def test_yaml_int_is_accepted_for_float_fields(tmp_path):
    assert parse_config(["--config", write_yaml(tmp_path, "lr: 1\n")]).lr == 1.0


def test_unknown_yaml_key_is_rejected_by_name(tmp_path):
    path = write_yaml(tmp_path, "epochs: 2\nlearning_rate: 0.1\n")
    with pytest.raises(DistmnistError, match="unknown key 'learning_rate'") as err:
        parse_config(["--config", path])
    assert path in str(err.value)
    assert err.value.exit_code == EXIT_USAGE == 2


@pytest.mark.parametrize(
    "text, key",
    [
        ("epochs: ten\n", "epochs"),
        ("epochs: 2.5\n", "epochs"),
        ("lr: fast\n", "lr"),
        ("no_download: 1\n", "no_download"),
        ("mixed_precision: no\n", "mixed_precision"),  # bare YAML `no` is the boolean false, not "no"
        ("epochs:\n", "epochs"),
    ],
)
def test_yaml_value_of_wrong_type_is_rejected_by_name(tmp_path, text, key):
    with pytest.raises(DistmnistError, match=f"'{key}'"):
        parse_config(["--config", write_yaml(tmp_path, text)])


def test_yaml_that_is_not_a_mapping_or_missing_is_rejected(tmp_path):
    with pytest.raises(DistmnistError, match="mapping"):
        parse_config(["--config", write_yaml(tmp_path, "- epochs\n- 3\n")])
    with pytest.raises(DistmnistError, match="--config: no such file"):
        parse_config(["--config", str(tmp_path / "absent.yaml")])
    with pytest.raises(DistmnistError, match="not valid YAML"):
        parse_config(["--config", write_yaml(tmp_path, "epochs: [1\n")])


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--epochs", "0"], "--epochs"),
        (["--batch-size", "0"], "--batch-size"),
        (["--test-batch-size", "-5"], "--test-batch-size"),
        (["--lr", "-1"], "--lr"),
        (["--lr", "0"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--momentum", "1.5"], "--momentum"),
        (["--momentum", "1"], "--momentum"),
        (["--momentum", "-0.1"], "--momentum"),
        (["--limit-train", "0"], "--limit-train"),
        (["--limit-test", "0"], "--limit-test"),
        (["--seed", "-1"], "--seed"),
        (["--keep-checkpoints", "-1"], "--keep-checkpoints"),
        (["--dist-timeout", "0"], "--dist-timeout"),
    ],
)
def test_impossible_values_are_rejected_naming_the_flag(argv, flag):
    with pytest.raises(DistmnistError) as err:
        parse_config(argv)
    assert str(err.value).startswith(f"{flag} must")
    assert err.value.exit_code == 2


def test_impossible_values_from_yaml_are_rejected_too(tmp_path):
    with pytest.raises(DistmnistError, match="--epochs must be between 1 and 1,000,000, got 0"):
        parse_config(["--config", write_yaml(tmp_path, "epochs: 0\n")])
    with pytest.raises(DistmnistError, match="--mixed-precision must be one of no, fp16, bf16"):
        parse_config(["--config", write_yaml(tmp_path, "mixed_precision: fp8\n")])
    with pytest.raises(DistmnistError, match="--data-path must be one of"):
        parse_config(["--config", write_yaml(tmp_path, "data_path: disk\n")])


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--mixed-precision", "fp8"], "--mixed-precision"),
        (["--progress", "fancy"], "--progress"),
        (["--data-path", "disk"], "--data-path"),
        (["--cuda-graphs", "maybe"], "--cuda-graphs"),
        (["--epochs", "ten"], "--epochs"),
        (["--no-such-flag"], "--no-such-flag"),
    ],
)
def test_bad_choice_or_type_on_command_line_exits_2_naming_the_flag(capsys, argv, flag):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(argv)
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err


def test_every_field_has_a_kebab_case_flag():
    """The same name everywhere: field batch_size is flag --batch-size, and a flag sets exactly its field."""
    from distmnist.config import FIELDS, build_parser

    options = {s for a in build_parser()._actions for s in a.option_strings}
    for name in FIELDS:
        assert f"--{name.replace('_', '-')}" in options
    assert parse_config(["--data-dir", "/x", "--output-dir", "/y", "--resume", "auto"]).to_dict() == {
        **TrainConfig().to_dict(), "data_dir": "/x", "output_dir": "/y", "resume": "auto",
    }
