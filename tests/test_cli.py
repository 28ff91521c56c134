"""The `distmnist` command: subcommands, --help with every default, and --log-with trackers."""

from __future__ import annotations

import json

import subprocess

import pytest

from conftest import BIN, ROOT, env
from distmnist import cli, config, evaluate, plot, predict
from distmnist.serve import command as serve

PARSERS = {
    "train": config.build_parser,
    "evaluate": evaluate.build_parser,
    "predict": predict.build_parser,
    "plot": plot.build_parser,
    "serve": serve.build_parser,
}


def test_top_level_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("train", "evaluate", "predict", "plot"):
        assert f"  {name} " in out
    assert set(cli.COMMANDS) == set(PARSERS)


def test_no_command_or_an_unknown_one_exits_2(capsys):
    assert cli.main([]) == 2
    assert cli.main(["fly"]) == 2
    assert "unknown command 'fly'" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(PARSERS))
def test_every_flag_shows_its_default(name, capsys):
    parser = PARSERS[name]()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert "(default" in action.help or "(required)" in action.help, f"{name} {action.option_strings[0]}"
    with pytest.raises(SystemExit) as exit:
        cli.main([name, "--help"])
    assert exit.value.code == 0
    assert f"usage: distmnist {name}" in capsys.readouterr().out


def test_the_installed_console_script_runs_a_subcommand():
    # python -m distmnist.<name> is what the other tests launch (run_module, torchrun)
    for args, expected in ((["--version"], "distmnist "), (["plot", "--help"], "usage: distmnist plot")):
        r = subprocess.run([str(BIN / "distmnist"), *args], cwd=ROOT, env=env(), capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(expected)


# ---------------------------------------------------------------- --log-with


@pytest.fixture
def fresh_accelerate():
    """In-process runs build an Accelerator; leave no process-wide state behind for later tests."""
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("tracker,package", [("tensorboard", "tensorboard"), ("comet_ml", "comet-ml")])
def test_log_with_a_missing_package_names_what_to_install(tracker, package, monkeypatch, mnist_dir, capsys):
    import accelerate.tracking

    from distmnist.train import main as train_main

    monkeypatch.setattr(accelerate.tracking, "_available_trackers", [])  # as if no tracker were installed
    with pytest.raises(SystemExit) as exit:
        train_main(["--data-dir", str(mnist_dir), "--log-with", tracker, "--epochs", "1"])
    assert exit.value.code == 2
    assert f"pip install {package}" in capsys.readouterr().err


def test_log_with_an_unknown_tracker_lists_the_known_ones(mnist_dir, capsys):
    from distmnist.train import main as train_main

    with pytest.raises(SystemExit) as exit:
        train_main(["--data-dir", str(mnist_dir), "--log-with", "carrier-pigeon"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "unknown tracker 'carrier-pigeon'" in err and "tensorboard" in err


@pytest.mark.slow
def test_log_with_sends_the_config_and_every_epoch_to_the_tracker(monkeypatch, mnist_dir, tmp_path,
                                                                 fresh_accelerate):
    """A tracker registered the way Accelerate allows receives what tensorboard or wandb would."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, GeneralTracker

    from distmnist.train import main as train_main

    seen = []

    class Recorder(GeneralTracker):
        name = "recorder"
        requires_logging_directory = True

        def __init__(self, run_name, logging_dir, **kwargs):
            super().__init__()
            seen.append({"run_name": run_name, "logging_dir": str(logging_dir), "logs": []})

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            seen[-1]["config"] = values

        def log(self, values, step=None, **kwargs):
            seen[-1]["logs"].append((step, values))

        def finish(self):
            seen[-1]["finished"] = True

    monkeypatch.setitem(LOGGER_TYPE_TO_CLASS, "recorder", Recorder)
    out = tmp_path / "run"
    args = ["--data-dir", str(mnist_dir), "--no-download", "--limit-train", "200", "--output-dir", str(out),
            "--progress", "none", "--log-with", "recorder"]
    assert train_main([*args, "--epochs", "2"]) == 0
    run_id = json.loads((out / "config.json").read_text())["run_id"]
    first = seen[0]
    assert first["run_name"] == run_id and first["logging_dir"] == str(out / "logs")  # one folder per run
    assert first["config"]["log_with"] == "recorder" and first["config"]["epochs"] == 2
    assert first["config"]["run_id"] == run_id
    assert [step for step, _ in first["logs"]] == [1, 2]
    assert {"train_loss", "test_loss", "test_accuracy", "train_samples_per_second"} <= set(first["logs"][0][1])
    assert first["finished"]

    # resumed: the same run name, so its curve continues; a new run in another folder gets a new name
    assert train_main([*args, "--epochs", "3", "--resume", "auto"]) == 0
    assert seen[1]["run_name"] == run_id and [step for step, _ in seen[1]["logs"]] == [3]
    other = tmp_path / "other"
    assert train_main([*args, "--epochs", "1", "--output-dir", str(other)]) == 0
    assert seen[2]["run_name"] == json.loads((other / "config.json").read_text())["run_id"] != run_id
