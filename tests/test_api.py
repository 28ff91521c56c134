"""The Python API (distmnist.train / evaluate / predict / load_run): typed results equal to what the
command line writes, the command line's errors as exceptions, notebook_launcher with 2 processes,
and the example notebook executed in a real Jupyter kernel."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import distmnist
from conftest import BIN, ROOT, env, free_port, in_process, run_module, write_mnist
from distmnist import evaluation, prediction, training
from distmnist.data import load_mnist

# 600 train / 250 test synthetic images, 2 epochs: accuracy between chance and 100% (as test_train.py)
OPTIONS = dict(epochs=2, lr=0.02, batch_size=50, no_download=True, progress="none")
FLAGS = ["--epochs", "2", "--lr", "0.02", "--batch-size", "50", "--no-download", "--progress", "none"]
TIMING = {"train_seconds", "train_samples_per_second", "eval_seconds", "capture_seconds"}  # differ run to run


def untimed(records) -> list[dict]:
    return [{k: v for k, v in (r if isinstance(r, dict) else r.to_dict()).items() if k not in TIMING} for r in records]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(str(a)), load_file(str(b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, \
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> SimpleNamespace:
    """A 2-epoch run of distmnist.train() in this process, on 600 synthetic images."""
    root = tmp_path_factory.mktemp("api")
    data = write_mnist(root / "mnist")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the command's OMP_NUM_THREADS=1 (conftest.env): bit-identical weights
    try:
        result = distmnist.train(data_dir=data, output_dir=root / "api", **OPTIONS)
    finally:
        torch.set_num_threads(threads)
    return SimpleNamespace(root=root, data=data, result=result, api=root / "api")


@pytest.fixture(scope="module")
def cli_run(runs) -> Path:
    """The same run as `python -m distmnist.train` in a process of its own."""
    out = runs.root / "cli"
    check(run_module("train", "--data-dir", runs.data, "--output-dir", out, *FLAGS))
    return out


# ---------------------------------------------------------------- the package


def test_importing_distmnist_stays_cheap_and_the_api_names_are_functions():
    code = textwrap.dedent("""
        import inspect, runpy, sys
        import distmnist
        assert "torch" not in sys.modules, "import distmnist imported torch"
        assert issubclass(distmnist.RunStopped, distmnist.DistmnistError) and "torch" not in sys.modules
        from distmnist import train, evaluate
        assert inspect.isfunction(train) and inspect.isfunction(evaluate) and train is distmnist.train
        assert train.__module__ == "distmnist.api" and distmnist.load_run.__module__ == "distmnist.api"
        assert list(inspect.signature(distmnist.evaluate).parameters)[:2] == ["checkpoint", "data_dir"]
        assert "images" in inspect.signature(distmnist.predict).parameters
        from distmnist.training import main, run_training  # the command's code, by its own name
        assert callable(main) and distmnist.train is train  # ... which leaves the function in place
        print("ok")
    """)
    proc = check(subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env(), capture_output=True, text=True,
                                timeout=120))
    assert proc.stdout.strip() == "ok"
    version = check(subprocess.run([str(BIN / "distmnist"), "--version"], cwd=ROOT, env=env(), capture_output=True,
                                   text=True, timeout=60))
    assert version.stdout.strip() == f"distmnist {distmnist.__version__}"


# ---------------------------------------------------------------- train and load_run


def test_train_returns_typed_history_equal_to_what_it_wrote(runs):
    result = runs.result
    assert isinstance(result, distmnist.TrainResult)
    assert all(isinstance(r, distmnist.EpochRecord) for r in result.history)
    assert [r.epoch for r in result.history] == [1, 2] and [r.step for r in result.history] == [12, 24]
    assert result.final.world_size == 1 and result.final.test_samples == 250 and result.final.train_samples == 600
    assert result.final.test_accuracy == result.final.test_correct / 250
    assert result.history[1].train_loss < result.history[0].train_loss  # it learns
    assert result.run_id == json.loads((runs.api / "config.json").read_text())["run_id"]
    assert result.weights == runs.api / "model.safetensors" and result.weights.is_file() and result.finished
    lines = [json.loads(line) for line in (runs.api / "metrics.jsonl").read_text().splitlines()]
    assert [r.to_dict() for r in result.history] == lines  # every key, every float to the bit
    assert distmnist.load_run(runs.api) == result


@pytest.mark.slow
def test_train_is_the_command_lines_run(runs, cli_run):
    """Same options, same engine: the same records (timings aside) and bit-identical weights."""
    cli = distmnist.load_run(cli_run)
    assert cli.finished and cli.run_id != runs.result.run_id
    assert untimed(cli.history) == untimed(runs.result.history)
    assert same_weights(cli.weights, runs.result.weights)
    assert {k: v for k, v in cli.config.items() if k != "output_dir"} == \
        {k: v for k, v in runs.result.config.items() if k != "output_dir"}


def test_load_run_keeps_unknown_keys_and_names_a_bad_line(runs, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(runs.api, folder)
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    extended = [json.dumps({**json.loads(line), "val_accuracy": 0.5}) for line in lines]
    (folder / "metrics.jsonl").write_text("\n".join(extended) + "\n")
    loaded = distmnist.load_run(folder)
    assert [r.extra for r in loaded.history] == [{"val_accuracy": 0.5}] * 2
    assert [r.to_dict() for r in loaded.history] == [json.loads(line) for line in extended]
    (folder / "metrics.jsonl").write_text(lines[0] + "\n{\"epoch\": 2}\n")
    with pytest.raises(distmnist.DistmnistError, match=r"metrics.jsonl:2: missing step, lr, "):
        distmnist.load_run(folder)
    with pytest.raises(distmnist.DistmnistError, match="no readable config.json"):
        distmnist.load_run(tmp_path)


def test_validation_keeps_the_best_model_and_an_early_stopped_run_is_finished(runs, tmp_path):
    result = distmnist.train(data_dir=runs.data, output_dir=tmp_path / "val",
                             **{**OPTIONS, "epochs": 30, "val_size": 100, "early_stop": 1})
    assert result.finished and len(result.history) < 30  # stopped early: no better validation accuracy
    assert result.best == tmp_path / "val" / "best.safetensors" and result.best.is_file()
    assert all(r.extra.keys() == {"val_loss", "val_accuracy", "val_correct", "val_samples"} for r in result.history)
    assert {r.extra["val_samples"] for r in result.history} == {100}
    assert {r.train_samples for r in result.history} == {500}
    assert distmnist.load_run(tmp_path / "val") == result


# ---------------------------------------------------------------- evaluate and predict


def test_evaluate_returns_the_report_the_command_writes(runs, tmp_path):
    weights = str(runs.result.weights)
    proc = in_process("evaluate", "--checkpoint", weights, "--data-dir", runs.data, "--no-download", "--progress",
                      "none", "--output-json", tmp_path / "eval.json", "--mistakes", tmp_path / "mistakes.png",
                      "--mistakes-count", "6")
    check(proc)
    report = distmnist.evaluate(weights, runs.data, mistakes=6, no_download=True)
    assert isinstance(report, distmnist.EvalReport)
    assert report.to_dict() == json.loads((tmp_path / "eval.json").read_text())
    assert (report.samples, report.world_size, report.correct) == (250, 1, runs.result.final.test_correct)
    assert sum(map(sum, report.confusion_matrix)) == 250
    _, test = load_mnist(runs.data, allow_download=False)
    assert len(report.mistakes) == 6 and all(m.label != m.predicted for m in report.mistakes)
    assert torch.equal(report.mistake_images, test.images[[m.index for m in report.mistakes]])
    # a run folder: its weights and its own data_dir
    # each call clears Accelerate's process-wide state after it: the next may use another precision
    bf16 = distmnist.evaluate(weights, runs.data, no_download=True, mixed_precision="bf16")
    assert bf16.samples == 250 and bf16.loss == pytest.approx(report.loss, rel=0.02)
    via_folder = distmnist.evaluate(runs.api, no_download=True)
    assert via_folder.mistakes is None
    without_mistakes = {k: v for k, v in report.to_dict().items() if k != "mistakes"}
    assert via_folder.to_dict() == without_mistakes | {"checkpoint": str(runs.api)}


def test_predict_returns_what_the_command_prints(runs, tmp_path):
    _, test = load_mnist(runs.data, allow_download=False)
    drawn = tmp_path / "digit.png"
    Image.fromarray(255 - test.images[3].numpy()).resize((140, 140)).save(drawn)  # dark on light, 5x larger
    files = [str(ROOT / "docs" / "my-digit.png"), str(drawn)]
    proc = check(in_process("predict", "--checkpoint", runs.result.weights, "--json", *files))
    printed = json.loads(proc.stdout)
    predicted = distmnist.predict(runs.result.weights, files)
    assert all(isinstance(p, distmnist.Prediction) for p in predicted)
    assert [(p.file, p.digit, p.probabilities) for p in predicted] == \
        [(p["file"], p["digit"], p["probabilities"]) for p in printed]
    assert distmnist.predict(runs.result.weights, Image.open(drawn))[0].digit == predicted[1].digit
    # uint8 MNIST digits as they are: the whole test set agrees with evaluate's count
    everything = distmnist.predict(runs.result.weights, test.images)
    right = sum(p.digit == label for p, label in zip(everything, test.labels.tolist(), strict=True))
    assert right == runs.result.final.test_correct
    assert everything[7].file == "images[0][7]"
    with pytest.raises(distmnist.DistmnistError, match=r"images\[0\]: arrays must be uint8 MNIST digits"):
        distmnist.predict(runs.result.weights, np.zeros((28, 28), np.float32))


# ---------------------------------------------------------------- errors: the command line's, as exceptions


def cli_error(main, argv: list[str], capsys) -> str:
    """The one-line error of a command's main(argv) (what `python -m` prints) without the prefix."""
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("distmnist: error: ") and err.count("\n") == 1, err
    return err.removeprefix("distmnist: error: ").rstrip("\n")


