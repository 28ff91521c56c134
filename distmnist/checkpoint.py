"""One checkpoint folder: safetensors for tensors, JSON for the rest, a SHA-256 manifest; written
crash-safely, loaded only after verification. What the JSON part means is state.py's business (the
only module that knows its keys); where checkpoint folders live, how they are named, ordered and
pruned is the run folder's (catalogue.py, rundir.py).

A checkpoint folder holds::

    model.safetensors      weights, keys as in distmnist.model.Net (conv1.weight ... fc2.bias)
    optimizer.safetensors  optimizer state tensors, "state.<param index>.<name>"
    rng.safetensors        RNG states: "cpu" (world, n) and "cuda" (world, m) uint8, one row per rank; with
                           a global batch also "dropout" (k,), the dropout masks' generator
    progress.safetensors   mid-epoch checkpoints only: every rank's running loss sum and image count
    state.json             a state.TrainState: run id, position, data order, progress, config, ...
    manifest.json          every file above with its size in bytes and SHA-256

It is written to a temporary folder, flushed to disk and renamed into place, so a crash during a
save never leaves a half-written checkpoint under a final name. Loading verifies the manifest
first (plain file names only, no symlinks, nothing unlisted); nothing is ever unpickled, and
weights that are not finite, or values that cannot be (negative counts, a step that disagrees
with the position), are refused.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .errors import DistmnistError, RunFailed
from .files import fsync_path, json_text, write_bytes
from .model import Net
from .state import FORMAT, TrainState

MANIFEST = "manifest.json"
STATE = "state.json"
TENSOR_FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors")
PROGRESS = "progress.safetensors"  # mid-epoch checkpoints only
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
MAX_HEADER_BYTES = 1 << 20  # a safetensors header this small model could never need
MAX_STATE_BYTES = 64 << 20  # state.json: the metrics of 10^5 epochs fit; a bigger one is not a checkpoint


@dataclass
class Checkpoint:
    """What a verified checkpoint folder holds, loaded on the host."""

    path: Path
    model: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    rng: dict[str, torch.Tensor]
    state: TrainState
    progress: dict[str, torch.Tensor] | None = None  # mid-epoch: "loss_sum" (world,) and "samples" (world,)

    @property
    def epoch(self) -> int:
        """The epoch this checkpoint ends (an epoch checkpoint) or is in the middle of (a mid-epoch one)."""
        return self.state.epoch

    @property
    def run_id(self) -> str:
        return self.state.run_id

    @property
    def epochs_done(self) -> int:
        return self.state.epochs_done


# ---------------------------------------------------------------- checks


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.cache
def net_spec() -> tuple[dict[str, tuple[tuple[int, ...], torch.dtype]], list[tuple[tuple[int, ...], torch.dtype]]]:
    """(shape and dtype per weight key, per parameter in order) of Net, built on the meta device: the
    checks must never draw from the global RNG, which the training's dropout masks come from."""
    with torch.device("meta"):
        net = Net()
    return ({k: (tuple(v.shape), v.dtype) for k, v in net.state_dict().items()},
            [(tuple(p.shape), p.dtype) for p in net.parameters()])


def expected_weights() -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return net_spec()[0]


def nonfinite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity."""
    return [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def check_weights(weights: dict[str, torch.Tensor], source: Path) -> None:
    """The weights must be exactly the tutorial network's (keys, shapes, dtypes) and finite."""
    expected = expected_weights()
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        problems = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unexpected {', '.join(extra)}"] if extra else [])
        raise DistmnistError(f"{source}: not a distmnist Net checkpoint (another architecture?): {'; '.join(problems)}")
    for key, (shape, dtype) in expected.items():
        t = weights[key]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise DistmnistError(f"{source}: tensor {key} is {t.dtype} {tuple(t.shape)}, expected {dtype} {shape} "
                                 "(another architecture?)")
    bad = nonfinite(weights)
    if bad:
        raise DistmnistError(f"{source}: weights are not finite (NaN or infinity in {', '.join(bad)}): the run that "
                             "wrote them diverged")


