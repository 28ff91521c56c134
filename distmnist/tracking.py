"""What the trackers of --log-with receive step by step, under which run name, and where each one
keeps its logs.

Every record goes to Accelerate's trackers on one axis, the optimizer step counted over the run:
the epoch records at the step that ends their epoch and, with --log-every N, the loss and learning
rate of every Nth step. Step losses reach the host once per epoch, in the same read as the epoch's
totals (engine.py), so logging them adds no host sync to the step.

One run name per run id (rundir.py): a resumed run continues its own curve and a new run starts a
new one. File-based trackers (tensorboard, ...) write to OUTPUT_DIR/logs/RUN_ID; the others (wandb,
mlflow, ...) keep the project "distmnist" and name the run by its id.
"""

from __future__ import annotations

from pathlib import Path

from .distributed import tracker_classes
from .schedule import ScheduleSpec

PROJECT = "distmnist"  # the project of trackers that are not file-based

# where trackers that do not write under the output folder keep their logs, by Accelerate's name
ELSEWHERE = {
    "wandb": "the W&B project 'distmnist' (offline with WANDB_MODE=offline: ./wandb)",
    "mlflow": "the MLflow experiment 'distmnist' (MLFLOW_TRACKING_URI, else ./mlruns)",
    "comet_ml": "the Comet project 'distmnist'",
    "clearml": "the ClearML project 'distmnist'",
    "dvclive": "./dvclive",
    "trackio": "the Trackio project 'distmnist'",
    "swanlab": "the SwanLab project 'distmnist'",
}


def logs_dir(output_dir: str | Path) -> Path:
    """Accelerate's project_dir for the run: file-based trackers write under it, one folder per run id."""
    return Path(output_dir) / "logs"


def file_based(name: str) -> bool:
    tracker = tracker_classes().get(name)
    return tracker is not None and getattr(tracker, "requires_logging_directory", False)


def destination(name: str, output_dir: str, run_id: str) -> str:
    """Where tracker `name` writes for this run, in words."""
    from accelerate.tracking import get_available_trackers

    if name == "all":
        return "; ".join(f"{t}: {destination(str(t), output_dir, run_id)}" for t in map(str, get_available_trackers()))
    if file_based(name):
        return str(logs_dir(output_dir) / run_id)
    return ELSEWHERE.get(name, f"{name}'s own store") + f", run {run_id}"


def init(accelerator, log_with: str | None, run_id: str, config: dict) -> None:
    """Start --log-with's tracker(s) for this run id (main process only, inside Accelerate)."""
    if log_with is None:
        return
    names = [str(t) for t in accelerator.log_with]
    per_run_folder = bool(names) and all(file_based(n) for n in names)
    accelerator.init_trackers(
        run_id if per_run_folder else PROJECT, config={"run_id": run_id, **config},
        init_kwargs={"wandb": {"name": run_id, "id": run_id, "resume": "allow"}, "mlflow": {"run_name": run_id}},
    )


def what(log_every: int) -> str:
    if log_every:
        return f"every epoch's metrics; step_loss and lr every {log_every} steps"
    return "every epoch's metrics"


def log_steps(accelerator, losses: list[float], first_step: int, every: int, spec: ScheduleSpec | None) -> int:
    """Send {step_loss, lr} for each optimizer step g (1-based over the run) with g % every == 0.

    losses[i] is the loss of step first_step + i + 1; the lr is the schedule's at that step (a pure
    function, evaluated here on the host). Main process only, like every accelerator.log call.
    Returns how many steps were logged.
    """
    sent = 0
    for i, loss in enumerate(losses):
        step = first_step + i + 1
        if every and step % every == 0:
            values = {"step_loss": loss}
            if spec is not None:
                values["lr"] = spec.value_at(step - 1)
            accelerator.log(values, step=step)
            sent += 1
    return sent