BAD_TRAIN = {  # options for distmnist.train(): flags for the command line, or a config file's lines
    "lr": ({"lr": -1.0}, ["--lr", "-1"]),
    "lr_nan": ({"lr": float("nan")}, ["--lr", "nan"]),
    "momentum": ({"momentum": 1}, ["--momentum", "1"]),
    "epochs": ({"epochs": 0}, ["--epochs", "0"]),
    "seed": ({"seed": 2**32}, ["--seed", str(2**32)]),
    "dist_timeout": ({"dist_timeout": 0}, ["--dist-timeout", "0"]),
    "keep_checkpoints": ({"keep_checkpoints": -1}, ["--keep-checkpoints", "-1"]),
    "limit_train": ({"limit_train": 0}, ["--limit-train", "0"]),
    "no_config_file": ({"config": "no-such.yaml"}, ["--config", "no-such.yaml"]),
    "choice": ({"data_path": "fast"}, "data_path: fast\n"),  # argparse refuses the flag itself; a file reaches _check
    "in_config_file": ({"config": "{file}"}, "batch_size: 0\n"),
}


@pytest.mark.parametrize("case", BAD_TRAIN)
def test_bad_train_options_raise_the_command_lines_message(case, tmp_path, capsys):
    options, argv = BAD_TRAIN[case]
    if isinstance(argv, str):  # the command line reads it from a config file
        config = tmp_path / "bad.yaml"
        config.write_text(argv)
        argv = ["--config", str(config)]
        options = {k: str(config) if v == "{file}" else v for k, v in options.items()}
    with pytest.raises(distmnist.DistmnistError) as raised:
        distmnist.train(data_dir=tmp_path, output_dir=tmp_path / "out", **options)
    assert str(raised.value) == cli_error(training.main, argv, capsys)
    assert not (tmp_path / "out").exists()


