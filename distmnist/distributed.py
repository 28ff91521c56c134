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
import secrets
import socket
import time
import types
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch

from .checkpoint import Checkpoint
from .errors import DistmnistError, RunFailed
from .state import TrainState

T = TypeVar("T")

AGREE_BYTES = 4096  # per rank: exit code, host and a one-line message, as JSON


def launched_world_size() -> int:
    """The world size the launcher (torchrun, accelerate launch, SLURM via them) asked for."""
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        value = os.environ.get(name)
        if value is not None and not value.strip().isdigit():
            raise DistmnistError(f"{name}={value!r} in the environment is not a whole number; it is set by the "
                                 "launcher (torchrun, accelerate launch): unset it to run one process")
    return int(os.environ.get("WORLD_SIZE", "1"))


def accelerate_internal(owner: Any, name: str) -> Any:
    """``owner.name``: a part of Accelerate that is not its public API, used where it has none; one line
    naming the installed Accelerate if that version no longer has it (instead of an AttributeError)."""
    value = getattr(owner, name, None)
    if value is None:
        import accelerate

        where = owner.__name__ if isinstance(owner, types.ModuleType) else f"{owner.__module__}.{owner.__qualname__}"
        raise DistmnistError(f"distmnist uses {where}.{name}, which accelerate {accelerate.__version__} does not "
                             f"have: install an earlier accelerate (pip install 'accelerate<{accelerate.__version__}')")
    return value


def tracker_classes() -> dict[str, Any]:
    """Accelerate's trackers by name, built-in and registered (register_tracker_class): its own lookup
    table, as no public function lists them."""
    import accelerate.tracking

    return accelerate_internal(accelerate.tracking, "LOGGER_TYPE_TO_CLASS")


def state_reset() -> Callable[[], None] | None:
    """Where Accelerate's process-wide state (PartialState, AcceleratorState) is not set up yet: a function
    that clears it again, with GradientState, for a caller that sets it up for a while; None where it
    already is (someone else's, left alone). Accelerate has no public way to ask about PartialState or to
    clear either, so those parts are its internals."""
    from accelerate.state import AcceleratorState, GradientState, PartialState, is_initialized

    reset_accelerator = accelerate_internal(AcceleratorState, "_reset_state")
    reset_gradient = accelerate_internal(GradientState, "_reset_state")
    if is_initialized() or accelerate_internal(PartialState, "_shared_state"):
        return None

    def reset() -> None:
        reset_accelerator(reset_partial_state=True)
        reset_gradient()

    return reset


TRACKER_PACKAGES = {"comet_ml": "comet-ml"}  # pip names that differ from Accelerate's tracker names


