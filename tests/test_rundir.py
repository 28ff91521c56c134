"""One run, one owner, one truth. The output folder's rules (a run id, a lock, no mixing, --overwrite),
what a resume really does (the command line wins, recorded epoch by epoch), checkpoint order by what is
recorded inside them, divergence, and the paths people try. Real train, evaluate and predict commands on
synthetic data, asserting exit codes, messages and bytes on disk: through the session's in-process driver
(conftest.in_process), and in processes of their own where another process is the point (two runs at
once, a lock held by another process).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, assert_ok, env, in_process, one_line, write_mnist
from distmnist.catalogue import scan
from distmnist.checkpoint import load_checkpoint, write_checkpoint

RECIPE = ["--lr", "0.02", "--batch-size", "50", "--no-download", "--progress", "plain"]


def train(data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return in_process("train", "--data-dir", data, "--output-dir", out, *RECIPE, *extra)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under the folder (hidden ones included) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def strict_json(text: str):
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def all_finite(path: Path) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in load_file(str(path)).values() if t.is_floating_point())


def run_id(out: Path) -> str:
    return json.loads((out / "config.json").read_text())["run_id"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_mnist(tmp_path_factory.mktemp("rundir") / "mnist", n_train=300, n_test=120)


@pytest.fixture(scope="module")
def base(data, tmp_path_factory) -> Path:
    """A finished 1-epoch run that the tests copy and continue."""
    out = tmp_path_factory.mktemp("base") / "run"
    assert_ok(train(data, out, "--epochs", "1"))
    return out


def copy(base: Path, to: Path) -> Path:
    shutil.copytree(base, to)
    return to


# ---------------------------------------------------------------- one owner of the output folder


def test_a_run_has_an_id_everywhere_and_files_have_normal_permissions(base):
    rid = run_id(base)
    assert rid and json.loads((base / "run.json").read_text())["run_id"] == rid
    assert json.loads((base / "checkpoints" / "epoch-0001" / "state.json").read_text())["run_id"] == rid
    # the umask decides (0022 here: readable by the group and others), not safetensors' own 0600
    for path in (base / "model.safetensors", base / "checkpoints" / "epoch-0001" / "model.safetensors",
                 base / "config.json", base / "metrics.jsonl"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~0o022, path


def test_a_fresh_run_into_an_occupied_folder_exits_2_and_changes_nothing(data, base, tmp_path):
    out = copy(base, tmp_path / "run")
    before = snapshot(out)
    proc = train(data, out, "--epochs", "1")
    one_line(proc, 2, str(out), run_id(base), "--resume auto", "--output-dir", "--overwrite")
    assert snapshot(out) == before  # byte for byte, the lock file included


def test_overwrite_deletes_the_old_run_and_starts_a_new_one(data, base, tmp_path):
    out = copy(base, tmp_path / "run")
    (out / "notes.txt").write_text("mine")
    (out / "checkpoints" / "epoch-0007").mkdir()  # an old run's leftover: deleted with its checkpoints/
    proc = train(data, out, "--epochs", "1", "--overwrite")
    assert_ok(proc)
    assert "--overwrite: deleted" in proc.stdout
    assert run_id(out) != run_id(base)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-0001"]
    assert (out / "notes.txt").read_text() == "mine"  # not a run file: left alone


@pytest.mark.slow
def test_two_runs_started_together_on_one_folder(data, tmp_path):
    """One trains to the end; the other exits 2 within seconds, naming who holds the folder."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "distmnist.train", "--data-dir", str(data), "--output-dir", str(out), *RECIPE,
           "--epochs", "4"]
    started = time.monotonic()
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    ended = {}
    while len(ended) < 2 and time.monotonic() - started < 240:
        for i, proc in enumerate(procs):
            if i not in ended and proc.poll() is not None:
                ended[i] = time.monotonic() - started
        time.sleep(0.05)
    results = [(proc.returncode, *proc.communicate()) for proc in procs]
    codes = sorted(code for code, *_ in results)
    assert codes == [0, 2], results
    loser = next(i for i, (code, *_) in enumerate(results) if code == 2)
    winner = 1 - loser
    assert ended[loser] < ended[winner]  # it did not wait for the other to finish
    err = results[loser][2].strip().splitlines()
    assert len(err) == 1 and "in use by another run" in err[0] and "pid" in err[0], err
    # nothing mixed: every record and checkpoint is the winner's run
    rid = run_id(out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert {e.run_id for e in scan(out)} == {rid}


def test_a_lock_left_by_a_dead_process_blocks_nobody(data, base, tmp_path):
    out = copy(base, tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", f"""
import fcntl, os, time
fd = os.open({str(out / '.lock.json')!r}, os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        held = train(data, out, "--epochs", "2", "--resume", "auto")
        one_line(held, 2, "in use by another run")
    finally:
        holder.kill()
        holder.wait()
    assert_ok(train(data, out, "--epochs", "2", "--resume", "auto"))  # the holder died: its lock went with it


# ---------------------------------------------------------------- resume says what it does


def test_resume_with_a_new_lr_really_applies_it_and_records_it(data, base, tmp_path):
    same, faster = copy(base, tmp_path / "same"), copy(base, tmp_path / "faster")
    assert_ok(train(data, same, "--epochs", "2", "--resume", "auto"))
    proc = train(data, faster, "--epochs", "2", "--resume", "auto", "--lr", "0.5", "--momentum", "0.5")
    assert_ok(proc)
    notices = [line for line in proc.stdout.splitlines() if "changed settings" in line]
    assert len(notices) == 1 and "lr 0.02 -> 0.5" in notices[0] and "momentum 0.9 -> 0.5" in notices[0], proc.stdout
    a, b = load_file(str(same / "model.safetensors")), load_file(str(faster / "model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the new lr was used, not the checkpoint's

    state = json.loads((faster / "checkpoints" / "epoch-0002" / "state.json").read_text())
    assert state["config"]["lr"] == 0.5 and state["optimizer_param_groups"][0]["lr"] == 0.5
    history = state["config_history"]
    assert [(h["from_epoch"], h["config"]["lr"], h["config"]["momentum"]) for h in history] == \
        [(1, 0.02, 0.9), (2, 0.5, 0.5)]
    assert [r["lr"] for r in map(json.loads, (faster / "metrics.jsonl").read_text().splitlines())] == [0.02, 0.5]
    assert json.loads((faster / "config.json").read_text())["lr"] == 0.5
    summary = json.loads((faster / "run.json").read_text())
    assert summary["config"]["lr"] == 0.5 and summary["config_history"] == history
    # the other resume changed only --epochs (the total), recorded as such; lr stayed 0.02 throughout
    same_history = json.loads((same / "checkpoints" / "epoch-0002" / "state.json").read_text())["config_history"]
    assert [(h["from_epoch"], h["config"]["epochs"], h["config"]["lr"]) for h in same_history] == \
        [(1, 1, 0.02), (2, 2, 0.02)]


def test_epochs_below_the_checkpoint_exits_2(data, base, tmp_path):
    out = copy(base, tmp_path / "run")
    assert_ok(train(data, out, "--epochs", "2", "--resume", "auto"))
    one_line(train(data, out, "--epochs", "1", "--resume", "auto"), 2, "--epochs 1", "at least 2")


def test_rerunning_a_finished_run_trains_nothing_and_rewrites_nothing(data, base, tmp_path):
    out = copy(base, tmp_path / "run")
    before = snapshot(out)
    proc = train(data, out, "--epochs", "1", "--resume", "auto")
    assert_ok(proc)
    assert "already complete at epoch 1, nothing trained" in proc.stdout
    assert "epoch 1/1 " not in proc.stdout
    assert snapshot(out) == before


# ---------------------------------------------------------------- order by what is recorded


def relabel(src: Path, dst: Path, epoch: int | None = None, run_id: str | None = None) -> Path:
    """A copy of checkpoint src as a well-formed checkpoint at dst, moved to the end of ``epoch`` (with a
    metrics record for every epoch before, as a real run would have) or given another run id."""
    from distmnist.checkpoint import unflatten_optimizer

    ckpt = load_checkpoint(src)
    state = ckpt.state
    optimizer = unflatten_optimizer(ckpt.optimizer, state.optimizer_param_groups)
    if epoch is not None:
        per_epoch, first = state.step // state.epoch, state.progress.metrics[0]
        state.progress.metrics = [{**first, "epoch": e, "step": per_epoch * e} for e in range(1, epoch + 1)]
        state.epoch, state.step = epoch, per_epoch * epoch
    if run_id is not None:
        state.run_id = run_id
    return write_checkpoint(dst, ckpt.model, optimizer, ckpt.rng, state)


def test_order_past_epoch_9999_and_pruning_never_takes_the_new_checkpoint(data, base, tmp_path):
    out = copy(base, tmp_path / "run")
    root = out / "checkpoints"
    relabel(root / "epoch-0001", root / "epoch-9999", epoch=9999)
    shutil.rmtree(root / "epoch-0001")
    proc = train(data, out, "--epochs", "10001", "--resume", "auto", "--keep-checkpoints", "1")
    assert_ok(proc)
    assert f"resumed from {root / 'epoch-9999'}" in proc.stdout
    assert "epoch 10001/10001" in proc.stdout
    # epoch-10000 sorts before epoch-9999 by name; by what they record it is newer, and so is 10001
    assert sorted(p.name for p in root.iterdir()) == ["epoch-10001"]


def test_another_runs_checkpoint_is_skipped_and_never_pruned(data, base, tmp_path):
    out = copy(base, tmp_path / "run")
    root = out / "checkpoints"
    relabel(root / "epoch-0001", root / "epoch-9999", epoch=9999, run_id="someone-else")
    proc = train(data, out, "--epochs", "3", "--resume", "auto", "--keep-checkpoints", "1")
    assert_ok(proc)
    assert f"skipping checkpoint {root / 'epoch-9999'}: it belongs to run someone-else" in proc.stdout
    assert f"resumed from {root / 'epoch-0001'}" in proc.stdout
    assert sorted(p.name for p in root.iterdir()) == ["epoch-0003", "epoch-9999"]


def test_resuming_an_older_checkpoint_keeps_the_one_just_written(data, base, tmp_path):
    out = copy(base, tmp_path / "run")
    assert_ok(train(data, out, "--epochs", "3", "--resume", "auto"))
    root = out / "checkpoints"
    proc = train(data, out, "--epochs", "2", "--resume", str(root / "epoch-0001"), "--keep-checkpoints", "1")
    assert_ok(proc)
    assert "discarded this run's later checkpoints epoch-0003, epoch-0002" in proc.stdout
    assert sorted(p.name for p in root.iterdir()) == ["epoch-0002"]
    assert load_checkpoint(root / "epoch-0002").epoch == 2
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


# ---------------------------------------------------------------- divergence stops the run


def test_divergence_exits_1_and_leaves_no_non_finite_file(data, base, tmp_path):
    fresh = tmp_path / "fresh"
    proc = train(data, fresh, "--epochs", "2", "--lr", "1e6")
    line = one_line(proc, 1, "training diverged", "epoch 1", "no checkpoint was written")
    assert not (fresh / "model.safetensors").exists() and not list(fresh.rglob("*.safetensors"))

    resumed = copy(base, tmp_path / "resumed")
    proc = train(data, resumed, "--epochs", "3", "--resume", "auto", "--lr", "1e6")
    one_line(proc, 1, "training diverged", "epoch 2",
                          f"newest finite checkpoint: {resumed / 'checkpoints' / 'epoch-0001'}")
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["epoch-0001"]
    for folder in (fresh, resumed):
        for path in folder.rglob("*"):
            if path.suffix == ".safetensors":
                assert all_finite(path), path
            elif path.suffix == ".json":
                strict_json(path.read_text())
            elif path.suffix == ".jsonl":
                [strict_json(line) for line in path.read_text().splitlines()]
    assert "NaN" not in line


@pytest.mark.parametrize("lr", ["inf", "nan", "-1", "0"])
def test_lr_must_be_finite_and_positive(data, tmp_path, lr):
    one_line(train(data, tmp_path / "out", "--lr", lr), 2, "--lr must be a finite number > 0")
    assert not (tmp_path / "out").exists()


def test_evaluate_and_predict_refuse_non_finite_weights(base, data, tmp_path):
    weights = load_file(str(base / "model.safetensors"))
    weights["fc2.bias"][3] = math.nan
    bad = tmp_path / "model.safetensors"
    save_file(weights, str(bad))
    evaluate = in_process("evaluate", "--checkpoint", bad, "--data-dir", data, "--no-download")
    one_line(evaluate, 2, str(bad), "not finite", "fc2.bias")
    digit = tmp_path / "digit.png"
    from PIL import Image
    Image.new("L", (40, 40), 255).save(digit)
    predict = in_process("predict", "--checkpoint", bad, digit)
    one_line(predict, 2, str(bad), "not finite")


def test_every_json_written_is_strict(base):
    for path in [*base.rglob("*.json")]:
        strict_json(path.read_text())
    for line in (base / "metrics.jsonl").read_text().splitlines():
        strict_json(line)


# ---------------------------------------------------------------- paths people try


def test_evaluate_and_predict_take_a_run_folder_and_its_data_dir(base, data, tmp_path):
    by_file = tmp_path / "by-file.json"
    by_run = tmp_path / "by-run.json"
    assert_ok(in_process("evaluate", "--checkpoint", base / "model.safetensors", "--data-dir", data, "--no-download",
                         "--output-json", by_file))
    assert_ok(in_process("evaluate", "--checkpoint", base, "--output-json", by_run))  # --data-dir from the run
    a, b = json.loads(by_file.read_text()), json.loads(by_run.read_text())
    assert (a["test_correct"], a["test_loss"], a["test_samples"]) == (b["test_correct"], b["test_loss"], 120)

    from PIL import Image
    digit = tmp_path / "digit.png"
    image = Image.new("L", (40, 40), 0)
    image.paste(255, (8, 18, 32, 22))
    image.save(digit)
    by_file = in_process("predict", "--checkpoint", base / "model.safetensors", digit, "--json")
    by_run = in_process("predict", "--checkpoint", base, digit, "--json")
    assert_ok(by_run)
    assert json.loads(by_file.stdout) == json.loads(by_run.stdout)


def test_resume_takes_a_run_folder_and_explains_a_weights_file(data, base, tmp_path):
    out = tmp_path / "continued"
    proc = train(data, out, "--epochs", "2", "--resume", str(base))
    assert_ok(proc)
    assert f"resumed from {base / 'checkpoints' / 'epoch-0001'}" in proc.stdout
    assert run_id(out) == run_id(base)  # the same run, continued in another folder
    weights = base / "model.safetensors"
    one_line(train(data, tmp_path / "other", "--epochs", "2", "--resume", str(weights)), 2,
                          str(weights), "expects a checkpoint folder", "no optimizer or RNG state")


def test_resume_into_a_folder_of_another_run_is_refused(data, base, tmp_path):
    other = tmp_path / "other"
    assert_ok(train(data, other, "--epochs", "1"))
    proc = train(data, other, "--epochs", "2", "--resume", str(base / "checkpoints" / "epoch-0001"))
    one_line(proc, 2, f"belongs to run {run_id(base)}", f"holds run {run_id(other)}", "--overwrite")
