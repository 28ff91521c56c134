"""The `distmnist` command: subcommands, --help with every default, and --log-with trackers."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from conftest import BIN, ROOT, env
from distmnist import bench, cli, config, plot
from distmnist import evaluation as evaluate
from distmnist import prediction as predict
from distmnist.serve import command as serve

PARSERS = {
    "train": config.build_parser,
    "evaluate": evaluate.build_parser,
    "predict": predict.build_parser,
    "plot": plot.build_parser,
    "serve": serve.build_parser,
    "bench": bench.build_parser,
}


def test_top_level_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("train", "evaluate", "predict", "plot", "bench"):
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
        if action.option_strings and action.dest != "help" and action.help != argparse.SUPPRESS:
            flag = f"{name} {action.option_strings[0]}"
            if action.required:  # nothing to default to: the help says it must be given
                assert "(required)" in action.help and "(default" not in action.help, flag
            else:
                assert "(default" in action.help and "(required)" not in action.help, flag
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


def test_python_m_distmnist_is_the_distmnist_command():
    r = subprocess.run([sys.executable, "-m", "distmnist", "plot", "--help"], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: distmnist plot")
    r = subprocess.run([sys.executable, "-m", "distmnist", "trian"], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "did you mean train?" in r.stderr


# ---------------------------------------------------------------- did you mean


def test_a_mistyped_command_gets_a_suggestion(capsys):
    assert cli.main(["trian"]) == 2
    assert "unknown command 'trian'; did you mean train?" in capsys.readouterr().err
    assert cli.main(["--data-dir", "x"]) == 2
    assert "flags follow a command, as in: distmnist train --data-dir" in capsys.readouterr().err


SUGGESTING = PARSERS


@pytest.mark.parametrize("name", list(SUGGESTING))
def test_every_command_suggests_the_flag_a_typo_meant(name, capsys):
    from distmnist.args import ArgumentParser

    parser = SUGGESTING[name]()
    assert isinstance(parser, ArgumentParser)
    flag = max((f for f in parser.flags() if f != "--help"), key=len)
    typo = "--" + flag[2:].replace("-", "_") if "-" in flag[2:] else flag[:-1]  # the YAML spelling, or a letter short
    with pytest.raises(SystemExit) as exit:
        parser.parse_args([typo, "1"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert f"unrecognized argument {typo} (did you mean {flag}?)" in err
    assert len(err.strip().splitlines()) == 1 and "usage:" not in err  # one line, not the whole usage


@pytest.mark.parametrize("argv,expected", [
    (["--data_dir", "x"], "--data_dir (did you mean --data-dir?)"),
    (["--epoch", "3"], "--epoch (did you mean --epochs?)"),  # no silent abbreviation
    (["--lr-schedul", "cosine"], "--lr-schedul (did you mean --lr-schedule?)"),
    (["--epochs", "2", "--bogus"], "unrecognized argument --bogus ("),
    (["--lr-schedule", "cosin"], "invalid choice: 'cosin'"),
])
def test_train_flag_typos(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit:
        config.parse_config(argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert expected in err
    if "cosin" in argv:
        assert "did you mean cosine?" in err
    if "--bogus" in argv:
        assert "did you mean" not in err  # nothing close: no made-up suggestion


def test_a_mistyped_required_flag_is_named_as_mistyped(capsys):
    with pytest.raises(SystemExit):
        evaluate.build_parser().parse_args(["--chekpoint", "x.safetensors"])
    assert "--chekpoint (did you mean --checkpoint?)" in capsys.readouterr().err


def test_a_config_key_typo_gets_a_suggestion(tmp_path):
    from distmnist.errors import DistmnistError

    path = tmp_path / "c.yaml"
    path.write_text("batchsize: 64\n")
    with pytest.raises(DistmnistError, match="unknown key 'batchsize' in .*; did you mean batch_size"):
        config.parse_config(["--config", str(path)])


def test_python_m_distmnist_bench_names_a_real_command():
    r = subprocess.run([str(BIN / "python"), "-m", "distmnist.bench", "--help"], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("usage: distmnist bench")
    assert "bench" in cli.COMMANDS


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

    from distmnist.training import main as train_main

    monkeypatch.setattr(accelerate.tracking, "_available_trackers", [])  # as if no tracker were installed
    with pytest.raises(SystemExit) as exit:
        train_main(["--data-dir", str(mnist_dir), "--log-with", tracker, "--epochs", "1"])
    assert exit.value.code == 2
    assert f"pip install {package}" in capsys.readouterr().err


def test_log_with_an_unknown_tracker_lists_the_known_ones(mnist_dir, capsys):
    from distmnist.training import main as train_main

    with pytest.raises(SystemExit) as exit:
        train_main(["--data-dir", str(mnist_dir), "--log-with", "carrier-pigeon"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "unknown tracker 'carrier-pigeon'" in err and "tensorboard" in err


REGISTERED = pytest.mark.skipif(__import__("distmnist.distributed", fromlist=["x"]).accelerate_version() < (1, 15),
                                reason="a tracker registered by name needs accelerate 1.15 (refused before: see below)")


@REGISTERED
def test_log_with_sends_the_config_and_every_epoch_to_the_tracker(monkeypatch, mnist_dir, tmp_path,
                                                                 fresh_accelerate):
    """A tracker registered the way Accelerate allows receives what tensorboard or wandb would."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, GeneralTracker

    from distmnist.training import main as train_main

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
    assert [step for step, _ in first["logs"]] == [2, 4]  # optimizer steps: 2 per epoch of 200 images
    assert {"train_loss", "test_loss", "test_accuracy", "train_samples_per_second"} <= set(first["logs"][0][1])
    assert first["finished"]

    # resumed: the same run name, so its curve continues; a new run in another folder gets a new name
    assert train_main([*args, "--epochs", "3", "--resume", "auto"]) == 0
    assert seen[1]["run_name"] == run_id and [step for step, _ in seen[1]["logs"]] == [6]
    other = tmp_path / "other"
    assert train_main([*args, "--epochs", "1", "--output-dir", str(other)]) == 0
    assert seen[2]["run_name"] == json.loads((other / "config.json").read_text())["run_id"] != run_id


