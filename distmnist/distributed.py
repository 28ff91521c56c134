"""The one place that knows about processes: build the Accelerator, check the launch, move RNG state.

Accelerate owns devices and process groups. On a machine without CUDA the Accelerator is made
with ``cpu=True`` so that ``torchrun --nproc_per_node N`` becomes real N-process data parallel over
gloo instead of N processes that each believe they are alone.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch

from .errors import DistmnistError


def launched_world_size() -> int:
    """The world size the launcher (torchrun, accelerate launch, SLURM via them) asked for."""
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
    """project_dir: where file-based trackers (tensorboard, ...) write, under project_dir/distmnist."""
    from accelerate import Accelerator
    from accelerate.utils import AutocastKwargs, InitProcessGroupKwargs

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