def test_python_values_are_type_checked_like_a_config_files(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("epochs: '3'\n")
    message = cli_error(training.main, ["--config", str(config)], capsys)
    with pytest.raises(distmnist.DistmnistError) as raised:
        distmnist.train(epochs="3")
    assert str(raised.value) == message.replace(f"--config {config}", "distmnist.train()")
    with pytest.raises(distmnist.DistmnistError,
                       match=r"unknown option 'lrr'; did you mean lr\? \(the options are config and"):
        distmnist.train(lrr=0.1)
    # Path objects and numpy numbers are what notebooks pass
    with pytest.raises(distmnist.DistmnistError, match="--epochs must be between 1 and 1,000,000, got 0"):
        distmnist.train(data_dir=tmp_path, epochs=np.int64(0), lr=np.float32(0.5))


def test_bad_evaluate_and_predict_arguments_raise_the_command_lines_message(runs, tmp_path, capsys):
    weights = str(runs.result.weights)
    message = cli_error(evaluation.main, ["--checkpoint", weights, "--test-batch-size", "0"], capsys)
    with pytest.raises(distmnist.DistmnistError) as raised:
        distmnist.evaluate(weights, test_batch_size=0)
    assert str(raised.value) == message
    missing = str(tmp_path / "nothing.safetensors")
    message = cli_error(prediction.main, ["--checkpoint", missing, str(ROOT / "docs" / "my-digit.png")], capsys)
    with pytest.raises(distmnist.DistmnistError) as raised:
        distmnist.predict(missing, [ROOT / "docs" / "my-digit.png"])
    assert str(raised.value) == message


def test_every_function_answers_a_wrong_call_with_distmnists_error(runs, tmp_path):
    weights = runs.result.weights
    cases = {
        "evaluate(weights, mistake=3)": (lambda: distmnist.evaluate(weights, mistake=3),
                                         "distmnist.evaluate(): unknown argument 'mistake'; did you mean mistakes?"),
        "evaluate()": (lambda: distmnist.evaluate(), "distmnist.evaluate(): missing a required argument: 'checkpoint'"),
        "evaluate(5)": (lambda: distmnist.evaluate(5), "distmnist.evaluate(): 'checkpoint' must be a path"),
        "load_run(5)": (lambda: distmnist.load_run(5), "distmnist.load_run(): 'output_dir' must be a path (a str or "
                                                        "os.PathLike), got int 5"),
        "load_run(None)": (lambda: distmnist.load_run(None), "'output_dir' must be a path (a str or os.PathLike), got "
                                                              "NoneType None"),
        "load_run(file)": (lambda: distmnist.load_run(weights), f"distmnist.load_run(): {weights} is a file, not a run "
                                                                "folder: give the run's --output-dir"),
        "load_run(run, x=1)": (lambda: distmnist.load_run(runs.api, x=1), "unknown argument 'x'"),
        "predict(weights, 5)": (lambda: distmnist.predict(weights, 5),
                                "distmnist.predict(): 'images' must be an image (a file name, a PIL image, a uint8 "
                                "array of 28 x 28 digits) or a list of them, got int 5"),
        "predict(weights, [], max_pixel=9)": (lambda: distmnist.predict(weights, [], max_pixel=9),
                                              "unknown argument 'max_pixel'; did you mean max_pixels?"),
        "train(data_dir=123)": (lambda: distmnist.train(data_dir=123), "'data_dir' must be a path (a string), got "
                                                                       "int 123"),
        "train(epoch=2)": (lambda: distmnist.train(epoch=2), "unknown option 'epoch'; did you mean epochs?"),
        "top(-1)": (lambda: distmnist.predict(weights, [ROOT / "docs" / "my-digit.png"])[0].top(-1),
                    "Prediction.top(k): k must be a whole number from 1 to 10, got -1"),
        "top(11)": (lambda: distmnist.predict(weights, [ROOT / "docs" / "my-digit.png"])[0].top(11), "got 11"),
    }
    for name, (call, needle) in cases.items():
        with pytest.raises(distmnist.DistmnistError) as raised:
            call()
        assert needle in str(raised.value), (name, str(raised.value))
    assert len(distmnist.predict(weights, [ROOT / "docs" / "my-digit.png"])[0].top(10)) == 10


@pytest.mark.slow
def test_a_second_train_in_the_same_process_while_one_runs_is_refused(runs, tmp_path):
    code = textwrap.dedent(f"""
        import threading, time, distmnist
        from distmnist import engine
        started, release = threading.Event(), threading.Event()
        real = engine.Engine._step
        def step(self, *args):  # the first run waits in its first step until the second has been tried
            started.set()
            release.wait(60)
            return real(self, *args)
        engine.Engine._step = step
        first = threading.Thread(target=lambda: distmnist.train(data_dir={str(runs.data)!r}, output_dir=
                                 {str(tmp_path / 'one')!r}, epochs=1, progress="none"))
        first.start()
        started.wait(60)
        try:
            distmnist.train(data_dir={str(runs.data)!r}, output_dir={str(tmp_path / 'two')!r}, epochs=1,
                            progress="none")
        except distmnist.DistmnistError as err:
            print("refused:", err)
        release.set()
        first.join()
        print("first finished:", distmnist.load_run({str(tmp_path / 'one')!r}).finished)
    """)
    proc = check(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                                env=env()))
    assert "refused: distmnist.train(): another train() is running in this process" in proc.stdout
    assert "first finished: True" in proc.stdout
    assert not (tmp_path / "two").exists()