def check_tracker(name: str) -> None:
    """--log-with must name a tracker whose package is installed: Accelerate would silently drop it."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    if name == "all":
        if not get_available_trackers():
            raise DistmnistError("--log-with all: no tracker package is installed (pip install tensorboard, "
                                 "wandb, ...)")
    elif name in LoggerType.list():
        if LoggerType(name) not in get_available_trackers():
            package = TRACKER_PACKAGES.get(name, name)
            raise DistmnistError(f"--log-with {name}: the {package} package is not installed; pip install {package}")
    elif name not in tracker_classes():  # also accepts trackers registered with register_tracker_class
        raise DistmnistError(f"--log-with: unknown tracker {name!r}; choose from {', '.join(LoggerType.list())}")
    elif accelerate_version() < REGISTERED_TRACKERS:
        import accelerate

        raise DistmnistError(f"--log-with {name}: a tracker registered by name needs accelerate 1.15 or later "
                             f"(installed: {accelerate.__version__}); choose from {', '.join(LoggerType.list())}")


REGISTERED_TRACKERS = (1, 15)  # the first Accelerate whose Accelerator(log_with=NAME) takes a registered name


def accelerate_version() -> tuple[int, ...]:
    import accelerate

    return tuple(int(part) for part in accelerate.__version__.split(".")[:2] if part.isdigit())


UNSUPPORTED_LAUNCH = (  # (environment variable, value that asks for it, what distmnist says)
    ("ACCELERATE_USE_FSDP", "true", "FSDP"),
    ("ACCELERATE_USE_DEEPSPEED", "true", "DeepSpeed"),
    ("ACCELERATE_USE_MEGATRON_LM", "true", "Megatron-LM"),
)


def check_launch() -> None:
    """Refuse launcher settings distmnist does not implement, before Accelerate acts on them: it trains
    plain data parallel (DDP), one optimizer step per batch, eagerly or in a CUDA graph."""
    launched_world_size()  # a malformed WORLD_SIZE / RANK is a one-line error, not Accelerate's traceback
    if "ACCELERATE_DYNAMO_BACKEND" in os.environ and "MASTER_PORT" in os.environ and "WORLD_SIZE" not in os.environ:
        # accelerate launch's one-process launcher, which sets a rendezvous address only when it was asked for
        # several processes (with --cpu, or without --multi_gpu), and then starts one
        raise DistmnistError("accelerate launch was asked for several processes but started this one alone (it does "
                             "so with --cpu, or without --multi_gpu); refusing to train one process as if it were "
                             "several: on a CPU launch with --multi_gpu and ACCELERATE_USE_CPU=1, or use torchrun "
                             "--nproc_per_node N")
    for name, value, what in UNSUPPORTED_LAUNCH:
        if os.environ.get(name, "").lower() == value:
            raise DistmnistError(f"the launcher asks for {what} ({name}={os.environ[name]}); distmnist trains plain "
                                 "data parallel (DDP): launch without it (accelerate config, or its flags)")
    dynamo = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no")
    if dynamo.lower() not in ("no", ""):
        raise DistmnistError(f"the launcher asks for torch.compile (ACCELERATE_DYNAMO_BACKEND={dynamo}); distmnist "
                             "does not compile its step: launch with --dynamo_backend no")
    steps = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1")
    if steps.strip() != "1":
        raise DistmnistError(f"the launcher asks for gradient accumulation (ACCELERATE_GRADIENT_ACCUMULATION_STEPS="
                             f"{steps}), which distmnist does not implement (every batch is an optimizer step): launch "
                             "without it, and use --global-batch-size for a larger batch")


ELASTIC_POLL_S = 1.0  # how long a rank waits on a leader before it looks for a newer one


def restartable_launch() -> bool:
    """torchrun that may restart its workers (--max-restarts > 0) and hands them its own rendezvous store
    (TORCHELASTIC_USE_AGENT_STORE, the default since torch 2.5)."""
    return (os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0)


def fresh_store(timeout_s: float):
    """A namespace of torchrun's shared store that only this attempt's processes use.

    Every attempt of a restarted group meets in the same store, where the previous attempt's keys are
    still there: its ranks' addresses and barrier counters. A new process group reads them and either
    connects to a dead peer (gloo: "connectFullMesh failed ... Connection refused") or waits for a
    count that never comes (pytorch/pytorch#135712 and #167288: the per-attempt isolation by
    TORCHELASTIC_RESTART_COUNT is per machine, not per job). Here rank 0 draws a fresh name and
    publishes it; every other rank acknowledges the name it read with a nonce of its own, and takes it
    only once rank 0 has listed that very nonce, which no earlier attempt can have done."""
    from torch.distributed import PrefixStore, TCPStore

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                     timeout=timedelta(seconds=timeout_s))
    root, mine = f"distmnist/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}", secrets.token_hex(8)
    if rank == 0:
        store.set(f"{root}/leader", mine)
        acks = [f"{root}/ack/{mine}/{r}" for r in range(1, world)]
        if acks:
            store.wait(acks, timedelta(seconds=timeout_s))
        store.set(f"{root}/members/{mine}", json.dumps([store.get(key).decode() for key in acks]))
        return PrefixStore(f"{root}/{mine}/", store)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        leader = store.get(f"{root}/leader").decode()
        store.set(f"{root}/ack/{leader}/{rank}", mine)
        try:
            store.wait([f"{root}/members/{leader}"], timedelta(seconds=ELASTIC_POLL_S))
        except (RuntimeError, torch.distributed.DistError):  # not yet, or a leader of an earlier attempt
            continue
        if json.loads(store.get(f"{root}/members/{leader}"))[rank - 1] == mine:
            return PrefixStore(f"{root}/{leader}/", store)
        time.sleep(0.1)  # an earlier attempt's list: wait for this attempt's leader
    raise DistmnistError(f"rank {rank}: no rank 0 of this attempt appeared in torchrun's store within "
                         f"--setup-timeout {timeout_s:g} s")


def start_processes(cpu: bool, timeout_s: float):
    """Join the launch's process group (Accelerate's PartialState) with the set-up timeout; one line if
    it cannot be formed. Returns the state: num_processes, process_index, is_main_process, device."""
    from accelerate import PartialState

    check_launch()
    use_cpu = cpu or not torch.cuda.is_available()
    try:
        if restartable_launch() and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("gloo" if use_cpu else "nccl", store=fresh_store(timeout_s),
                                                 rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                                                 timeout=timedelta(seconds=timeout_s))
        state = PartialState(cpu=use_cpu, timeout=timedelta(seconds=timeout_s))
    except (ValueError, RuntimeError) as err:
        if launched_world_size() == 1:
            raise
        # WORLD_SIZE > 1 but no launcher-made rendezvous (MASTER_ADDR unset, the peers never came, a stale address)
        raise DistmnistError(
            f"WORLD_SIZE={launched_world_size()} but the process group could not be formed "
            f"({str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}); launch with torchrun "
            "or accelerate launch, which start every rank"
        ) from None
    if launched_world_size() > 1 and state.num_processes == 1:
        raise DistmnistError(
            f"the launcher started WORLD_SIZE={launched_world_size()} processes but this one runs alone "
            "(no process group); refusing to train independent copies. Launch with torchrun or accelerate launch "
            "and a working backend"
        )
    return state


def make_accelerator(cpu: bool, mixed_precision: str, log_with: str | None = None, project_dir: str | None = None):
    """The Accelerator over the process group start_processes joined (or a new one-process state).
    project_dir: where file-based trackers (tensorboard, ...) write, one folder per run id (init_trackers)."""
    from accelerate import Accelerator
    from accelerate.utils import AutocastKwargs, DistributedType

    check_launch()
    if log_with is not None:
        check_tracker(log_with)
    use_cpu = cpu or not torch.cuda.is_available()
    if mixed_precision == "fp16" and use_cpu:
        raise DistmnistError("--mixed-precision fp16 needs a CUDA GPU; on the CPU use --mixed-precision bf16 or no")
    handlers = [AutocastKwargs(cache_enabled=False)]  # the autocast cache must be off inside CUDA graphs
    accelerator = Accelerator(cpu=use_cpu, mixed_precision=mixed_precision, kwargs_handlers=handlers,
                              log_with=log_with, project_dir=project_dir)
    if accelerator.gradient_accumulation_steps != 1:
        raise DistmnistError(f"gradient accumulation ({accelerator.gradient_accumulation_steps} steps) is not "
                             "implemented: every batch is an optimizer step; use --global-batch-size for a larger "
                             "batch")
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        raise DistmnistError(f"{accelerator.distributed_type.value} is not supported: distmnist trains plain data "
                             "parallel (DDP)")
    return accelerator


def set_collective_timeout(seconds: float) -> None:
    """From set-up's long timeout to training's short one (--dist-timeout), as torchtitan does: a hung
    rank ends a training run within seconds of the limit, while set-up may verify and download."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return
    c10d = dist.distributed_c10d
    setter = getattr(c10d, "set_timeout", None) or c10d._set_pg_timeout
    setter(timedelta(seconds=seconds))