def train_in_process(mnist_dir, out, *extra) -> int:
    from distmnist.training import main as train_main

    return train_main(["--data-dir", str(mnist_dir), "--no-download", "--epochs", "2", "--limit-train", "200",
                       "--output-dir", str(out), "--progress", "none", *extra])


@REGISTERED
def test_log_every_sends_each_steps_loss_and_lr_read_once_per_epoch(monkeypatch, mnist_dir, tmp_path,
                                                                     fresh_accelerate):
    """--log-every 1 with a cosine schedule: every step's loss, whose mean is the epoch's train_loss
    (equal batches), and the schedule's lr, before each epoch record, all on the optimizer-step axis."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, GeneralTracker

    from distmnist.schedule import ScheduleSpec

    logs = []

    class Recorder(GeneralTracker):
        name = "recorder"
        requires_logging_directory = False

        def __init__(self, run_name, **kwargs):
            super().__init__()

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            pass

        def log(self, values, step=None, **kwargs):
            logs.append((step, values))

    monkeypatch.setitem(LOGGER_TYPE_TO_CLASS, "recorder", Recorder)
    out = tmp_path / "run"
    assert train_in_process(mnist_dir, out, "--batch-size", "50", "--log-with", "recorder", "--log-every", "1",
                            "--lr-schedule", "cosine", "--warmup-steps", "2") == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [step for step, _ in logs] == [1, 2, 3, 4, 4, 5, 6, 7, 8, 8]  # 4 steps of 50 images per epoch
    steps = [(step, v) for step, v in logs if "step_loss" in v]
    spec = ScheduleSpec("cosine", 0.01, 8, warmup_steps=2)
    assert [v["lr"] for _, v in steps] == pytest.approx([spec.value_at(i) for i in range(8)])
    for epoch, record in enumerate(records):
        losses = [v["step_loss"] for _, v in steps[4 * epoch: 4 * epoch + 4]]
        assert sum(losses) / 4 == pytest.approx(record["train_loss"], rel=1e-6)


def test_log_every_writes_tensorboard_events_where_the_plan_says(mnist_dir, tmp_path, fresh_accelerate, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert train_in_process(mnist_dir, out, "--batch-size", "50", "--log-with", "tensorboard", "--log-every", "3",
                            "--progress", "plain") == 0
    stdout = capsys.readouterr().out
    logs = out / "logs" / json.loads((out / "config.json").read_text())["run_id"]  # one folder per run
    assert f"tracker: tensorboard -> {logs} (every epoch's metrics; step_loss and lr every 3 steps)" in stdout
    events = EventAccumulator(str(logs))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("step_loss")] == [3, 6]
    # lr: every 3rd step's, and each epoch record's (the lr of its last step, steps 4 and 8)
    assert [e.step for e in events.Scalars("lr")] == [3, 4, 6, 8]
    assert [e.value for e in events.Scalars("lr")] == pytest.approx([0.01] * 4)
    assert [e.step for e in events.Scalars("test_accuracy")] == [4, 8]
    assert {"train_loss", "test_loss"} <= set(scalars)


@pytest.mark.slow
def test_step_losses_on_two_processes_are_the_mean_over_both_ranks(mnist_dir, tmp_path):
    """torchrun, 2 processes: each logged step loss is the mean of both ranks' batch losses, so an
    epoch's step losses average to its train_loss (the global mean over every image)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from conftest import torchrun

    out = tmp_path / "run"
    proc = torchrun(2, "train", "--data-dir", mnist_dir, "--no-download", "--epochs", "2", "--limit-train", "400",
                    "--batch-size", "50", "--output-dir", out, "--progress", "plain", "--log-with", "tensorboard",
                    "--log-every", "1")
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / "logs" / json.loads((out / "config.json").read_text())["run_id"]))
    events.Reload()
    losses = [e.value for e in events.Scalars("step_loss")]
    assert [e.step for e in events.Scalars("step_loss")] == list(range(1, 9))  # 400 / (2 x 50) = 4 a epoch
    for epoch, record in enumerate(records):
        assert sum(losses[4 * epoch: 4 * epoch + 4]) / 4 == pytest.approx(record["train_loss"], rel=1e-5)