def test_missing_data_raises_the_command_lines_message(tmp_path):
    nowhere = tmp_path / "no-mnist"
    proc = in_process("train", "--data-dir", nowhere, "--output-dir", tmp_path / "cli", "--no-download")
    assert proc.returncode == 2
    with pytest.raises(distmnist.DistmnistError) as raised:
        distmnist.train(data_dir=nowhere, output_dir=tmp_path / "api", no_download=True, progress="none")
    assert f"distmnist: error: {raised.value}\n" == proc.stderr
    assert not (tmp_path / "api").exists() and not (tmp_path / "cli").exists()


def test_divergence_raises_run_failed(runs, tmp_path):
    with pytest.raises(distmnist.RunFailed, match="training diverged") as raised:
        distmnist.train(data_dir=runs.data, output_dir=tmp_path / "out", **{**OPTIONS, "lr": 1e12})
    assert raised.value.exit_code == 1


def test_a_signal_raises_run_stopped_and_resume_finishes(runs, tmp_path):
    """SIGTERM (or interrupting a notebook's kernel, SIGINT) stops at a step with a checkpoint."""
    out = tmp_path / "out"
    previous = signal.getsignal(signal.SIGTERM)

    def stop_after_the_first_checkpoint() -> None:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "epoch-0001").is_dir() and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_after_the_first_checkpoint, daemon=True).start()
    stopped_at = r"stopped by SIGTERM at (epoch \d+ step|the end of epoch)"
    with pytest.raises(distmnist.RunStopped, match=stopped_at) as raised:
        distmnist.train(data_dir=runs.data, output_dir=out, **{**OPTIONS, "epochs": 500})
    assert (raised.value.signum, raised.value.exit_code) == (signal.SIGTERM, 143)
    assert signal.getsignal(signal.SIGTERM) == previous  # the handlers are the caller's again
    stopped = distmnist.load_run(out)
    assert not stopped.finished and stopped.weights is None and len(stopped.history) < 500
    resumed = distmnist.train(data_dir=runs.data, output_dir=out, resume="auto",
                              **{**OPTIONS, "epochs": len(stopped.history) + 1})
    assert resumed.finished and resumed.run_id == stopped.run_id
    assert [r.epoch for r in resumed.history] == list(range(1, len(stopped.history) + 2))
    assert distmnist.load_run(out) == resumed