def shutdown(accelerator) -> None:
    """Meet, then tear the process group down while the interpreter is fully alive (gloo's worker
    threads can abort the process if it is left to interpreter exit)."""
    accelerator.wait_for_everyone()
    accelerator.end_training()


def gather_rng(accelerator, dropout: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """RNG state of every rank as (world, n) uint8 tensors, gathered to all ranks (every rank calls); with
    ``dropout`` (the global batch's mask generator, the same on every rank) also its state."""
    from accelerate.utils import gather

    states = {"cpu": torch.get_rng_state()}
    if accelerator.device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(accelerator.device)
    out = {}
    for name, state in states.items():
        out[name] = gather(state.to(accelerator.device).unsqueeze(0)).cpu().contiguous()
    if dropout is not None:
        out["dropout"] = dropout.get_state().clone()
    return out


def mixed_seed(*parts: int) -> int:
    """One 63-bit seed from several integers (splitmix64 steps): nearby inputs give unrelated streams."""
    x = 0x9E3779B97F4A7C15
    for part in parts:
        x = (x ^ (part & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x >> 1


def restore_rng(accelerator, rng: dict[str, torch.Tensor], written_on: str, seed: int, step: int,
                dropout_from_them: bool = True) -> list[str]:
    """Set this rank's generators from a checkpoint's rows (every rank's, as gather_rng saved them); what
    cannot be restored restarts from (seed, rank, step). Returns a notice per stream not restored that
    matters: with a global batch (``dropout_from_them`` False) training draws nothing from them."""
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device.type
    notices = []
    if rng["cpu"].shape[0] == world:
        torch.set_rng_state(rng["cpu"][rank].clone())
    else:
        torch.manual_seed(mixed_seed(seed, rank, step))  # also seeds CUDA: no stream repeats an earlier one
        if dropout_from_them:
            notices.append(f"the checkpoint was written by {rng['cpu'].shape[0]} process(es), this run has {world}: "
                           f"each rank's random stream (dropout) restarts from (seed, rank, step {step})")
    if not dropout_from_them:
        return notices
    if device == "cuda" and "cuda" in rng and rng["cpu"].shape[0] == world:
        torch.cuda.set_rng_state(rng["cuda"][rank].clone(), accelerator.device)
    elif device == "cuda" and rng["cpu"].shape[0] == world:
        torch.cuda.manual_seed(mixed_seed(seed, rank, step))
        notices.append(f"the checkpoint was written on the {written_on}, this run is on CUDA: the CUDA random "
                       "stream (dropout on the GPU) restarts from (seed, rank, step), so the run is not bit-exact")
    elif written_on == "cuda" and device != "cuda":
        notices.append("the checkpoint was written on CUDA, this run is on the CPU: CUDA's random streams are not "
                       "used, and the CPU's dropout masks differ from the GPU's, so the run is not bit-exact")
    return notices


# ---------------------------------------------------------------- sending the main process's decisions


def share_json(accelerator, value: Any) -> Any:
    """The main process's JSON-able ``value`` on every rank (others pass anything)."""
    raw = json.dumps(value).encode() if accelerator.is_main_process else None
    return json.loads(broadcast_bytes(accelerator, raw)) if accelerator.num_processes > 1 else value


def share_checkpoint(accelerator, ckpt: Checkpoint | None) -> Checkpoint | None:
    """The main process's checkpoint on every rank, content included (its state as JSON and its tensors
    as safetensors bytes over the process group: ranks on machines that share no filesystem resume from
    the same state, and nothing is pickled). Others pass None."""
    from safetensors.torch import load, save

    if accelerator.num_processes == 1:
        return ckpt
    meta = share_json(accelerator, {"path": str(ckpt.path), "state": ckpt.state.to_json()} if ckpt else None)
    blob = None
    if accelerator.is_main_process and ckpt is not None:
        groups = {g: getattr(ckpt, g) for g in CHECKPOINT_TENSORS}
        blob = save({f"{g}/{k}": v.contiguous() for g, part in groups.items() if part for k, v in part.items()})
    tensors = load(broadcast_bytes(accelerator, blob)) if meta is not None else {}
    if meta is None:
        return None
    parts: dict[str, dict[str, torch.Tensor]] = {g: {} for g in CHECKPOINT_TENSORS}
    for key, value in tensors.items():
        group, name = key.split("/", 1)
        parts[group][name] = value
    path = Path(meta["path"])
    return Checkpoint(path, parts["model"], parts["optimizer"], parts["rng"],
                      TrainState.from_json(meta["state"], path / "state.json"), parts["progress"] or None)


CHECKPOINT_TENSORS = ("model", "optimizer", "rng", "progress")


def on_main(accelerator, action: Callable[[], T], what: str) -> T | None:
    """Run ``action`` on the main process only (the others get None); whatever it raises ends every rank
    together, as one line: a DistmnistError as it is, an OSError with its path and reason, anything else
    with its type (on one process, an unforeseen exception keeps its traceback)."""
    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = action()
        except DistmnistError as err:
            error = err
        except OSError as err:
            where = f" {err.filename}" if getattr(err, "filename", None) else ""
            error = DistmnistError(f"{what}:{where} {err.strerror or err}")
        except Exception as err:
            if accelerator.num_processes == 1:
                raise
            error = RunFailed(f"{what}: {type(err).__name__}: {err}")
    agree(accelerator, error)
    return result


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
    from accelerate.utils import gather

    rows = gather(buf.to(accelerator.device).unsqueeze(0)).cpu()
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
    payload = (data or b"") if main else b""
    sent = torch.tensor([len(payload)], dtype=torch.int64, device=accelerator.device)
    length = int(broadcast(sent, from_process=0).item())
    buf = torch.zeros(length, dtype=torch.uint8)
    if main and length:
        buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
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
    if (error is not None and accelerator.process_index == rank
            and (accelerator.is_main_process or first["node"] != records[0]["node"])):
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
