"""The one place that knows about processes: build the Accelerator, check the launch, move RNG
state, and make the ranks agree (on an error, on a decision of the main process, on digests).

Accelerate owns devices and process groups. On a machine without CUDA the Accelerator is made
with ``cpu=True`` so that ``torchrun --nproc_per_node N`` becomes real N-process data parallel over
gloo instead of N processes that each believe they are alone.

Agreement is what keeps collectives paired: a rank that meets an error does not leave on its own
while the others wait in the next collective; every rank reports what it met (``agree``) and all
of them leave together, with the error shown once.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from datetime import timedelta

import torch

from .errors import DistmnistError, RunFailed

AGREE_BYTES = 4096  # per rank: exit code, host and a one-line message, as JSON


def launched_world_size() -> int:
    """The world size the launcher (torchrun, accelerate launch, SLURM via them) asked for."""
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        value = os.environ.get(name)
        if value is not None and not value.strip().isdigit():
            raise DistmnistError(f"{name}={value!r} in the environment is not a whole number; it is set by the "
                                 "launcher (torchrun, accelerate launch): unset it to run one process")
    return int(os.environ.get("WORLD_SIZE", "1"))


TRACKER_PACKAGES = {"comet_ml": "comet-ml"}  # pip names that differ from Accelerate's tracker names


def check_tracker(name: str) -> None:
    """--log-with must name a tracker whose package is installed: Accelerate would silently drop it."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers
    from accelerate.utils import LoggerType

    if name == "all":
        if not get_available_trackers():
            raise DistmnistError("--log-with all: no tracker package is installed (pip install tensorboard, "
                                 "wandb, ...)")
    elif name in LoggerType.list():
        if LoggerType(name) not in get_available_trackers():
            package = TRACKER_PACKAGES.get(name, name)
            raise DistmnistError(f"--log-with {name}: the {package} package is not installed; pip install {package}")
    elif name not in LOGGER_TYPE_TO_CLASS:  # also accepts trackers registered with register_tracker_class
        raise DistmnistError(f"--log-with: unknown tracker {name!r}; choose from {', '.join(LoggerType.list())}")


def make_accelerator(cpu: bool, mixed_precision: str, timeout_s: float | None = None, log_with: str | None = None,
                     project_dir: str | None = None):
    """project_dir: where file-based trackers (tensorboard, ...) write, one folder per run id (init_trackers)."""
    from accelerate import Accelerator
    from accelerate.utils import AutocastKwargs, InitProcessGroupKwargs

    launched_world_size()  # a malformed WORLD_SIZE / RANK is a one-line error, not Accelerate's traceback
    if log_with is not None:
        check_tracker(log_with)
    use_cpu = cpu or not torch.cuda.is_available()
    if mixed_precision == "fp16" and use_cpu:
        raise DistmnistError("--mixed-precision fp16 needs a CUDA GPU; on the CPU use --mixed-precision bf16 or no")
    handlers = [AutocastKwargs(cache_enabled=False)]  # the autocast cache must be off inside CUDA graphs
    if timeout_s is not None:
        handlers.append(InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s)))
    try:
        accelerator = Accelerator(cpu=use_cpu, mixed_precision=mixed_precision, kwargs_handlers=handlers,
                                  log_with=log_with, project_dir=project_dir)
    except (ValueError, torch.distributed.DistError) as err:
        if launched_world_size() == 1:
            raise
        # WORLD_SIZE > 1 but no launcher-made rendezvous (MASTER_ADDR unset, or the peers never came)
        raise DistmnistError(
            f"WORLD_SIZE={launched_world_size()} but the process group could not be formed "
            f"({str(err).splitlines()[0]}); launch with torchrun or accelerate launch, which start every rank"
        ) from None
    if launched_world_size() > 1 and accelerator.num_processes == 1:
        raise DistmnistError(
            f"the launcher started WORLD_SIZE={launched_world_size()} processes but this one runs alone "
            "(no process group); refusing to train independent copies. Launch with torchrun or accelerate launch "
            "and a working backend"
        )
    return accelerator


def shutdown(accelerator) -> None:
    """Meet, then tear the process group down while the interpreter is fully alive (gloo's worker
    threads can abort the process if it is left to interpreter exit)."""
    accelerator.wait_for_everyone()
    accelerator.end_training()


def gather_rng(accelerator) -> dict[str, torch.Tensor]:
    """RNG state of every rank as (world, n) uint8 tensors, gathered to all ranks (every rank calls)."""
    states = {"cpu": torch.get_rng_state()}
    if accelerator.device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(accelerator.device)
    out = {}
    for name, state in states.items():
        gathered = accelerator.gather(state.to(accelerator.device).unsqueeze(0))
        out[name] = gathered.cpu().contiguous()
    return out


