"""One run, one recipe: a bare `--resume auto` continues the run as it was (its data folder, batch, lr,
limits), only what the command sets overrides it; the folder's lifecycle holds whatever fails; the
launcher's settings are honoured or refused; a run stopped mid-epoch resumes exactly. Real train
commands on synthetic data, asserting exit codes, messages and bytes: through the session's in-process
driver (conftest.in_process) where one command is the point, in processes of their own where a real
signal ends them, and under torchrun and accelerate launch.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import (
    BIN,
    ROOT,
    STOP_DRIVER,
    assert_ok,
    env,
    free_port,
    in_process,
    one_line,
    run_in_process,
    torchrun,
    write_mnist,
)
from distmnist.checkpoint import load_checkpoint

# not the defaults: a bare resume that fell back to them would train another recipe
RECIPE = ["--lr", "0.05", "--batch-size", "40", "--limit-train", "280", "--momentum", "0.8", "--no-download",
          "--progress", "plain"]


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_mnist(tmp_path_factory.mktemp("recipe") / "mnist", n_train=400, n_test=100)


@pytest.fixture(scope="module")
def whole(data, tmp_path_factory) -> Path:
    """The uninterrupted run of the full command line, 2 epochs."""
    out = tmp_path_factory.mktemp("whole") / "run"
    assert_ok(in_process("train", "--data-dir", data, "--output-dir", out, *RECIPE, "--epochs", "2"))
    return out


def test_a_bare_resume_continues_the_recorded_recipe_bit_identically(data, whole, tmp_path):
    out = tmp_path / "cut"
    assert_ok(in_process("train", "--data-dir", data, "--output-dir", out, *RECIPE, "--epochs", "1"))
    resumed = in_process("train", "--output-dir", out, "--resume", "auto", "--epochs", "2")
    assert_ok(resumed)
    assert "resuming with changed settings: epochs 1 -> 2" in resumed.stdout  # the one override, announced
    assert "changed settings: epochs 1 -> 2\n" in resumed.stdout + "\n"  # and nothing else changed
    assert f"from {data}" in resumed.stdout  # the recorded data folder, not the default data/
    assert (out / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    assert [m["train_loss"] for m in metrics(out)] == [m["train_loss"] for m in metrics(whole)]
    config = json.loads((out / "config.json").read_text())
    assert (config["lr"], config["batch_size"], config["limit_train"], config["epochs"]) == (0.05, 40, 280, 2)
    state = load_checkpoint(out / "checkpoints" / "epoch-0002").state
    assert [h["from_epoch"] for h in state.config_history] == [1, 2]  # the override is in the history
    # the summary's parts are this launch's (epoch 2); the run's training over both launches is shown apart
    seconds = json.loads((out / "run.json").read_text())["seconds"]
    assert seconds["train"] == pytest.approx(metrics(out)[1]["train_seconds"])
    assert seconds["run_train"] == pytest.approx(sum(m["train_seconds"] for m in metrics(out)))
    parts = seconds["setup"] + seconds["train"] + seconds["eval"] + seconds["checkpoint"]
    assert parts <= seconds["main"] + 1e-6
    assert "run total: training" in resumed.stdout and "over every launch of the run (epochs 1-2)" in resumed.stdout


@pytest.mark.slow
def test_a_bare_resume_on_two_processes_continues_bit_identically(data, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert_ok(torchrun(2, "train", "--data-dir", data, "--output-dir", whole, *RECIPE, "--epochs", "2"))
    assert_ok(torchrun(2, "train", "--data-dir", data, "--output-dir", cut, *RECIPE, "--epochs", "1"))
    assert_ok(torchrun(2, "train", "--output-dir", cut, "--resume", "auto", "--epochs", "2"))
    assert (cut / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()


def test_only_what_the_command_sets_overrides_and_a_config_file_counts_as_set(data, whole, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(whole, out)
    override = tmp_path / "more.yaml"
    override.write_text("epochs: 3\nlr: 0.02\n")
    resumed = in_process("train", "--output-dir", out, "--resume", "auto", "--config", override)
    assert_ok(resumed)
    assert "resuming with changed settings: epochs 2 -> 3, lr 0.05 -> 0.02" in resumed.stdout
    config = json.loads((out / "config.json").read_text())
    assert (config["lr"], config["batch_size"], config["momentum"], config["epochs"]) == (0.02, 40, 0.8, 3)
    assert [m["lr"] for m in metrics(out)] == [0.05, 0.05, 0.02]


def test_overwrite_never_deletes_before_the_resume_source_is_read(data, whole, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(whole, out)
    before = files(out)
    missing = out / "checkpoints" / "epoch-0009"
    one_line(in_process("train", "--output-dir", out, "--overwrite", "--resume", missing), 2, "no such checkpoint")
    assert files(out) == before  # nothing deleted for a start that failed
    one_line(in_process("train", "--output-dir", out, "--overwrite", "--resume", "auto"), 2,
             "--overwrite deletes the run that --resume auto would continue")
    assert files(out) == before
    # a checkpoint of the run itself: read first, then the folder starts over from it
    again = in_process("train", "--output-dir", out, "--overwrite", "--resume", out / "checkpoints" / "epoch-0001")
    assert_ok(again)
    assert "--overwrite: deleted run" in again.stdout
    assert (out / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-0002"]


def test_launcher_settings_distmnist_does_not_implement_are_refused(data, tmp_path):
    out = str(tmp_path / "out")
    argv = ["--data-dir", str(data), "--output-dir", out, "--epochs", "1", "--progress", "none"]
    results = run_in_process({
        "accumulation": ("train", argv, {"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}),
        "fsdp": ("train", argv, {"ACCELERATE_USE_FSDP": "true"}),
        "deepspeed": ("train", argv, {"ACCELERATE_USE_DEEPSPEED": "true"}),
        "dynamo": ("train", argv, {"ACCELERATE_DYNAMO_BACKEND": "inductor"}),
    })
    expected = {"accumulation": "gradient accumulation (ACCELERATE_GRADIENT_ACCUMULATION_STEPS=4)",
                "fsdp": "FSDP (ACCELERATE_USE_FSDP=true)", "deepspeed": "DeepSpeed", "dynamo": "torch.compile"}
    for case, needle in expected.items():
        result = results[case]
        assert result["code"] == 2, (case, result)
        lines = result["stderr"].strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result["stderr"], (case, result)
    assert not Path(out).exists()  # refused before anything was created


@pytest.mark.slow
def test_gradient_accumulation_under_accelerate_launch_is_refused_by_every_process(data, tmp_path):
    # (accelerate launch's own --gradient_accumulation_steps reaches the processes only with DeepSpeed, which
    # is refused anyway; the environment variable reaches every launch)
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes=2", "--num_machines=1",
           "--mixed_precision=no", "--dynamo_backend=no", f"--main_process_port={free_port()}", "-m",
           "distmnist.train", "--data-dir", str(data), "--output-dir", str(tmp_path / "out"), "--epochs", "1",
           "--progress", "none"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=env(ACCELERATE_USE_CPU="1", ACCELERATE_GRADIENT_ACCUMULATION_STEPS="4"))
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("distmnist: error:")]
    assert ours and all("gradient accumulation" in line for line in ours), proc.stderr[-3000:]
    assert "Traceback" not in "\n".join(ours)
    assert not (tmp_path / "out" / "checkpoints").exists()


def stopped_after(step: int, sig: str, out: Path, data: Path, *argv: str) -> subprocess.CompletedProcess:
    """A run that gets `sig` right after its `step`-th training step (conftest.STOP_DRIVER)."""
    return subprocess.run([sys.executable, "-c", STOP_DRIVER, "step", str(step), sig, "--data-dir", str(data),
                           "--output-dir", str(out), *RECIPE, *argv], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env=env())


@pytest.mark.slow
def test_a_mid_epoch_resume_with_another_seed_is_announced_and_not_called_exact(data, tmp_path):
    out = tmp_path / "run"
    assert stopped_after(4, "SIGTERM", out, data, "--epochs", "1").returncode == 143
    ckpt = out / "checkpoints" / "epoch-0001-step-0004"
    assert load_checkpoint(ckpt).state.mid_epoch.step == 4
    proc = in_process("train", "--output-dir", out, "--resume", "auto", "--seed", "7")
    assert_ok(proc)
    assert "resuming with changed settings: seed 1 -> 7" in proc.stdout
    assert ("epoch-0001-step-0004 stopped in the middle of epoch 1, but the batches of this launch differ (seed 1 "
            "-> 7): epoch 1 restarts from its first step (not an exact resume)") in proc.stdout
    assert "resumed from" in proc.stdout and "at step 4" not in proc.stdout
    assert metrics(out)[0]["step"] == 7 and metrics(out)[0]["train_samples"] == 280  # the whole epoch, once


@pytest.mark.slow
@pytest.mark.parametrize("path", ["loader", "resident"])
def test_a_mid_epoch_resume_is_bit_identical_on_both_data_paths(data, tmp_path, path):
    whole, out = tmp_path / "whole", tmp_path / "out"
    assert_ok(in_process("train", "--data-dir", data, "--output-dir", whole, *RECIPE, "--epochs", "2",
                         "--data-path", path))
    assert stopped_after(10, "SIGTERM", out, data, "--epochs", "2", "--data-path", path).returncode == 143
    resumed = in_process("train", "--output-dir", out, "--resume", "auto")
    assert_ok(resumed)
    assert "epoch-0002-step-0003" in resumed.stdout and "at step 3" in resumed.stdout
    assert (out / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    assert [m["train_loss"] for m in metrics(out)] == [m["train_loss"] for m in metrics(whole)]


@pytest.mark.slow
def test_checkpoint_every_n_steps_bounds_what_a_killed_process_loses(data, whole, tmp_path):
    out = tmp_path / "out"
    # SIGKILL right after step 12 (epoch 2, step 5), before its checkpoint: no handler runs, nothing is saved
    # at the moment of death
    killed = stopped_after(12, "SIGKILL", out, data, "--epochs", "2", "--checkpoint-every", "3")
    assert killed.returncode == -signal.SIGKILL
    # every 3 optimizer steps of the run (3, 6 | 9): epoch 1's were superseded by its end
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-0001", "epoch-0002-step-0002"]
    resumed = in_process("train", "--output-dir", out, "--resume", "auto")
    assert_ok(resumed)
    assert "at step 2" in resumed.stdout
    assert (out / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-0001", "epoch-0002"]


def test_checkpoint_every_minutes_is_checked_by_the_main_process_clock(data, tmp_path):
    out = tmp_path / "out"
    proc = in_process("train", "--data-dir", data, "--output-dir", out, *RECIPE, "--epochs", "1",
                      "--checkpoint-every", "0.0001m")  # 6 ms: due at every step
    assert_ok(proc)
    assert "checkpoints: at each epoch's end and every 0.0001 minutes" in proc.stdout
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-0001"]  # the 6 mid-epoch ones superseded


@pytest.mark.parametrize("bad", ["0", "-3", "5h", "1e9m", "m", "nan m"])
def test_checkpoint_every_that_is_neither_steps_nor_minutes_is_refused(data, tmp_path, bad):
    out = tmp_path / "out"
    one_line(in_process("train", "--data-dir", data, "--output-dir", out, "--checkpoint-every", bad), 2,
             "--checkpoint-every must be a number of optimizer steps (e.g. 500) or of minutes (e.g. 10m)")
    assert not out.exists()
