"""Checkpoints: safetensors for tensors, JSON for the rest, a SHA-256 manifest; the only writer of state.

A checkpoint is a folder ``OUTPUT_DIR/checkpoints/epoch-NNNN/``::

    model.safetensors      weights, keys as in distmnist.model.Net (conv1.weight ... fc2.bias)
    optimizer.safetensors  optimizer state tensors, "state.<param index>.<name>"
    rng.safetensors        RNG state of every rank: "cpu" (world, n) and "cuda" (world, m) uint8
    state.json             epoch, step, world size, resolved config, metrics so far, param groups
    manifest.json          every file above with its size in bytes and SHA-256

It is written to a temporary folder, flushed to disk and renamed into place, so a crash during a
save never leaves a half-written checkpoint under a final name. Loading verifies the manifest
first; nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import DistmnistError
from .model import Net

FORMAT = "distmnist-checkpoint/1"
MANIFEST = "manifest.json"
STATE = "state.json"
TENSOR_FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
MAX_HEADER_BYTES = 1 << 20  # a safetensors header this small model could never need


@dataclass
class Checkpoint:
    """What a verified checkpoint folder holds, loaded on the host."""

    path: Path
    model: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    rng: dict[str, torch.Tensor]
    state: dict[str, Any]

    @property
    def epoch(self) -> int:
        return int(self.state["epoch"])


# ---------------------------------------------------------------- helpers


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def expected_weights() -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(v.shape), v.dtype) for k, v in Net().state_dict().items()}


def check_weights(weights: dict[str, torch.Tensor], source: Path) -> None:
    """The weights must be exactly the tutorial network's: same keys, shapes and dtypes."""
    expected = expected_weights()
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        raise DistmnistError(
            f"{source}: not a distmnist Net checkpoint (another architecture?): "
            + "; ".join(filter(None, [missing and f"missing {', '.join(missing)}", extra and f"unexpected {', '.join(extra)}"]))
        )
    for key, (shape, dtype) in expected.items():
        t = weights[key]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise DistmnistError(
                f"{source}: tensor {key} is {t.dtype} {tuple(t.shape)}, expected {dtype} {shape} (another architecture?)"
            )


def check_optimizer(tensors: dict[str, torch.Tensor], source: Path) -> None:
    """SGD state of Net: only "state.<i>.momentum_buffer", each shaped and typed like parameter i."""
    params = [(tuple(p.shape), p.dtype) for p in Net().parameters()]
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


def check_rng(rng: dict[str, torch.Tensor], source: Path) -> None:
    """One row of RNG state per rank: "cpu" (world, n) uint8 as torch.get_rng_state() gives, "cuda" optional."""
    cpu = rng.get("cpu")
    n = torch.get_rng_state().numel()
    if cpu is None or cpu.dtype != torch.uint8 or cpu.dim() != 2 or cpu.shape[0] < 1 or cpu.shape[1] != n:
        got = "nothing" if cpu is None else f"{cpu.dtype} {tuple(cpu.shape)}"
        raise DistmnistError(f"{source}: tensor cpu is {got}, expected torch.uint8 (world size, {n})")
    for key, t in rng.items():
        if key not in ("cpu", "cuda"):
            raise DistmnistError(f"{source}: unexpected tensor {key} (expected cpu and cuda RNG states)")
        if t.dtype != torch.uint8 or t.dim() != 2 or t.shape[0] != cpu.shape[0]:
            raise DistmnistError(f"{source}: tensor {key} is {t.dtype} {tuple(t.shape)}, expected torch.uint8 "
                                 f"({cpu.shape[0]}, n)")