def check_optimizer(tensors: dict[str, torch.Tensor], source: Path) -> None:
    """SGD state of Net: only "state.<i>.momentum_buffer", each shaped and typed like parameter i, finite."""
    params = net_spec()[1]
    for key, t in tensors.items():
        parts = key.split(".")
        if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit() or parts[2] != "momentum_buffer":
            raise DistmnistError(f"{source}: unexpected tensor {key} (expected SGD state of Net)")
        index = int(parts[1])
        if index >= len(params):
            raise DistmnistError(f"{source}: tensor {key} refers to parameter {index}, Net has {len(params)}")
        shape, dtype = params[index]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise DistmnistError(f"{source}: tensor {key} is {t.dtype} {tuple(t.shape)}, expected {dtype} {shape}")
    bad = nonfinite(tensors)
    if bad:
        raise DistmnistError(f"{source}: optimizer state is not finite (in {', '.join(bad)})")


def check_rng(rng: dict[str, torch.Tensor], state: TrainState, source: Path) -> None:
    """One row of RNG state per rank that wrote it: "cpu" (world, n) uint8 as torch.get_rng_state() gives,
    "cuda" (world, m) where state.random says so; "dropout" (k,) uint8 where it says so."""
    world = state.data.world_size
    n = torch.get_rng_state().numel()
    cpu = rng.get("cpu")
    if cpu is None or cpu.dtype != torch.uint8 or tuple(cpu.shape) != (world, n):
        got = "nothing" if cpu is None else f"{cpu.dtype} {tuple(cpu.shape)}"
        raise DistmnistError(f"{source}: tensor cpu is {got}, expected torch.uint8 ({world}, {n}) for the {world} "
                             "process(es) the state names")
    expected = {"cpu", *(["cuda"] if state.random.device == "cuda" else []), *(["dropout"] if state.random.dropout
                                                                                else [])}
    if set(rng) != expected:
        raise DistmnistError(f"{source}: holds {', '.join(sorted(rng))}, expected {', '.join(sorted(expected))}")
    cuda, dropout = rng.get("cuda"), rng.get("dropout")
    if cuda is not None and (cuda.dtype != torch.uint8 or cuda.dim() != 2 or cuda.shape[0] != world):
        raise DistmnistError(f"{source}: tensor cuda is {cuda.dtype} {tuple(cuda.shape)}, expected torch.uint8 "
                             f"({world}, m)")
    if dropout is not None and (dropout.dtype != torch.uint8 or dropout.dim() != 1 or not dropout.numel()):
        raise DistmnistError(f"{source}: tensor dropout is {dropout.dtype} {tuple(dropout.shape)}, expected a "
                             "generator state (torch.uint8, 1 dimension)")


def check_progress(progress: dict[str, torch.Tensor], state: TrainState, source: Path) -> None:
    """Mid-epoch running sums, one per rank: "loss_sum" finite and >= 0; "samples" exactly the images each
    rank took in the steps done (every step before the last is full)."""
    world, mid = state.data.world_size, state.mid_epoch
    loss, samples = progress.get("loss_sum"), progress.get("samples")
    if set(progress) != {"loss_sum", "samples"} or loss is None or samples is None or mid is None:
        raise DistmnistError(f"{source}: expected exactly the tensors loss_sum and samples, got {sorted(progress)}")
    if not loss.is_floating_point() or tuple(loss.shape) != (world,):
        raise DistmnistError(f"{source}: loss_sum must be {world} floats (one per rank), got {loss.dtype} "
                             f"{tuple(loss.shape)}")
    if not bool(torch.isfinite(loss).all()) or bool((loss < 0).any()):
        raise DistmnistError(f"{source}: loss_sum must be finite and >= 0 (a sum of losses), got {loss.tolist()}")
    if samples.dtype != torch.int64 or tuple(samples.shape) != (world,):
        raise DistmnistError(f"{source}: samples must be {world} image counts (int64, one per rank), got "
                             f"{samples.dtype} {tuple(samples.shape)}")
    taken = mid.step * state.data.batch_size
    if samples.tolist() != [taken] * world:
        raise DistmnistError(f"{source}: samples {samples.tolist()} disagree with the position: {mid.step} step(s) of "
                             f"{state.data.batch_size} image(s) are {taken} per rank")


def check_optimizer_step(tensors: dict[str, torch.Tensor], state: TrainState, source: Path) -> None:
    """SGD with momentum has a momentum buffer per parameter from its first step on, and none before."""
    momentum = any(float(g.get("momentum", 0) or 0) > 0 for g in state.optimizer_param_groups)
    if momentum and state.step > 0 and len(tensors) != len(net_spec()[1]):
        raise DistmnistError(f"{source}: {len(tensors)} momentum buffer(s) after {state.step:,} steps with momentum; "
                             f"SGD has one per parameter ({len(net_spec()[1])}) from its first step on")
    if state.step == 0 and tensors:
        raise DistmnistError(f"{source}: optimizer state at step 0, before any step could make it")