def restore_rng(accelerator, rng: dict[str, torch.Tensor]) -> bool:
    """Set this rank's RNG from a gathered state; False if the checkpoint came from another world size."""
    if rng["cpu"].shape[0] != accelerator.num_processes:
        return False
    rank = accelerator.process_index
    torch.set_rng_state(rng["cpu"][rank].clone())
    if "cuda" in rng and accelerator.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"][rank].clone(), accelerator.device)
    return True


# ---------------------------------------------------------------- agreement between ranks


def host() -> str:
    return socket.gethostname()


def node() -> str:
    """Which machine of the job this process runs on: the launcher's node rank, else the host name."""
    return f"{host()}/{os.environ.get('GROUP_RANK', '0')}"


def gather_bytes(accelerator, data: bytes, size: int) -> list[bytes]:
    """Every rank's ``data`` (at most ``size`` bytes) on every rank, in rank order: one all-gather."""
    if len(data) > size:
        raise ValueError(f"{len(data)} bytes do not fit in {size}")
    buf = torch.zeros(size + 4, dtype=torch.uint8)
    buf[:4] = torch.tensor(list(len(data).to_bytes(4, "little")), dtype=torch.uint8)
    if data:
        buf[4 : 4 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    rows = accelerator.gather(buf.to(accelerator.device).unsqueeze(0)).cpu()
    out = []
    for row in rows:
        raw = bytes(row.tolist())
        out.append(raw[4 : 4 + int.from_bytes(raw[:4], "little")])
    return out


def broadcast_bytes(accelerator, data: bytes | None) -> bytes:
    """The main process's ``data`` on every rank (its length, then its bytes); others pass None."""
    from accelerate.utils import broadcast

    if accelerator.num_processes == 1:
        return data or b""
    main = accelerator.is_main_process
    length = torch.tensor([len(data) if main else 0], dtype=torch.int64, device=accelerator.device)
    length = int(broadcast(length, from_process=0).item())
    buf = torch.zeros(length, dtype=torch.uint8)
    if main and length:
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return bytes(broadcast(buf.to(accelerator.device), from_process=0).cpu().tolist()) if length else b""


def agree(accelerator, error: DistmnistError | None) -> None:
    """Every rank calls this with the error it met, or None; if any rank met one, every rank raises.

    The lowest failing rank's error wins. It is shown once per machine: by the main process (naming
    the rank and host when it happened elsewhere) and by the failing rank itself if that runs on
    another machine (node); every other rank exits with the same code silently.
    """
    if accelerator.num_processes == 1:
        if error is not None:
            raise error
        return
    mine = {"code": error.exit_code if error else 0, "host": host(), "node": node(),
            "message": str(error)[:600] if error else ""}
    records = [json.loads(raw) for raw in gather_bytes(accelerator, json.dumps(mine).encode(), AGREE_BYTES)]
    failed = [(rank, r) for rank, r in enumerate(records) if r["code"]]
    if not failed:
        return
    rank, first = failed[0]
    if accelerator.process_index == rank and (accelerator.is_main_process or first["node"] != records[0]["node"]):
        raise error
    if accelerator.is_main_process:
        raise DistmnistError(f"rank {rank} on {first['host']}: {first['message']}", exit_code=first["code"])
    raise DistmnistError(first["message"], silent=True, exit_code=first["code"])


def disagreeing_ranks(accelerator, digest: bytes) -> list[tuple[int, str]]:
    """(rank, host) of every rank whose ``digest`` differs from the main process's (every rank calls)."""
    if accelerator.num_processes == 1:
        return []
    records = [json.loads(raw) for raw in gather_bytes(
        accelerator, json.dumps({"digest": digest.hex(), "host": host()}).encode(), 512)]
    return [(rank, r["host"]) for rank, r in enumerate(records) if r["digest"] != records[0]["digest"]]


def tensors_digest(tensors) -> bytes:
    """SHA-256 over the bytes of the tensors, in order (tensors on any device; copied to the host)."""
    digest = hashlib.sha256()
    for t in tensors:
        t = t.detach().contiguous().cpu()
        digest.update(str((tuple(t.shape), t.dtype)).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.digest()


def collective_failure(err: BaseException, timeout_s: float) -> RunFailed | None:
    """The one-line failure for a timed-out or broken collective (a peer hung or died), as gloo and
    NCCL report it in a multi-process run; None for any other error."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    text = str(err).lower()
    if not isinstance(err, dist.DistError) and not any(
            s in text for s in ("timed out", "timeout", "connection closed", "connection reset", "broken pipe")):
        return None
    return RunFailed(f"rank {dist.get_rank()}: a collective with the other ranks failed or did not finish within "
                     f"--dist-timeout {timeout_s:g} s (a rank hung or died): {str(err).splitlines()[0]}")