def check_state(state: Any, source: Path) -> None:
    """state.json must hold what resuming reads (epoch, step, metrics, optimizer param groups), well typed."""

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not isinstance(state, dict):
        raise DistmnistError(f"{source}: expected a JSON object")
    if not (is_int(state.get("epoch")) and state["epoch"] >= 1 and is_int(state.get("step")) and state["step"] >= 0):
        raise DistmnistError(f"{source}: 'epoch' (>= 1) and 'step' (>= 0) must be integers")
    metrics = state.get("metrics")
    if not isinstance(metrics, list) or not all(isinstance(r, dict) and is_int(r.get("epoch")) for r in metrics):
        raise DistmnistError(f"{source}: 'metrics' must be a list of epoch records, each with its 'epoch'")
    groups = state.get("optimizer_param_groups")
    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        raise DistmnistError(f"{source}: 'optimizer_param_groups' must be a list of groups with 'params'")
    indices = [i for g in groups for i in g["params"]]
    if not all(is_int(i) for i in indices) or sorted(indices) != list(range(len(list(Net().parameters())))):
        raise DistmnistError(f"{source}: 'optimizer_param_groups' do not cover Net's parameters exactly once")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file, refusing absurd headers; errors name the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            header = int.from_bytes(fh.read(8), "little")
    except OSError as err:
        raise DistmnistError(f"{path}: cannot read ({err})") from None
    if size < 8 or header > min(MAX_HEADER_BYTES, size - 8):
        raise DistmnistError(f"{path}: not a valid safetensors file (header of {header} bytes in a {size}-byte file)")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise DistmnistError(f"{path}: not a valid safetensors file ({err})") from None


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from a model.safetensors file or a checkpoint folder (verified), checked against Net."""
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


def checkpoint_dir(output_dir: str | Path, epoch: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"epoch-{epoch:04d}"


def write_checkpoint(
    final: Path,
    model: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    rng: dict[str, torch.Tensor],
    state: dict[str, Any],
) -> Path:
    """Write a checkpoint folder crash-safely: temp folder, fsync, manifest last, atomic rename."""
    tmp = final.parent / f".tmp-{final.name}"
    for stale in final.parent.glob(".tmp-epoch-*"):  # left by a save that crashed; never loaded, now removed
        shutil.rmtree(stale)
    tmp.mkdir(parents=True)
    opt_tensors, param_groups = flatten_optimizer(optimizer)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.items()}, str(tmp / "model.safetensors"))
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    save_file(rng, str(tmp / "rng.safetensors"))
    _write_json(tmp / STATE, {**state, "format": FORMAT, "optimizer_param_groups": param_groups})
    files = {name: {"bytes": (tmp / name).stat().st_size, "sha256": sha256(tmp / name)} for name in (*TENSOR_FILES, STATE)}
    _write_json(tmp / MANIFEST, {"format": FORMAT, "files": files})
    for name in (*TENSOR_FILES, STATE, MANIFEST):
        _fsync(tmp / name)
    if final.exists():  # a rerun of the same epoch replaces it, still atomically per folder
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(final.parent)
    return final


def prune(output_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints (keep <= 0: keep all)."""
    if keep <= 0:
        return []
    old = list_checkpoints(output_dir)[keep:]
    for path in old:
        shutil.rmtree(path)
    return old


# ---------------------------------------------------------------- load


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoint folders under OUTPUT_DIR/checkpoints, newest epoch first (temp folders excluded)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("epoch-*") if p.is_dir()), key=lambda p: p.name, reverse=True)


def verify(path: Path) -> dict[str, Any]:
    """Check the manifest against the folder: every file present with its size and hash, nothing else."""
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise DistmnistError(f"--resume: no such checkpoint folder: {path}")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DistmnistError(f"{manifest_path}: missing or unreadable manifest ({err})") from None
    if not isinstance(files, dict) or not all(
        isinstance(m, dict) and isinstance(m.get("bytes"), int) and isinstance(m.get("sha256"), str) for m in files.values()
    ):
        raise DistmnistError(f"{manifest_path}: 'files' must map each file name to its bytes and sha256")
    present = {p.name for p in path.iterdir()}
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


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Verify, then load a checkpoint folder; every problem is a DistmnistError naming the file."""
    path = Path(path)
    verify(path)
    try:
        state = json.loads((path / STATE).read_text())
    except ValueError as err:
        raise DistmnistError(f"{path / STATE}: not valid JSON ({err})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else None
        raise DistmnistError(f"{path / STATE}: unknown checkpoint format {found!r}, expected {FORMAT}")
    check_state(state, path / STATE)
    ckpt = Checkpoint(
        path=path,
        model=read_tensors(path / "model.safetensors"),
        optimizer=read_tensors(path / "optimizer.safetensors"),
        rng=read_tensors(path / "rng.safetensors"),
        state=state,
    )
    check_weights(ckpt.model, path / "model.safetensors")
    check_optimizer(ckpt.optimizer, path / "optimizer.safetensors")
    check_rng(ckpt.rng, path / "rng.safetensors")
    return ckpt


def newest_valid(output_dir: str | Path, warn) -> Checkpoint | None:
    """The newest checkpoint that verifies; each one skipped is reported through ``warn``."""
    for path in list_checkpoints(output_dir):
        try:
            return load_checkpoint(path)
        except DistmnistError as err:
            warn(f"skipping invalid checkpoint {path}: {err}")
    return None


def save_weights(model: dict[str, torch.Tensor], path: Path) -> None:
    """Final weights, loadable with safetensors.torch.load_file into a plain Net; written atomically."""
    tmp = path.with_name(f".tmp-{path.name}")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.items()}, str(tmp))
    _fsync(tmp)
    os.replace(tmp, path)