def check_param_groups(state: TrainState, source: Path) -> None:
    indices = [i for g in state.optimizer_param_groups for i in g["params"]]
    if not all(isinstance(i, int) for i in indices) or sorted(indices) != list(range(len(net_spec()[1]))):
        raise DistmnistError(f"{source}: 'optimizer_param_groups' do not cover Net's parameters exactly once")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file, refusing absurd headers; errors name the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            header = int.from_bytes(fh.read(8), "little")
    except OSError as err:
        raise DistmnistError(f"{path}: cannot read ({err.strerror or err})") from None
    if size < 8 or header > min(MAX_HEADER_BYTES, size - 8):
        raise DistmnistError(f"{path}: not a valid safetensors file (header of {header} bytes in a {size}-byte file)")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise DistmnistError(f"{path}: not a valid safetensors file ({err})") from None


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from a model.safetensors file or a checkpoint folder (verified), checked against Net.
    (A run folder is resolved to one of these by rundir.load_weights.)"""
    path = Path(path)
    if path.is_dir():
        return load_checkpoint(path).model
    if not path.is_file():
        raise DistmnistError(f"--checkpoint: no such file or folder: {path}")
    weights = read_tensors(path)
    check_weights(weights, path)
    return weights


# ---------------------------------------------------------------- optimizer state <-> flat tensors


def flatten_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    tensors = {}
    for index, entries in state_dict["state"].items():
        for name, value in entries.items():
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value)
            tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
    return tensors, state_dict["param_groups"]


def unflatten_optimizer(tensors: dict[str, torch.Tensor], param_groups: list[dict[str, Any]]) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": param_groups}


# ---------------------------------------------------------------- save


def host_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def write_checkpoint(
    final: Path,
    model: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    rng: dict[str, torch.Tensor],
    state: TrainState,
    progress: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint folder crash-safely: temp folder, fsync, manifest last, atomic rename.

    ``optimizer`` is the optimizer's state_dict (its param groups go into ``state``). A failed write
    (disk full, read-only) removes the temp folder and raises a one-line error; the folder's previous
    checkpoints are untouched. Non-finite weights are never written.
    """
    model = host_tensors(model)
    bad = nonfinite(model)
    if bad:
        raise RunFailed(f"refusing to write {final}: weights are not finite ({', '.join(bad)})")
    tmp = final.parent / f".tmp-{final.name}"
    opt_tensors, param_groups = flatten_optimizer(optimizer)
    state.optimizer_param_groups = param_groups
    contents = {
        "model.safetensors": save(model),
        "optimizer.safetensors": save(opt_tensors),
        "rng.safetensors": save(host_tensors(rng)),
        **({PROGRESS: save(host_tensors(progress))} if progress is not None else {}),
        STATE: json_text(state.to_json()).encode(),
    }
    try:
        for stale in final.parent.glob(".tmp-*"):  # left by a save that crashed; never loaded, now removed
            shutil.rmtree(stale) if stale.is_dir() and not stale.is_symlink() else stale.unlink()
        tmp.mkdir(parents=True)
        for name, data in contents.items():
            write_bytes(tmp / name, data, atomic=False)
        files = {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                 for name, data in contents.items()}
        write_bytes(tmp / MANIFEST, json_text({"format": FORMAT, "files": files}).encode(), atomic=False)
        fsync_path(tmp)
        if final.is_symlink() or final.is_file():
            final.unlink()
        elif final.exists():  # a rerun of the same position replaces it, still atomically per folder
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_path(final.parent)
    except (OSError, DistmnistError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise DistmnistError(f"cannot write checkpoint {final}: {reason}") from None
    return final


# ---------------------------------------------------------------- load


def verify(path: Path) -> dict[str, Any]:
    """Check the manifest against the folder: every file present with its size and hash, nothing else,
    plain file names only, no symlinks anywhere."""
    manifest_path = path / MANIFEST
    if path.is_symlink():
        raise DistmnistError(f"{path}: checkpoint folder is a symlink; distmnist reads only real folders")
    if not path.is_dir():
        raise DistmnistError(f"--resume: no such checkpoint folder: {path}")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DistmnistError(f"{manifest_path}: missing or unreadable manifest ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") not in (FORMAT, "distmnist-checkpoint/1"):
        raise DistmnistError(f"{manifest_path}: not a distmnist checkpoint manifest")
    if not isinstance(files, dict) or not all(
        isinstance(m, dict) and isinstance(m.get("bytes"), int) and isinstance(m.get("sha256"), str)
        for m in files.values()
    ):
        raise DistmnistError(f"{manifest_path}: 'files' must map each file name to its bytes and sha256")
    for name in files:
        if name in ("", ".", "..", MANIFEST) or Path(name).name != name or "/" in name or "\\" in name:
            raise DistmnistError(f"{manifest_path}: entry {name!r} is not a plain file name inside the checkpoint "
                                 "folder")
    entries = list(path.iterdir())
    links = sorted(p.name for p in entries if p.is_symlink())
    if links:
        raise DistmnistError(f"{path / links[0]}: symlink in a checkpoint folder; distmnist reads only real files")
    present = {p.name for p in entries}
    pickles = sorted(n for n in present if n.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise DistmnistError(f"{path / pickles[0]}: pickle file in a checkpoint; distmnist never loads pickles")
    extra = sorted(present - set(files) - {MANIFEST})
    if extra:
        raise DistmnistError(f"{path / extra[0]}: file not listed in {manifest_path}")
    for name in (*TENSOR_FILES, STATE):
        if name not in files:
            raise DistmnistError(f"{manifest_path}: does not list {name}")
    for name, meta in files.items():
        file = path / name
        if not file.is_file():
            raise DistmnistError(f"{file}: missing (listed in {manifest_path})")
        size = file.stat().st_size
        if size != meta.get("bytes"):
            raise DistmnistError(f"{file}: {size} bytes, manifest says {meta.get('bytes')} (truncated or modified)")
        if sha256(file) != meta.get("sha256"):
            raise DistmnistError(f"{file}: SHA-256 does not match {manifest_path} (corrupted or modified)")
    return manifest


def read_state(path: Path) -> TrainState:
    """state.json of a checkpoint folder, parsed and checked but not verified against the manifest
    (enough to order a run's checkpoints; loading verifies everything)."""
    file = path / STATE
    try:
        if not stat.S_ISREG(os.stat(file, follow_symlinks=False).st_mode):
            raise DistmnistError(f"{file}: not a regular file")
        if file.stat().st_size > MAX_STATE_BYTES:
            raise DistmnistError(f"{file}: {file.stat().st_size:,} bytes, more than any checkpoint's state")
        raw = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise DistmnistError(f"{file}: missing or not valid JSON ({err})") from None
    return TrainState.from_json(raw, file)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Verify, then load a checkpoint folder; every problem is a DistmnistError naming the file."""
    path = Path(path)
    manifest = verify(path)
    state = read_state(path)
    mid = state.mid_epoch
    if (PROGRESS in manifest["files"]) != (mid is not None):
        raise DistmnistError(f"{path / MANIFEST}: {PROGRESS} must be listed exactly when state.json has 'mid_epoch'")
    ckpt = Checkpoint(
        path=path,
        model=read_tensors(path / "model.safetensors"),
        optimizer=read_tensors(path / "optimizer.safetensors"),
        rng=read_tensors(path / "rng.safetensors"),
        state=state,
        progress=read_tensors(path / PROGRESS) if mid is not None else None,
    )
    if "cuda" in ckpt.rng and state.random.device == "cpu":  # format 1 did not say: its tensors do
        state.random.device = "cuda"
    check_weights(ckpt.model, path / "model.safetensors")
    check_optimizer(ckpt.optimizer, path / "optimizer.safetensors")
    check_param_groups(state, path / STATE)
    check_optimizer_step(ckpt.optimizer, state, path / "optimizer.safetensors")
    check_rng(ckpt.rng, state, path / "rng.safetensors")
    if ckpt.progress is not None:
        check_progress(ckpt.progress, state, path / PROGRESS)
    return ckpt


def save_weights(model: dict[str, torch.Tensor], path: Path) -> Path:
    """Final weights, loadable with safetensors.torch.load_file into a plain Net; written atomically.
    Non-finite weights are never written."""
    model = host_tensors(model)
    bad = nonfinite(model)
    if bad:
        raise RunFailed(f"refusing to write {path}: weights are not finite ({', '.join(bad)})")
    return write_bytes(path, save(model))