# ---------------------------------------------------------------- notebook_launcher and the notebook

LAUNCHER = textwrap.dedent(
    """
    import sys
    import torch
    from accelerate import notebook_launcher
    import distmnist

    data, out, port = sys.argv[1:]
    options = dict(epochs=2, lr=0.02, batch_size=50, no_download=True, progress="plain")

    # a notebook that trained in its own process first: Accelerate's state and OpenMP's threads exist
    torch.set_num_threads(2)
    distmnist.train(data_dir=data, output_dir=out + "-here", **{**options, "epochs": 1, "progress": "none"})

    def work(data, out):
        result = distmnist.train(data_dir=data, output_dir=out, **options)
        print(f"rank {torch.distributed.get_rank() if torch.distributed.is_initialized() else '-'}: "
              f"world size {result.final.world_size}, run {result.run_id}", flush=True)

    notebook_launcher(work, (data, out), num_processes=2, use_port=port)
    print("loaded:", distmnist.load_run(out).final.world_size)
    """
)


@pytest.mark.slow
def test_notebook_launcher_trains_on_two_processes_like_torchrun(runs, tmp_path):
    out = tmp_path / "launcher"
    # in a process group of its own: a hung forked worker is killed with it
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(runs.data), str(out), str(free_port())], cwd=ROOT,
                                env=env(OMP_NUM_THREADS="2"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    try:
        stdout, stderr = launcher.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        stdout, stderr = launcher.communicate()
        pytest.fail(f"notebook_launcher hung (a forked worker in OpenMP?)\n{stdout[-2000:]}\n{stderr[-2000:]}")
    proc = check(subprocess.CompletedProcess(launcher.args, launcher.returncode, stdout, stderr))
    assert proc.stdout.count("world size 2, run ") == 2  # every process got its result
    assert "loaded: 2" in proc.stdout
    check(subprocess.run([str(BIN / "torchrun"), "--nproc_per_node=2", f"--master_port={free_port()}", "-m",
                          "distmnist.train", "--data-dir", str(runs.data), "--output-dir", str(tmp_path / "torchrun"),
                          *FLAGS], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300))
    launched, torchrun = distmnist.load_run(out), distmnist.load_run(tmp_path / "torchrun")
    assert [r.world_size for r in launched.history] == [2, 2]
    assert [json.loads(line)["world_size"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [2, 2]
    assert untimed(launched.history) == untimed(torchrun.history)
    assert same_weights(launched.weights, torchrun.weights)


@pytest.mark.slow
def test_example_notebook_runs(tmp_path, monkeypatch):
    """examples/notebook.ipynb in a real Jupyter kernel, on small synthetic data."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    (tmp_path / "examples").mkdir()
    (tmp_path / "docs").mkdir()
    shutil.copy(ROOT / "docs" / "my-digit.png", tmp_path / "docs")  # the notebook reads ../docs/my-digit.png
    data = write_mnist(tmp_path / "mnist", n_train=600, n_test=250)
    for name, value in env(DISTMNIST_DATA_DIR=str(data), DISTMNIST_PORT=str(free_port()),
                           PYTHONPATH=str(ROOT)).items():
        monkeypatch.setenv(name, value)
    notebook = nbformat.read(ROOT / "examples" / "notebook.ipynb", as_version=4)
    assert not any(cell.get("outputs") for cell in notebook.cells), "commit the notebook without outputs"
    nbclient.NotebookClient(notebook, timeout=240, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path / "examples")}}).execute()

    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    text = ["".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")
            for cell in code]
    images = [sum("image/png" in o.get("data", {}) for o in cell.outputs) for cell in code]
    assert not [o for cell in code for o in cell.outputs if o.output_type == "error"]
    run = distmnist.load_run(tmp_path / "runs" / "notebook")
    assert run.finished and len(run.history) == 3 and run.final.test_samples == 250
    accuracy = f"{run.final.test_accuracy:.2%}"
    assert f"run {run.run_id}: 3 epochs, test accuracy {accuracy}" in text[1]
    assert images[2] == 1  # the curves
    assert f"test accuracy {accuracy} ({run.final.test_correct}/250)" in text[3]
    assert images[4] == 1  # the mistakes
    assert "../docs/my-digit.png: " in text[5]
    _, test = load_mnist(data, allow_download=False)
    assert f"first 12 test digits: {test.labels[:12].tolist()}" in text[5]
    two = distmnist.load_run(tmp_path / "runs" / "notebook-2")
    assert two.finished and two.final.world_size == 2
    assert f"run {two.run_id}: world size 2" in text[6]
